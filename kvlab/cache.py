"""KV caches: one small interface, several designs.

Every cache implements ``update(layer, k, v, positions) -> (keys, values, key_positions)``: store the
new K/V (B, Hkv, T, D) written at absolute ``positions`` (B, T) and return everything attention may
look at, with the absolute position of each returned slot (B, S; -1 marks an empty slot). The model
builds its causal / sliding-window mask from those positions, so no cache needs to know about masks.

Shape legend: B batch, T new tokens, S returned slots, Hkv KV heads, D head dim.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .config import MistralConfig


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
        raise NotImplementedError

    def tensors(self) -> list[Tensor]:
        """Every tensor the cache holds, for memory tools and leak checks."""
        raise NotImplementedError


class ConcatCache(KVCache):
    """Grows with ``torch.cat`` every step, like Candle's ``KvCache`` and transformers' ``DynamicCache``.

    Each step's cache is a new tensor computed from the previous one, so under autograd the cache's
    ``grad_fn`` chain links every decode step together.
    """

    def __init__(self, num_layers: int) -> None:
        self.num_layers = num_layers
        self.reset()

    def reset(self) -> None:
        self.keys: list[Tensor | None] = [None] * self.num_layers
        self.values: list[Tensor | None] = [None] * self.num_layers
        self.positions: list[Tensor | None] = [None] * self.num_layers

    def update(self, layer: int, k: Tensor, v: Tensor, positions: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        if self.keys[layer] is None:
            self.keys[layer], self.values[layer], self.positions[layer] = k, v, positions
        else:
            with torch.no_grad():  # bookkeeping only; positions never carry a graph
                self.positions[layer] = torch.cat([self.positions[layer], positions], dim=1)
            self.keys[layer] = torch.cat([self.keys[layer], k], dim=2)  # (B, Hkv, S+T, D)
            self.values[layer] = torch.cat([self.values[layer], v], dim=2)
        return self.keys[layer], self.values[layer], self.positions[layer]

    @property
    def seq_len(self) -> int:
        return 0 if self.positions[0] is None else self.positions[0].shape[1]

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors())

    def tensors(self) -> list[Tensor]:
        return [t for t in (*self.keys, *self.values) if t is not None]


CACHES = {"concat": ConcatCache}


def make_cache(kind: str, config: MistralConfig, batch_size: int = 1, max_tokens: int | None = None,
               device: torch.device | str = "cpu", dtype: torch.dtype | None = None) -> KVCache:
    """Build a cache by name (``"concat"``, ...). ``max_tokens`` sizes preallocated designs."""
    if kind == "concat":
        return ConcatCache(config.num_hidden_layers)
    raise ValueError(f"unknown cache {kind!r}; choose from {sorted(CACHES)}")
