"""Decode speed and peak memory of kvlab's KV caches, side by side with transformers' caches.

For every preset x token count, this runs kvlab's ``MistralForCausalLM`` (frozen weights, under
``torch.inference_mode()``) with each cache variant, and transformers' ``MistralForCausalLM`` loaded
with the *same* state dict (kvlab's parameter names are HF's) with ``DynamicCache`` and ``StaticCache``,
in eager and SDPA attention. It prints one table with each run's ratio to transformers' fastest cache,
and the per-step K/V working set of grouped attention (``gqa``) against ``concat`` + repeat_kv.

How it measures, and why:

- Every run is its own subprocess. PyTorch's CPU tensors bypass ``tracemalloc``, and a process's heap
  keeps freed memory around, so the honest peak is a fresh process's resident-set high-water mark: the
  child loads the model, warms up, returns free heap pages to the OS (``malloc_trim``), reads VmRSS,
  resets VmHWM (``/proc/self/clear_refs``), decodes, and reports VmHWM - VmRSS, i.e. what decoding
  added on top of the loaded weights (cache, activations, allocator slack).
- Decode tokens/s times the decode loop only (after the prefill). Speed is measured in the parent
  process, all runs of one preset x token count interleaved round by round (``--repeats`` rounds, best
  kept), so that load from other processes hits every run alike. Both libraries run the same greedy
  loop (one forward per token, logits of the last position only), so the difference is the model +
  cache code, not a sampling wrapper.
- One intra-op thread by default (``--threads``): these models are small, and on a shared machine two
  threads waiting for each other at every op make timings erratic.
- Each run's tokens are compared with the first exact kvlab run's (``same``; ``no@k``: first differs at
  new token k); ``int8`` is expected to differ eventually, transformers' SDPA may in rare near-ties.
- The presets attend to every position, so ``sliding`` is skipped unless ``--sliding-window`` gives
  every run (both libraries) a window.

Usage: ``python benchmarks/bench_caches.py --quick`` (tiny preset, 256 tokens; under two minutes),
or e.g. ``--presets tiny small --tokens 256 1024 4096 --variants static gqa --out results.csv``.
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from kvlab.caches import CACHES, EXACT_CACHES, make_cache
from kvlab.checkpoint import random_state_dict
from kvlab.study.sweeps import kv_read_bytes
from kvlab.config import MistralConfig, preset
from kvlab.experiments.suites import hf_model as shared_hf_model
from kvlab.generate import generate
from kvlab.loaders import model_for_loader
from kvlab.model import MistralForCausalLM

HF_RUNS = [("hf-eager", "dynamic"), ("hf-eager", "static"), ("hf-sdpa", "dynamic"), ("hf-sdpa", "static")]
PROMPT_LEN = 16
WARMUP_TOKENS = 8
MiB = 2 ** 20


def hf_model(config: MistralConfig, state: dict[str, torch.Tensor], attn: str) -> Any:
    """transformers' model over the same tensors, frozen, and its config."""
    model = shared_hf_model(config, state, torch.device("cpu"), attn).requires_grad_(False)
    return model, model.config


# ------------------------------------------------------------------------------------------ memory
def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def release_free_memory() -> None:
    """Hand the heap's free pages back to the OS (glibc ``malloc_trim``), so that memory freed while
    loading the model cannot silently absorb the decode's allocations and hide them from the RSS peak."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def reset_peak_rss() -> bool:
    """Reset this process's VmHWM to its current RSS (Linux >= 4.0); False where not permitted."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


# ------------------------------------------------------------------------------------------ decoding
def decode_kvlab(model: MistralForCausalLM, prompt: torch.Tensor, n: int, kind: str) -> tuple[list[int], float, int]:
    """(tokens, decode seconds, cache bytes) for ``n`` new tokens."""
    cache = make_cache(kind, model.config, prompt.shape[0], max_tokens=prompt.shape[1] + n)
    start = []
    out = generate(model, prompt, n, cache=cache, inference_mode=True,
                   on_step=lambda s: start.append(time.perf_counter()) if s.index == 0 else None)
    seconds = time.perf_counter() - start[0]
    return out.tokens[0].tolist(), seconds, cache.nbytes


def _hf_cache_bytes(cache: Any) -> int:
    total = 0
    for layer in getattr(cache, "layers", []):
        for name in ("keys", "values"):
            t = getattr(layer, name, None)
            if isinstance(t, torch.Tensor):
                total += t.nbytes
    return total


def decode_hf(model: Any, hf_config: Any, prompt: torch.Tensor, n: int, kind: str) -> tuple[list[int], float, int]:
    """The same greedy loop as kvlab's ``generate``, through transformers' forward and cache."""
    import inspect

    from transformers import DynamicCache, StaticCache

    t = prompt.shape[1]
    cache = (DynamicCache(config=hf_config) if kind == "dynamic"
             else StaticCache(config=hf_config, max_cache_len=t + n))
    key = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    with torch.inference_mode():
        logits = model(input_ids=prompt, position_ids=torch.arange(t)[None], use_cache=True, logits_to_keep=1,
                       **{key: cache}).logits[:, -1]
        start = time.perf_counter()
        token = logits.argmax(-1, keepdim=True)
        tokens = [token]
        for i in range(n - 1):
            logits = model(input_ids=token, position_ids=torch.tensor([[t + i]]), use_cache=True,
                           logits_to_keep=1, **{key: cache}).logits[:, -1]
            token = logits.argmax(-1, keepdim=True)
            tokens.append(token)
        seconds = time.perf_counter() - start
    return torch.cat([prompt, *tokens], dim=1)[0].tolist(), seconds, _hf_cache_bytes(cache)


def build_runner(config: MistralConfig, state: dict[str, torch.Tensor], impl: str, cache: str, models: dict):
    """A function n -> (tokens, decode seconds, cache bytes); ``models`` memoises the loaded models."""
    key = impl
    if key not in models:
        models[key] = model_for_loader(config, state, "inference") if impl == "kvlab" else hf_model(config, state, impl[3:])
    model = models[key]
    prompt = torch.randint(0, config.vocab_size, (1, PROMPT_LEN), generator=torch.Generator().manual_seed(1))
    if impl == "kvlab":
        return lambda n: decode_kvlab(model, prompt, n, cache)
    return lambda n: decode_hf(model[0], model[1], prompt, n, cache)


def child(job: dict[str, Any]) -> dict[str, Any]:
    """Peak memory of one run, in a fresh process: only this model, this cache, this decode."""
    torch.set_num_threads(job["threads"])
    config = preset(job["preset"], **({"sliding_window": job["window"]} if job.get("window") else {}))
    state = torch.load(job["weights"], weights_only=True)
    run = build_runner(config, state, job["impl"], job["cache"], {})
    del state
    run(WARMUP_TOKENS)
    release_free_memory()
    rss_before = _status_kib("VmRSS")
    exact_peak = reset_peak_rss()
    tokens, _, cache_bytes = run(job["tokens"])
    peak = max(0, _status_kib("VmHWM") - rss_before) * 1024
    return {"tokens_out": tokens, "peak_bytes": peak, "peak_exact": exact_peak, "kv_bytes": cache_bytes}


def run_child(job: dict[str, Any]) -> dict[str, Any]:
    proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(job)], capture_output=True, text=True,
                          env={**os.environ, "TRANSFORMERS_VERBOSITY": "error", "PYTHONWARNINGS": "ignore"})
    if proc.returncode:
        raise RuntimeError(f"run {job['impl']}/{job['cache']} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------ working set
def kv_working_set(config: MistralConfig, state: dict[str, torch.Tensor], kind: str, n: int) -> tuple[float, int]:
    """Bytes of K/V that attention's matmuls read per decode step, all layers: (mean over steps, last).

    With repeat_kv that is the n_rep-fold copies; with grouped attention, the cache's own K/V.
    """
    model = model_for_loader(config, state, "inference")
    cache = make_cache(kind, config, 1, max_tokens=PROMPT_LEN + n)
    reads = kv_read_bytes(cache, config.num_key_value_groups)
    prompt = torch.randint(0, config.vocab_size, (1, PROMPT_LEN), generator=torch.Generator().manual_seed(1))
    generate(model, prompt, n, cache=cache, inference_mode=True)
    del cache.update
    per_step = reads[1:]  # reads[0]: the prefill
    return sum(per_step) / len(per_step), per_step[-1]


# ------------------------------------------------------------------------------------------ main
def fmt_table(rows: list[dict[str, Any]], columns: list[tuple[str, str]]) -> str:
    cells = [[title for _, title in columns]] + [[str(r[key]) for key, _ in columns] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", nargs="+", default=["tiny", "small"])
    parser.add_argument("--tokens", nargs="+", type=int, default=[256, 1024, 4096], help="new tokens per run")
    parser.add_argument("--variants", nargs="+", default=list(CACHES), choices=list(CACHES))
    parser.add_argument("--no-hf", action="store_true", help="skip the transformers runs")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds per run (the best is kept)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--sliding-window", type=int, help="give every preset this window (both libraries); "
                        "the presets attend to all positions, so 'sliding' runs only with this set")
    parser.add_argument("--quick", action="store_true", help="tiny preset, 256 tokens: under two minutes")
    parser.add_argument("--out", type=Path, help="write the results as CSV here")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    if args.quick:
        args.presets, args.tokens = ["tiny"], [256]

    began = time.time()
    torch.set_num_threads(args.threads)
    print(f"bench_caches: torch {torch.__version__}, {args.threads} thread(s), {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.1f}, prompt {PROMPT_LEN} tokens, best of {args.repeats} interleaved rounds")
    runs = [("kvlab", v) for v in args.variants]
    if not args.no_hf:
        if importlib.util.find_spec("transformers") is not None:
            runs += HF_RUNS
        else:
            print("transformers is not installed: kvlab runs only")

    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.presets:
            config = preset(name, **({"sliding_window": args.sliding_window} if args.sliding_window else {}))
            weights = Path(tmp) / f"{name}.pt"
            state = random_state_dict(config)
            torch.save(state, weights)
            for n in args.tokens:
                specs = [(impl, cache) for impl, cache in runs if cache != "sliding" or config.sliding_window]
                # Speed: all runs of this preset x tokens in this process, interleaved round by round so
                # that a busy neighbour slows every run alike; the best round of each run is kept.
                models: dict[str, Any] = {}
                runners = {spec: build_runner(config, state, *spec, models) for spec in specs}
                best = {spec: float("inf") for spec in specs}
                for spec in specs:
                    runners[spec](WARMUP_TOKENS)
                for _ in range(args.repeats):
                    for spec in specs:
                        best[spec] = min(best[spec], runners[spec](n)[1])
                del models, runners
                group = []
                for impl, cache in specs:
                    job = {"preset": name, "weights": str(weights), "impl": impl, "cache": cache, "tokens": n,
                           "threads": args.threads, "window": args.sliding_window}
                    result = run_child(job)  # memory: one fresh process per run
                    result.update(decode_s=best[impl, cache], tok_s=(n - 1) / best[impl, cache])
                    group.append({"preset": name, "tokens": n, "impl": impl, "cache": cache, **result})
                    print(f"  {name:>5} {n:>5} {impl:>8} {cache:>7}: {result['tok_s']:7.1f} tok/s, "
                          f"peak {result['peak_bytes'] / MiB:7.1f} MiB", flush=True)
                exact = [r for r in group if r["impl"] == "kvlab" and r["cache"] in EXACT_CACHES] or group
                reference = exact[0]["tokens_out"]
                hf = [r["tok_s"] for r in group if r["impl"] != "kvlab"]
                for r in group:
                    r["vs_hf_best"] = f"{r['tok_s'] / max(hf):.2f}" if hf else "-"
                    same = r["tokens_out"] == reference
                    if not same:
                        first = next((i for i, (a, b) in enumerate(zip(r["tokens_out"], reference)) if a != b),
                                     len(reference)) - PROMPT_LEN
                    r["same"] = "yes" if same else f"no@{first}"
                    r["tok_s_txt"], r["peak_mib"] = f"{r['tok_s']:.1f}", f"{r['peak_bytes'] / MiB:.1f}"
                    r["kv_mib"] = f"{r['kv_bytes'] / MiB:.2f}"
                rows += group

            if {"concat", "gqa"} <= set(args.variants):
                n = min(args.tokens)
                lines = []
                for kind in ("concat", "static", "gqa"):
                    if kind in args.variants:
                        mean, last = kv_working_set(config, state, kind, n)
                        lines.append((kind, mean, last))
                base_mean, base_last = lines[0][1], lines[0][2]
                n_rep = config.num_key_value_groups
                print(f"\nK/V working set per decode step ({name}, {n} tokens, all layers; attention's matmul "
                      f"inputs): target for gqa <= 1/n_rep = 1/{n_rep} = {1 / n_rep:.3f} of concat")
                for kind, mean, last in lines:
                    print(f"  {kind:>7}: mean {mean / 1024:9.1f} KiB/step ({mean / base_mean:.3f} of concat), "
                          f"last step {last / 1024:9.1f} KiB ({last / base_last:.3f})")
            del state

    columns = [("preset", "preset"), ("tokens", "tokens"), ("impl", "impl"), ("cache", "cache"),
               ("tok_s_txt", "decode tok/s"), ("vs_hf_best", "vs HF best"), ("peak_mib", "peak MiB"),
               ("kv_mib", "KV MiB"), ("same", "same tokens")]
    print("\n" + fmt_table(rows, columns))
    print(f"\npeak MiB: resident memory decoding added above the loaded model (fresh process per run); "
          f"KV MiB: the cache's K/V tensors at the end. Load average now {os.getloadavg()[0]:.1f}; "
          f"total {time.time() - began:.0f} s.")
    if args.out:
        fields = ["preset", "tokens", "impl", "cache", "tok_s", "vs_hf_best", "decode_s", "peak_bytes", "kv_bytes",
                  "same", "peak_exact"]
        with open(args.out, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
