"""Batch-1 decode speed of kvlab's fast path against the bandwidth roofline and transformers, in one run.

Everything is measured in one process on one GPU, on the same seeded random weights:

1. copy bandwidth (device-to-device copy, bytes read + written), and from it the roofline: bandwidth
   over the bytes one decode step must read (every weight matrix and norm, one embedding row, the
   whole static KV cache, since attention reads every slot), for bf16 and for int8 weights;
2. each weight matrix of a decode step as a matrix-vector product: cuBLAS on bf16, kvlab's Triton
   kernel on bf16 and int8 (plain rows, and the packed layout of fused models), dequantize-then-cuBLAS,
   and PyTorch's ``_weight_int8pack_mm`` where this build has it for CUDA (GB/s of weights read);
3. kvlab's fast path (:class:`kvlab.fastpath.FastDecoder` defaults) on bf16 and ``int8`` weights, and
   ablations: without fused projections, without the inductor tuning, with the model's own attention
   instead of the fused decode-attention kernel;
4. transformers' fastest path, ``generate`` with its static cache (which transformers compiles),
   with default inductor settings and with kvlab's tuning;
5. whether each kvlab path's tokens are the eager model's (same loader, unfused, uncompiled), teacher-
   forced (:func:`kvlab.fastpath.teacher_forced_agreement`) and free-running.

Each path is compiled and warmed up, then timed ``--repeats`` times; kvlab paths time the decode loop
(prefill excluded), transformers' ``generate`` the whole call (its prefill is one of ``--tokens`` steps).
Printed: median tok/s with min..max, and ratios of medians with the range the extremes allow. Written:
``fast.csv`` (one row per path and repeat) and ``fast.json`` (environment, command, settings, results).

    python benchmarks/bench_fast.py --preset mistral-7b --out data/gpu/h200-fast
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd
import torch
import torch.nn.functional as F

from kvlab.config import preset
from kvlab.experiments.speed import measure_bandwidth
from kvlab.fastpath import TUNING, FastDecoder, compile_options, sync, teacher_forced_agreement
from kvlab.kernels import fused_gemv, fused_linear_reference, pack_int8, tuned_configs
from kvlab.loaders import model_for_loader
from kvlab.quant import quantize_int8
from kvlab.study.env import cleanup, model_bytes, tensor_bytes
from kvlab.study.hf import hf_model
from kvlab.study.probes import prompt_ids
from kvlab.study.records import save_results
from kvlab.synthetic import random_state_dict

PATHS = ("bf16", "int8", "hf", "hf-tuned", "bf16-unfused", "bf16-untuned", "bf16-model-attention")
KVLAB_PATHS = {  # name: (loader, FastDecoder options)
    "bf16": ("inference", {}),
    "int8": ("int8", {}),
    "bf16-unfused": ("inference", {"fuse": False}),
    "bf16-untuned": ("inference", {"tuning": {}}),
    "bf16-model-attention": ("inference", {"attention_kernel": False}),
}


def spread(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "runs": values}


def ratio(a: dict[str, float], b: dict[str, float]) -> dict[str, float]:
    """Ratio of medians, and the range that the two paths' extremes allow."""
    return {"median": a["median"] / b["median"], "min": a["min"] / b["max"], "max": a["max"] / b["min"]}


def bytes_per_token(model: torch.nn.Module, config: Any, cache_bytes: int) -> int:
    """Bytes a decode step reads: all parameters and buffers but the embedding table (one row of it),
    plus the whole static KV cache (attention reads every slot, masking the empty ones)."""
    embed = model.model.embed_tokens.weight
    table = 0 if config.tie_word_embeddings else embed.numel() * embed.element_size()
    return model_bytes(model) - table + embed.shape[1] * embed.element_size() + cache_bytes


def inductor_value(key: str) -> Any:
    """The current value of an inductor setting named as in :data:`kvlab.fastpath.TUNING`."""
    value: Any = torch._inductor.config
    for part in key.split("."):
        value = getattr(value, part)
    return value


def gemv_table(config: Any, device: torch.device, dtype: torch.dtype) -> list[dict[str, Any]]:
    """Each decode matrix as a matrix-vector product, per kernel: time per call, GB/s, error vs float64.

    Timed as in decoding: one CUDA graph of back-to-back calls, each on the next of several copies of
    the matrix (together well beyond the L2 cache), so every call streams its weights from memory.
    """
    c, d = config.hidden_size, config.head_dim
    qkv = (config.num_attention_heads + 2 * config.num_key_value_heads) * d
    shapes = {"qkv": (qkv, c), "o_proj": (c, config.num_attention_heads * d),
              "gate_up": (2 * config.intermediate_size, c), "down": (c, config.intermediate_size),
              "lm_head": (config.vocab_size, c)}
    rows = []
    for name, (n, k) in shapes.items():
        copies = max(4, -(-512 * 2**20 // (n * k * 2)))  # >= 512 MiB of bf16 weights in rotation
        ws = [(torch.randn(n, k, device=device) * k ** -0.5).to(dtype) for _ in range(copies)]
        x = torch.randn(1, 1, k, device=device).to(dtype)
        for label, (fn, nbytes, exact) in gemv_candidates(x, ws).items():
            row: dict[str, Any] = {"matrix": name, "n": n, "k": k, "kernel": label, "copies": copies}
            try:
                out = fn(0).double().reshape(exact.shape)
                row["rel_err"] = float((out - exact).norm() / exact.norm())
                seconds = graph_seconds_per_call(fn, copies)
                row.update(us=seconds * 1e6, GBps=nbytes / seconds / 1e9)
            except Exception as exc:  # e.g. no CUDA kernel for _weight_int8pack_mm in this build
                row["error"] = f"{type(exc).__name__}: {exc}"[:200]
            rows.append(row)
            print(f"  {name:<8} {n:>6}x{k:<6} {label:<26} " + (f"{row['us']:8.1f} us {row['GBps']:7.0f} GB/s "
                  f"err {row['rel_err']:.1e}" if "us" in row else row["error"][:80]), flush=True)
        del ws, x
        cleanup(device)
    return rows


def graph_seconds_per_call(fn: Callable[[int], torch.Tensor], copies: int, rounds: int = 3) -> float:
    """Median time of one call inside a CUDA graph of ``rounds * copies`` calls cycling through the copies."""
    for i in range(copies):  # compile / autotune outside the capture
        fn(i)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(rounds * copies):
            fn(i % copies)
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(5):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / (rounds * copies))
    del graph
    return statistics.median(times)


Candidate = tuple[Callable[[int], torch.Tensor], int, torch.Tensor]  # call on copy i, bytes read, float64 result


def gemv_candidates(x: torch.Tensor, ws: list[torch.Tensor]) -> dict[str, Candidate]:
    """Kernels computing ``x @ w.T`` (bf16 ``w``) or its int8 quantization, on copy ``i`` of ``ws``."""
    qs = [quantize_int8(w) for w in ws]
    q, s = qs[0]
    exact_bf16 = F.linear(x.double(), ws[0].double())
    exact_int8 = F.linear(x.double(), q.double() * s.double()[:, None])
    bf16_bytes, int8_bytes = ws[0].nbytes, q.nbytes + s.nbytes
    scales16 = [s.to(x.dtype) for _, s in qs]
    packed = [pack_int8(q) for q, _ in qs]  # the layout of a fused model's int8 matrices
    return {
        "cuBLAS bf16": (lambda i: F.linear(x, ws[i]), bf16_bytes, exact_bf16),
        "kvlab Triton bf16": (lambda i: fused_gemv(x, ws[i], None, None, None, 1e-5, False), bf16_bytes, exact_bf16),
        "kvlab Triton int8": (lambda i: fused_gemv(x, *qs[i], None, None, 1e-5, False), int8_bytes, exact_int8),
        "kvlab Triton int8 packed": (lambda i: fused_gemv(x, packed[i], qs[i][1], None, None, 1e-5, False), int8_bytes,
                                     exact_int8),
        "dequantize + cuBLAS int8": (lambda i: fused_linear_reference(x, *qs[i]), int8_bytes, exact_int8),
        "torch._weight_int8pack_mm": (lambda i: torch._weight_int8pack_mm(x[0], qs[i][0], scales16[i]), int8_bytes,
                                      exact_int8),
    }


def time_kvlab(args: argparse.Namespace, config: Any, weights: dict, prompt: torch.Tensor, loader: str,
               options: dict[str, Any]) -> dict[str, Any]:
    """Compile, warm up and time one kvlab path; check its tokens against the eager unfused model."""
    device = prompt.device
    model = model_for_loader(config, weights, loader)
    max_tokens = prompt.shape[1] + args.tokens
    start = time.perf_counter()
    decoder = FastDecoder(model, max_tokens, **options)
    setup_s = time.perf_counter() - start
    first = decoder.generate(prompt, args.tokens, warmup=args.warmup)
    runs = [first.tokens_per_s] + [decoder.generate(prompt, args.tokens).tokens_per_s for _ in range(args.repeats - 1)]
    result = {"loader": loader, "options": options, "tok_per_s": spread(runs), "fuse_s": setup_s,
              "compile_s": first.compile_seconds, "inductor_options": decoder.options,
              "bytes_per_token": bytes_per_token(model, config, decoder.cache.nbytes),
              "kv_buffer_bytes": decoder.cache.nbytes,
              "weights_bytes": model_bytes(model), "peak_bytes": torch.cuda.max_memory_allocated(device)}
    tokens = first.tokens
    del decoder, model
    torch._dynamo.reset()
    cleanup(device)
    reference = model_for_loader(config, weights, loader)  # eager, unfused, the loader's own model
    result["teacher_forced"] = teacher_forced_agreement(reference, tokens, prompt.shape[1])
    eager = FastDecoder(reference, max_tokens, compile=False, fuse=False).generate(prompt, args.check_tokens).tokens
    n = eager.shape[1]
    result["free_running_equal_prefix"] = int((eager[0] == tokens[0, :n]).long().cumprod(0).sum()) - prompt.shape[1]
    result["free_running_compared"] = n - prompt.shape[1]
    del reference, eager
    cleanup(device)
    return result


def time_hf(args: argparse.Namespace, config: Any, weights: dict, prompt: torch.Tensor, tuned: bool) -> dict[str, Any]:
    """transformers' ``generate`` with its static cache, compiled by transformers; the first call compiles."""
    import transformers

    device = prompt.device
    model = hf_model(config, weights, device, "sdpa")
    gen = transformers.GenerationConfig(max_new_tokens=args.tokens, min_new_tokens=args.tokens, do_sample=False,
                                        eos_token_id=None, pad_token_id=0, cache_implementation="static")
    seconds = []
    with torch.no_grad(), torch._inductor.config.patch(TUNING if tuned else {}):
        for _ in range(args.repeats + 1):  # the first call compiles and is not counted
            sync(device)
            t0 = time.perf_counter()
            out = model.generate(prompt, generation_config=gen)
            sync(device)
            seconds.append(time.perf_counter() - t0)
    new = out.shape[1] - prompt.shape[1]
    result = {"cache_implementation": "static", "attn": "sdpa", "tuned": tuned, "new_tokens": new,
              "tok_per_s": spread([new / t for t in seconds[1:]]), "compile_s": seconds[0],
              "inductor_options": TUNING if tuned else {}, "transformers": transformers.__version__}
    del model
    torch._dynamo.reset()
    cleanup(device)
    return result


def summarize(res: dict[str, Any]) -> dict[str, Any]:
    paths, bw = res["paths"], res["bandwidth"]["bandwidth_Bps"]
    ok = {k: v for k, v in paths.items() if "tok_per_s" in v}
    out: dict[str, Any] = {}
    for name in ("bf16", "int8"):
        if name in ok:
            roof = bw / ok[name]["bytes_per_token"]
            out[f"roofline_{name}_tok_per_s"] = roof
            out[f"{name}_share_of_roofline"] = {k: v / roof for k, v in ok[name]["tok_per_s"].items() if k != "runs"}
    hf = [k for k in ("hf", "hf-tuned") if k in ok]
    if hf:
        best = max(hf, key=lambda k: ok[k]["tok_per_s"]["median"])
        out["hf_fastest"] = best
        if "bf16" in ok:
            out["bf16_over_hf_fastest"] = ratio(ok["bf16"]["tok_per_s"], ok[best]["tok_per_s"])
    if "bf16" in ok and "int8" in ok:
        out["int8_over_bf16"] = ratio(ok["int8"]["tok_per_s"], ok["bf16"]["tok_per_s"])
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="mistral-7b")
    p.add_argument("--tokens", type=int, default=200)
    p.add_argument("--prompt-len", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=8, help="decode calls spent compiling/capturing before timing")
    p.add_argument("--check-tokens", type=int, default=64, help="free-running tokens compared with eager")
    p.add_argument("--paths", default="bf16,int8,hf,hf-tuned", help=f"comma-separated, from {PATHS}")
    p.add_argument("--kernels", action=argparse.BooleanOptionalAction, default=True, help="per-matrix GEMV table")
    p.add_argument("--budget-s", type=float, default=540, help="start no new path after this many seconds")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("reports/bench_fast"))
    args = p.parse_args(argv)
    paths = [x for x in args.paths.split(",") if x]
    if set(paths) - set(PATHS):
        p.error(f"unknown path(s) {sorted(set(paths) - set(PATHS))}; choose from {PATHS}")
    if not torch.cuda.is_available():
        print("bench_fast measures GPU decoding and needs a CUDA device", file=sys.stderr)
        raise SystemExit(2)
    t0 = time.perf_counter()
    device = torch.device("cuda")
    config = preset(args.preset).replace(torch_dtype="bfloat16")
    import triton

    res: dict[str, Any] = {"preset": args.preset, "args": vars(args), "triton": triton.__version__,
                           "fast_path_inductor_options": compile_options(),
                           "inductor_defaults": {k: inductor_value(k) for k in TUNING}, "paths": {}}
    res["bandwidth"] = measure_bandwidth(device)
    print(f"copy bandwidth {res['bandwidth']['bandwidth_Bps'] / 1e12:.2f} TB/s median", flush=True)
    if args.kernels:
        res["gemv"] = gemv_table(config, device, torch.bfloat16)
    weights = random_state_dict(config, args.seed, device=device, dtype=torch.bfloat16)
    res["weights_bytes"] = tensor_bytes(weights.values())
    prompt = prompt_ids(config.vocab_size, args.prompt_len, seed=args.seed, device=device)
    rows = []
    for name in paths:
        if time.perf_counter() - t0 > args.budget_s:
            res["paths"][name] = {"status": "skipped", "detail": "time budget"}
            continue
        print(f"== {name}", flush=True)
        try:
            if name in KVLAB_PATHS:
                res["paths"][name] = time_kvlab(args, config, weights, prompt, *KVLAB_PATHS[name])
            else:
                res["paths"][name] = time_hf(args, config, weights, prompt, tuned=name == "hf-tuned")
            s = res["paths"][name]["tok_per_s"]
            rows += [{"path": name, "repeat": i, "tok_per_s": v} for i, v in enumerate(s["runs"])]
            print(f"   {s['median']:.1f} tok/s ({s['min']:.1f}..{s['max']:.1f}), compile "
                  f"{res['paths'][name]['compile_s']:.0f} s", flush=True)
        except Exception as exc:
            res["paths"][name] = {"status": "error", "detail": f"{type(exc).__name__}: {exc}"[:500]}
            traceback.print_exc()
            torch._dynamo.reset()
            cleanup(device)
        res["summary"] = summarize(res)
        res["gemv_tuned_configs"] = tuned_configs()
        res["total_s"] = time.perf_counter() - t0
        save_results(pd.DataFrame(rows, columns=["path", "repeat", "tok_per_s"]), args.out / "fast", config=config,
                     device=device, command="python benchmarks/bench_fast.py " + " ".join(argv or sys.argv[1:]), **res)
    report(res)
    return res


def report(res: dict[str, Any]) -> None:
    bw = res["bandwidth"]
    print(f"\ncopy bandwidth {bw['bandwidth_Bps'] / 1e12:.2f} TB/s median, {bw['bandwidth_best_Bps'] / 1e12:.2f} best")
    for name, r in res["paths"].items():
        if "tok_per_s" in r:
            s = r["tok_per_s"]
            extra = ""
            if "teacher_forced" in r:
                tf = r["teacher_forced"]
                extra = (f"  argmax = eager {tf['argmax_equal']}/{tf['positions']}, max gap "
                         f"{tf['max_gap_bf16_spacings']:.1f} bf16 spacings")
            print(f"{name:<14} {s['median']:7.1f} tok/s ({s['min']:.1f}..{s['max']:.1f}){extra}")
        else:
            print(f"{name:<14} {r.get('status')}: {r.get('detail', '')[:100]}")
    for key, value in res.get("summary", {}).items():
        if isinstance(value, dict):
            print(f"{key:<32} {value['median']:.3f} ({value['min']:.3f}..{value['max']:.3f})")
        else:
            print(f"{key:<32} {value if isinstance(value, str) else f'{value:.1f}'}")


if __name__ == "__main__":
    main()
