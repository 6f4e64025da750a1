"""Decode speed and peak memory of each loader on the same checkpoint, side by side in one run.

Each loader runs in a fresh process (so one run's heap cannot hide another's growth):
:func:`kvlab.study.isolated.loader_speed_child` loads the checkpoint, decodes ``--tokens`` greedy tokens
with the concat cache, and reports the decode time and the peak RSS above the loaded model. The point:
the fix is not only smaller but faster -- recording a graph costs time.

    python benchmarks/bench_loaders.py --preset tiny --tokens 256
"""

from __future__ import annotations

import argparse

import pandas as pd

from kvlab.loaders import LOADERS
from kvlab.memory.units import MiB
from kvlab.study.isolated import run_isolated
from kvlab.synthetic import build_checkpoint


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads per run (default 1)")
    parser.add_argument("--loaders", nargs="+", default=list(LOADERS), choices=LOADERS)
    args = parser.parse_args(argv)
    directory = str(build_checkpoint(args.preset))
    rows = []
    for loader in args.loaders:
        r = run_isolated("kvlab.study.isolated:loader_speed_child",
                         dict(directory=directory, loader=loader, tokens=args.tokens, threads=args.threads))
        rows.append(dict(loader=loader, seconds=r["seconds"], tok_per_s=args.tokens / r["seconds"],
                         peak_MiB=r["peak_above_model"] / MiB))
    table = pd.DataFrame(rows).set_index("loader")
    if "inference" in table.index:
        ref = table.loc["inference"]
        table["speed_vs_inference"] = table["tok_per_s"] / ref["tok_per_s"]
        table["peak_vs_inference"] = table["peak_MiB"] / max(ref["peak_MiB"], 1e-9)
    print(f"{args.preset} preset, {args.tokens} tokens, concat cache, {args.threads} thread(s), "
          "peak RSS above the loaded model (fresh process per loader)")
    print(table.round(3).to_string())
    if "inference" in table.index:
        verdict = "met" if table.loc["inference", "seconds"] < 5 else "MISSED"
        print(f"target: inference decodes {args.tokens} tokens in under 5 s -> {verdict}")


if __name__ == "__main__":
    main()
