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
- The model is rewritten in place by :func:`kvlab.fused.fuse_model` (``fuse=True``, the default): four
  weight reads per layer instead of seven, RMSNorm, SwiGLU and residual adds inside those reads,
  int8 matrices read as int8 by :mod:`kvlab.kernels`' Triton kernel, and (``attention_kernel=True``,
  the default) each layer's rotary, cache write and attention in one :mod:`kvlab.decode_attention` launch.
- :func:`greedy_step` (one token in, the greedy next token out) is compiled with ``fullgraph=True`` and
  ``mode="reduce-overhead"`` (one graph, replayed as a CUDA graph) plus the inductor settings in
  :data:`TUNING`. ``benchmarks/bench_fast.py`` measures the result against the roofline and
  transformers and records the settings in force.

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
from .fused import fuse_model
from .generate import choose, prefill

# Inductor settings added to the compile mode's own (gpt-fast's choice). Only the first changes what
# torch 2.11 does by default; the other two are its defaults, set so that builds with other defaults
# compile the same way. benchmarks/bench_fast.py records both these and the build's defaults.
TUNING: dict[str, bool] = {
    # After inductor's heuristic block sizes, tune each generated kernel's block sizes by coordinate
    # descent, timing candidates on the device. The decode step is a chain of small reductions
    # (norms, rotary, softmax, argmax) whose launch shapes the heuristic gets wrong at batch 1. On an
    # H200 at the Mistral-7B shape it took the unfused fast path from 196.5 to 214.3 tok/s (one lease);
    # it costs compile time (tens of seconds for 32 layers).
    "coordinate_descent_tuning": True,
    # Name each generated kernel after the operations it fuses: profiles and traces become readable.
    # No effect on the generated code's speed.
    "triton.unique_kernel_names": True,
    # Keep compiled graphs in inductor's on-disk cache: a later process compiling the same step
    # (same model shape, same settings) loads it instead of compiling and tuning again.
    "fx_graph_cache": True,
}


def compile_options(mode: str | None = "reduce-overhead",
                    tuning: dict[str, bool] | None = None) -> dict[str, bool]:
    """Inductor options of ``mode`` ("reduce-overhead": CUDA graphs) plus ``tuning`` (default :data:`TUNING`)."""
    from torch._inductor import list_mode_options

    options = dict(list_mode_options(mode)) if mode and mode != "default" else {}
    options.update(TUNING if tuning is None else tuning)
    return options


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

    ``compile=None`` compiles on CUDA only. ``backend`` goes to :func:`torch.compile`
    (``backend="eager"`` checks that the step traces as one graph without generating code); with
    inductor, :func:`compile_options` of ``mode`` and ``tuning``. ``fuse=True`` rewrites ``model`` in
    place with :func:`kvlab.fused.fuse_model` (same function, fused weights; see there), with its
    ``attention_kernel``.
    """

    def __init__(self, model: nn.Module, max_tokens: int, batch_size: int = 1, grouped: bool = True,
                 compile: bool | None = None, mode: str | None = "reduce-overhead",
                 backend: str = "inductor", fuse: bool = True, tuning: dict[str, bool] | None = None,
                 attention_kernel: bool = True) -> None:
        if fuse:
            fuse_model(model, attention_kernel)
        weight = model.lm_head.weight
        self.model = model
        self.device = weight.device
        dtype = weight.dtype if weight.is_floating_point() else model.model.embed_tokens.weight.dtype
        self.cache = fast_cache(model.config, batch_size, max_tokens, self.device, dtype, grouped=grouped)
        if compile is None:
            compile = self.device.type == "cuda"
        self.compiled = compile
        self.step = greedy_step
        self.options = compile_options(mode, tuning) if compile and backend == "inductor" else {}
        if compile:
            self.step = torch.compile(greedy_step, fullgraph=True, backend=backend, options=self.options or None)

    def _mark_step(self) -> None:
        if self.compiled:
            torch.compiler.cudagraph_mark_step_begin()

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


@torch.no_grad()
def teacher_forced_agreement(reference: nn.Module, tokens: Tensor, prompt_len: int) -> dict[str, float]:
    """Compare generated ``tokens`` (B, prompt + new) with ``reference``'s greedy choice on the same prefixes.

    Free-running greedy decodes part ways at the first near-tie and never meet again, so agreement is
    measured teacher-forced: one cache-free forward pass of ``reference`` over the sequence gives its
    logits at every position, and at each generated position the chosen token is either the
    reference's argmax or short of it by ``gap`` (reference max logit minus the chosen token's). The
    gap is also given in units of the bf16 spacing at the max logit (2**(floor(log2|max|) - 7)), the
    scale of rounding noise in bf16 logits.
    """
    logits = reference(tokens[:, :-1]).float()[:, prompt_len - 1:]  # (B, new, V)
    chosen = tokens[:, prompt_len:]
    best = logits.max(dim=-1).values
    gap = best - logits.gather(-1, chosen[..., None])[..., 0]
    spacing = torch.exp2(torch.floor(torch.log2(best.abs().clamp_min(1e-30))) - 7)
    return {"positions": chosen.numel(), "argmax_equal": int((gap == 0).sum()),
            "max_gap": float(gap.max()), "max_gap_bf16_spacings": float((gap / spacing).max())}
