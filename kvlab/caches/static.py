"""``static``: K/V preallocated for ``max_tokens`` positions and written in place by position."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from kvlab.caches.base import RowCache, mark_static_address, slot_bytes, write, write_plan
from kvlab.config import MistralConfig
from kvlab.decode_attention import decode_attention
from kvlab.errors import CacheOverflowError


class StaticCache(RowCache):
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

    ``nbytes`` = 2 x layers x Hkv x D x max_tokens x batch x bytes/elem, whatever was written.
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
                    device: torch.device | str, dtype: torch.dtype, **options: Any) -> StaticCache:
        if max_tokens is None:
            raise ValueError(f"make_cache({cls.kind!r}) needs max_tokens (prompt + new tokens)")
        return cls(config.num_hidden_layers, batch_size, config.num_key_value_heads, config.head_dim,
                   max_tokens, device=device, dtype=dtype, **options)

    @classmethod
    def nbytes_for(cls, config: MistralConfig, lengths: Sequence[int], dtype: torch.dtype, *,
                   max_tokens: int | None = None, **options: Any) -> int:
        if max_tokens is None:
            raise ValueError(f"kv_bytes(kind={cls.kind!r}) needs max_tokens")
        return slot_bytes(config, dtype) * max_tokens * len(lengths)

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
                mark_static_address(*self.keys, *self.values, self.key_positions)
        self._reset_rows()

    def update(self, layer: int, k: Tensor, v: Tensor, positions: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        if self.uniform_positions and torch.compiler.is_compiling():  # host-side work is not allowed here
            index = positions[0]  # (T,): every row at the same positions
            self.keys[layer].index_copy_(2, index, k)
            self.values[layer].index_copy_(2, index, v)
            self._record_positions(layer, positions)
            return self.keys[layer], self.values[layer], self.key_positions
        return self._update(layer, k, v, positions, None)

    def attend(self, layer: int, qkv: Tensor, positions: Tensor, rope: tuple[Tensor, Tensor], num_heads: int,
               window: int | None, scale: float) -> Tensor:
        """One compiled decode step's attention for ``layer`` in one kernel (:mod:`kvlab.decode_attention`):
        rotary, the K/V write at ``positions`` (B, 1) and grouped attention, from the fused projection's
        output ``qkv`` (B, 1, (H + 2 Hkv) D). Only for ``uniform_positions`` caches under ``torch.compile``,
        where :meth:`update` would write the same slots."""
        self._record_positions(layer, positions)
        cos, sin = rope
        return decode_attention(qkv, cos, sin, self.keys[layer], self.values[layer], positions, num_heads,
                                window or 0, scale)

    def _record_positions(self, layer: int, positions: Tensor) -> None:
        """The compiled paths' bookkeeping: key positions of uniformly written rows, once per step (layer 0)."""
        if layer == 0:
            self.key_positions.index_copy_(1, positions[0], positions)

    def _prepare(self, positions: Tensor, row: int | None) -> Any:
        rows, pos = self._row_positions(positions, row)
        top = max(max(p) for p in pos)
        if top >= self.max_tokens:
            raise CacheOverflowError(
                f"{type(self).__name__} was built for max_tokens={self.max_tokens} positions (0.."
                f"{self.max_tokens - 1}); asked to write position {top}. Nothing was written; build the "
                f"cache with max_tokens >= prompt + new tokens.")
        how, where = write_plan(pos, self.device)
        # Bookkeeping; nothing above has mutated the cache.
        rsl = None if row is None else slice(row, row + 1)
        key_positions = self.key_positions if rsl is None else self.key_positions[rsl]
        write(key_positions[:, None, :, None], how, where, positions[:, None, :, None])
        for r, p in zip(rows, pos):
            self.lengths[r] = max(self.lengths[r], max(p) + 1)
        hi = (max(self.lengths[r] for r in rows)) if self.trim else None
        return rsl, how, where, hi

    def _write_read(self, layer: int, k: Tensor, v: Tensor, plan: Any) -> tuple[Tensor, Tensor, Tensor]:
        rsl, how, where, hi = plan
        keys, values = self.keys[layer], self.values[layer]
        if rsl is not None:
            keys, values = keys[rsl], values[rsl]
        write(keys, how, where, k)
        write(values, how, where, v)
        key_positions = self.key_positions if rsl is None else self.key_positions[rsl]
        if hi is not None:  # trim: only the written prefix
            return keys[:, :, :hi], values[:, :, :hi], key_positions[:, :hi]
        return keys, values, key_positions

    def tensors(self) -> list[Tensor]:
        return [*self.keys, *self.values]
