"""What tensor storages and modules exist in this process right now, found through the garbage collector.

An exact tracer needs two such censuses: at the start, to know what was alive before it (the
*baseline*, and the modules whose names label allocations), and at the end, to find tensors that were
created while it ran but never passed through its dispatch mode: made in a thread it did not reach, or
built outside PyTorch's dispatcher. Only tensors with a Python object are found;
storages held by C++ alone (autograd's saved tensors) are not, which is why the census is a check and
the dispatch mode the measure.
"""

from __future__ import annotations

import gc
import weakref
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["StorageSet", "live_objects", "expand_modules", "storage_of", "keyed_storage", "charge", "unseen_storages"]

_CUDA_BLOCK = 512  # the CUDA caching allocator rounds every block up to this many bytes


def charge(nbytes: int, cuda: bool) -> int:
    """The bytes a storage of ``nbytes`` takes: CUDA's caching allocator rounds up to 512-byte blocks."""
    return -(-nbytes // _CUDA_BLOCK) * _CUDA_BLOCK if cuda and nbytes else nbytes


def live_objects() -> tuple[list[Tensor], list[nn.Module]]:
    """Every tensor and every module the garbage collector knows of now."""
    tensors: list[Tensor] = []
    modules: list[nn.Module] = []
    found = (None, tensors, modules)
    kinds: dict[type, int] = {}  # issubclass(_, Tensor) goes through a metaclass: ask once per type
    for obj in gc.get_objects():
        cls = type(obj)  # type() rather than isinstance(): some lazy module attributes warn on __class__
        kind = kinds.get(cls)
        if kind is None:
            kind = kinds[cls] = 1 if issubclass(cls, Tensor) else 2 if issubclass(cls, nn.Module) else 0
        if kind:
            found[kind].append(obj)  # type: ignore[union-attr]
    return tensors, modules


def expand_modules(items: Iterable[Tensor | nn.Module]) -> Iterator[Tensor]:
    """The tensors of ``items``: tensors as given, modules as their parameters and buffers."""
    for item in items:
        if isinstance(item, nn.Module):
            yield from item.parameters()
            yield from item.buffers()
        elif isinstance(item, Tensor):
            yield item
        else:
            raise TypeError(f"baseline items must be tensors or modules, got {type(item).__name__}")


def storage_of(t: Any, device_type: str | None) -> tuple[Any, int] | None:
    """``(untyped storage, address)`` of a tensor on ``device_type`` (any if ``None``), or ``None`` for
    tensors without memory of their own (sparse, meta, fake, other devices)."""
    try:
        if device_type is not None and t.device.type != device_type:
            return None
        st = t.untyped_storage()
        ptr = st.data_ptr()
    except (RuntimeError, NotImplementedError, TypeError):
        return None
    return (st, ptr) if ptr else None


def keyed_storage(t: Tensor) -> tuple[tuple[str, int], int] | None:
    """``((device, address), bytes)`` of the storage behind ``t`` on any device: the one identity of a
    storage (views of one buffer share it); ``None`` for tensors without memory of their own."""
    found = storage_of(t, None)
    return ((str(t.device), found[1]), found[0].nbytes()) if found is not None else None


class StorageSet:
    """Addresses of storages alive at some moment, each forgotten as soon as its storage dies (the
    address may then be reused by a new tensor). Also sums their bytes per device."""

    def __init__(self) -> None:
        self.refs: dict[int, weakref.ref] = {}
        self.bytes_by_device: dict[str, int] = {}

    def __contains__(self, ptr: int) -> bool:
        return ptr in self.refs

    def add_tensors(self, tensors: Iterable[Any], device_type: str | None) -> None:
        for t in tensors:
            found = storage_of(t, device_type)
            if found is None or found[1] in self.refs:
                continue
            st, ptr = found
            self.refs[ptr] = weakref.ref(st, self._forget(ptr))
            dev = str(t.device)
            self.bytes_by_device[dev] = self.bytes_by_device.get(dev, 0) + charge(st.nbytes(), t.is_cuda)

    def _forget(self, ptr: int) -> Callable[[weakref.ref], None]:
        refs = self.refs

        def forget(ref: weakref.ref) -> None:
            if refs.get(ptr) is ref:
                del refs[ptr]

        return forget

    def clear(self) -> None:
        self.refs.clear()  # dropping the references cancels their callbacks


# Dtypes PyTorch gives a Python number it wraps into a tensor (the 0.5 of ``x * 0.5``).
_NUMBER_DTYPES = (torch.float64, torch.int64, torch.complex128, torch.bool)


def _python_number(t: Tensor) -> bool:
    """True for what looks like a Python number wrapped into a tensor outside the dispatcher: autograd
    keeps them (``MulBackward0`` saves the 0.5 of ``x * 0.5``), and a dispatch mode gives them a Python
    object it never sees created. Each is one scalar of a few bytes, so skipping them costs nothing."""
    return t.dim() == 0 and t.dtype in _NUMBER_DTYPES and t.device.type == "cpu" and not t.requires_grad


def unseen_storages(known: Callable[[int], bool], device_type: str | None) -> dict[int, int]:
    """Address -> bytes of every storage alive now, held by a tensor, for which ``known(address)`` is
    false (Python numbers wrapped by PyTorch excepted)."""
    found: dict[int, int] = {}
    for t in live_objects()[0]:
        if _python_number(t):
            continue
        hit = storage_of(t, device_type)
        if hit is None or hit[1] in found or known(hit[1]):
            continue
        found[hit[1]] = charge(hit[0].nbytes(), t.is_cuda)
    return found
