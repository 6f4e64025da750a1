"""``paged``: a pool of fixed-size blocks shared by all sequences, plus one block table per sequence."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from kvlab.caches.base import RowCache, slot_bytes
from kvlab.config import MistralConfig


class PagedCache(RowCache):
    """A shared pool of fixed-size blocks plus one block table per sequence: a sequence owns
    ceil(len / block_size) blocks, so rows of different lengths waste at most one partly filled block
    each instead of padding to the longest row. Reads gather a row's blocks in table order.

    Sizes: ``nbytes`` = blocks allocated to sequences, 2 x layers x Hkv x D x block_size x bytes/elem
    per block, ceil(tokens / block_size) blocks per row (:meth:`nbytes_for`);
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
                    device: torch.device | str, dtype: torch.dtype, **options: Any) -> PagedCache:
        return cls(config.num_hidden_layers, batch_size, config.num_key_value_heads, config.head_dim,
                   max_tokens=max_tokens, device=device, dtype=dtype, **options)

    @classmethod
    def nbytes_for(cls, config: MistralConfig, lengths: Sequence[int], dtype: torch.dtype, *,
                   max_tokens: int | None = None, block_size: int = 16, **options: Any) -> int:
        return slot_bytes(config, dtype) * sum(math.ceil(n / block_size) * block_size for n in lengths)

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
