"""CUDA caching-allocator snapshots: PyTorch's own memory history, recorded around a block of code.

The allocator's view names the Python and C++ stack of every block (``repeat_kv``, ``cat``) and shows
fragmentation, but not why memory stays alive: that is the autograd graph's business
(:mod:`kvlab.memory.retention`). CPU builds have no allocator history; use
:class:`~kvlab.memory.trace.MemoryTracer` there.
"""

from __future__ import annotations

import contextlib
import pickle
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from .trace import TracerError

__all__ = ["SnapshotFiles", "cuda_memory_snapshot"]

_snapshot_active = False


@dataclass
class SnapshotFiles:
    """Where a snapshot was written: the pickle for PyTorch's viewer, and a self-contained HTML page."""

    pickle_path: Path
    html_path: Path


@contextlib.contextmanager
def cuda_memory_snapshot(html_path: str | Path, pickle_path: str | Path | None = None, *,
                         max_entries: int = 100_000) -> Iterator[SnapshotFiles]:
    """Record the CUDA caching allocator's history while the block runs; write a snapshot and its HTML.

    The pickle opens in PyTorch's memory viewer; the HTML (``torch.cuda._memory_viz.trace_plot``)
    embeds the same snapshot and loads the viewer's script from PyTorch's CDN when opened. Recording is
    stopped on exit whatever happens, and the snapshot is still written if the block raised (that is
    when it is most useful, e.g. after an out-of-memory error). Raises :class:`TracerError` without a
    GPU, or when a snapshot is already being recorded.
    """
    global _snapshot_active
    if not torch.cuda.is_available():
        raise TracerError("CUDA memory snapshots need a CUDA build of PyTorch and a visible GPU "
                          f"(this is torch {torch.__version__}, cuda available: False); on CPU use MemoryTracer")
    if _snapshot_active:
        raise TracerError("a CUDA memory snapshot is already being recorded; snapshots cannot be nested")
    html_path = Path(html_path)
    pickle_path = Path(pickle_path) if pickle_path is not None else html_path.with_suffix(".pickle")
    from torch.cuda import _memory_viz

    _snapshot_active = True
    torch.cuda.memory._record_memory_history(max_entries=max_entries)
    try:
        yield SnapshotFiles(pickle_path, html_path)
    finally:
        try:
            torch.cuda.synchronize()
            snapshot = torch.cuda.memory._snapshot()  # what _dump_snapshot would pickle
            pickle_path.parent.mkdir(parents=True, exist_ok=True)
            with open(pickle_path, "wb") as f:
                pickle.dump(snapshot, f)
            html_path.parent.mkdir(parents=True, exist_ok=True)
            html_path.write_text(_memory_viz.trace_plot(snapshot))
        finally:
            torch.cuda.memory._record_memory_history(enabled=None)
            _snapshot_active = False
