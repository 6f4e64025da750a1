"""Performance test for KV-cache changes: run it before and after touching a cache.

    python -m kvlab.study.cachecheck --save-baseline before.json   # on the old code
    python -m kvlab.study.cachecheck --baseline before.json        # on the new code

(``benchmarks/bench_cache_change.py`` runs the same.)
For every cache variant the tiny preset with inference (frozen) weights decodes a fixed number of
tokens after a fixed prompt. Speed is tokens per second, the median of ``--repeats`` untraced runs
after a warm-up. Memory is the exact peak of live tensor bytes during one traced run (weights
excluded, :class:`kvlab.memory.trace.MemoryTracer`): deterministic, so any change in it is a real change
of the cache, not allocator noise. The generated tokens are hashed too: a cache change must not change
them (``int8`` excepted, it rounds K/V).

With ``--baseline`` it prints, per cache, the ratios against the baseline and exits 1 if any cache
got slower than ``--tolerance`` allows (0.15: 15 % fewer tokens/s), its peak memory grew more than
``--memory-tolerance`` allows, or its tokens changed; 2 on a missing or unreadable baseline. Speed
baselines only compare on the same machine under similar load; memory and tokens compare anywhere.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import sys
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from kvlab.caches import CACHES
from kvlab.config import preset
from kvlab.loaders import random_model
from kvlab.memory.units import MiB

from .probes import prompt_ids
from .records import environment, now_utc
from .runs import measure

__all__ = ["FORMAT", "measure_cache", "run_all", "compare", "main"]

FORMAT = "kvlab-bench-cache/1"


def measure_cache(kind: str, model: nn.Module, prompt: Tensor, tokens: int, repeats: int) -> dict[str, Any]:
    """Speed (median of ``repeats`` untraced runs after a warm-up), exact peak and end bytes (one traced
    run) and the tokens' hash of one cache design; every run a :func:`kvlab.study.runs.measure`."""
    timed = [measure(model, kind, tokens, prompt=prompt, trace=False, warmup=tokens if i == 0 else 0)
             for i in range(repeats)]
    traced = measure(model, kind, tokens, prompt=prompt, frames=False)
    if not torch.equal(traced.generated, timed[-1].generated):
        raise RuntimeError(f"cache {kind!r}: tokens differ between two identical runs")
    seconds = [run.seconds for run in timed]
    generated = traced.generated[0].tolist()
    return {"tokens_per_s": tokens / statistics.median(seconds), "seconds": seconds,
            "peak_bytes": traced.peak_bytes, "end_bytes": traced.end_bytes, "cache_bytes": traced.kv_nbytes,
            "tokens_sha256": hashlib.sha256(json.dumps(generated).encode()).hexdigest()}


def run_all(caches: list[str], tokens: int, prompt_len: int, repeats: int, window: int, seed: int) -> dict[str, Any]:
    """:func:`measure_cache` for every cache on the tiny preset with frozen weights and a ``window``."""
    config = preset("tiny", sliding_window=window)  # one config for all, so that "sliding" is comparable
    model = random_model(config, "inference", seed)
    prompt = prompt_ids(config.vocab_size, prompt_len, seed=seed)
    results = {}
    for kind in caches:
        results[kind] = r = measure_cache(kind, model, prompt, tokens, repeats)
        print(f"  {kind:8s} {r['tokens_per_s']:8.1f} tok/s   peak {r['peak_bytes'] / MiB:7.3f} MiB", file=sys.stderr)
    meta = {"format": FORMAT, "preset": "tiny", "sliding_window": window, "tokens": tokens, "prompt_len": prompt_len,
            "repeats": repeats, "seed": seed, **environment("cpu"), "date": now_utc(), "command": " ".join(sys.argv)}
    return {"meta": meta, "results": results}


def compare(current: dict[str, Any], baseline: dict[str, Any], tolerance: float,
            memory_tolerance: float) -> tuple[str, bool]:
    """A table of ratios against the baseline and whether every cache passed."""
    lines = [f"{'cache':8s} {'tok/s base':>10s} {'tok/s now':>10s} {'ratio':>6s} {'peak MiB base':>13s} "
             f"{'peak MiB now':>12s} {'ratio':>6s} {'tokens':>7s}  status"]
    ok = True
    for kind, base in baseline["results"].items():
        now = current["results"].get(kind)
        if now is None:
            lines.append(f"{kind:8s} {'(not measured now)':>40s}  MISSING")
            ok = False
            continue
        speed = now["tokens_per_s"] / base["tokens_per_s"]
        memory = now["peak_bytes"] / base["peak_bytes"] if base["peak_bytes"] else float("inf")
        same_tokens = now["tokens_sha256"] == base["tokens_sha256"]
        problems = []
        if speed < 1 - tolerance:
            problems.append("SLOWER")
        if memory > 1 + memory_tolerance:
            problems.append("MORE MEMORY")
        if not same_tokens:
            problems.append("TOKENS CHANGED")
        ok &= not problems
        lines.append(f"{kind:8s} {base['tokens_per_s']:10.1f} {now['tokens_per_s']:10.1f} {speed:6.2f} "
                     f"{base['peak_bytes'] / MiB:13.3f} {now['peak_bytes'] / MiB:12.3f} {memory:6.2f} "
                     f"{'same' if same_tokens else 'differ':>7s}  {' '.join(problems) or 'ok'}")
    for kind in current["results"]:
        if kind not in baseline["results"]:
            lines.append(f"{kind:8s} {current['results'][kind]['tokens_per_s']:21.1f}  (new: no baseline)")
    return "\n".join(lines), ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kvlab.study.cachecheck", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--save-baseline", type=Path, metavar="FILE", help="measure and write the baseline JSON")
    mode.add_argument("--baseline", type=Path, metavar="FILE", help="measure and compare with this baseline")
    parser.add_argument("--caches", default=",".join(CACHES), help=f"comma-separated (default {','.join(CACHES)})")
    parser.add_argument("--tokens", type=int, default=128, help="tokens to decode (default 128)")
    parser.add_argument("--prompt-len", type=int, default=16, help="prompt tokens (default 16)")
    parser.add_argument("--window", type=int, default=64, help="sliding window of the config (default 64)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per cache; the median counts (default 3)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1, steadier timings)")
    parser.add_argument("--tolerance", type=float, default=0.15, help="allowed tok/s loss as a fraction (default 0.15)")
    parser.add_argument("--memory-tolerance", type=float, default=0.05,
                        help="allowed peak-memory growth as a fraction (default 0.05)")
    args = parser.parse_args(argv)
    caches = [c.strip() for c in args.caches.split(",") if c.strip()]
    unknown = [c for c in caches if c not in CACHES]
    if unknown or args.tokens < 1 or args.repeats < 1 or args.prompt_len < 1:
        parser.error(f"unknown cache(s) {unknown}; choose from {list(CACHES)}" if unknown
                     else "--tokens, --repeats and --prompt-len must be positive")
    baseline = None
    if args.baseline is not None:
        try:
            baseline = json.loads(args.baseline.read_text())
            if baseline.get("format") != FORMAT and baseline.get("meta", {}).get("format") != FORMAT:
                raise ValueError(f"not a {FORMAT} file")
        except (OSError, ValueError, AttributeError) as exc:
            print(f"cachecheck: cannot use baseline {args.baseline}: {exc}", file=sys.stderr)
            return 2
        meta = baseline["meta"]
        args.tokens, args.prompt_len, args.window = meta["tokens"], meta["prompt_len"], meta["sliding_window"]
        args.seed = meta["seed"]
    if args.threads:
        torch.set_num_threads(args.threads)
    current = run_all(caches, args.tokens, args.prompt_len, args.repeats, args.window, args.seed)
    if args.save_baseline is not None:
        args.save_baseline.parent.mkdir(parents=True, exist_ok=True)
        args.save_baseline.write_text(json.dumps(current, indent=2) + "\n")
        print(f"baseline written to {args.save_baseline}")
        return 0
    table, ok = compare(current, baseline, args.tolerance, args.memory_tolerance)
    print(table)
    print("ok" if ok else f"FAILED: slower than --tolerance {args.tolerance}, more memory than "
                          f"--memory-tolerance {args.memory_tolerance}, changed tokens or a missing cache")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
