"""A compiled batch-1 decode path: static shapes, in-place cache writes, one CUDA graph per token.

Batch-1 decoding reads every weight once per token, so its speed limit is memory bandwidth divided by
the bytes read per token (the roofline). Eager PyTorch is far from it: each token launches a few
thousand small kernels from Python. This module removes that overhead the way gpt-fast does, with no
change to :mod:`kvlab.model`:

- The cache is :mod:`kvlab.caches`'s ``static`` (or ``gqa``) cache with ``uniform_positions=True`` and
  ``trim=False``: preallocated K/V for ``max_tokens`` positions at fixed addresses, written under
  ``torch.compile`` with ``index_copy_`` at a device-side position, so every decode step has the same
  shapes and no host sync; the key positions it returns (-1 for empty slots) make the model's own
  mask hide the unwritten part.
- Positions are a device tensor, so nothing in the step depends on a Python integer that changes.
- :func:`greedy_step` (one token in, the greedy next token out) is compiled with
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

from .caches import KVCache, StaticCache, make_cache
from .config import MistralConfig
from .errors import CacheOverflowError
from .generate import choose, prefill


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA), so that host timings cover it; nothing elsewhere."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def fast_cache(config: MistralConfig, batch_size: int, max_tokens: int, device: torch.device | str = "cpu",
               dtype: torch.dtype | None = None, grouped: bool = False) -> StaticCache:
    """The cache :class:`FastDecoder` decodes into: ``gqa`` (``grouped``) or ``static``, every slot
    returned (fixed shapes), rows written at shared positions (sync-free under ``torch.compile``)."""
    return make_cache("gqa" if grouped else "static", config, batch_size, max_tokens=max_tokens, device=device,
                      dtype=dtype, trim=False, uniform_positions=True)


def greedy_step(model: nn.Module, cache: KVCache, token: Tensor, positions: Tensor) -> Tensor:
    """Greedy next token (B, 1) after ``token`` (B, 1) written at ``positions`` (B, 1).

    Unlike :func:`kvlab.generate.decode_one_token`, positions are a device tensor passed in, so the
    compiled step depends on no Python integer that changes between tokens.
    """
    logits = model(token, positions=positions, cache=cache, last_only=True)[:, -1]  # (B, V)
    return choose(logits, 0.0, None)


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
        self.cache = fast_cache(model.config, batch_size, max_tokens, self.device, dtype, grouped=grouped)
        if compile is None:
            compile = self.device.type == "cuda"
        self.compiled = compile
        self.step = greedy_step
        if compile:
            options = {"fullgraph": True, "backend": backend}
            if backend == "inductor" and mode is not None:
                options["mode"] = mode
            self.step = torch.compile(greedy_step, **options)

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
            sync(self.device)
            compile_seconds = time.perf_counter() - start
        sync(self.device)
        tokens, seconds = self._run(prompt, new_tokens)
        return FastTiming(tokens, new_tokens - 1, seconds, compile_seconds)

    def _run(self, prompt: Tensor, new_tokens: int) -> tuple[Tensor, float]:
        self.cache.reset()
        b, t = prompt.shape
        token = choose(prefill(self.model, prompt, self.cache), 0.0, None)  # (B, 1)
        position = torch.full((b, 1), t, device=self.device, dtype=torch.long)
        out = [token]
        sync(self.device)
        start = time.perf_counter()
        for _ in range(new_tokens - 1):
            self._mark_step()
            token = self.step(self.model, self.cache, token, position).clone()
            position = position + 1
            out.append(token)
        sync(self.device)
        return torch.cat([prompt, *out], dim=1), time.perf_counter() - start
