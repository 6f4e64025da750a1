"""``concat``: the cache regrown with ``torch.cat`` at every step.

The design of Candle's ``KvCache`` and of transformers' ``DynamicCache``, and the one the incident ran.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from kvlab.caches.base import GrowingCache, slot_bytes
from kvlab.config import MistralConfig


class ConcatCache(GrowingCache):
    """Grows with ``torch.cat`` every step: each step's K/V is a new tensor computed from the last one.

    Under autograd the cache's ``grad_fn`` chain therefore links every decode step together.
    ``nbytes`` = 2 x layers x Hkv x D x tokens x batch x bytes/elem.
    """

    kind = "concat"

    @classmethod
    def nbytes_for(cls, config: MistralConfig, lengths: Sequence[int], dtype: torch.dtype, *,
                   max_tokens: int | None = None, **options: Any) -> int:
        return slot_bytes(config, dtype) * max(lengths, default=0) * len(lengths)

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
