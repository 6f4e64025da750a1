"""The interface every KV cache implements, and the machinery several designs share.

``update(layer, k, v, positions) -> (keys, values, key_positions)``: store the new K/V (B, Hkv, T, D)
written at absolute ``positions`` (B, T) and return everything attention may look at, with the
absolute position of each returned slot (B, S; -1 marks an empty slot). The model builds its causal /
sliding-window mask from those positions, so no cache needs to know about masks.

Each design also states its own size: :meth:`KVCache.nbytes_for` is the closed form of what its
``nbytes`` reports, so :func:`kvlab.caches.kv_bytes` is a lookup, not a chain of cases.

Shared here: :class:`GrowingCache` (one tensor per layer, regrown by ``torch.cat``: ``concat``,
``int8``) and :class:`RowCache` (rows addressed by (row, position), ragged batches, a once-per-step
plan: ``static``, ``gqa``, ``sliding``, ``paged``).

Shape legend: B batch, T new tokens, S returned slots, Hkv KV heads, D head dim.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from kvlab.config import MistralConfig


def slot_bytes(config: MistralConfig, dtype: torch.dtype) -> int:
    """K and V of one position of one sequence, all layers: 2 x layers x Hkv x D x bytes/elem."""
    return 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * dtype.itemsize


class KVCache:
    """Base class. ``nbytes`` counts K/V storage only (the position bookkeeping is not KV memory)."""

    #: The name :data:`kvlab.caches.CACHES` registers the design under.
    kind: str = ""
    #: True: attention broadcasts KV heads over query groups instead of materialising repeat_kv.
    grouped: bool = False
    #: True when ``update`` accepts positions that differ per row and ``for_sequence`` works.
    ragged: bool = False
    #: True when decoding with this cache gives exactly the no-cache tokens (``int8`` rounds K/V).
    exact: bool = True

    @classmethod
    def from_config(cls, config: MistralConfig, batch_size: int, max_tokens: int | None,
                    device: torch.device | str, dtype: torch.dtype, **options: Any) -> KVCache:
        """The cache :func:`kvlab.caches.make_cache` builds for ``config``."""
        raise NotImplementedError

    @classmethod
    def nbytes_for(cls, config: MistralConfig, lengths: Sequence[int], dtype: torch.dtype, *,
                   max_tokens: int | None = None, **options: Any) -> int:
        """What ``nbytes`` reports once sequence ``b`` holds ``lengths[b]`` positions.

        ``max_tokens`` and ``options`` are what :func:`kvlab.caches.make_cache` would get; a design
        ignores those that do not change its size."""
        raise NotImplementedError

    def update(self, layer: int, k: Tensor, v: Tensor, positions: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        raise NotImplementedError

    def reset(self) -> None:
        raise NotImplementedError

    @property
    def seq_len(self) -> int:
        """Positions written so far (of sequence 0), i.e. where the next token goes."""
        raise NotImplementedError

    @property
    def nbytes(self) -> int:
        """Bytes of K/V held: by default every tensor of :meth:`tensors`."""
        return sum(t.nbytes for t in self.tensors())

    def tensors(self) -> list[Tensor]:
        """Every tensor the cache holds, for memory tools and leak checks."""
        raise NotImplementedError

    def for_sequence(self, b: int) -> KVCache:
        """A batch-of-one view writing into row ``b``, used to prefill ragged prompts one at a time."""
        raise NotImplementedError(f"{type(self).__name__} does not support ragged batches; use a design "
                                  "whose class sets ragged = True (kvlab.caches.CACHES lists them)")


# --------------------------------------------------------------------------- growing (torch.cat)
class GrowingCache(KVCache):
    """What the caches that grow with ``torch.cat`` share (``concat``, ``int8``): one entry per layer, set
    by the layer's first update and concatenated onto by every later one, with the positions alongside.
    Rows are stored rectangular, so every row holds the longest row's length."""

    def __init__(self, num_layers: int) -> None:
        self.num_layers = num_layers
        self.reset()

    @classmethod
    def from_config(cls, config: MistralConfig, batch_size: int, max_tokens: int | None,
                    device: torch.device | str, dtype: torch.dtype, **options: Any) -> GrowingCache:
        return cls(config.num_hidden_layers, **options)

    def reset(self) -> None:
        self.positions: list[Tensor | None] = [None] * self.num_layers

    def _store_positions(self, layer: int, positions: Tensor) -> Tensor:
        """Record a layer's new positions (B, T) and return all of them (B, S)."""
        if self.positions[layer] is None:
            self.positions[layer] = positions
        else:
            with torch.no_grad():  # bookkeeping only; positions never carry a graph
                self.positions[layer] = torch.cat([self.positions[layer], positions], dim=1)
        return self.positions[layer]

    @property
    def seq_len(self) -> int:
        return 0 if self.positions[0] is None else self.positions[0].shape[1]


# --------------------------------------------------------------------------- rows (row, position)
class SequenceView(KVCache):
    """Row ``b`` of a ragged-capable cache seen as a batch of one (shares the parent's storage)."""

    def __init__(self, parent: RowCache, row: int) -> None:
        if not 0 <= row < parent.batch_size:
            raise IndexError(f"sequence {row} out of range for a cache of batch size {parent.batch_size}")
        self.parent, self.row = parent, row
        self.grouped = parent.grouped

    def update(self, layer: int, k: Tensor, v: Tensor, positions: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return self.parent._update(layer, k, v, positions, self.row)

    def reset(self) -> None:
        raise RuntimeError("reset the parent cache, not a per-sequence view")

    @property
    def seq_len(self) -> int:
        return self.parent.lengths[self.row]

    @property
    def nbytes(self) -> int:
        return self.parent.nbytes

    def tensors(self) -> list[Tensor]:
        return self.parent.tensors()


class RowCache(KVCache):
    """Common plumbing for caches addressed by (row, position): per-row lengths, ragged views and a
    once-per-step plan.

    The model passes the same ``positions`` tensor to every layer of one forward, so the position
    bookkeeping (validation, slot indices, per-row lengths) is computed on layer 0's call and reused by
    the other layers while they see that same tensor: a decode step pays for it once, not once per
    layer. Validation runs before anything is written, so a rejected step leaves the cache unchanged.
    """

    ragged = True

    def __init__(self, num_layers: int, batch_size: int, num_kv_heads: int, head_dim: int,
                 device: torch.device | str, dtype: torch.dtype) -> None:
        self.num_layers, self.batch_size = num_layers, batch_size
        self.num_kv_heads, self.head_dim = num_kv_heads, head_dim
        self.device, self.dtype = torch.device(device), dtype

    def update(self, layer: int, k: Tensor, v: Tensor, positions: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return self._update(layer, k, v, positions, None)

    def for_sequence(self, b: int) -> KVCache:
        return SequenceView(self, b)

    @property
    def seq_len(self) -> int:
        return self.lengths[0]

    def _update(self, layer: int, k: Tensor, v: Tensor, positions: Tensor,
                row: int | None) -> tuple[Tensor, Tensor, Tensor]:
        key = self._plan_key
        if layer == 0 or key is None or key[0] is not positions or key[1] != row:
            self._check_kv(k, v, positions, row)
            self._plan = self._prepare(positions, row)  # validates, then updates bookkeeping
            self._plan_key = (positions, row)
        return self._write_read(layer, k, v, self._plan)

    def _check_kv(self, k: Tensor, v: Tensor, positions: Tensor, row: int | None) -> None:
        rows = self.batch_size if row is None else 1
        expected = (rows, self.num_kv_heads, positions.shape[-1], self.head_dim)
        if tuple(k.shape) != expected or tuple(v.shape) != expected or tuple(positions.shape) != expected[::2]:
            raise ValueError(f"{type(self).__name__}: expected k, v of shape {expected} and positions of "
                             f"shape {expected[::2]}, got {tuple(k.shape)}, {tuple(v.shape)}, "
                             f"{tuple(positions.shape)}")
        if k.dtype != self.dtype or v.dtype != self.dtype:
            raise TypeError(f"{type(self).__name__} stores {self.dtype}, got k/v of {k.dtype}/{v.dtype}")

    def _row_positions(self, positions: Tensor, row: int | None) -> tuple[list[int], list[list[int]]]:
        """(row indices, positions per row as Python ints); negative positions are rejected."""
        rows = list(range(self.batch_size)) if row is None else [row]
        pos = positions.tolist()
        if min(min(p) for p in pos) < 0:
            raise ValueError(f"{type(self).__name__}: positions must be >= 0")
        return rows, pos

    def _reset_rows(self) -> None:
        self.lengths: list[int] = [0] * self.batch_size
        self._plan_key: tuple[Tensor, int | None] | None = None
        self._plan: Any = None

    def _prepare(self, positions: Tensor, row: int | None) -> Any:
        raise NotImplementedError

    def _write_read(self, layer: int, k: Tensor, v: Tensor, plan: Any) -> tuple[Tensor, Tensor, Tensor]:
        raise NotImplementedError


# --------------------------------------------------------------------------- in-place writes
def write_plan(slots: list[list[int]], device: torch.device) -> tuple[str, Any]:
    """How to write T tokens per row into slot indices ``slots`` (rows x T) of dim 2 of a (B, Hkv, S, D)
    buffer: ``("slice", slice)`` when every row writes the same contiguous run (a plain copy),
    ``("index", idx (T,))`` when rows agree (``index_copy_``), else ``("scatter", (rows, slots))``."""
    first = slots[0]
    if all(s == first for s in slots):
        if first == list(range(first[0], first[0] + len(first))):
            return "slice", slice(first[0], first[0] + len(first))
        return "index", torch.tensor(first, device=device)
    rows = torch.arange(len(slots), device=device)[:, None].expand(-1, len(first))
    return "scatter", (rows, torch.tensor(slots, device=device))


def write(buf: Tensor, how: str, where: Any, src: Tensor) -> None:
    """Write ``src`` (B, Hkv, T, D) into ``buf`` (B, Hkv, S, D) in place, following :func:`write_plan`.

    In place on a buffer that does not require grad is legal under autograd: the buffer then carries a
    ``CopySlices`` / ``IndexCopyBackward`` node linking this write to every earlier one.
    """
    if how == "slice":
        buf[:, :, where] = src
    elif how == "index":
        buf.index_copy_(2, where, src)
    else:
        rows, slots = where  # (B, T) each
        buf[rows, :, slots] = src.transpose(1, 2)  # advanced indices first: target (B, T, Hkv, D)


def mark_static_address(*tensors: Tensor) -> None:
    """Tell ``torch.compile`` these buffers keep their address, so CUDA graphs may use them in place."""
    mark = getattr(getattr(torch, "_dynamo", None), "mark_static_address", None)
    if mark is not None:
        for t in tensors:
            mark(t)
