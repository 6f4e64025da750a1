"""``int8``: the ``concat`` cache with K and V rounded to int8, dequantized on every read."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from kvlab.caches.base import GrowingCache
from kvlab.config import MistralConfig
from kvlab.quant import dequantize_int8, quantize_int8

#: Bytes of one int8 cache scale (one float32 per token, per KV head, for K and for V).
INT8_SCALE_BYTES = 4


class Int8Cache(GrowingCache):
    """``concat`` storage in int8 plus one float32 absmax scale per (token, KV head): (D + 4) bytes per
    head-token instead of D x bytes/elem. Not exact: decoding drifts from the float tokens eventually.

    ``nbytes`` = 2 x layers x Hkv x (D + 4) x tokens x batch.
    """

    kind = "int8"
    exact = False

    @classmethod
    def nbytes_for(cls, config: MistralConfig, lengths: Sequence[int], dtype: torch.dtype, *,
                   max_tokens: int | None = None, **options: Any) -> int:
        per_slot = 2 * config.num_hidden_layers * config.num_key_value_heads * (config.head_dim + INT8_SCALE_BYTES)
        return per_slot * max(lengths, default=0) * len(lengths)

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
