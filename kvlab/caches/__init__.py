"""KV caches: one small interface, several designs.

Every cache implements ``update(layer, k, v, positions) -> (keys, values, key_positions)``: store the
new K/V (B, Hkv, T, D) written at absolute ``positions`` (B, T) and return everything attention may
look at, with the absolute position of each returned slot (B, S; -1 marks an empty slot). The model
builds its causal / sliding-window mask from those positions, so no cache needs to know about masks.

The designs, and the one thing each changes:

========  ==================================================================  =====================
kind      storage                                                             ``nbytes`` counts
========  ==================================================================  =====================
concat    one tensor per layer, regrown with ``torch.cat`` every step           tokens
static    preallocated (B, Hkv, max_tokens, D), written in place by position    max_tokens
gqa       ``static`` storage, read by grouped attention (no repeat_kv copies)   max_tokens
sliding   ring of ``sliding_window`` slots, slot = position % window            min(tokens, window)
int8      ``concat`` storage in int8 + a float32 scale per (token, KV head)     tokens (int8 + scales)
paged     pool of fixed-size blocks + a block table per sequence                whole blocks in use
========  ==================================================================  =====================

None of them detaches anything: under autograd (trainable weights) every cache carries the graph of
every step that wrote into it, which is the point the notebooks make -- the cache design changes how
much a step keeps alive, never whether the graph is kept.

Ragged batches (rows with different prompt lengths): ``static``, ``gqa``, ``sliding`` and ``paged`` take
per-row positions. A ragged prompt is fed row by row through :meth:`KVCache.for_sequence` (a
batch-of-one view writing into row ``b``), then all rows decode together with per-row positions;
shorter rows see -1 key positions in the padding. :func:`generate_ragged` does exactly that.

Shape legend: B batch, T new tokens, S returned slots, Hkv KV heads, D head dim, W window,
NB pool blocks, BS block size.
"""

from __future__ import annotations

import contextlib
import math
import operator
from typing import TYPE_CHECKING, Any, Sequence

import torch
from torch import Tensor

from kvlab.config import MistralConfig
from kvlab.errors import CacheOverflowError
from kvlab.quant import dequantize_int8, quantize_int8

if TYPE_CHECKING:
    from torch import nn

#: Bytes of one int8 cache scale (one float32 per token, per KV head, for K and for V).
INT8_SCALE_BYTES = 4


class KVCache:
    """Base class. ``nbytes`` counts K/V storage only (the position bookkeeping is not KV memory)."""

    #: True: attention broadcasts KV heads over query groups instead of materialising repeat_kv.
    grouped: bool = False

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

    def for_sequence(self, b: int) -> "KVCache":
        """A batch-of-one view writing into row ``b``, used to prefill ragged prompts one at a time."""
        raise NotImplementedError(f"{type(self).__name__} does not support ragged batches; "
                                  f"use one of {sorted(k for k, c in CACHES.items() if c.ragged)}")

    #: True when ``update`` accepts positions that differ per row and ``for_sequence`` works.
    ragged: bool = False


class _GrowingCache(KVCache):
    """What the caches that grow with ``torch.cat`` share (``concat``, ``int8``): one entry per layer, set
    by the layer's first update and concatenated onto by every later one, with the positions alongside."""

    def __init__(self, num_layers: int) -> None:
        self.num_layers = num_layers
        self.reset()

    @classmethod
    def from_config(cls, config: MistralConfig, batch_size: int, max_tokens: int | None,
                    device: torch.device | str, dtype: torch.dtype) -> "_GrowingCache":
        return cls(config.num_hidden_layers)

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


class ConcatCache(_GrowingCache):
    """Grows with ``torch.cat`` every step, like Candle's ``KvCache`` and transformers' ``DynamicCache``.

    Each step's cache is a new tensor computed from the previous one, so under autograd the cache's
    ``grad_fn`` chain links every decode step together.
    """

    kind = "concat"

    def reset(self) -> None:
        self.keys: list[Tensor | None] = [None] * self.num_layers
        self.values: list[Tensor | None] = [None] * self.num_layers
        super().reset()

    def update(self, layer: int, k: Tensor, v: Tensor, positions: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        first = self.keys[layer] is None
        positions = self._store_positions(layer, positions)
        if first:
            self.keys[layer], self.values[layer] = k, v
        else:
            self.keys[layer] = torch.cat([self.keys[layer], k], dim=2)  # (B, Hkv, S+T, D)
            self.values[layer] = torch.cat([self.values[layer], v], dim=2)
        return self.keys[layer], self.values[layer], positions

    def tensors(self) -> list[Tensor]:
        return [t for t in (*self.keys, *self.values) if t is not None]


# --------------------------------------------------------------------------- shared helpers
class _SequenceView(KVCache):
    """Row ``b`` of a ragged-capable cache seen as a batch of one (shares the parent's storage)."""

    def __init__(self, parent: "_RowCache", row: int) -> None:
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


class _RowCache(KVCache):
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
        return _SequenceView(self, b)

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


def _compiling() -> bool:
    """True while ``torch.compile`` traces the code (which must then do nothing host-side)."""
    is_compiling = getattr(getattr(torch, "compiler", None), "is_compiling", None)
    return bool(is_compiling and is_compiling())


def _mark_static_address(*tensors: Tensor) -> None:
    """Tell ``torch.compile`` these buffers keep their address, so CUDA graphs may use them in place."""
    mark = getattr(getattr(torch, "_dynamo", None), "mark_static_address", None)
    if mark is not None:
        for t in tensors:
            mark(t)


def _write_plan(slots: list[list[int]], device: torch.device) -> tuple[str, Any]:
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


def _write(buf: Tensor, how: str, where: Any, src: Tensor) -> None:
    """Write ``src`` (B, Hkv, T, D) into ``buf`` (B, Hkv, S, D) in place, following :func:`_write_plan`.

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


# --------------------------------------------------------------------------- static / gqa
class StaticCache(_RowCache):
    """Preallocated (B, Hkv, max_tokens, D) buffers written in place at each token's position;
    attention sees all ``max_tokens`` slots, unwritten ones at key position -1 (fixed shapes, the
    design compiled decoders use). ``trim=True`` returns only the written prefix instead.

    ``uniform_positions=True`` is the compiled decoder's mode (:mod:`kvlab.fastpath`): the caller
    promises that every row is written at the same positions, so under ``torch.compile`` an update is
    two device-side ``index_copy_`` at ``positions[0]`` -- no host sync, no Python-side bookkeeping,
    nothing that changes between steps, as a CUDA graph needs (overflow is then not checked and
    ``seq_len``/``lengths`` stay where eager code last left them). Outside ``torch.compile`` the same
    cache validates and writes like any other, ragged rows included. Its buffers are marked as static
    addresses for the compiler, and :meth:`reset` keeps them (zeroed in place) unless a graph hangs off
    them; other static caches reset to fresh buffers.
    """

    kind = "static"

    def __init__(self, num_layers: int, batch_size: int, num_kv_heads: int, head_dim: int, max_tokens: int,
                 *, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                 trim: bool = False, uniform_positions: bool = False) -> None:
        if max_tokens is None or max_tokens <= 0:
            raise ValueError(f"{type(self).__name__} needs max_tokens > 0 (prompt + new tokens), got {max_tokens}")
        if uniform_positions and trim:
            raise ValueError(f"{type(self).__name__}: uniform_positions (compiled decoding) needs fixed shapes, "
                             "i.e. trim=False")
        super().__init__(num_layers, batch_size, num_kv_heads, head_dim, device, dtype)
        self.max_tokens, self.trim, self.uniform_positions = max_tokens, trim, uniform_positions
        self.keys: list[Tensor] = []
        self.reset()

    @classmethod
    def from_config(cls, config: MistralConfig, batch_size: int, max_tokens: int | None,
                    device: torch.device | str, dtype: torch.dtype, **options: Any) -> "StaticCache":
        if max_tokens is None:
            raise ValueError(f"make_cache({cls.kind!r}) needs max_tokens (prompt + new tokens)")
        return cls(config.num_hidden_layers, batch_size, config.num_key_value_heads, config.head_dim,
                   max_tokens, device=device, dtype=dtype, **options)

    def reset(self) -> None:
        buffers = [*self.keys, *self.values, self.key_positions] if self.keys else []
        if self.uniform_positions and buffers and not any(t.requires_grad or t.is_inference() for t in buffers):
            # In place: the buffers keep their addresses, which captured CUDA graphs replay on.
            for t in buffers[:-1]:
                t.zero_()
            self.key_positions.fill_(-1)
        else:
            # Fresh buffers: after a run with trainable weights the old ones carry a graph, and only
            # dropping them releases it (inference tensors cannot be written outside inference mode).
            shape = (self.batch_size, self.num_kv_heads, self.max_tokens, self.head_dim)
            self.keys = [torch.zeros(shape, device=self.device, dtype=self.dtype) for _ in range(self.num_layers)]
            self.values = [torch.zeros(shape, device=self.device, dtype=self.dtype) for _ in range(self.num_layers)]
            self.key_positions = torch.full((self.batch_size, self.max_tokens), -1, dtype=torch.long,
                                            device=self.device)  # (B, max_tokens)
            if self.uniform_positions:
                _mark_static_address(*self.keys, *self.values, self.key_positions)
        self._reset_rows()

    def update(self, layer: int, k: Tensor, v: Tensor, positions: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        if self.uniform_positions and _compiling():
            index = positions[0]  # (T,): every row at the same positions
            self.keys[layer].index_copy_(2, index, k)
            self.values[layer].index_copy_(2, index, v)
            if layer == 0:
                self.key_positions.index_copy_(1, index, positions)
            return self.keys[layer], self.values[layer], self.key_positions
        return self._update(layer, k, v, positions, None)

    def _prepare(self, positions: Tensor, row: int | None) -> Any:
        rows, pos = self._row_positions(positions, row)
        top = max(max(p) for p in pos)
        if top >= self.max_tokens:
            raise CacheOverflowError(
                f"{type(self).__name__} was built for max_tokens={self.max_tokens} positions (0.."
                f"{self.max_tokens - 1}); asked to write position {top}. Nothing was written; build the "
                f"cache with max_tokens >= prompt + new tokens.")
        how, where = _write_plan(pos, self.device)
        # Bookkeeping; nothing above has mutated the cache.
        rsl = None if row is None else slice(row, row + 1)
        key_positions = self.key_positions if rsl is None else self.key_positions[rsl]
        _write(key_positions[:, None, :, None], how, where, positions[:, None, :, None])
        for r, p in zip(rows, pos):
            self.lengths[r] = max(self.lengths[r], max(p) + 1)
        hi = (max(self.lengths[r] for r in rows)) if self.trim else None
        return rsl, how, where, hi

    def _write_read(self, layer: int, k: Tensor, v: Tensor, plan: Any) -> tuple[Tensor, Tensor, Tensor]:
        rsl, how, where, hi = plan
        keys, values = self.keys[layer], self.values[layer]
        if rsl is not None:
            keys, values = keys[rsl], values[rsl]
        _write(keys, how, where, k)
        _write(values, how, where, v)
        key_positions = self.key_positions if rsl is None else self.key_positions[rsl]
        if hi is not None:  # trim: only the written prefix
            return keys[:, :, :hi], values[:, :, :hi], key_positions[:, :hi]
        return keys, values, key_positions

    def tensors(self) -> list[Tensor]:
        return [*self.keys, *self.values]


class GroupedCache(StaticCache):
    """``static`` storage read by grouped attention: each KV head is broadcast over its query group, so
    attention never materialises repeat_kv copies. The cache is exactly as large as ``static``; the
    saving (a factor ``n_rep`` = H / Hkv) is in attention's per-step working set, not in ``nbytes``.

    It returns only the written prefix by default (``trim=True``), so attention reads exactly the K/V
    that exist: with ``concat`` + repeat_kv reading n_rep copies of the same span, the per-step K/V
    working set is 1/n_rep of that.
    """

    kind = "gqa"
    grouped = True

    def __init__(self, num_layers: int, batch_size: int, num_kv_heads: int, head_dim: int, max_tokens: int,
                 *, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                 trim: bool = True, uniform_positions: bool = False) -> None:
        super().__init__(num_layers, batch_size, num_kv_heads, head_dim, max_tokens, device=device, dtype=dtype,
                         trim=trim, uniform_positions=uniform_positions)


# --------------------------------------------------------------------------- sliding window
class SlidingWindowCache(_RowCache):
    """Ring of ``sliding_window`` slots, slot = position % window: once the window is full each new
    token overwrites the one that just left the window, so memory stops growing.

    Until the window fills, the ring grows one slot per token (so it holds min(tokens, window) slots).
    A multi-token call (a prefill) returns the ring's old slots followed by all new keys, because its
    earlier queries may need keys that its own later writes overwrite; only the last ``window`` new
    keys are then kept.
    """

    kind = "sliding"

    def __init__(self, num_layers: int, batch_size: int, num_kv_heads: int, head_dim: int, window: int,
                 *, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> None:
        if window is None or window <= 0:
            raise ValueError(f"the sliding cache needs a positive window (config.sliding_window), got {window}; "
                             "this config attends to every position, use 'static' or 'concat'")
        super().__init__(num_layers, batch_size, num_kv_heads, head_dim, device, dtype)
        self.window = window
        self.reset()

    @classmethod
    def from_config(cls, config: MistralConfig, batch_size: int, max_tokens: int | None,
                    device: torch.device | str, dtype: torch.dtype) -> "SlidingWindowCache":
        if config.sliding_window is None:
            raise ValueError("make_cache('sliding') needs a config with sliding_window set; this config "
                             "attends to every position (use 'static' or 'concat')")
        return cls(config.num_hidden_layers, batch_size, config.num_key_value_heads, config.head_dim,
                   config.sliding_window, device=device, dtype=dtype)

    def reset(self) -> None:
        empty = (self.batch_size, self.num_kv_heads, 0, self.head_dim)
        self.keys = [torch.zeros(empty, device=self.device, dtype=self.dtype) for _ in range(self.num_layers)]
        self.values = [torch.zeros(empty, device=self.device, dtype=self.dtype) for _ in range(self.num_layers)]
        self.key_positions = torch.full((self.batch_size, 0), -1, dtype=torch.long, device=self.device)  # (B, C)
        self._reset_rows()

    def _prepare(self, positions: Tensor, row: int | None) -> Any:
        rows, pos = self._row_positions(positions, row)
        t, window = len(pos[0]), self.window
        for p in pos:
            if p != list(range(p[0], p[0] + t)):
                raise ValueError("sliding cache: the positions of one call must be consecutive in every row")
        lengths = list(self.lengths)
        for r, p in zip(rows, pos):
            lengths[r] = max(lengths[r], p[-1] + 1)
        capacity, old_capacity = min(window, max(lengths)), self.key_positions.shape[1]
        rsl = None if row is None else slice(row, row + 1)
        through = t > 1  # a prefill: return old slots + every new key (see class docstring)
        returned_positions = None
        if through:
            old = self.key_positions if rsl is None else self.key_positions[rsl]
            returned_positions = torch.cat([old, positions], dim=1) if old_capacity else positions  # (B, C+T)
        keep = min(t, window)
        how, where = _write_plan([[q % window for q in p[t - keep:]] for p in pos], self.device)
        # Bookkeeping.
        if capacity > old_capacity:
            pad = torch.full((self.batch_size, capacity - old_capacity), -1, dtype=torch.long, device=self.device)
            self.key_positions = torch.cat([self.key_positions, pad], dim=1)
        key_positions = self.key_positions if rsl is None else self.key_positions[rsl]
        _write(key_positions[:, None, :, None], how, where, positions[:, None, t - keep:, None])
        self.lengths = lengths
        return rsl, capacity, t - keep, how, where, returned_positions

    def _write_read(self, layer: int, k: Tensor, v: Tensor, plan: Any) -> tuple[Tensor, Tensor, Tensor]:
        rsl, capacity, skip, how, where, returned_positions = plan
        out = []
        for store, new in ((self.keys, k), (self.values, v)):
            ring = store[layer]  # (B, Hkv, C, D)
            if returned_positions is not None:
                old = ring if rsl is None else ring[rsl]
                out.append(torch.cat([old, new], dim=2) if ring.shape[2] else new)  # before overwriting
            if ring.shape[2] < capacity:  # still filling the window: grow by the missing slots
                grow = ring.new_zeros(ring.shape[0], ring.shape[1], capacity - ring.shape[2], ring.shape[3])
                ring = store[layer] = torch.cat([ring, grow], dim=2)
            view = ring if rsl is None else ring[rsl]
            _write(view, how, where, new[:, :, skip:])
            if returned_positions is None:
                out.append(view)
        if returned_positions is None:
            returned_positions = self.key_positions if rsl is None else self.key_positions[rsl]
        return out[0], out[1], returned_positions

    def tensors(self) -> list[Tensor]:
        return [*self.keys, *self.values]


# --------------------------------------------------------------------------- int8
class Int8Cache(_GrowingCache):
    """``concat`` storage with K and V rounded to int8 plus one float32 absmax scale per (token, KV head),
    dequantized on every read: (D + 4) bytes per head-token instead of D x elem_size. Not exact."""

    kind = "int8"

    def reset(self) -> None:
        # Per layer: int8 K, K scales, int8 V, V scales -- (B, Hkv, S, D) int8 / (B, Hkv, S, 1) float32.
        self.stores: list[list[Tensor] | None] = [None] * self.num_layers
        super().reset()

    def update(self, layer: int, k: Tensor, v: Tensor, positions: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        new = [*quantize_int8(k, keepdim=True, differentiable=True),
               *quantize_int8(v, keepdim=True, differentiable=True)]
        if self.stores[layer] is None:
            self.stores[layer] = new
        else:
            self.stores[layer] = [torch.cat([old, part], dim=2) for old, part in zip(self.stores[layer], new)]
        positions = self._store_positions(layer, positions)
        kq, ks, vq, vs = self.stores[layer]
        return dequantize_int8(kq, ks, k.dtype), dequantize_int8(vq, vs, v.dtype), positions

    def tensors(self) -> list[Tensor]:
        return [t for store in self.stores if store is not None for t in store]


# --------------------------------------------------------------------------- paged
class PagedCache(_RowCache):
    """A shared pool of fixed-size blocks plus one block table per sequence: a sequence owns
    ceil(len / block_size) blocks, so rows of different lengths waste at most one partly filled block
    each instead of padding to the longest row. Reads gather a row's blocks in table order.

    Sizes: ``nbytes`` = blocks allocated to sequences (what :func:`kv_bytes` predicts);
    ``used_bytes`` = slots actually written; ``waste_bytes`` = their difference (< one block per row);
    ``pool_bytes`` = the pool tensors as allocated, free blocks and the reserved null block included.
    The pool starts with ``num_blocks`` usable blocks (default: enough for ``max_tokens`` per row) and
    doubles when it runs out. Block 0 is a null block (never written, positions -1) that pads the block
    tables of shorter rows.
    """

    kind = "paged"

    def __init__(self, num_layers: int, batch_size: int, num_kv_heads: int, head_dim: int, *,
                 block_size: int = 16, num_blocks: int | None = None, max_tokens: int | None = None,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> None:
        if block_size <= 0:
            raise ValueError(f"block_size must be positive, got {block_size}")
        super().__init__(num_layers, batch_size, num_kv_heads, head_dim, device, dtype)
        self.block_size = block_size
        if num_blocks is None:
            num_blocks = batch_size * (math.ceil(max_tokens / block_size) if max_tokens else 4)
        self.initial_blocks = num_blocks
        self.reset()

    @classmethod
    def from_config(cls, config: MistralConfig, batch_size: int, max_tokens: int | None,
                    device: torch.device | str, dtype: torch.dtype, **options: Any) -> "PagedCache":
        return cls(config.num_hidden_layers, batch_size, config.num_key_value_heads, config.head_dim,
                   max_tokens=max_tokens, device=device, dtype=dtype, **options)

    def reset(self) -> None:
        shape = (self.initial_blocks + 1, self.num_kv_heads, self.block_size, self.head_dim)  # +1: null block
        self.key_pool = [torch.zeros(shape, device=self.device, dtype=self.dtype) for _ in range(self.num_layers)]
        self.value_pool = [torch.zeros(shape, device=self.device, dtype=self.dtype) for _ in range(self.num_layers)]
        self.position_pool = torch.full((shape[0], self.block_size), -1, dtype=torch.long,
                                        device=self.device)  # (NB, BS)
        self.free_blocks: list[int] = list(range(self.initial_blocks, 0, -1))  # pop() hands out 1, 2, ...
        self.block_tables: list[list[int]] = [[] for _ in range(self.batch_size)]
        self._reset_rows()

    # ----------------------------------------------------------------- block allocation
    def _grow_pool(self) -> None:
        """Double the pool (a reallocation; a real server would preempt a sequence instead)."""
        old = self.position_pool.shape[0]
        extra = old - 1 or 1
        for pool in (self.key_pool, self.value_pool):
            for layer, tensor in enumerate(pool):
                pool[layer] = torch.cat([tensor, tensor.new_zeros(extra, *tensor.shape[1:])])
        pad = torch.full((extra, self.block_size), -1, dtype=torch.long, device=self.device)
        self.position_pool = torch.cat([self.position_pool, pad])
        self.free_blocks = list(range(old + extra - 1, old - 1, -1)) + self.free_blocks

    def _allocate(self, row: int) -> None:
        if not self.free_blocks:
            self._grow_pool()
        block = self.free_blocks.pop()
        self.position_pool[block] = -1
        self.block_tables[row].append(block)

    def free_sequence(self, b: int) -> None:
        """Return row ``b``'s blocks to the pool (a finished request); the row can then start over."""
        self.free_blocks.extend(reversed(self.block_tables[b]))
        self.block_tables[b] = []
        self.lengths[b] = 0
        self._plan_key = None

    # ----------------------------------------------------------------- update
    def _prepare(self, positions: Tensor, row: int | None) -> Any:
        rows, pos = self._row_positions(positions, row)
        bs = self.block_size
        # Bookkeeping (validation is done): allocate blocks, then record positions.
        for r, p in zip(rows, pos):
            while len(self.block_tables[r]) <= max(p) // bs:
                self._allocate(r)
            self.lengths[r] = max(self.lengths[r], max(p) + 1)
        blocks = torch.tensor([self.block_tables[r][q // bs] for r, p in zip(rows, pos) for q in p],
                              device=self.device)  # (B*T,)
        offsets = torch.tensor([q % bs for p in pos for q in p], device=self.device)  # (B*T,)
        self.position_pool[blocks, offsets] = positions.reshape(-1)
        width = max(len(self.block_tables[r]) for r in rows)
        table = torch.tensor([self.block_tables[r] + [0] * (width - len(self.block_tables[r])) for r in rows],
                             device=self.device)  # (B, nb), padded with the null block
        key_positions = self.position_pool[table].reshape(len(rows), width * bs)  # (B, nb*BS)
        return blocks, offsets, table, key_positions

    def _write_read(self, layer: int, k: Tensor, v: Tensor, plan: Any) -> tuple[Tensor, Tensor, Tensor]:
        blocks, offsets, table, key_positions = plan
        b, hkv, t, d = k.shape
        out = []
        for pool, new in ((self.key_pool[layer], k), (self.value_pool[layer], v)):
            pool[blocks, :, offsets] = new.transpose(1, 2).reshape(b * t, hkv, d)  # (B*T, Hkv, D)
            gathered = pool[table]  # (B, nb, Hkv, BS, D)
            out.append(gathered.transpose(1, 2).reshape(b, hkv, -1, d))  # (B, Hkv, nb*BS, D)
        return out[0], out[1], key_positions

    # ----------------------------------------------------------------- sizes
    @property
    def block_bytes(self) -> int:
        """K and V of one block, all layers."""
        return 2 * self.num_layers * self.num_kv_heads * self.block_size * self.head_dim * self.dtype.itemsize

    @property
    def nbytes(self) -> int:
        return sum(len(t) for t in self.block_tables) * self.block_bytes

    @property
    def used_bytes(self) -> int:
        return sum(self.lengths) * self.block_bytes // self.block_size

    @property
    def waste_bytes(self) -> int:
        return self.nbytes - self.used_bytes

    @property
    def pool_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors())

    def tensors(self) -> list[Tensor]:
        return [*self.key_pool, *self.value_pool]


# --------------------------------------------------------------------------- registry
CACHES: dict[str, type[KVCache]] = {
    "concat": ConcatCache,
    "static": StaticCache,
    "gqa": GroupedCache,
    "sliding": SlidingWindowCache,
    "int8": Int8Cache,
    "paged": PagedCache,
}
#: Variants whose tokens equal the no-cache run's exactly (``int8`` rounds K/V).
EXACT_CACHES = ("concat", "static", "gqa", "sliding", "paged")


def make_cache(kind: str, config: MistralConfig, batch_size: int = 1, max_tokens: int | None = None,
               device: torch.device | str = "cpu", dtype: torch.dtype | None = None, **options: Any) -> KVCache:
    """Build a cache by name (see :data:`CACHES`). ``max_tokens`` (prompt + new tokens) sizes the
    preallocated designs (required by ``static``/``gqa``, sizes ``paged``'s initial pool). ``options``
    go to the class: ``trim`` for static/gqa, ``block_size``/``num_blocks`` for paged."""
    try:
        cls = CACHES[kind]
    except KeyError:
        raise ValueError(f"unknown cache {kind!r}; choose from {sorted(CACHES)}") from None
    return cls.from_config(config, batch_size, max_tokens, device, dtype or config.dtype, **options)


def kv_bytes(config: MistralConfig, batch: int, tokens: int | Sequence[int], dtype: torch.dtype | None = None,
             kind: str = "concat", *, max_tokens: int | None = None, block_size: int = 16) -> int:
    """Bytes of K/V a ``kind`` cache holds for ``batch`` sequences of ``tokens`` positions each (or one
    length per sequence, for ragged batches). Equal to the cache's ``nbytes``:

    - exact, growing (``concat``): 2 x layers x Hkv x D x tokens x batch x bytes/elem;
    - ``static``/``gqa``: max_tokens instead of tokens (preallocated);
    - ``sliding``: min(tokens, window);
    - ``int8``: 1 byte per element plus a float32 scale per (token, KV head), for K and V;
    - ``paged``: ceil(tokens / block_size) x block_size per sequence.

    Rectangular designs hold every row at the longest row's length.
    """
    if kind not in CACHES:
        raise ValueError(f"unknown cache {kind!r}; choose from {sorted(CACHES)}")
    # operator.index: numpy integers (e.g. from np.arange) are welcome, floats are not.
    if isinstance(tokens, Sequence):
        lengths = [operator.index(t) for t in tokens]
    else:
        lengths = [operator.index(tokens)] * batch
    if len(lengths) != batch:
        raise ValueError(f"got {len(lengths)} sequence lengths for batch {batch}")
    elem = (dtype or config.dtype).itemsize
    per_slot = 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim  # elements
    longest = max(lengths, default=0)
    if kind in ("static", "gqa"):
        if max_tokens is None:
            raise ValueError(f"kv_bytes(kind={kind!r}) needs max_tokens")
        return per_slot * max_tokens * batch * elem
    if kind == "sliding":
        if config.sliding_window is None:
            raise ValueError("kv_bytes(kind='sliding') needs a config with sliding_window set")
        return per_slot * min(longest, config.sliding_window) * batch * elem
    if kind == "int8":
        scales = 2 * config.num_hidden_layers * config.num_key_value_heads * INT8_SCALE_BYTES
        return (per_slot + scales) * longest * batch
    if kind == "paged":
        return per_slot * sum(math.ceil(n / block_size) * block_size for n in lengths) * elem
    return per_slot * longest * batch * elem


# --------------------------------------------------------------------------- ragged decoding
def generate_ragged(model: "nn.Module", prompts: list[list[int]], max_new_tokens: int, cache: KVCache,
                    *, inference_mode: bool = False) -> list[Tensor]:
    """Greedy decoding of prompts of different lengths in one batch; returns, per row, the prompt
    followed by ``max_new_tokens`` tokens (1-D tensors).

    Each prompt is prefilled alone through ``cache.for_sequence(b)`` (no padding tokens ever enter the
    model), then all rows decode together, row ``b`` at its own position ``len(prompt_b) + step``; key
    slots a shorter row has not written come back at position -1 and are masked. Like
    :func:`kvlab.generate.generate`, grad mode is left alone unless ``inference_mode`` is set.
    """
    if not cache.ragged:
        cache.for_sequence(0)  # raises the "not supported" error with the list of variants that are
    if len(prompts) != cache.batch_size:
        raise ValueError(f"{len(prompts)} prompts for a cache of batch size {cache.batch_size}")
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    device = next(model.parameters()).device
    generated: list[Tensor] = []  # (B, 1) tokens per step
    with torch.inference_mode() if inference_mode else contextlib.nullcontext():
        firsts = []
        for b, prompt in enumerate(prompts):
            ids = torch.tensor([prompt], device=device)  # (1, T_b)
            positions = torch.arange(len(prompt), device=device)[None]
            logits = model(ids, positions=positions, cache=cache.for_sequence(b), last_only=True)[:, -1]
            firsts.append(logits.argmax(dim=-1, keepdim=True))  # (1, 1)
        tokens = torch.cat(firsts)  # (B, 1)
        positions = torch.tensor([[len(p)] for p in prompts], device=device)  # (B, 1)
        if max_new_tokens > 0:
            generated.append(tokens)
        for _ in range(max_new_tokens - 1):
            logits = model(tokens, positions=positions, cache=cache, last_only=True)[:, -1]
            tokens = logits.argmax(dim=-1, keepdim=True)
            positions = positions + 1
            generated.append(tokens)
        new = torch.cat(generated, dim=1).cpu() if generated else torch.empty(len(prompts), 0, dtype=torch.long)
    return [torch.cat([torch.tensor(p, dtype=torch.long), new[b]]) for b, p in enumerate(prompts)]
