"""``python -m kvlab.experiments --summarize DIR ... --out OUT``: recorded results against the analytic model.

Runs nothing and needs no GPU: it reads result folders (:func:`kvlab.study.results.load_results`) and
writes what they show next to :mod:`kvlab.study.memmodel`: ``leak_vs_model.csv``,
``incident_by_site.csv`` and ``summary.json``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd

from kvlab.memory.units import GiB
from kvlab.study.memmodel import leak_by_site, weight_bytes
from kvlab.study.records import write_json
from kvlab.study.results import leak_vs_model, load_results, peak_breakdown

from .leak import INCIDENT

__all__ = ["summarize"]

_SOURCE_KEYS = ("command", "date", "torch", "transformers", "device", "bandwidth", "weights", "hf_parity", "fast",
                "hf_generate", "speed_summary", "hf_leak_GiB_beyond_start", "suite_seconds", "suite_errors")


def summarize(dirs: list[Path], out: Path) -> dict[str, Any]:
    """Read result folders written by ``python -m kvlab.experiments`` and set them against :mod:`kvlab.study.memmodel`.

    Writes ``leak_vs_model.csv`` (measured memory beyond the start vs the analytic leak + KV cache, for
    trainable + concat runs), ``incident_by_site.csv`` (live bytes by site vs the model's leak by site)
    and ``summary.json`` (the headline numbers of every folder). Needs no GPU: rerun it any time.
    """
    leak_rows: list[dict[str, Any]] = []
    site_rows: list[dict[str, Any]] = []
    summary: dict[str, Any] = {"sources": {}, "fixed_peak_check": [], "leak_runs": []}
    for folder in dirs:
        meta = json.loads((folder / "meta.json").read_text())
        summary["sources"][folder.name] = {k: meta[k] for k in _SOURCE_KEYS if meta.get(k) is not None}
        if not (folder / "runs.csv").is_file():  # no runs recorded (e.g. bandwidth only)
            continue
        results = load_results(folder)
        config, prompt_len = results.config, meta["args"]["prompt_len"]
        for run in results.runs.to_dict("records"):
            if run.get("impl") != "kvlab" or run.get("status") not in ("ok", "oom", "capped"):
                continue
            run_id, dtype = run["run_id"], run["dtype"]
            rows = results.run_steps(run_id).set_index("generated")
            if run["loader"] == "trainable":
                summary["leak_runs"].append({k: run.get(k) for k in (
                    "run_id", "status", "tokens_done", "oom_generated", "final_beyond_start", "fit_bytes_per_token2",
                    "loglog_slope_2nd_half", "tok_per_s", "cache_impl")})
            if run["loader"] == "trainable" and run["cache"] == "concat":
                last = int(rows.index.max())
                points = sorted({n for n in (16, 32, 64, 128, 140, 256, 384, 512, 640) if n <= last} | {last})
                for row in leak_vs_model(results, run_id, tokens=points).itertuples():
                    leak_rows.append({"run_id": run_id, "dtype": dtype, "generated": row.generated,
                                      "measured_beyond_start_GiB": row.measured_bytes / GiB,
                                      "model_leak_GiB": row.predicted_leak_bytes / GiB,
                                      "model_kv_GiB": row.predicted_kv_bytes / GiB,
                                      "model_total_GiB": row.predicted_bytes / GiB, "measured_over_model": row.ratio})
                if run.get("traced") and "live_bytes" in rows.columns:
                    n = last
                    model_sites = leak_by_site(config, n, prompt_len, dtype=dtype)
                    measured_sites = {c.removeprefix("live_"): float(rows.loc[n, c]) for c in rows.columns
                                      if c.startswith("live_") and c not in ("live_bytes", "live_peak_bytes")
                                      and pd.notna(rows.loc[n, c]) and rows.loc[n, c] > 0}
                    for name in sorted(set(model_sites) | set(measured_sites)):
                        site_rows.append({"run_id": run_id, "dtype": dtype, "generated": n, "site": name,
                                          "measured_GB": measured_sites.get(name, 0.0) / 1e9,
                                          "model_leak_GB": model_sites.get(name, 0) / 1e9})
            if run["loader"] in ("inference", "int8") and run["suite"] == "leak" and pd.notna(run.get("peak_bytes")):
                check = peak_breakdown(results, run_id)
                weights = weight_bytes(config, dtype, "int8" if run["loader"] == "int8" else None)
                transient = int(check["analytic_step_bytes"])
                kv = check["kv_bytes"]
                other = check["start_bytes"] - weights  # cuBLAS workspace; for int8 also the float weights
                summary["fixed_peak_check"].append({
                    "run_id": run_id, "cache_len": int(rows["cache_len"].iloc[-1]), "peak_bytes": run["peak_bytes"],
                    "model_weights_bytes": weights, "other_at_start_bytes": other, "kv_bytes": kv,
                    "model_step_transient_bytes": transient,
                    "measured_step_transient_bytes": run.get("step_transient_max"),
                    "predicted_peak_bytes": check["predicted_peak_bytes"],
                    "peak_over_predicted": check["peak_over_predicted"],
                    # Only meaningful when nothing but the model's weights was alive at the start (the
                    # int8 runs keep the shared float weights alive beside their int8 copies).
                    "peak_over_weights_kv_transient": run["peak_bytes"] / (weights + kv + transient)
                    if other < GiB else None})
    out.mkdir(parents=True, exist_ok=True)
    if leak_rows:
        pd.DataFrame(leak_rows).to_csv(out / "leak_vs_model.csv", index=False)
    if site_rows:
        pd.DataFrame(site_rows).to_csv(out / "incident_by_site.csv", index=False)
    summary["incident_figures"] = INCIDENT
    write_json(out / "summary.json", summary)
    return summary
