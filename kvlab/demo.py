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

from kvlab.caches import CACHES
from kvlab.config import PRESETS
from kvlab.loaders import LOADERS, TRAINABLE_LOADERS, load_model
from kvlab.memory.units import MiB
from kvlab.study.runs import measure
from kvlab.synthetic import build_checkpoint


def run_demo(preset: str = "tiny", tokens: int = 256, loaders: Sequence[str] = LOADERS, cache: str = "concat",
             seed: int = 0, root: str | Path | None = None, progress: bool = True) -> pd.DataFrame:
    """One row per loader: retained MiB after ``tokens // 2`` and ``tokens`` tokens, growth ratio, KV MiB, verdict.

    Each row is one :func:`kvlab.study.runs.measure` run with the kept bytes measured on the way, after
    N and after 2N tokens: the same as two runs of N and 2N tokens, since decoding is deterministic and
    the cache at step N is the same either way. No tracer, so the demo takes seconds.
    """
    if tokens < 2:
        raise ValueError(f"tokens must be at least 2, got {tokens}")
    directory = build_checkpoint(preset, root=root, seed=seed)
    half = tokens // 2
    rows = []
    for loader in tqdm(loaders, desc="loaders", unit="loader", disable=not progress):
        model = load_model(directory, loader)
        run = measure(model, cache, tokens, loader=loader, seed=seed, trace=False, retained=True)
        del model  # free this loader's model before the next one loads
        kept = run.retained
        rows.append({
            "loader": loader,
            f"retained MiB @{half}": kept[half].total_bytes / MiB,
            f"retained MiB @{tokens}": kept[tokens].total_bytes / MiB,
            "growth ratio": run.leak.growth_ratio,
            "KV cache MiB": kept[tokens].cache_bytes / MiB,
            "params requiring grad": run.params_requiring_grad,
            "verdict": run.leak.verdict,
            "seconds": run.seconds,
            "tokens": run.generated[0].tolist(),
        })
    return pd.DataFrame(rows)


def expected_contrast(table: pd.DataFrame) -> bool:
    """Trainable-style loaders leak, the others do not, and every loader generated the same tokens
    except int8 (quantized weights may change the argmax)."""
    for row in table.itertuples(index=False):
        should_leak = row.loader in TRAINABLE_LOADERS
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
    problem = (f"--loaders: unknown loader(s) {unknown}; choose from {list(LOADERS)}" if unknown or not loaders
               else f"--preset {args.preset!r}: choose from {sorted(PRESETS)}" if args.preset not in PRESETS
               else f"--cache {args.cache!r}: choose from {list(CACHES)}" if args.cache not in CACHES
               else f"--tokens must be at least 2, got {args.tokens}" if args.tokens < 2
               else f"--threads must be at least 0, got {args.threads}" if args.threads < 0 else None)
    if problem:
        print(f"kvlab demo: error: {problem}", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    table = run_demo(args.preset, args.tokens, loaders, args.cache, progress=not args.quiet)
    shown = table.drop(columns=["tokens"])
    print(f"\n{args.preset} model, {args.cache} cache, greedy decode of {args.tokens} tokens "
          "from a one-token prompt:\n")
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
