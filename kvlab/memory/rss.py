"""Resident set size over a decode loop: what ``top`` shows, with decode steps marked on it.

:func:`rss_timeline` runs a function while memory_profiler samples this process's RSS from a helper
process, and the loop marks each decode step through a callback (``generate``'s ``on_step``), which
records the time and the RSS at that instant. The result is two tidy tables: the samples, each placed
on a fractional decode-step axis, and one row per step.

RSS mixes the allocator's behaviour into the signal (see :func:`rss_vs_exact`, which compares it with the
exact tracer's bytes): glibc keeps freed heap pages resident, so RSS can stay high after tensors die.
:func:`honest_malloc_env` gives the environment for a child process in which large tensors come and go
with ``mmap``, so that RSS follows the tensors (glibc reads it at start-up only).
"""

from __future__ import annotations

import gc
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import psutil

from .trace import MemoryTracer
from .units import MiB, step_index

__all__ = ["rss_bytes", "RSSTimeline", "rss_timeline", "rss_vs_exact", "honest_malloc_env"]

_process = psutil.Process()


def rss_bytes() -> int:
    """This process's resident set size now, in bytes."""
    return _process.memory_info().rss


@dataclass
class RSSTimeline:
    """``samples``: ``time_s, rss_bytes, rss_mib, step_pos`` (fractional decode step, interpolated between
    marks; NaN before the first); ``steps``: ``step, time_s, rss_bytes, rss_mib`` read at each mark;
    ``result``: what the function returned; ``baseline_bytes``: RSS just before it started."""

    samples: pd.DataFrame
    steps: pd.DataFrame
    result: Any
    baseline_bytes: int

    @property
    def growth_bytes(self) -> int:
        """RSS at the last mark (or the last sample) minus RSS before the run."""
        last = self.steps["rss_bytes"].iloc[-1] if len(self.steps) else self.samples["rss_bytes"].iloc[-1]
        return int(last) - self.baseline_bytes


def rss_timeline(fn: Callable[[Callable[[Any], None]], Any], *, interval: float = 0.01) -> RSSTimeline:
    """Run ``fn(mark)`` while sampling RSS every ``interval`` seconds; ``mark`` is the step callback.

    ``mark`` accepts kvlab's ``Step``, an int, or nothing (counts up), so both of these work::

        rss_timeline(lambda mark: generate(model, prompt, 256, cache=cache, on_step=mark))
        rss_timeline(lambda mark: [mark(i) for i in my_loop()])
    """
    from memory_profiler import memory_usage

    marks: list[tuple[int, float, int]] = []

    def mark(step: Any = None) -> None:
        index = step_index(step, marks[-1][0] if marks else None)
        marks.append((index, time.time(), rss_bytes()))

    baseline = rss_bytes()
    # memory_profiler samples from a child process, in MiB (2**20 bytes), with time.time() stamps.
    usage, result = memory_usage((fn, (mark,), {}), interval=interval, timestamps=True, retval=True,
                                 max_iterations=1)
    samples = pd.DataFrame(usage, columns=["rss_mib", "time"])
    steps = pd.DataFrame(marks, columns=["step", "time", "rss_bytes"])
    t0 = samples["time"].iloc[0] if len(samples) else (steps["time"].iloc[0] if len(steps) else time.time())
    samples["time_s"] = samples["time"] - t0
    samples["rss_bytes"] = (samples["rss_mib"] * MiB).round().astype("int64")
    steps["time_s"] = steps["time"] - t0
    steps["rss_mib"] = steps["rss_bytes"] / MiB
    if len(steps) >= 2:
        pos = np.interp(samples["time_s"], steps["time_s"], steps["step"].astype(float),
                        left=np.nan, right=np.nan)
        after = samples["time_s"] > steps["time_s"].iloc[-1]
        pos[after.to_numpy()] = float(steps["step"].iloc[-1])
        samples["step_pos"] = pos
    else:
        samples["step_pos"] = np.nan
    return RSSTimeline(samples=samples[["time_s", "rss_bytes", "rss_mib", "step_pos"]],
                       steps=steps[["step", "time_s", "rss_bytes", "rss_mib"]], result=result,
                       baseline_bytes=baseline)


def rss_vs_exact(run: Callable[[Callable[[Any], None]], Any], *, untraced_first: bool = True) -> dict[str, Any]:
    """Compare RSS growth with exact tensor bytes for one decode loop, in this process.

    ``run(on_step)`` runs the loop and returns what it keeps (kept alive until both figures are read).
    With ``untraced_first`` the loop runs once without the tracer, measuring RSS growth free of the
    tracer's own bookkeeping; it is then dropped, and a second, traced run (the same computation, so the
    same tensors) gives the exact bytes.

    Why the two differ, and why to run this in a fresh process with ``MALLOC_MMAP_THRESHOLD_=65536``
    (see :func:`honest_malloc_env`): glibc serves blocks above its mmap threshold with ``mmap`` and
    returns them to the OS on free, but after freeing a large block it *raises* that threshold, so
    later large tensors come from the heap, whose freed pages stay resident. RSS then counts memory
    that no tensor holds. Fixing the threshold keeps large tensors on ``mmap``. What remains is real
    but not tensor storage: about 1 KiB per autograd graph node (the node, the tensor handles of its
    saved variables, malloc's headers), heap fragmentation among small tensors, and page rounding.
    That part grows with the number of nodes, not with tensor sizes, so it is a few percent at real
    model sizes but a third of the leak on a 256-wide toy with one sequence (kvlab's tests use four
    sequences to keep it near 10%). Exact bytes are the ones to reason with; RSS is what ``top`` shows.
    """
    result: dict[str, Any] = {}
    if untraced_first:
        gc.collect()
        before = rss_bytes()
        kept = run(lambda step: None)
        gc.collect()
        result["rss_growth_bytes"] = rss_bytes() - before
        del kept
        gc.collect()
    tracer = MemoryTracer(baseline="auto")
    before = rss_bytes()
    with tracer:
        kept = run(tracer.mark_step)
        gc.collect()
    traced_rss = rss_bytes() - before
    result["traced_rss_growth_bytes"] = traced_rss
    result.setdefault("rss_growth_bytes", traced_rss)
    result["exact_bytes"] = tracer.end_bytes
    result["exact_peak_bytes"] = tracer.peak_bytes
    result["ratio"] = result["rss_growth_bytes"] / max(tracer.end_bytes, 1)
    del kept
    return result


def honest_malloc_env(base: Mapping[str, str] | None = None, threshold: int = 65536) -> dict[str, str]:
    """An environment in which glibc serves every block of ``threshold`` bytes or more with ``mmap``.

    glibc's default threshold starts at 128 KiB and rises after large frees, after which big tensors
    come from the heap and their pages stay resident when freed; a fixed threshold stops that, so RSS
    follows the live tensors. Only a new process reads it: give it to the child's ``subprocess`` call.
    """
    env = dict(os.environ if base is None else base)
    env["MALLOC_MMAP_THRESHOLD_"] = str(threshold)
    return env
