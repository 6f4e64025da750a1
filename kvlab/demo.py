"""The leak and the fix in a few seconds: ``python -m kvlab.demo`` (or ``kvlab demo``).

Builds the tiny checkpoint, loads it with every loader, generates the same tokens with each, and
measures what the decode loop keeps alive after N and 2N tokens (cache tensors plus everything the
autograd graph saved, exact bytes). A KV cache alone doubles from N to 2N; the trainable loaders'
retained memory grows about four times (quadratic: every step keeps a graph that references all the
cache before it), while the inference and int8 loaders keep exactly the cache.

Exit code 0 when the table shows the expected contrast (trainable/threaded leak, inference/int8 do
not), 1 otherwise — so the demo doubles as a smoke test.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import pandas as pd
import torch
from tqdm.auto import tqdm

from .caches import make_cache
from .checkpoint import build_checkpoint
from .generate import Step, generate
from kvlab.memory.leakguard import Retained, compare_retained, measure_retained
from .loaders import LOADERS, load_model

MIB = 2**20
LEAKING_LOADERS = ("trainable", "threaded")


def run_demo(preset: str = "tiny", tokens: int = 256, loaders: Sequence[str] = LOADERS, cache: str = "concat",
             seed: int = 0, root: str | Path | None = None, progress: bool = True) -> pd.DataFrame:
    """One row per loader: retained MiB after ``tokens // 2`` and ``tokens`` tokens, growth ratio, KV MiB, verdict.

    One generation per loader, measured twice on the way (after N and after 2N tokens), is the same
    as two generations of N and 2N tokens: decoding is deterministic and the cache at step N is the
    same either way.
    """
    if tokens < 2:
        raise ValueError(f"tokens must be at least 2, got {tokens}")
    directory = build_checkpoint(preset, root=root, seed=seed)
    half = tokens // 2
    rows = []
    for loader in tqdm(loaders, desc="loaders", unit="loader", disable=not progress):
        model = load_model(directory, loader)
        config = model.config
        kept: dict[int, Retained] = {}

        def probe(step: Step, model: torch.nn.Module = model, kept: dict[int, Retained] = kept) -> None:
            if step.index + 1 in (half, tokens):
                kept[step.index + 1] = measure_retained((step.cache, step.logits), model)

        start = time.perf_counter()
        result = generate(model, torch.tensor([[1]]), tokens, on_step=probe,
                          cache=make_cache(cache, config, max_tokens=tokens + 1))
        seconds = time.perf_counter() - start
        report = compare_retained(kept[half], kept[tokens], tokens - half, config=config)
        rows.append({
            "loader": loader,
            f"retained MiB @{half}": kept[half].total_bytes / MIB,
            f"retained MiB @{tokens}": kept[tokens].total_bytes / MIB,
            "growth ratio": report.growth_ratio,
            "KV cache MiB": kept[tokens].cache_bytes / MIB,
            "params requiring grad": sum(p.requires_grad for p in model.parameters()),
            "verdict": report.verdict,
            "seconds": seconds,
            "tokens": result.tokens[0, 1:].tolist(),
        })
        del model, result, kept, probe  # free this loader's model before the next one loads
    return pd.DataFrame(rows)


def expected_contrast(table: pd.DataFrame) -> bool:
    """Trainable-style loaders leak, the others do not, and every loader generated the same tokens
    except int8 (quantized weights may change the argmax)."""
    for row in table.itertuples(index=False):
        should_leak = row.loader in LEAKING_LOADERS
        if (row.verdict == "LEAK") != should_leak:
            return False
    exact = table[table["loader"] != "int8"]["tokens"].tolist()
    return all(t == exact[0] for t in exact)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kvlab demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny", help="model preset (default tiny)")
    parser.add_argument("--tokens", type=int, default=256, help="tokens to generate per loader (default 256)")
    parser.add_argument("--loaders", default=",".join(LOADERS), help=f"comma-separated (default {','.join(LOADERS)})")
    parser.add_argument("--cache", default="concat", help="cache design (default concat)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: the tiny model's matmuls are too small to gain from "
                             "more, and busy cores make extra threads wait for each other; 0 = torch's default)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    loaders = [name.strip() for name in args.loaders.split(",") if name.strip()]
    unknown = [name for name in loaders if name not in LOADERS]
    if unknown or args.tokens < 2:
        problem = f"unknown loader(s) {unknown}; choose from {list(LOADERS)}" if unknown else "--tokens must be >= 2"
        print(f"kvlab demo: error: {problem}", file=sys.stderr)
        return 2
    if args.threads < 0:
        print("kvlab demo: error: --threads must be >= 0", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    try:
        table = run_demo(args.preset, args.tokens, loaders, args.cache, progress=not args.quiet)
    except ValueError as exc:
        print(f"kvlab demo: error: {exc}", file=sys.stderr)
        return 2
    shown = table.drop(columns=["tokens"])
    print(f"\n{args.preset} model, {args.cache} cache, greedy decode of {args.tokens} tokens from one token:\n")
    print(shown.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    print("\nA KV cache alone doubles from N to 2N tokens (ratio ~2). Trainable weights make every step record "
          "an autograd graph\nthat the cache's concat chain keeps alive: retained memory grows ~quadratically "
          "(ratio -> 4). The inference\nloader (frozen weights) and int8 keep exactly the cache. "
          f"Total {time.perf_counter() - start:.1f} s.")
    ok = expected_contrast(table)
    if not ok:
        print("kvlab demo: the expected contrast (trainable leaks, inference does not) did not show", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
