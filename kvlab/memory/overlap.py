"""Whether two tensors share memory: the same bytes of one storage, not merely one storage.

A loader may read one flat buffer and hand out weights as slices of it (one ``mmap``, one blob per
shard, a flattened parameter group): they all live in one storage, yet an in-place update of one
leaves the others untouched as long as their bytes do not overlap. Tied weights, and views of one
weight, do overlap. :func:`share_memory` tells the two apart exactly.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .census import keyed_storage

__all__ = ["storage_key", "share_memory"]

_EXACT_LIMIT = 1 << 24  # joint byte range up to which two strided views are compared byte by byte


def storage_key(t: Tensor) -> tuple[str, int] | None:
    """``(device, address)`` of the storage behind ``t``; ``None`` for tensors without memory of their
    own (meta, sparse, empty)."""
    found = keyed_storage(t) if t.numel() else None
    return found[0] if found is not None else None


def _byte_span(t: Tensor) -> tuple[int, int]:
    """[first, last + 1) byte offsets of ``t``'s elements inside its storage."""
    start = t.storage_offset() * t.element_size()
    extent = sum((n - 1) * abs(st) for n, st in zip(t.shape, t.stride()))
    return start, start + (extent + 1) * t.element_size()


def _byte_map(t: Tensor, lo: int, size: int) -> Tensor:
    """A bool map of the bytes ``t`` covers in ``[lo, lo + size)`` of its storage."""
    offsets = torch.tensor([t.storage_offset()])
    for n, stride in zip(t.shape, t.stride()):
        offsets = (offsets[:, None] + torch.arange(n) * stride).reshape(-1)  # element offsets, one dim at a time
    offsets = offsets * t.element_size() - lo
    covered = torch.zeros(size, dtype=torch.bool)
    for byte in range(t.element_size()):
        covered[offsets + byte] = True
    return covered


def share_memory(a: Tensor, b: Tensor) -> bool:
    """Whether ``a`` and ``b`` have at least one byte in common (an in-place update of one changes the other).

    Different storages never do; in one storage, byte ranges that do not intersect never do, and
    contiguous tensors cover their whole range. Strided views with holes (interleaved columns) are
    compared byte by byte when their joint range is at most ``_EXACT_LIMIT`` bytes, and count as
    sharing beyond that.
    """
    key = storage_key(a)
    if key is None or key != storage_key(b):
        return False
    (a0, a1), (b0, b1) = _byte_span(a), _byte_span(b)
    if a1 <= b0 or b1 <= a0:
        return False
    if a.is_contiguous() and b.is_contiguous():
        return True
    lo, hi = min(a0, b0), max(a1, b1)
    if hi - lo > _EXACT_LIMIT:
        return True
    return bool((_byte_map(a, lo, hi - lo) & _byte_map(b, lo, hi - lo)).any())
