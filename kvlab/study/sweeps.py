"""Cache designs side by side: one model with frozen weights, every cache of :data:`kvlab.caches.CACHES`.

- :func:`token_agreement`: tokens and logits of every design against the no-cache run;
- :func:`sweep_caches`: per decode step, ``nbytes`` next to :func:`kvlab.caches.kv_bytes`, the K/V bytes
  attention reads and, with ``trace=True``, exact live/peak bytes;
- :func:`time_caches`: tokens/s by batch and sequence length, fastest of interleaved rounds;
- :func:`ragged_batch`: rows of different lengths, bytes held against bytes needed.

Every decode is one :func:`kvlab.study.runs.measure` from the prompt of
:func:`kvlab.study.probes.prompt_ids`; nothing here measures on its own.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import pandas as pd
import torch
from torch import Tensor, nn

from kvlab.caches import CACHES, kv_bytes, make_cache
from kvlab.config import MistralConfig

from .runs import measure

__all__ = ["usable_caches", "token_agreement", "sweep_caches", "time_caches", "ragged_batch"]


def usable_caches(config: MistralConfig, caches: Sequence[str] = tuple(CACHES)) -> list[str]:
    """``caches`` minus ``sliding`` when the config attends to every position (no window to slide)."""
    return [c for c in caches if c != "sliding" or config.sliding_window is not None]


def _logits(model: nn.Module, prompt: Tensor, tokens: int, cache: str | None) -> tuple[Tensor, list[Tensor]]:
    """Generated tokens (B, tokens) and the logits of every step, decoded under ``inference_mode``."""
    logits: list[Tensor] = []
    run = measure(model, cache, tokens, prompt=prompt, trace=False, inference_mode=True,
                  on_step=lambda step: logits.append(step.logits.detach().float().cpu()))
    return run.generated, logits


def token_agreement(model: nn.Module, prompt: Tensor, tokens: int,
                    caches: Sequence[str] = tuple(CACHES)) -> pd.DataFrame:
    """Greedy tokens and logits of every cache against the no-cache run (full recompute each step).

    One row per cache: ``tokens_equal``; ``matching_tokens`` (generated tokens equal to the reference
    before the first difference, the worst row of the batch); ``max_abs_logit_error`` over the steps whose
    inputs still agree (after a divergence, logits differ because the inputs do); ``max_abs_logit`` of
    the reference, for scale. Runs under ``inference_mode``.
    """
    ref_new, ref_logits = _logits(model, prompt, tokens, None)
    scale = max(float(x.abs().max()) for x in ref_logits)
    rows = []
    for kind in usable_caches(model.config, caches):
        new, logits = _logits(model, prompt, tokens, kind)
        same = (new == ref_new).all(dim=0).long()
        matching = int(same.cumprod(0).sum())
        compared = min(matching + 1, tokens)  # the step that diverged still had equal inputs
        error = max(float((a - b).abs().max()) for a, b in zip(logits[:compared], ref_logits[:compared]))
        rows.append(dict(cache=kind, tokens=tokens, tokens_equal=bool(torch.equal(new, ref_new)),
                         matching_tokens=matching, max_abs_logit_error=error, max_abs_logit=scale))
    return pd.DataFrame(rows)


def sweep_caches(model: nn.Module, caches: Sequence[str], batches: Sequence[int], tokens: int, *,
                 prompt_len: int = 16, seed: int = 0, trace: bool = False, warmup: int = 4) -> pd.DataFrame:
    """Decode ``tokens`` tokens with every cache x batch size; one row per decode step.

    Columns: ``cache, batch, step, positions`` (cached positions after the step), ``step_s`` (wall time
    of the step, device-synchronised), ``nbytes`` (the cache's own count), ``kv_bytes`` (the analytic
    :func:`kvlab.caches.kv_bytes` for that many positions), ``kv_read_bytes`` (K/V bytes attention read
    in that step, all layers) and, with ``trace=True``, ``live_bytes``/``peak_bytes`` of the exact tracer
    (tensors allocated during the run: cache + activations). Runs under ``no_grad`` (not inference mode,
    under which the tracer misses composite ops' copies); tracing slows every op: measure speed with
    :func:`time_caches`.
    """
    frames = []
    for batch in batches:
        for kind in usable_caches(model.config, caches):
            run = measure(model, kind, tokens, prompt_len=prompt_len, batch=batch, seed=seed, trace=trace,
                          frames=False, kv_reads=True, grad=False, warmup=warmup)
            frame = run.timeline.rename(columns={"cache_bytes": "nbytes", "kv_analytic_bytes": "kv_bytes"})
            columns = ["step", "positions", "step_s", "nbytes", "kv_bytes", "kv_read_bytes"]
            columns += ["live_bytes", "peak_bytes"] if trace else []
            frames.append(frame[columns].assign(cache=kind, batch=batch))
    sweep = pd.concat(frames, ignore_index=True)
    return sweep[["cache", "batch", *[c for c in sweep.columns if c not in ("cache", "batch")]]]


def time_caches(model: nn.Module, caches: Sequence[str], batches: Sequence[int], lengths: Sequence[int], *,
                steps: int = 16, rounds: int = 3, seed: int = 0) -> pd.DataFrame:
    """Decode speed of every cache x batch size x sequence length, measured to survive a busy machine.

    One measurement prefills a prompt of ``length`` tokens (untimed) and times ``steps`` decode steps
    under ``inference_mode``. On a CPU the clock is this process's CPU time (``cpu_s``), which other
    processes' load cannot inflate and which equals wall time on an idle machine when torch runs one
    thread; on CUDA it is synchronised wall time. Every combination runs once per round, ``rounds``
    rounds in all, and keeps its fastest round. Columns ``cache, batch, positions`` (the prompt length),
    ``ms_per_step`` and ``tokens_per_s`` (batch / step time).
    """
    if steps < 2:
        raise ValueError(f"steps must be at least 2 (one prefill, then timed decode steps), got {steps}")
    clock = "step_s" if next(model.parameters()).device.type == "cuda" else "cpu_s"
    best: dict[tuple[str, int, int], float] = {}
    for _ in range(rounds):
        for batch in batches:
            for length in lengths:
                for kind in usable_caches(model.config, caches):
                    run = measure(model, kind, steps, prompt_len=length, batch=batch, seed=seed, trace=False,
                                  inference_mode=True)
                    per_step = run.timeline[clock].iloc[1:].mean()  # step 0: the prefill
                    key = (kind, batch, length)
                    best[key] = min(best.get(key, math.inf), per_step)
    rows = [dict(cache=k, batch=b, positions=n, ms_per_step=s * 1e3, tokens_per_s=b / s)
            for (k, b, n), s in best.items()]
    return pd.DataFrame(rows)


def ragged_batch(model: nn.Module, prompts: Sequence[Sequence[int]], new_tokens: int,
                 caches: Sequence[str] = ("static", "sliding", "paged"), **options: Any) -> pd.DataFrame:
    """Decode prompts of different lengths in one batch (:func:`kvlab.generate.generate_ragged`) with each
    ragged-capable cache; compare every row with the same prompt decoded alone.

    One row per cache: ``nbytes`` (held), ``kv_bytes`` (analytic, per-row lengths), ``needed_bytes``
    (the positions actually written, at the cache's own bytes per position), ``waste_bytes`` = held -
    needed, and ``tokens_equal`` (every row equals its solo run). ``options`` go to ``make_cache``
    (e.g. ``block_size`` for ``paged``; sized the same for ``kv_bytes``).
    """
    from kvlab.generate import generate_ragged

    weight = model.model.embed_tokens.weight
    config = model.config
    batch = len(prompts)
    max_tokens = max(len(p) for p in prompts) + new_tokens
    solo = [torch.cat([torch.tensor(list(p)), measure(model, "concat", new_tokens, trace=False, inference_mode=True,
                                                       prompt=torch.tensor([list(p)], device=weight.device)
                                                       ).generated[0]]) for p in prompts]
    per_position = kv_bytes(config, 1, 1)  # bytes of one position of one row, every layer, K and V
    rows = []
    for kind in usable_caches(config, caches):
        opts = options if kind == "paged" else {}
        cache = make_cache(kind, config, batch, max_tokens=max_tokens, device=weight.device, dtype=weight.dtype,
                           **opts)
        out = generate_ragged(model, [list(p) for p in prompts], new_tokens, cache, inference_mode=True)
        lengths = list(cache.lengths)
        held = cache.nbytes
        needed = sum(min(n, config.sliding_window) if kind == "sliding" else n for n in lengths) * per_position
        analytic = kv_bytes(config, batch, lengths, kind=kind, max_tokens=max_tokens,
                            **({"block_size": opts["block_size"]} if "block_size" in opts else {}))
        rows.append(dict(cache=kind, rows=batch, lengths=lengths, nbytes=held, kv_bytes=analytic,
                         needed_bytes=needed, waste_bytes=held - needed, waste_share=(held - needed) / held,
                         tokens_equal=all(torch.equal(a.cpu(), b) for a, b in zip(out, solo))))
    return pd.DataFrame(rows)
