"""``sliding``: a ring of ``sliding_window`` slots, so memory stops growing once the window is full."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from kvlab.caches.base import RowCache, slot_bytes, write, write_plan
from kvlab.config import MistralConfig


class SlidingWindowCache(RowCache):
    """Ring of ``sliding_window`` slots, slot = position % window: once the window is full each new
    token overwrites the one that just left the window, so memory stops growing.

    Until the window fills, the ring grows one slot per token (so it holds min(tokens, window) slots).
    A multi-token call (a prefill) returns the ring's old slots followed by all new keys, because its
    earlier queries may need keys that its own later writes overwrite; only the last ``window`` new
    keys are then kept.

    ``nbytes`` = 2 x layers x Hkv x D x min(tokens, window) x batch x bytes/elem.
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
                    device: torch.device | str, dtype: torch.dtype, **options: Any) -> SlidingWindowCache:
        if config.sliding_window is None:
            raise ValueError("make_cache('sliding') needs a config with sliding_window set; this config "
                             "attends to every position (use 'static' or 'concat')")
        return cls(config.num_hidden_layers, batch_size, config.num_key_value_heads, config.head_dim,
                   config.sliding_window, device=device, dtype=dtype, **options)

    @classmethod
    def nbytes_for(cls, config: MistralConfig, lengths: Sequence[int], dtype: torch.dtype, *,
                   max_tokens: int | None = None, **options: Any) -> int:
        if config.sliding_window is None:
            raise ValueError("kv_bytes(kind='sliding') needs a config with sliding_window set")
        return slot_bytes(config, dtype) * min(max(lengths, default=0), config.sliding_window) * len(lengths)

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
        how, where = write_plan([[q % window for q in p[t - keep:]] for p in pos], self.device)
        # Bookkeeping.
        if capacity > old_capacity:
            pad = torch.full((self.batch_size, capacity - old_capacity), -1, dtype=torch.long, device=self.device)
            self.key_positions = torch.cat([self.key_positions, pad], dim=1)
        key_positions = self.key_positions if rsl is None else self.key_positions[rsl]
        write(key_positions[:, None, :, None], how, where, positions[:, None, t - keep:, None])
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
            write(view, how, where, new[:, :, skip:])
            if returned_positions is None:
                out.append(view)
        if returned_positions is None:
            returned_positions = self.key_positions if rsl is None else self.key_positions[rsl]
        return out[0], out[1], returned_positions

    def tensors(self) -> list[Tensor]:
        return [*self.keys, *self.values]
