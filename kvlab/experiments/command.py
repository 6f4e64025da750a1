"""``python -m kvlab.experiments``: its options, and one session running the suites in order.

:func:`run_experiments` returns the session's ``meta.json`` content (tests and notebooks read it);
:func:`main` is the command, which reports bad options in one line with exit code 2.
"""

from __future__ import annotations

import argparse
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from kvlab.config import DTYPES, PRESETS, preset
from kvlab.study.env import cleanup, parse_device
from kvlab.study.records import Recorder, environment, now_utc

from .leak import CACHES, INCIDENT, LOADERS, parse_runs, suite_incident, suite_leak
from .runner import STEP_COLUMNS, Context
from .speed import suite_bandwidth, suite_compare, suite_fast, suite_hf_compile
from .summary import summarize
from .transformers_suites import suite_hf, suite_parity

__all__ = ["SUITES", "parser", "run_experiments", "main"]

DESCRIPTION = "Real-scale experiments: the leak, the fix and the fast path at the Mistral-7B shape on one GPU."
#: Every suite, in the order a session runs them.
SUITES: dict[str, Callable[[Context], None]] = {
    "bandwidth": suite_bandwidth, "parity": suite_parity, "compare": suite_compare, "hf": suite_hf,
    "fast": suite_fast, "hf-compile": suite_hf_compile, "leak": suite_leak, "incident": suite_incident}
NOTES = {"beyond_start_bytes": "allocated minus allocated before the run's cache existed (CUDA); live tensor "
                               "bytes created during the run (CPU)",
         "cuda_peak_step": "max_memory_allocated since the previous step (reset every step)",
         "live_<site>": "exact bytes of tensor storages allocated in that record_function region (outside "
                        "regions: module path or Python line) and alive at the step's end "
                        "(kvlab.memory.trace.MemoryTracer)"}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m kvlab.experiments", description=DESCRIPTION,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)

    def csv(text: str) -> list[str]:
        return [x for x in text.split(",") if x]

    p.add_argument("--preset", default="tiny")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", type=Path, default=Path("reports/experiments"))
    p.add_argument("--suites", type=csv, default=["bandwidth", "parity", "compare", "hf", "fast", "leak", "incident"],
                   help=f"comma-separated, from {tuple(SUITES)}")
    p.add_argument("--dtypes", type=csv, default=None, help="first = the dtype of speed runs (default: preset's)")
    p.add_argument("--loaders", type=csv, default=list(LOADERS))
    p.add_argument("--caches", type=csv, default=list(CACHES))
    p.add_argument("--tokens", type=int, default=64, help="token cap of leak runs")
    p.add_argument("--runs", nargs="*", default=None,
                   help="leak runs as dtype:loader:cache[:tokens] (overrides the grid)")
    p.add_argument("--run-cap-s", type=float, default=None, help="wall-time cap of one leak run")
    p.add_argument("--budget-s", type=float, default=None, help="stop starting new work after this many seconds")
    p.add_argument("--prompt-len", type=int, default=8)
    p.add_argument("--parity-len", type=int, default=32)
    p.add_argument("--speed-tokens", type=int, default=None, help="tokens timed by compare/fast/hf (default: --tokens)")
    p.add_argument("--static-slack", type=int, default=0, help="extra static-cache slots beyond prompt + tokens")
    p.add_argument("--fast-variants", type=csv, default=["gqa"], help="fast paths: gqa (grouped) and/or static")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None, help="default: on CUDA only")
    p.add_argument("--compile-backend", default="inductor")
    p.add_argument("--warmup", type=int, default=8, help="decode calls spent compiling/capturing before timing")
    p.add_argument("--hf-attn", default="sdpa", help="transformers attention for speed/leak runs")
    p.add_argument("--hf-attn-parity", type=csv, default=["eager", "sdpa"])
    p.add_argument("--hf-generate", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--hf-leak-tokens", type=int, default=None, help="default: max of --hf-leak-points")
    p.add_argument("--hf-leak-points", type=lambda s: [int(x) for x in s.split(",")], default=[16, 32, 48, 64])
    p.add_argument("--incident-tokens", type=int, default=140)
    p.add_argument("--incident-runs", nargs="*", default=None, help="traced runs as dtype:loader:cache[:tokens]")
    p.add_argument("--trace", action="store_true", help="trace live bytes by region in leak runs too (slower)")
    p.add_argument("--copy-gib", type=float, default=4.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--summarize", type=Path, nargs="+", default=None, metavar="DIR",
                   help="no runs: read these result folders, compare with kvlab.study.memmodel, write into --out")
    return p


def _check(args: argparse.Namespace) -> None:
    """A ValueError naming the first option that cannot work, before anything runs."""
    if args.summarize:
        missing = [str(d) for d in args.summarize if not (d / "meta.json").is_file()]
        if missing:
            raise ValueError(f"--summarize: no meta.json in {', '.join(missing)}")
        return
    unknown = sorted(set(args.suites) - set(SUITES))
    if unknown:
        raise ValueError(f"--suites: unknown suite(s) {unknown}; choose from {tuple(SUITES)}")
    if args.preset not in PRESETS:
        raise ValueError(f"--preset {args.preset!r}: choose from {sorted(PRESETS)}")
    parse_device(args.device)
    bad = [d for d in args.dtypes or [] if d not in DTYPES] or [x for x in args.loaders if x not in LOADERS] or [
        x for x in args.caches if x not in CACHES] or [v for v in args.fast_variants if v not in ("gqa", "static")]
    if bad:
        raise ValueError(f"unknown value(s) {bad}: dtypes {sorted(DTYPES)}, loaders {LOADERS}, caches {CACHES}, "
                         "fast variants gqa/static")
    if min(args.tokens, args.prompt_len, args.parity_len, *args.hf_leak_points) < 1:
        raise ValueError("--tokens, --prompt-len, --parity-len and --hf-leak-points must be positive")
    for specs in (args.runs, args.incident_runs):
        parse_runs(specs or [], args.tokens, "check")


def run_experiments(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the session ``argv`` describes (``--summarize``: only the summary); returns its metadata.

    Raises ``ValueError`` for options that cannot work (see :func:`main`).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser().parse_args(argv)
    _check(args)
    if args.summarize:
        return summarize(args.summarize, args.out)
    device = torch.device(args.device)
    config = preset(args.preset)
    args.dtypes = args.dtypes or [config.torch_dtype]
    args.speed_tokens = args.speed_tokens or args.tokens
    args.hf_leak_tokens = args.hf_leak_tokens or max(args.hf_leak_points)
    args.fast_variants = [v == "gqa" for v in args.fast_variants]
    meta = environment(device)
    meta.update(date=now_utc(), command="python -m kvlab.experiments " + " ".join(argv), preset=args.preset,
                config=config, args=dict(vars(args)), incident_figures=INCIDENT, notes=NOTES)
    rec = Recorder(args.out, meta, first_columns=STEP_COLUMNS)
    ctx = Context(args, config, device, rec, time.perf_counter())
    rec.flush()
    for name in [s for s in SUITES if s in args.suites]:
        if ctx.remaining() < 10:
            meta.setdefault("skipped_suites", []).append(name)
            continue
        start = time.perf_counter()
        tqdm.write(f"== suite {name} ({ctx.remaining():.0f} s left)" if args.budget_s else f"== suite {name}")
        try:
            SUITES[name](ctx)
        except Exception as exc:  # record and go on with the next suite
            meta.setdefault("suite_errors", {})[name] = f"{type(exc).__name__}: {exc}"[:500]
            traceback.print_exc()
        meta.setdefault("suite_seconds", {})[name] = time.perf_counter() - start
        rec.flush()
    ctx.weights.clear()
    cleanup(device)
    meta["total_s"] = time.perf_counter() - ctx.t0
    rec.flush()
    return meta


def main(argv: list[str] | None = None) -> int:
    """The command: 0 when every suite ran without error, 1 when one recorded an error, 2 for bad options."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        _check(parser().parse_args(argv))
    except ValueError as exc:
        print(f"python -m kvlab.experiments: error: {exc}", file=sys.stderr)
        return 2
    meta = run_experiments(argv)
    return 1 if meta.get("suite_errors") else 0
