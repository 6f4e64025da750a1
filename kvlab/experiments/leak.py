"""The leak suites: decode until out of memory for each dtype x loader x cache, and the incident's length.

``leak`` runs every combination of ``--dtypes`` x ``--loaders`` x ``--caches`` (or the ``--runs``
given) to the token cap or the out-of-memory error, one weight set at a time. ``incident`` traces runs
at the incident's length (~140 tokens) and sets the live bytes by region next to the figures the
incident reported (:data:`INCIDENT`): ``incident.csv``.
"""

from __future__ import annotations

from typing import Any

import pandas as pd
from tqdm.auto import tqdm

from kvlab.config import DTYPES

from .runner import Context, RunSpec, in_units, run_kvlab

__all__ = ["INCIDENT", "LOADERS", "CACHES", "parse_runs", "suite_leak", "suite_incident"]

#: The incident's own figures (mistral.rs issue #49/#134, Candle #2070; CPU, ~100-word story).
INCIDENT = {"unquantized_total_GB": 6.0, "quantized_total_GB": 0.1, "repeat_kv_GB": 5.0, "concat_GB": 2.0}
#: The loaders and caches of the default grid (and the ones ``--runs`` may name).
LOADERS = ("trainable", "inference", "int8")
CACHES = ("concat", "static", "gqa")
_SOURCE = "incident (mistral.rs #49/#134, CPU, ~100-word story)"


def parse_runs(specs: list[str], default_tokens: int, suite: str) -> list[RunSpec]:
    """``dtype:loader:cache[:tokens]`` strings, e.g. ``bfloat16:trainable:concat:2048``; a ValueError
    naming the entry for anything else."""
    out = []
    for text in specs:
        parts = text.split(":")
        if len(parts) not in (3, 4) or (len(parts) == 4 and not parts[3].isdigit()):
            raise ValueError(f"--runs entry {text!r}: expected dtype:loader:cache[:tokens]")
        dtype, loader, cache = parts[:3]
        if dtype not in DTYPES or loader not in LOADERS or cache not in CACHES:
            raise ValueError(f"--runs entry {text!r}: dtype in {sorted(DTYPES)}, loader in {LOADERS}, "
                             f"cache in {CACHES}")
        out.append(RunSpec(suite, loader, cache, dtype, int(parts[3]) if len(parts) == 4 else default_tokens))
    return out


def suite_leak(ctx: Context) -> None:
    args = ctx.args
    if args.runs:
        specs = parse_runs(args.runs, args.tokens, "leak")
    else:
        specs = [RunSpec("leak", loader, cache, dtype, args.tokens)
                 for dtype in args.dtypes for loader in args.loaders for cache in args.caches]
    specs.sort(key=lambda s: args.dtypes.index(s.dtype) if s.dtype in args.dtypes else 99)  # one weight set at a time
    for spec in tqdm(specs, desc="leak runs", unit="run", disable=not args.progress):
        run_kvlab(ctx, spec, args.run_cap_s)


def suite_incident(ctx: Context) -> None:
    """Traced runs at the incident's length; the table of live bytes by region next to its figures."""
    args = ctx.args
    specs = parse_runs(args.incident_runs, args.incident_tokens, "incident") if args.incident_runs else [
        RunSpec("incident", loader, "concat", args.dtypes[0], args.incident_tokens) for loader in args.loaders]
    table: list[dict[str, Any]] = [
        {"source": _SOURCE, "run": "unquantized", "total_GB": INCIDENT["unquantized_total_GB"],
         "repeat_kv_GB": INCIDENT["repeat_kv_GB"], "concat_GB": INCIDENT["concat_GB"]},
        {"source": _SOURCE, "run": "quantized", "total_GB": INCIDENT["quantized_total_GB"]}]
    named = ("end_live_bytes", "end_live_repeat_kv", "end_live_cache", "end_live_peak_bytes")
    for spec in specs:
        spec.trace = True
        run = run_kvlab(ctx, spec, args.run_cap_s)
        row = {"source": f"kvlab {args.preset} on {ctx.rec.meta['device']['name']}", "run": spec.run_id,
               "status": run.get("status"), "tokens": run.get("tokens_done"),
               "total_GB": _gb(run.get("end_live_bytes")), "repeat_kv_GB": _gb(run.get("end_live_repeat_kv")),
               "concat_GB": _gb(run.get("end_live_cache")),
               "cuda_beyond_start_GB": _gb(run.get("final_beyond_start")) if ctx.device.type == "cuda" else None,
               "step_peak_live_GB": _gb(run.get("end_live_peak_bytes"))}
        row.update({k.removeprefix("end_live_") + "_GB": _gb(v) for k, v in run.items()
                    if k.startswith("end_live_") and k not in named})
        table.append(row)
    pd.DataFrame(table).to_csv(ctx.rec.out / "incident.csv", index=False)
    ctx.rec.meta["incident_table"] = table
    ctx.rec.flush()


def _gb(value: Any) -> float | None:
    return in_units(value, 1e9)
