"""A small decode server with the "KV-cache leak", written in plain PyTorch.

Nothing here looks wrong at first sight. The model is an ordinary ``nn.Module``, so its weights require
grad (PyTorch's default for every parameter); ``model.eval()`` does not change that. The decode loop
forgot ``torch.no_grad()``. So every step records an autograd graph, the cache's ``torch.cat`` links
each step's graph to the previous one, and nothing recorded is ever freed: memory grows with the
square of the tokens generated, and a heap profiler blames ``repeat_kv`` and ``cat``.

    kvlab diagnose examples/leaky_server.py:run      # exit code 1: leak found, with the cause
    kvlab diagnose examples/fixed_server.py:run      # the fix: exit code 0

Shape legend: B batch, T new tokens, S cached positions, H query heads, Hkv KV heads, D head dim.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.profiler import record_function

VOCAB, DIM, HEADS, KV_HEADS, LAYERS = 1024, 128, 8, 2, 2
HEAD_DIM = DIM // HEADS


class KVCache:
    """One growing (K, V) pair per layer, each (B, Hkv, S, D), extended with ``torch.cat`` every step."""

    def __init__(self) -> None:
        self.keys: list[Tensor] = []
        self.values: list[Tensor] = []

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        if layer == len(self.keys):  # the first step fills the layer
            self.keys.append(k)
            self.values.append(v)
        else:
            self.keys[layer] = torch.cat([self.keys[layer], k], dim=2)
            self.values[layer] = torch.cat([self.values[layer], v], dim=2)
        return self.keys[layer], self.values[layer]


def repeat_kv(x: Tensor, n_rep: int) -> Tensor:
    """(B, Hkv, S, D) -> (B, Hkv * n_rep, S, D): each KV head shared by ``n_rep`` query heads, copied."""
    return x.repeat_interleave(n_rep, dim=1)


class Attention(nn.Module):
    def __init__(self, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.q = nn.Linear(DIM, HEADS * HEAD_DIM, bias=False)
        self.k = nn.Linear(DIM, KV_HEADS * HEAD_DIM, bias=False)
        self.v = nn.Linear(DIM, KV_HEADS * HEAD_DIM, bias=False)
        self.o = nn.Linear(HEADS * HEAD_DIM, DIM, bias=False)

    def forward(self, x: Tensor, cache: KVCache) -> Tensor:
        b, t, _ = x.shape
        q = self.q(x).view(b, t, HEADS, HEAD_DIM).transpose(1, 2)  # (B, H, T, D)
        k = self.k(x).view(b, t, KV_HEADS, HEAD_DIM).transpose(1, 2)  # (B, Hkv, T, D)
        v = self.v(x).view(b, t, KV_HEADS, HEAD_DIM).transpose(1, 2)
        k, v = cache.update(self.layer, k, v)  # (B, Hkv, S, D)
        with record_function("repeat_kv"):  # a named region: profilers and kvlab's tracer show this name
            k, v = repeat_kv(k, HEADS // KV_HEADS), repeat_kv(v, HEADS // KV_HEADS)  # (B, H, S, D)
        y = F.scaled_dot_product_attention(q, k, v)  # one new token attends to every cached one
        return self.o(y.transpose(1, 2).reshape(b, t, DIM))


class Block(nn.Module):
    def __init__(self, layer: int) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(DIM), nn.LayerNorm(DIM)
        self.attn = Attention(layer)
        self.mlp = nn.Sequential(nn.Linear(DIM, 4 * DIM), nn.GELU(), nn.Linear(4 * DIM, DIM))

    def forward(self, x: Tensor, cache: KVCache) -> Tensor:
        x = x + self.attn(self.norm1(x), cache)
        return x + self.mlp(self.norm2(x))


class TinyDecoder(nn.Module):
    """Embedding, ``LAYERS`` pre-norm blocks, a language-model head. No positional encoding: a toy."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, DIM)
        self.blocks = nn.ModuleList(Block(i) for i in range(LAYERS))
        self.norm = nn.LayerNorm(DIM)
        self.lm_head = nn.Linear(DIM, VOCAB, bias=False)

    def forward(self, ids: Tensor, cache: KVCache) -> Tensor:
        x = self.embed(ids)  # (B, T, C)
        for block in self.blocks:
            x = block(x, cache)
        return self.lm_head(self.norm(x))  # (B, T, V)


torch.manual_seed(0)
model = TinyDecoder().eval()  # the server's model, loaded once: eval() turns off dropout, not autograd


def run(steps: int, device: str = "cpu") -> KVCache:
    """Greedy-decode ``steps`` tokens from token 0 and return the cache the server keeps for the session."""
    model.to(device)
    cache = KVCache()
    token = torch.zeros(1, 1, dtype=torch.long, device=device)  # (B, T)
    for _ in range(steps):  # the bug: no torch.no_grad() around the loop
        logits = model(token, cache)
        token = logits[:, -1:].argmax(dim=-1)
    return cache
