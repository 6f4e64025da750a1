"""The speed suites: copy bandwidth, eager kvlab per cache, the compiled fast path, transformers' generate.

Decode at batch 1 is bound by memory bandwidth: every token reads every weight once. ``bandwidth``
measures the device-to-device copy rate, whose ratio to the weight bytes is the roofline every
tokens/s figure is set against in :func:`summarize_speed`.
"""

from __future__ import annotations

import math
import time
import traceback
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from kvlab.caches import kv_bytes
from kvlab.config import DTYPES
from kvlab.fastpath import FastDecoder, sync
from kvlab.loaders import model_for_loader
from kvlab.memory.units import GiB
from kvlab.study import hf
from kvlab.study.env import cleanup, model_bytes

from .runner import Context, RunSpec, run_kvlab

__all__ = ["measure_bandwidth", "suite_bandwidth", "suite_compare", "suite_fast", "suite_hf_compile",
           "hf_generate_speed", "summarize_speed"]


def measure_bandwidth(device: torch.device, nbytes: int = 4 * GiB, repeats: int = 20) -> dict[str, float]:
    """Device-to-device copy of ``nbytes``; bandwidth counts bytes read plus bytes written (CUDA only)."""
    if device.type != "cuda":
        return {}
    n = nbytes // 2
    src = torch.empty(n, dtype=torch.bfloat16, device=device).normal_()
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(repeats):
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    times.sort()
    median = times[len(times) // 2]
    del src, dst
    cleanup(device)
    return {"copy_bytes": float(2 * n * 2), "copy_median_s": median, "bandwidth_Bps": 2 * n * 2 / median,
            "bandwidth_best_Bps": 2 * n * 2 / times[0]}


def suite_bandwidth(ctx: Context) -> None:
    ctx.rec.meta["bandwidth"] = measure_bandwidth(ctx.device, int(ctx.args.copy_gib * GiB))
    ctx.rec.flush()


def suite_compare(ctx: Context) -> None:
    """Eager kvlab (frozen weights) with each cache: the speed/peak side of the transformers comparison."""
    for cache in ctx.args.caches:
        run_kvlab(ctx, RunSpec("compare", "inference", cache, ctx.args.dtypes[0], ctx.args.speed_tokens))


def suite_fast(ctx: Context) -> None:
    """The compiled decode path; tokens/s against the copy-bandwidth roofline."""
    args, device = ctx.args, ctx.device
    dtype = args.dtypes[0]
    config = ctx.config.replace(torch_dtype=dtype)
    weights = ctx.state(dtype)
    prompt = ctx.prompt()
    new = args.speed_tokens
    results = ctx.rec.meta.setdefault("fast", {})
    compile_on = device.type == "cuda" if args.compile is None else args.compile
    for grouped in args.fast_variants:
        label = "gqa" if grouped else "static"
        if ctx.remaining() < (240 if compile_on else 20):
            results[label] = {"status": "skipped", "detail": "time budget"}
            continue
        model = model_for_loader(config, weights, "inference")
        cleanup(device)
        result: dict[str, Any] = {"grouped": grouped, "compiled": compile_on, "prompt_tokens": prompt.shape[1],
                                  "new_tokens": new, "max_tokens": prompt.shape[1] + new + args.static_slack}
        try:
            decoder = FastDecoder(model, result["max_tokens"], grouped=grouped, compile=compile_on,
                                  backend=args.compile_backend)
            timing = decoder.generate(prompt, new, warmup=args.warmup if compile_on else 0)
            again = decoder.generate(prompt, new)  # a second timed pass: the spread between the two is noise
            result.update(status="ok", compile_s=timing.compile_seconds, decode_steps=timing.decode_steps,
                          tok_per_s=max(timing.tokens_per_s, again.tokens_per_s),
                          tok_per_s_runs=[timing.tokens_per_s, again.tokens_per_s],
                          kv_buffer_bytes=decoder.cache.nbytes, weights_bytes=model_bytes(model),
                          peak_bytes=torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
                          same_tokens_both_runs=bool(torch.equal(timing.tokens, again.tokens)))
            # Same computation as the eager loop? Greedy tokens of the compiled path vs eager with the same cache.
            eager = FastDecoder(model, result["max_tokens"], grouped=grouped, compile=False)
            eager_tokens = eager.generate(prompt, min(new, 64)).tokens
            n = eager_tokens.shape[1]
            agree = (eager_tokens[0] == timing.tokens[0, :n]).long()
            result["tokens_equal_eager_prefix"] = int(agree.cumprod(0).sum().item())
            result["tokens_compared"] = n
            del decoder, eager
        except Exception as exc:
            result.update(status="error", detail=f"{type(exc).__name__}: {exc}"[:500])
            traceback.print_exc()
        del model
        if compile_on:
            torch._dynamo.reset()
        cleanup(device)
        results[label] = result
        tqdm.write(f"fast {label}: {result.get('status')} tok/s={result.get('tok_per_s', math.nan):.1f} "
                   f"compile {result.get('compile_s', math.nan):.1f} s")
        ctx.rec.flush()
    summarize_speed(ctx)


def hf_generate_speed(ctx: Context, model: nn.Module, tokens: int, cache_implementation: str | None,
                      repeats: int = 2) -> dict[str, Any]:
    """Tokens/s of transformers' own ``generate`` (the first call compiles a static cache; timed: the last)."""
    import transformers

    device = ctx.device
    prompt = ctx.prompt()
    config = transformers.GenerationConfig(max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False,
                                           eos_token_id=None, pad_token_id=0,
                                           cache_implementation=cache_implementation)
    times, result = [], {"cache_implementation": cache_implementation or "dynamic", "tokens": tokens}
    try:
        with torch.no_grad():
            for _ in range(repeats):
                cleanup(device)
                sync(device)
                start = time.perf_counter()
                out = model.generate(prompt, generation_config=config)
                sync(device)
                times.append(time.perf_counter() - start)
                result["peak_bytes"] = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
        result.update(first_call_s=times[0], timed_s=times[-1], new_tokens=int(out.shape[1] - prompt.shape[1]),
                      tok_per_s=(out.shape[1] - prompt.shape[1]) / times[-1], status="ok")
    except Exception as exc:
        result.update(status="error", detail=f"{type(exc).__name__}: {exc}"[:300], times=times)
        traceback.print_exc()
    cleanup(device)
    tqdm.write(f"hf generate {result['cache_implementation']:<8} {result.get('status')} "
               f"tok/s={result.get('tok_per_s', math.nan):7.1f} "
               f"first call {result.get('first_call_s', math.nan):.1f} s")
    return result


def suite_hf_compile(ctx: Context) -> None:
    """transformers' compiled static-cache ``generate``."""
    if ctx.remaining() < 150:
        ctx.rec.meta.setdefault("hf_generate", {})["static"] = {"status": "skipped", "detail": "time budget"}
        return
    dtype = ctx.args.dtypes[0]
    model = hf.hf_model(ctx.config.replace(torch_dtype=dtype), ctx.state(dtype), ctx.device, ctx.args.hf_attn)
    ctx.rec.meta.setdefault("hf_generate", {})["static"] = hf_generate_speed(ctx, model, ctx.args.speed_tokens,
                                                                             "static")
    del model
    torch._dynamo.reset()
    cleanup(ctx.device)
    summarize_speed(ctx)


def summarize_speed(ctx: Context) -> None:
    """Roofline and ratios from whatever speed results exist so far (``meta.json``'s ``speed_summary``)."""
    meta = ctx.rec.meta
    bw = meta.get("bandwidth", {}).get("bandwidth_Bps")
    dtype = ctx.args.dtypes[0]
    wbytes = meta.get("weights", {}).get(dtype, {}).get("bytes")
    summary: dict[str, Any] = {}
    kvlab_paths = {f"kvlab fast {k}": v["tok_per_s"] for k, v in meta.get("fast", {}).items()
                   if v.get("status") == "ok"}
    hf_paths = {}
    for run in ctx.rec.runs:
        if run.get("suite") == "compare" and run.get("status") == "ok":
            kvlab_paths[f"kvlab eager {run['cache']}"] = run["tok_per_s"]
        if run.get("suite") == "hf" and run.get("status") == "ok" and run.get("loader") == "hf-nograd":
            hf_paths[f"hf loop {run['cache']}"] = run["tok_per_s"]
    for name, res in meta.get("hf_generate", {}).items():
        if res.get("status") == "ok":
            hf_paths[f"hf generate {name}"] = res["tok_per_s"]
    summary["kvlab_tok_per_s"], summary["hf_tok_per_s"] = kvlab_paths, hf_paths
    for key, paths in (("kvlab_best", kvlab_paths), ("hf_best", hf_paths)):
        if paths:
            best = max(paths, key=paths.get)
            summary[key] = {"path": best, "tok_per_s": paths[best]}
    if kvlab_paths and hf_paths:
        summary["kvlab_best_over_hf_best"] = summary["kvlab_best"]["tok_per_s"] / summary["hf_best"]["tok_per_s"]
    if bw and wbytes:
        tokens = ctx.args.prompt_len + ctx.args.speed_tokens / 2  # mean cache length while timing
        kv_per_token = kv_bytes(ctx.config, 1, 1, DTYPES[dtype])
        roofline = summary["roofline_weights_only_tok_per_s"] = bw / wbytes
        summary["roofline_with_kv_tok_per_s"] = bw / (wbytes + kv_per_token * tokens)
        for key, best in (("kvlab_best_roofline_fraction", "kvlab_best"), ("hf_best_roofline_fraction", "hf_best")):
            if best in summary:
                summary[key] = summary[best]["tok_per_s"] / roofline
    meta["speed_summary"] = summary
    ctx.rec.flush()
