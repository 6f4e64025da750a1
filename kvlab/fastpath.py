"""A compiled batch-1 decode path: static shapes, in-place cache writes, one CUDA graph per token.

Batch-1 decoding reads every weight once per token, so its speed limit is memory bandwidth divided by
the bytes read per token (the roofline). Eager PyTorch is far from it: each token launches a few
thousand small kernels from Python. This module removes that overhead the way gpt-fast does, with no
change to :mod:`kvlab.model`:

- :class:`StaticKVCache` preallocates K/V for ``max_tokens`` positions and writes with ``index_copy_``,
  so every decode step has the same shapes; the key positions it returns (-1 for empty slots) make
  the model's own mask hide the unwritten part.
- Positions are a device tensor, so nothing in the step depends on a Python integer that changes.
- :func:`decode_one_token` (logits -> greedy token) is compiled with
  ``torch.compile(mode="reduce-overhead", fullgraph=True)``: one graph, replayed as a CUDA graph.

``grouped=True`` gives the GQA-native variant (no ``repeat_kv`` copies), which reads the cache once
instead of ``n_heads / n_kv_heads`` times. The cache's buffers never require grad; with a trainable
model outside ``no_grad`` they would become part of the autograd graph like any other cache, so
:class:`FastDecoder` always runs under ``torch.no_grad()``.

Shape legend: B batch, T new tokens, S preallocated slots, Hkv KV heads, D head dim, V vocab.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .cache import KVCache
from .config import MistralConfig
from .errors import CacheOverflowError


def _compiling() -> bool:
    is_compiling = getattr(getattr(torch, "compiler", None), "is_compiling", None)
    return bool(is_compiling and is_compiling())


class StaticKVCache(KVCache):
    """Preallocated K/V written in place at absolute positions; shapes never change between steps.

    Every row of the batch is written at the same positions (``positions[0]``), which is all greedy
    batch decoding needs. ``update`` returns the whole buffer; empty slots carry position -1.
    """

    def __init__(self, config: MistralConfig, batch_size: int, max_tokens: int,
                 device: torch.device | str = "cpu", dtype: torch.dtype | None = None,
                 grouped: bool = False) -> None:
        dtype = dtype or config.dtype
        shape = (batch_size, config.num_key_value_heads, max_tokens, config.head_dim)  # (B, Hkv, S, D)
        self.grouped = grouped
        self.max_tokens = max_tokens
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_hidden_layers)]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_hidden_layers)]
        self.positions = torch.full((batch_size, max_tokens), -1, device=device, dtype=torch.long)  # (B, S)
        self._len = 0  # host-side count for eager callers; compiled code never reads it
        mark_static = getattr(getattr(torch, "_dynamo", None), "mark_static_address", None)
        if mark_static is not None:  # CUDA graphs may then keep these buffers at fixed addresses
            for t in (*self.keys, *self.values, self.positions):
                mark_static(t)

    def update(self, layer: int, k: Tensor, v: Tensor, positions: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        index = positions[0]  # (T,)
        if not _compiling():
            if layer == 0:
                end = int(index.max()) + 1
                if end > self.max_tokens:
                    raise CacheOverflowError(f"static cache holds {self.max_tokens} positions; asked to write {end}")
                self._len = max(self._len, end)
        self.keys[layer].index_copy_(2, index, k)
        self.values[layer].index_copy_(2, index, v)
        if layer == 0:
            self.positions.index_copy_(1, index, positions)
        return self.keys[layer], self.values[layer], self.positions

    def reset(self) -> None:
        for t in (*self.keys, *self.values):
            t.zero_()
        self.positions.fill_(-1)
        self._len = 0

    @property
    def seq_len(self) -> int:
        return self._len

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in (*self.keys, *self.values))

    def tensors(self) -> list[Tensor]:
        return [*self.keys, *self.values]


def decode_one_token(model: nn.Module, cache: KVCache, token: Tensor, positions: Tensor) -> Tensor:
    """Greedy next token (B, 1) after ``token`` (B, 1) written at ``positions`` (B, 1)."""
    logits = model(token, positions=positions, cache=cache, last_only=True)[:, -1]  # (B, V)
    return logits.argmax(dim=-1, keepdim=True)


@dataclass
class FastTiming:
    tokens: Tensor  # (B, prompt + new)
    decode_steps: int  # new tokens minus the one the prefill chose
    seconds: float  # decode loop only (prefill excluded), device-synchronised
    compile_seconds: float  # first call(s): tracing, compiling, graph capture

    @property
    def tokens_per_s(self) -> float:
        return self.decode_steps / self.seconds if self.seconds > 0 else float("nan")


class FastDecoder:
    """Prefill eagerly, then decode with a (optionally) compiled one-token step over a static cache.

    ``compile=None`` compiles on CUDA only. ``mode``/``backend`` go to :func:`torch.compile`
    (``backend="eager"`` checks that the step traces as one graph without generating code).
    """

    def __init__(self, model: nn.Module, max_tokens: int, batch_size: int = 1, grouped: bool = True,
                 compile: bool | None = None, mode: str | None = "reduce-overhead",
                 backend: str = "inductor") -> None:
        weight = model.lm_head.weight
        self.model = model
        self.device = weight.device
        dtype = weight.dtype if weight.is_floating_point() else model.model.embed_tokens.weight.dtype
        self.cache = StaticKVCache(model.config, batch_size, max_tokens, self.device, dtype, grouped=grouped)
        if compile is None:
            compile = self.device.type == "cuda"
        self.compiled = compile
        self.step = decode_one_token
        if compile:
            options = {"fullgraph": True, "backend": backend}
            if backend == "inductor" and mode is not None:
                options["mode"] = mode
            self.step = torch.compile(decode_one_token, **options)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _mark_step(self) -> None:
        mark = getattr(getattr(torch, "compiler", None), "cudagraph_mark_step_begin", None)
        if self.compiled and mark is not None:
            mark()

    @torch.no_grad()
    def generate(self, prompt: Tensor, new_tokens: int, warmup: int = 0) -> FastTiming:
        """Greedy decode ``new_tokens`` after ``prompt`` (B, T); the first ``warmup`` decode calls
        (compilation, graph capture) run on a throwaway pass and are reported as ``compile_seconds``."""
        if prompt.shape[1] + new_tokens > self.cache.max_tokens:
            raise CacheOverflowError(f"prompt {prompt.shape[1]} + {new_tokens} tokens exceed the static cache "
                                     f"({self.cache.max_tokens} positions)")
        compile_seconds = 0.0
        if warmup:
            start = time.perf_counter()
            self._run(prompt, min(warmup, new_tokens))
            self._sync()
            compile_seconds = time.perf_counter() - start
        self._sync()
        tokens, seconds = self._run(prompt, new_tokens)
        return FastTiming(tokens, new_tokens - 1, seconds, compile_seconds)

    def _run(self, prompt: Tensor, new_tokens: int) -> tuple[Tensor, float]:
        self.cache.reset()
        b, t = prompt.shape
        positions = torch.arange(t, device=self.device).expand(b, -1)
        logits = self.model(prompt, positions=positions, cache=self.cache, last_only=True)[:, -1]
        token = logits.argmax(dim=-1, keepdim=True)  # (B, 1)
        position = torch.full((b, 1), t, device=self.device, dtype=torch.long)
        out = [token]
        self._sync()
        start = time.perf_counter()
        for _ in range(new_tokens - 1):
            self._mark_step()
            token = self.step(self.model, self.cache, token, position).clone()
            position = position + 1
            out.append(token)
        self._sync()
        return torch.cat([prompt, *out], dim=1), time.perf_counter() - start
