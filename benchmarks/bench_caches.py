"""Decode speed of kvlab's KV caches beside transformers' caches, measured side by side in one run.

For every preset x token count this decodes with kvlab's ``MistralForCausalLM`` (frozen weights) and
each cache design, and with transformers' ``MistralForCausalLM`` holding the *same* tensors
(:func:`kvlab.study.hf.hf_model`) with ``DynamicCache`` and ``StaticCache``, in eager and SDPA
attention. It prints each run's speed as a ratio to transformers' fastest run of the same preset and
length, and the K/V bytes attention reads per step with grouped attention (``gqa``) against
``concat`` + repeat_kv.

How it measures, and why:

- Both libraries run the same greedy loop (one forward per token, logits of the last position only,
  under ``torch.inference_mode()``): kvlab's :func:`~kvlab.generate.generate` and transformers'
  :func:`kvlab.study.hf.greedy`, from the one prompt recipe (:func:`kvlab.study.probes.prompt_ids`), so
  the difference is the model + cache code, not a sampling wrapper. The clock starts after the prefill.
- All runs of one preset x token count are interleaved round by round (``--repeats`` rounds, the best
  kept), so that load from other processes hits every run alike; the ratios are only ever taken
  between runs of the same process and rounds.
- One intra-op thread by default (``--threads``): these models are small, and on a shared machine two
  threads waiting for each other at every op make timings erratic.
- The clock is the process's CPU time by default (``--clock cpu``): on a machine shared with other
  work, wall time mostly measures how long each run waited for a core, while CPU time measures the
  work each run did. On an idle machine the two agree; ``--clock wall`` gives wall time.
- Each run's tokens are compared with the first exact kvlab run's (``same``; ``no@k``: first differs at
  new token k); ``int8`` is expected to differ eventually, transformers' SDPA may in rare near-ties.
- The presets attend to every position, so ``sliding`` is skipped unless ``--sliding-window`` gives
  every run (both libraries) a window.

Memory is not measured here: each design's bytes are exact and pinned elsewhere (``kv_bytes`` and the
tracer in ``python -m kvlab.study.cachecheck``); the ``KV MiB`` column is each cache's own size.

Usage: ``python benchmarks/bench_caches.py --quick`` (tiny preset, 256 tokens; about a minute),
or e.g. ``--presets tiny small --tokens 256 1024 4096 --variants concat gqa --out results.csv``.
"""

from __future__ import annotations

import argparse
import csv
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from kvlab.caches import CACHES, EXACT_CACHES, make_cache
from kvlab.config import MistralConfig, preset
from kvlab.generate import generate
from kvlab.loaders import model_for_loader
from kvlab.memory.units import MiB
from kvlab.study import hf
from kvlab.study.probes import kv_read_bytes, prompt_ids
from kvlab.synthetic import random_state_dict

HF_RUNS = [("hf-eager", "DynamicCache"), ("hf-eager", "StaticCache"), ("hf-sdpa", "DynamicCache"),
           ("hf-sdpa", "StaticCache")]
PROMPT_LEN = 16
WARMUP_TOKENS = 8
Run = Callable[[int], tuple[list[int], float, int]]  # new tokens -> (tokens, decode seconds, KV bytes)
CLOCKS = {"cpu": time.process_time, "wall": time.perf_counter}


def runner(model: torch.nn.Module, config: MistralConfig, cache: str, clock: Callable[[], float]) -> Run:
    """A function decoding ``n`` new tokens with a fresh ``cache`` after the shared prompt."""
    prompt = prompt_ids(config.vocab_size, PROMPT_LEN, seed=1)
    transformers_model = hf.is_transformers(model)

    def run(n: int) -> tuple[list[int], float, int]:
        marks: list[float] = []

        def mark(step: Any) -> None:  # the clock starts once the prefill's token is chosen
            if step.index == 0:
                marks.append(clock())

        with torch.inference_mode():
            if transformers_model:
                kv = hf.new_cache(model, cache, PROMPT_LEN + n)
                out = hf.greedy(model, prompt, n, kv, on_step=mark)
                nbytes = hf.cache_bytes(kv)
            else:
                kv = make_cache(cache, config, 1, max_tokens=PROMPT_LEN + n)
                out = generate(model, prompt, n, cache=kv, on_step=mark)
                nbytes = kv.nbytes
        return out.tokens[0].tolist(), clock() - marks[0], nbytes

    return run


def kv_working_set(model: torch.nn.Module, config: MistralConfig, kind: str, n: int) -> tuple[float, int]:
    """Bytes of K/V that attention reads per decode step, all layers: (mean over steps, last step).

    With repeat_kv that is the n_rep-fold copies; with grouped attention, the cache's own K/V.
    """
    cache = make_cache(kind, config, 1, max_tokens=PROMPT_LEN + n)
    reads = kv_read_bytes(cache, config.num_key_value_groups)
    generate(model, prompt_ids(config.vocab_size, PROMPT_LEN, seed=1), n, cache=cache, inference_mode=True)
    del cache.update
    per_step = reads[1:]  # reads[0]: the prefill
    return sum(per_step) / len(per_step), per_step[-1]


def measure_group(config: MistralConfig, state: dict[str, torch.Tensor], specs: list[tuple[str, str]], n: int,
                  repeats: int, clock: Callable[[], float]) -> list[dict[str, Any]]:
    """Every run of one preset x length, interleaved round by round; the best round of each is kept."""
    models = {"kvlab": model_for_loader(config, state, "inference")}
    for impl, _ in specs:
        if impl != "kvlab" and impl not in models:
            models[impl] = hf.hf_model(config, state, "cpu", impl.removeprefix("hf-")).requires_grad_(False)
    runs = {spec: runner(models[spec[0]], config, spec[1], clock) for spec in specs}
    for run in runs.values():
        run(WARMUP_TOKENS)
    best: dict[tuple[str, str], tuple[list[int], float, int]] = {}
    for _ in range(repeats):
        for spec, run in runs.items():
            result = run(n)
            if spec not in best or result[1] < best[spec][1]:
                best[spec] = result
    return [{"impl": impl, "cache": cache, "tokens_out": best[impl, cache][0], "decode_s": best[impl, cache][1],
             "tok_s": (n - 1) / best[impl, cache][1], "kv_bytes": best[impl, cache][2]} for impl, cache in specs]


def annotate(group: list[dict[str, Any]]) -> None:
    """Ratios to transformers' fastest run of the group, and token agreement with the first exact run."""
    exact = [r for r in group if r["impl"] == "kvlab" and r["cache"] in EXACT_CACHES] or group
    reference = exact[0]["tokens_out"]
    fastest_hf = max((r for r in group if r["impl"] != "kvlab"), key=lambda r: r["tok_s"], default=None)
    for r in group:
        r["vs_hf_best"] = f"{r['tok_s'] / fastest_hf['tok_s']:.2f}" if fastest_hf else "-"
        r["hf_best"] = f"{fastest_hf['impl']}/{fastest_hf['cache']}" if fastest_hf else "-"
        first = next((i for i, (a, b) in enumerate(zip(r["tokens_out"], reference)) if a != b), None)
        r["same"] = "yes" if first is None else f"no@{first - PROMPT_LEN}"
        r["tok_s_txt"], r["kv_mib"] = f"{r['tok_s']:.1f}", f"{r['kv_bytes'] / MiB:.2f}"


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
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="cpu",
                        help="cpu: process CPU time (robust on a shared machine); wall: elapsed time")
    parser.add_argument("--sliding-window", type=int, help="give every preset this window (both libraries); "
                        "the presets attend to all positions, so 'sliding' runs only with this set")
    parser.add_argument("--quick", action="store_true", help="tiny preset, 256 tokens: about a minute")
    parser.add_argument("--out", type=Path, help="write the results as CSV here")
    args = parser.parse_args(argv)
    if args.quick:
        args.presets, args.tokens = ["tiny"], [256]

    began = time.time()
    torch.set_num_threads(args.threads)
    print(f"bench_caches: torch {torch.__version__}, {args.threads} thread(s), {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.1f}, prompt {PROMPT_LEN} tokens, best of {args.repeats} interleaved "
          f"rounds, {args.clock} time")
    runs = [("kvlab", v) for v in args.variants]
    if not args.no_hf:
        if hf.hf_available():
            runs += HF_RUNS
        else:
            print("transformers is not installed: kvlab runs only")

    rows: list[dict[str, Any]] = []
    for name in args.presets:
        config = preset(name, **({"sliding_window": args.sliding_window} if args.sliding_window else {}))
        state = random_state_dict(config)
        for n in args.tokens:
            specs = [(impl, cache) for impl, cache in runs if cache != "sliding" or config.sliding_window]
            group = measure_group(config, state, specs, n, args.repeats, CLOCKS[args.clock])
            annotate(group)
            for r in group:
                r.update(preset=name, tokens=n)
                print(f"  {name:>5} {n:>5} {r['impl']:>8} {r['cache']:>12}: {r['tok_s_txt']:>7} tok/s "
                      f"({r['vs_hf_best']} of {r['hf_best']})", flush=True)
            rows += group
        if {"concat", "gqa"} <= set(args.variants):
            n, model = min(args.tokens), model_for_loader(config, state, "inference")
            sets = {kind: kv_working_set(model, config, kind, n) for kind in ("concat", "static", "gqa")
                    if kind in args.variants}
            base_mean, base_last = sets["concat"]
            n_rep = config.num_key_value_groups
            print(f"\nK/V working set per decode step ({name}, {n} tokens, all layers; attention's inputs): "
                  f"target for gqa <= 1/n_rep = 1/{n_rep} = {1 / n_rep:.3f} of concat")
            for kind, (mean, last) in sets.items():
                print(f"  {kind:>7}: mean {mean / 1024:9.1f} KiB/step ({mean / base_mean:.3f} of concat), "
                      f"last step {last / 1024:9.1f} KiB ({last / base_last:.3f})")

    columns = [("preset", "preset"), ("tokens", "tokens"), ("impl", "impl"), ("cache", "cache"),
               ("tok_s_txt", "decode tok/s"), ("vs_hf_best", "vs HF best"), ("kv_mib", "KV MiB"),
               ("same", "same tokens")]
    print("\n" + fmt_table(rows, columns))
    gqa = [r for r in rows if r["impl"] == "kvlab" and r["cache"] == "gqa" and r["vs_hf_best"] != "-"]
    for r in gqa:
        verdict = "met" if float(r["vs_hf_best"]) >= 1.0 else "MISSED"
        print(f"gqa vs transformers' fastest ({r['hf_best']}), {r['preset']} {r['tokens']} tokens: "
              f"{r['vs_hf_best']}x (target >= 1.00: {verdict})")
    print(f"\nKV MiB: the cache's K/V tensors at the end. Load average now {os.getloadavg()[0]:.1f}; "
          f"total {time.time() - began:.0f} s.")
    if args.out:
        fields = ["preset", "tokens", "impl", "cache", "tok_s", "vs_hf_best", "hf_best", "decode_s", "kv_bytes", "same"]
        with open(args.out, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
