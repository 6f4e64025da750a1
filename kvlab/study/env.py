"""The device a measured run runs on: freeing it between runs, and counting what a model holds.

Every experiment in one process must start from the same state, or one run's leftovers show up in
the next run's numbers: :func:`cleanup` collects garbage (the leak's graphs sit in reference cycles
only the collector frees) and, on CUDA, returns cached blocks and resets the peak counter.
"""

from __future__ import annotations

import gc
import math
from collections.abc import Iterable

import torch
from torch import Tensor, nn

__all__ = ["OOM", "cleanup", "cuda_allocated", "tensor_bytes", "model_bytes"]

#: The out-of-memory error of this torch build (``torch.OutOfMemoryError`` since 2.5).
OOM: type[Exception] = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)


def cleanup(device: str | torch.device = "cpu") -> None:
    """Collect garbage between runs; on CUDA also return cached blocks and reset the peak counter."""
    gc.collect()
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def cuda_allocated(device: torch.device) -> float:
    """Bytes the CUDA caching allocator has handed out on ``device``; NaN on other devices."""
    return float(torch.cuda.memory_allocated(device)) if device.type == "cuda" else math.nan


def tensor_bytes(tensors: Iterable[Tensor]) -> int:
    """Bytes of the distinct storages behind ``tensors`` (tied or shared weights counted once)."""
    seen: dict[int, int] = {}
    for t in tensors:
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def model_bytes(model: nn.Module) -> int:
    """Bytes of a model's parameters and buffers, each storage once."""
    return tensor_bytes([*model.parameters(), *model.buffers()])


def parse_device(name: str) -> torch.device:
    """The torch device a ``--device`` option names, refused with a one-line ``ValueError`` unless this
    machine has it: the one check behind every kvlab command's ``--device``."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name!r}: not a device name (kvlab runs on cpu, cuda or mps)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name}: CUDA is not available in this build of PyTorch / on this machine")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device {name}: MPS is not available on this machine")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"--device {name}: kvlab runs on cpu, cuda or mps")
    return device
