"""One recorded run of a suite: a measured decode (:func:`kvlab.study.runs.measure`) turned into rows.

The suites differ in what they decode; how a run is measured and recorded is the same for all of them:
:class:`Context` holds the session (arguments, config, device, the one weight set alive, the time
budget), :func:`record_run` measures one decode of a kvlab or transformers model and appends one row
per step to ``steps.csv`` and one row per run to ``runs.csv`` (:class:`kvlab.study.records.Recorder`).
Out of memory, a time cap or any other failure ends that run only, with its status recorded.
"""

from __future__ import annotations

import argparse
import math
import time
import traceback
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from kvlab.config import DTYPES, MistralConfig
from kvlab.fastpath import sync
from kvlab.loaders import model_for_loader
from kvlab.memory.units import GiB
from kvlab.study.env import cleanup, cuda_allocated, model_bytes, tensor_bytes
from kvlab.study.probes import prompt_ids
from kvlab.study.records import Recorder
from kvlab.study.runs import DecodeRun, measure
from kvlab.synthetic import random_state_dict

__all__ = ["STEP_COLUMNS", "RunSpec", "Context", "record_run", "run_kvlab", "isnan", "in_units"]

#: steps.csv's leading columns (the ``live_<region>`` columns of traced runs follow).
STEP_COLUMNS = ["run_id", "suite", "impl", "loader", "cache", "dtype", "traced", "step", "generated", "cache_len",
                "step_s", "cuda_allocated", "cuda_peak_step", "beyond_start_bytes", "kv_bytes", "live_bytes",
                "live_peak_bytes", "event"]
# The measured run's columns under their recorded names (the files of data/gpu/ use these).
_RECORDED = {"tokens": "generated", "positions": "cache_len", "cuda_allocated_bytes": "cuda_allocated",
             "cuda_peak_bytes": "cuda_peak_step", "cache_bytes": "kv_bytes", "peak_bytes": "live_peak_bytes"}


@dataclass
class RunSpec:
    suite: str
    loader: str
    cache: str
    dtype: str
    tokens: int
    trace: bool = False
    impl: str = "kvlab"
    note: str = ""

    @property
    def run_id(self) -> str:
        return (f"{self.suite}:{self.impl}:{self.dtype}:{self.loader}:{self.cache}:{self.tokens}"
                + (":traced" if self.trace else ""))


@dataclass
class Context:
    """One session of suites: its arguments, model config, device, recorder and clock."""

    args: argparse.Namespace
    config: MistralConfig
    device: torch.device
    rec: Recorder
    t0: float
    weights: dict[str, dict[str, Tensor]] = field(default_factory=dict)  # dtype name -> state

    def remaining(self) -> float:
        return self.args.budget_s - (time.perf_counter() - self.t0) if self.args.budget_s else math.inf

    def deadline(self, cap: float | None = None) -> float | None:
        limits = [x for x in (cap, self.remaining() - 5 if self.args.budget_s else None) if x is not None]
        return time.perf_counter() + min(limits) if limits else None

    def state(self, dtype: str) -> dict[str, Tensor]:
        """The seeded random weights in ``dtype``, drawn on the device; one weight set alive at a time."""
        if dtype not in self.weights:
            self.weights.clear()
            cleanup(self.device)
            start = time.perf_counter()
            self.weights[dtype] = random_state_dict(self.config, self.args.seed, device=self.device,
                                                    dtype=DTYPES[dtype])
            sync(self.device)
            self.rec.meta.setdefault("weights", {})[dtype] = {
                "bytes": tensor_bytes(self.weights[dtype].values()),
                "params": sum(t.numel() for t in self.weights[dtype].values()),
                "build_s": time.perf_counter() - start}
        return self.weights[dtype]

    def prompt(self, length: int | None = None) -> Tensor:
        """The session's prompt (:func:`kvlab.study.probes.prompt_ids`, ``--prompt-len`` tokens, ``--seed``)."""
        return prompt_ids(self.config.vocab_size, length or self.args.prompt_len, seed=self.args.seed,
                          device=self.device)


def record_run(ctx: Context, spec: RunSpec, model: nn.Module, *, trace: bool, grad: bool | None = None,
               cap_s: float | None = None, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Measure one decode of ``model`` as ``spec`` says and record it; returns its ``runs.csv`` row."""
    extra = dict(extra or {})
    weights = model_bytes(model)
    try:
        run = measure(model, spec.cache, spec.tokens, loader=spec.loader, prompt=ctx.prompt(), trace=trace,
                      grad=grad, deadline=ctx.deadline(cap_s))
    except Exception as exc:  # a failing run must not end the session
        traceback.print_exc()
        run = None
        status, detail = "error", f"{type(exc).__name__}: {exc}"[:300]
    cleanup(ctx.device)
    steps = _step_rows(spec, run, trace) if run is not None else []
    if run is not None:
        status, detail = run.status, run.detail
        extra["cache_impl"] = run.extra["cache_impl"]
    ctx.rec.steps.extend(steps)
    row = _run_row(spec, steps, status, detail, run.start_bytes if run is not None else math.nan, weights)
    row.update(extra)
    ctx.rec.runs.append(row)
    ctx.rec.flush()
    _say(row)
    return row


def run_kvlab(ctx: Context, spec: RunSpec, cap_s: float | None = None) -> dict[str, Any]:
    """One eager decode of kvlab's model, loaded as ``spec.loader`` says from the session's weights.

    On a CPU the tracer is the only memory measure, so every run but the speed runs is traced there.
    """
    if ctx.remaining() < 10:
        row = {"run_id": spec.run_id, "suite": spec.suite, "status": "skipped", "detail": "time budget"}
        ctx.rec.runs.append(row)
        ctx.rec.flush()
        return row
    model = model_for_loader(ctx.config.replace(torch_dtype=spec.dtype), ctx.state(spec.dtype), spec.loader)
    trace = spec.trace or (ctx.device.type != "cuda" and spec.suite != "compare")
    weights = ctx.rec.meta.get("weights", {}).get(spec.dtype, {}).get("bytes")
    row = record_run(ctx, spec, model, trace=trace, cap_s=cap_s, extra={"weights_dtype_bytes": weights})
    del model
    cleanup(ctx.device)
    row["allocated_after_cleanup"] = cuda_allocated(ctx.device)  # the session's weights, and anything leaked
    ctx.rec.flush()
    return row


def _step_rows(spec: RunSpec, run: DecodeRun, traced: bool) -> list[dict[str, Any]]:
    """One ``steps.csv`` row per step: the run's timeline, with live bytes by region when traced."""
    frame = run.timeline.rename(columns=_RECORDED)
    keep = [c for c in STEP_COLUMNS if c in frame.columns]
    frame = frame[keep].assign(run_id=spec.run_id, suite=spec.suite, impl=spec.impl, loader=spec.loader,
                               cache=spec.cache, dtype=spec.dtype, traced=traced)
    frame["event"] = np.where(frame["step"] == 0, "prefill", "")
    if run.status == "oom" and len(frame):
        frame.loc[frame.index[-1], "event"] = (frame["event"].iloc[-1] + " last-before-oom").strip()
    if traced and not run.site_table.empty:
        regions = run.site_table.pivot_table(index="step", columns="site", values="live_bytes", aggfunc="sum")
        frame = frame.join(regions.add_prefix("live_"), on="step")
    rows = frame.to_dict("records")
    return [{k: v for k, v in r.items() if not (isinstance(v, float) and math.isnan(v) and k.startswith("live_"))}
            for r in rows]


def _run_row(spec: RunSpec, rows: list[dict[str, Any]], status: str, detail: str, start_bytes: float,
             weights: int) -> dict[str, Any]:
    """The ``runs.csv`` row: status, speed, memory at the end, peak, one step's working set and growth fit."""
    decode = [r["step_s"] for r in rows if r["step"] > 0]
    peaks = [r.get("cuda_peak_step", math.nan) for r in rows]
    run = {
        "run_id": spec.run_id, "suite": spec.suite, "impl": spec.impl, "loader": spec.loader, "cache": spec.cache,
        "dtype": spec.dtype, "traced": spec.trace, "tokens_requested": spec.tokens, "tokens_done": len(rows),
        "status": status, "detail": detail, "note": spec.note, "start_bytes": start_bytes, "weights_bytes": weights,
        "peak_bytes": max(peaks) if peaks and not all(isnan(p) for p in peaks) else math.nan,
        "final_beyond_start": rows[-1].get("beyond_start_bytes", math.nan) if rows else math.nan,
        "kv_bytes_end": rows[-1].get("kv_bytes", math.nan) if rows else math.nan,
        "decode_s": sum(decode), "tok_per_s": len(decode) / sum(decode) if decode and sum(decode) > 0 else math.nan,
        "step_median_s": sorted(decode)[len(decode) // 2] if decode else math.nan,
    }
    run["tok_per_s_median"] = 1 / run["step_median_s"] if run["step_median_s"] > 0 else math.nan
    if status == "oom":
        run["oom_step"] = len(rows)
        run["oom_generated"] = len(rows) + 1
    if rows and "live_bytes" in rows[-1]:
        run.update({f"end_{k}": v for k, v in rows[-1].items() if k.startswith("live_")})
    # One step's working set: the largest step peak above the allocation before that step.
    if len(rows) > 1 and "cuda_peak_step" in rows[0]:
        transients = [rows[i]["cuda_peak_step"] - rows[i - 1]["cuda_allocated"] for i in range(1, len(rows))]
        run["step_transient_last"], run["step_transient_max"] = transients[-1], max(transients)
        # A fixed run's peak should be weights + KV cache + one step's working set, nothing retained.
        if not isnan(run["kv_bytes_end"]) and not isnan(start_bytes):
            run["weights_kv_step_bytes"] = start_bytes + run["kv_bytes_end"] + transients[-1]
            run["peak_over_weights_kv_step"] = run["peak_bytes"] / run["weights_kv_step_bytes"]
    run.update(_fit(rows))
    return run


def _fit(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Growth of memory beyond the start: quadratic fit and log-log slope over the second half."""
    pts = [(r["generated"], r["beyond_start_bytes"]) for r in rows
           if r.get("beyond_start_bytes") is not None and not isnan(r.get("beyond_start_bytes")) and r["step"] > 0]
    if len(pts) < 8:
        return {}
    n = np.array([p[0] for p in pts], dtype=float)
    b = np.array([p[1] for p in pts], dtype=float)
    c2, c1, c0 = np.polyfit(n, b, 2)
    half = n >= n.max() / 2
    out = {"fit_bytes_per_token2": float(c2), "fit_bytes_per_token": float(c1), "fit_bytes0": float(c0),
           "bytes_per_token_last": float((b[-1] - b[len(b) // 2]) / max(n[-1] - n[len(n) // 2], 1))}
    lo, hi = b[half][0], b[-1]
    if lo > 0 and hi > lo and n[half][0] > 0:
        out["loglog_slope_2nd_half"] = float(math.log(hi / lo) / math.log(n[-1] / n[half][0]))
    return out


def isnan(value: Any) -> bool:
    """True for a float NaN (and a pandas NA), False for anything else."""
    return isinstance(value, float) and math.isnan(value) or value is pd.NA


def in_units(value: Any, unit: float) -> float | None:
    """``value / unit`` for the recorded tables; ``None`` where nothing was measured (missing, NaN or NA)."""
    return None if value is None or isnan(value) else value / unit


def _say(run: dict[str, Any]) -> None:
    end = run.get("final_beyond_start", math.nan)
    tqdm.write(f"{run['run_id']:<55} {run['status']:<7} tokens={run.get('tokens_done', 0):>5} "
               f"beyond_start={end / GiB if not isnan(end) else math.nan:8.3f} GiB "
               f"tok/s={run.get('tok_per_s', math.nan):7.1f} {str(run.get('detail', ''))[:80]}")
