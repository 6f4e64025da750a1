"""The transformers suites: logit parity on the same weights, and transformers' own speed and leak.

transformers' ``MistralForCausalLM`` is built over the session's weight tensors
(:func:`kvlab.study.hf.hf_model`, no copy) and decoded by the same greedy loop and probes as kvlab's
model (:func:`kvlab.study.hf.greedy` through :func:`kvlab.experiments.runner.record_run`), so the two
libraries are measured alike. ``hf`` also drives it with grad mode on: transformers has the same leak.
"""

from __future__ import annotations

import traceback
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from kvlab.loaders import model_for_loader
from kvlab.memory.units import GiB
from kvlab.study import hf
from kvlab.study.env import cleanup

from .runner import Context, RunSpec, in_units, record_run
from .speed import hf_generate_speed, summarize_speed

__all__ = ["logit_parity", "suite_parity", "suite_hf"]


def logit_parity(ctx: Context, dtype: str, attn: str) -> dict[str, Any]:
    """Max and mean |logit difference| and argmax agreement of kvlab against transformers on one prompt."""
    config = ctx.config.replace(torch_dtype=dtype)
    weights = ctx.state(dtype)
    ours, theirs = model_for_loader(config, weights, "inference"), hf.hf_model(config, weights, ctx.device, attn)
    ids = ctx.prompt(ctx.args.parity_len)
    with torch.no_grad():
        a, b = ours(ids).float(), theirs(input_ids=ids).logits.float()
    diff = (a - b).abs()
    result = {"dtype": dtype, "hf_attn": attn, "prompt_tokens": ids.shape[1], "max_abs_logit_diff": diff.max().item(),
              "mean_abs_logit_diff": diff.mean().item(), "max_abs_logit": b.abs().max().item(),
              "argmax_agreement": (a.argmax(-1) == b.argmax(-1)).float().mean().item()}
    del ours, theirs, a, b, diff
    cleanup(ctx.device)
    tqdm.write(f"parity {dtype} {attn}: max |dlogit| = {result['max_abs_logit_diff']:.3g} "
               f"(max |logit| {result['max_abs_logit']:.3g}), argmax agreement {result['argmax_agreement']:.3f}")
    return result


def suite_parity(ctx: Context) -> None:
    """Max |logit difference| between kvlab and transformers on the same weights, per dtype and attention."""
    results = ctx.rec.meta.setdefault("hf_parity", [])
    for dtype in ctx.args.dtypes:
        for attn in ctx.args.hf_attn_parity:
            try:
                results.append(logit_parity(ctx, dtype, attn))
            except Exception as exc:
                results.append({"dtype": dtype, "hf_attn": attn, "status": "error",
                                "detail": f"{type(exc).__name__}: {exc}"[:300]})
                traceback.print_exc()
            ctx.rec.flush()


def _hf_run(ctx: Context, spec: RunSpec, model: nn.Module, grad: bool) -> dict[str, Any]:
    """transformers decoded by the greedy loop: parameters requiring grad and grad mode on (``grad``),
    or both off. On a CPU its leak runs are traced (the tracer is the memory measure there)."""
    model.requires_grad_(grad)
    try:
        trace = ctx.device.type != "cuda" and spec.suite == "hf-leak"
        return record_run(ctx, spec, model, trace=trace, grad=grad,
                          extra={"hf_attn": model.config._attn_implementation})
    finally:
        model.requires_grad_(False)


def suite_hf(ctx: Context) -> None:
    """transformers' decode speed with ``DynamicCache``/``StaticCache``, its ``generate``, and its leak
    (its forward, grad enabled, trainable parameters, a hand-written loop) at ``--hf-leak-points``."""
    args = ctx.args
    dtype = args.dtypes[0]
    meta = ctx.rec.meta
    model = hf.hf_model(ctx.config.replace(torch_dtype=dtype), ctx.state(dtype), ctx.device, args.hf_attn)
    for kind in hf.HF_CACHES:
        _hf_run(ctx, RunSpec("hf", "hf-nograd", kind, dtype, args.speed_tokens, impl="hf"), model, grad=False)
    gen = meta.setdefault("hf_generate", {})
    if args.hf_generate:
        gen["dynamic"] = hf_generate_speed(ctx, model, args.speed_tokens, None)
    for grad in (True, False):
        name = "hf-grad" if grad else "hf-nograd"
        _hf_run(ctx, RunSpec("hf-leak", name, "DynamicCache", dtype, args.hf_leak_tokens, impl="hf"), model, grad)
    leak: dict[str, dict[str, float | None]] = {}
    for run_id in dict.fromkeys(r["run_id"] for r in ctx.rec.steps if r["suite"] == "hf-leak"):
        rows = {r["generated"]: r for r in ctx.rec.steps if r["run_id"] == run_id}
        loader = next(iter(rows.values()))["loader"]
        leak[loader] = {str(n): in_units(rows[n].get("beyond_start_bytes"), GiB) if n in rows else None
                        for n in args.hf_leak_points}
    meta["hf_leak_GiB_beyond_start"] = leak
    del model
    cleanup(ctx.device)
    summarize_speed(ctx)
