"""Decode speed and peak memory of each loader on the same checkpoint, side by side in one run.

Each loader runs in a fresh process (so one run's heap cannot hide another's growth): load the
checkpoint, decode ``--tokens`` greedy tokens with the concat cache, report tokens/s and the peak RSS
above the loaded model. The point: the fix is not only smaller but faster — recording a graph costs time.

    python benchmarks/bench_loaders.py --preset tiny --tokens 256
"""

from __future__ import annotations

import argparse

import pandas as pd

from kvlab.checkpoint import build_checkpoint
from kvlab.loaders import LOADERS
from kvlab.memory.rss import run_python

CHILD = """
import json, resource, time, torch
torch.set_num_threads({threads})
from kvlab.caches import ConcatCache
from kvlab.generate import generate
from kvlab.loaders import load_model
from kvlab.memory.rss import rss_bytes
model = load_model({directory!r}, {loader!r})
prompt = torch.tensor([[1]])
generate(model, prompt, 4, cache=ConcatCache(model.config.num_hidden_layers))  # warm-up
base = rss_bytes()
start = time.perf_counter()
generate(model, prompt, {tokens}, cache=ConcatCache(model.config.num_hidden_layers))
seconds = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
print(json.dumps(dict(seconds=seconds, peak_above_model=max(peak - base, 0))))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads per run (default 1)")
    parser.add_argument("--loaders", nargs="+", default=list(LOADERS), choices=LOADERS)
    args = parser.parse_args()
    directory = str(build_checkpoint(args.preset))
    rows = []
    for loader in args.loaders:
        r = run_python(CHILD.format(directory=directory, loader=loader, tokens=args.tokens, threads=args.threads))
        rows.append(dict(loader=loader, seconds=r["seconds"], tok_per_s=args.tokens / r["seconds"],
                         peak_MiB=r["peak_above_model"] / 2**20))
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
