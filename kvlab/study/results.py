"""Readers of recorded results: what ``python -m kvlab.experiments`` wrote, set against the analytic model.

:func:`load_results` reads one output folder or a folder of them (``steps.csv``, ``runs.csv``,
``meta.json``, ``incident.csv``) into :class:`RecordedResults`; :func:`leak_vs_model` puts a leaking
run next to the analytic model of :mod:`kvlab.study.memmodel`; :func:`peak_breakdown` splits a fixed
run's peak into weights, KV cache and one step's working set; :func:`speed_summary` tabulates kvlab
and transformers tokens/s against the roofline. :func:`load_fast_runs`, :func:`fast_summary` and
:func:`load_fast_kernels` read what ``benchmarks/bench_fast.py`` wrote (``fast.json`` + ``fast.csv``):
the fast decode path against the roofline and transformers, one folder per run. The committed GPU
results (``data/gpu/``) are read through these, by notebook 6 and by the tests.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from kvlab.config import MistralConfig

from .memmodel import leak_curve, step_transient_bytes

__all__ = ["RESULT_FILES", "RecordedResults", "load_results", "leak_vs_model", "peak_breakdown", "speed_summary",
           "FAST_FILES", "FAST_LABELS", "load_fast_runs", "fast_summary", "load_fast_kernels"]

RESULT_FILES = ("meta.json", "runs.csv", "steps.csv")
FAST_FILES = ("fast.json", "fast.csv")
#: Readable names of ``bench_fast.py``'s paths; transformers' two settings are one path, timed two ways.
FAST_LABELS = {"bf16": "kvlab fast, bf16", "bf16-unfused": "kvlab fast, bf16, projections not fused",
               "bf16-untuned": "kvlab fast, bf16, default inductor settings", "int8": "kvlab fast, int8",
               "bf16-model-attention": "kvlab fast, bf16, the model's attention (no decode kernel)",
               "hf": "transformers generate, static cache, compiled",
               "hf-tuned": "transformers generate, static cache, compiled"}


@dataclass
class RecordedResults:
    """What ``python -m kvlab.experiments`` wrote, from one or several output folders (``sources``).

    ``runs``/``steps``/``incident`` concatenate the folders' CSVs with a ``source`` column (the folder
    name); ``metas`` maps each source to its ``meta.json``. :meth:`get` finds a metadata key in the first
    source that has it.
    """

    root: Path
    metas: dict[str, dict[str, Any]]
    runs: pd.DataFrame
    steps: pd.DataFrame
    incident: pd.DataFrame = field(default_factory=pd.DataFrame)

    @property
    def sources(self) -> list[str]:
        return list(self.metas)

    def get(self, key: str, default: Any = None) -> Any:
        for meta in self.metas.values():
            if key in meta:
                return meta[key]
        return default

    @property
    def config(self) -> MistralConfig:
        return MistralConfig.from_dict(self.get("config"), source=f"{self.root} meta.json")

    @property
    def device(self) -> str:
        info = self.get("device", {})
        return info.get("name") or info.get("type", "?")

    def run(self, run_id: str) -> pd.Series:
        """The ``runs.csv`` row of one run (by its ``run_id``, e.g. ``leak:kvlab:bfloat16:trainable:concat:2048``)."""
        found = self.runs[self.runs["run_id"] == run_id]
        if found.empty:
            raise KeyError(f"no run {run_id!r} in {self.root}; recorded: {sorted(self.runs['run_id'])}")
        return found.iloc[0]

    def run_steps(self, run_id: str) -> pd.DataFrame:
        """The ``steps.csv`` rows of one run, in step order."""
        found = self.steps[self.steps["run_id"] == run_id]
        if found.empty:
            raise KeyError(f"no steps of run {run_id!r} in {self.root}")
        return found.sort_values("step", ignore_index=True)

    def find_runs(self, **match: Any) -> pd.DataFrame:
        """``runs`` rows whose columns equal the given values (``suite="leak", loader="trainable"``)."""
        rows = self.runs
        for column, value in match.items():
            rows = rows[rows[column] == value]
        return rows

    def commands(self) -> dict[str, str]:
        """The command each source was recorded with, its ``--out`` pointing at the source's folder."""
        return {name: _rerun(meta.get("command", ""), self.root if name == "." else self.root / name)
                for name, meta in self.metas.items()}


def _rerun(command: str, folder: Path) -> str:
    """``command`` with its ``--out`` pointing at ``folder``, relative to the repository root if inside it
    (the commands are run from there)."""
    repo = Path(__file__).resolve().parents[2]  # the repository root (kvlab/study/results.py)
    where = folder.resolve()
    if where.is_relative_to(repo):
        where = where.relative_to(repo)
    return re.sub(r"--out \S+", f"--out {where.as_posix()}", command)


def _is_result_dir(path: Path) -> bool:
    return all((path / name).is_file() for name in RESULT_FILES[:2])


def load_results(results_dir: str | Path) -> RecordedResults:
    """Read an experiments output folder, or every such folder directly under ``results_dir``.

    Raises ``FileNotFoundError`` naming the folder when it holds no ``meta.json`` + ``runs.csv``.
    """
    root = Path(results_dir)
    dirs = [root] if _is_result_dir(root) else sorted(p for p in root.glob("*/") if _is_result_dir(p))
    if not dirs:
        raise FileNotFoundError(f"{root}: no kvlab.experiments results (meta.json + runs.csv) here or in its "
                                "subfolders; record them with `python -m kvlab.experiments --out DIR`")
    metas, runs, steps, incident = {}, [], [], []
    for d in dirs:
        name = "." if d == root else d.name
        metas[name] = json.loads((d / "meta.json").read_text())
        runs.append(pd.read_csv(d / "runs.csv").assign(source=name))
        if (d / "steps.csv").is_file():
            steps.append(pd.read_csv(d / "steps.csv", low_memory=False).assign(source=name))
        if (d / "incident.csv").is_file():
            incident.append(pd.read_csv(d / "incident.csv").assign(source=name))
    concat = lambda parts: pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()  # noqa: E731
    return RecordedResults(root, metas, concat(runs), concat(steps), concat(incident))


def leak_vs_model(results: RecordedResults, run_id: str, tokens: Sequence[int] | None = None,
                  points: int = 12) -> pd.DataFrame:
    """A recorded run's memory beyond its start next to :mod:`kvlab.study.memmodel`'s prediction.

    Predicted = :func:`~kvlab.study.memmodel.leak_bytes` (what autograd keeps alive; 0 unless the run's loader
    is trainable) + :func:`~kvlab.caches.kv_bytes` of the concat cache, both from
    :func:`~kvlab.study.memmodel.leak_curve`. ``tokens``: the generated counts to compare (default: ``points``
    recorded counts spaced evenly on a log scale). Columns ``generated, measured_bytes,
    predicted_leak_bytes, predicted_kv_bytes, predicted_bytes`` (their sum) and ``ratio`` (measured /
    predicted).
    """
    run = results.run(run_id)
    steps = results.run_steps(run_id)
    config = results.config.replace(torch_dtype=run["dtype"])
    prompt_len = int(results.get("args", {}).get("prompt_len", 8))
    if tokens is None:
        recorded = steps["generated"].to_numpy()
        tokens = np.unique(np.geomspace(recorded.min(), recorded.max(), points).round().astype(int))
    steps = steps[steps["generated"].isin(list(tokens))]
    model = leak_curve(config, [int(n) for n in steps["generated"]], prompt_len)
    leaks = run["loader"] in ("trainable", "threaded", "hf-grad")
    out = pd.DataFrame({"generated": steps["generated"].to_numpy(),
                        "measured_bytes": steps["beyond_start_bytes"].to_numpy(dtype=float),
                        "predicted_leak_bytes": model["leak_bytes"].to_numpy() * leaks,
                        "predicted_kv_bytes": model["kv_cache_bytes"].to_numpy()})
    out["predicted_bytes"] = (out["predicted_leak_bytes"] + out["predicted_kv_bytes"]).astype(float)
    out["ratio"] = out["measured_bytes"] / out["predicted_bytes"]
    return out


def peak_breakdown(results: RecordedResults, run_id: str) -> dict[str, float]:
    """A recorded run's peak allocation split into what it should be: weights + KV cache + one step.

    ``start_bytes`` (allocated before the run: the weights), ``kv_bytes`` (the cache at the end), the
    last step's measured working set (``step_transient_bytes``: its peak above what was allocated before
    it) and the analytic one (:func:`~kvlab.study.memmodel.step_transient_bytes`); ``predicted_peak_bytes`` =
    start + KV + analytic step, and ``peak_over_predicted``.
    """
    run = results.run(run_id)
    config = results.config.replace(torch_dtype=run["dtype"])
    cached = int(results.run_steps(run_id)["cache_len"].iloc[-1])  # positions after the last step's update
    analytic_step = step_transient_bytes(config, cached)
    predicted = float(run["start_bytes"]) + float(run["kv_bytes_end"]) + analytic_step
    return {"peak_bytes": float(run["peak_bytes"]), "start_bytes": float(run["start_bytes"]),
            "weights_bytes": float(run["weights_bytes"]), "kv_bytes": float(run["kv_bytes_end"]),
            "step_transient_bytes": float(run["step_transient_last"]), "analytic_step_bytes": float(analytic_step),
            "predicted_peak_bytes": predicted, "peak_over_predicted": float(run["peak_bytes"]) / predicted}


def speed_summary(results: RecordedResults) -> pd.DataFrame:
    """Decode tokens/s and peak allocation of every recorded path, kvlab and transformers, with its
    share of the weights-only roofline (copy bandwidth / weight bytes) when bandwidth was measured.

    Columns ``library, path, tokens_per_s, peak_bytes, roofline_share``, fastest first.
    """
    speeds: dict[str, dict[str, float]] = {"kvlab": {}, "transformers": {}}
    roofline = None
    for meta in results.metas.values():  # several sources: merge their paths
        summary = meta.get("speed_summary", {})
        speeds["kvlab"].update(summary.get("kvlab_tok_per_s", {}))
        speeds["transformers"].update(summary.get("hf_tok_per_s", {}))
        roofline = roofline or summary.get("roofline_weights_only_tok_per_s")
    peaks: dict[str, float] = {}
    for meta in results.metas.values():
        for name, res in meta.get("fast", {}).items():
            peaks.setdefault(f"kvlab fast {name}", res.get("peak_bytes"))
        for name, res in meta.get("hf_generate", {}).items():
            peaks.setdefault(f"hf generate {name}", res.get("peak_bytes"))
    for run in results.runs.itertuples():
        if run.suite == "compare" and run.status == "ok":
            peaks.setdefault(f"kvlab eager {run.cache}", run.peak_bytes)
        elif run.suite == "hf" and run.status == "ok" and run.loader == "hf-nograd":
            peaks.setdefault(f"hf loop {run.cache}", run.peak_bytes)
    rows = []
    for library, paths in speeds.items():
        for path, speed in paths.items():
            rows.append(dict(library=library, path=path, tokens_per_s=speed, peak_bytes=peaks.get(path, np.nan),
                             roofline_share=speed / roofline if roofline else np.nan))
    columns = ["library", "path", "tokens_per_s", "peak_bytes", "roofline_share"]
    return pd.DataFrame(rows, columns=columns).sort_values("tokens_per_s", ascending=False, ignore_index=True)


def _fast_dirs(root: str | Path) -> list[Path]:
    """``root`` if it holds a ``bench_fast.py`` output, else each subfolder that does (sorted)."""
    root = Path(root)
    has = lambda d: all((d / name).is_file() for name in FAST_FILES)  # noqa: E731
    dirs = [root] if has(root) else sorted(p for p in root.glob("*/") if has(p))
    if not dirs:
        raise FileNotFoundError(f"{root}: no fast-path results (fast.json + fast.csv) here or in its subfolders; "
                                "record them with `python benchmarks/bench_fast.py --out DIR`")
    return dirs


def load_fast_runs(root: str | Path) -> pd.DataFrame:
    """Every path of every ``bench_fast.py`` run under ``root``: one row per run (folder) and path.

    Speeds come from ``fast.csv`` (one row per timed repeat): ``tok_per_s`` (median), ``tok_per_s_min``,
    ``tok_per_s_max``; a ``ValueError`` names the folder when they are not the repeats ``fast.json``
    records. ``roofline_tok_per_s`` is the run's copy bandwidth over the bytes one decode step of the
    path's weights reads (transformers' paths: the bf16 path's bytes, the same weights) and
    ``roofline_share`` the median's share of it. Teacher-forced agreement with the eager model
    (``tf_agreement``, ``tf_max_gap``, ``tf_max_gap_bf16_spacings``: the largest gap at a disagreement)
    for kvlab's paths; ``settings`` says which inductor settings a transformers path was compiled with.
    """
    rows = []
    for folder in _fast_dirs(root):
        meta = json.loads((folder / "fast.json").read_text())
        repeats = pd.read_csv(folder / "fast.csv")
        bandwidth = float(meta["bandwidth"]["bandwidth_Bps"])
        bf16_bytes = meta["paths"].get("bf16", {}).get("bytes_per_token")
        for path, result in meta["paths"].items():
            speeds = repeats.loc[repeats["path"] == path, "tok_per_s"]
            if "tok_per_s" not in result:  # a path that failed or ran out of budget
                continue
            if not np.allclose(sorted(speeds), sorted(result["tok_per_s"]["runs"]), rtol=1e-9):
                raise ValueError(f"{folder}: fast.csv's {path} repeats {list(speeds)} are not fast.json's")
            transformers = "cache_implementation" in result
            per_token = bf16_bytes if transformers else result.get("bytes_per_token")
            roofline = bandwidth / per_token if per_token else np.nan
            tf = result.get("teacher_forced", {})
            rows.append({
                "run": folder.name, "date": meta.get("date", ""), "device": meta.get("device", {}).get("name", ""),
                "preset": meta.get("preset", ""), "command": _rerun(meta.get("command", ""), folder),
                "path": path, "label": FAST_LABELS.get(path, path),
                "library": "transformers" if transformers else "kvlab", "loader": result.get("loader"),
                "settings": ("kvlab's inductor settings" if result.get("tuned") else "default inductor settings")
                if transformers else "", "repeats": len(speeds),
                "tok_per_s": float(speeds.median()), "tok_per_s_min": float(speeds.min()),
                "tok_per_s_max": float(speeds.max()), "bandwidth_Bps": bandwidth, "bytes_per_token": per_token,
                "roofline_tok_per_s": roofline, "roofline_share": float(speeds.median()) / roofline,
                "tf_positions": tf.get("positions", np.nan), "tf_argmax_equal": tf.get("argmax_equal", np.nan),
                "tf_max_gap": tf.get("max_gap", np.nan),
                "tf_max_gap_bf16_spacings": tf.get("max_gap_bf16_spacings", np.nan),
                "free_running_equal_prefix": result.get("free_running_equal_prefix", np.nan),
                "free_running_compared": result.get("free_running_compared", np.nan)})
    out = pd.DataFrame(rows)
    out["tf_agreement"] = out["tf_argmax_equal"] / out["tf_positions"]
    return out


def fast_summary(fast: pd.DataFrame) -> pd.DataFrame:
    """One row per run of :func:`load_fast_runs`: the bf16 and int8 rooflines, the bf16 path's share of
    its roofline (median, min, max over the repeats), and the ratios int8 / bf16 and bf16 / transformers'
    fastest path (median over median; ``_min``/``_max`` pair the extremes, as ``bench_fast.py`` prints)."""
    rows = []
    for run, paths in fast.groupby("run", sort=True):
        paths = paths.set_index("path")
        bf16 = paths.loc["bf16"]
        row: dict[str, Any] = {"run": run, "bandwidth_TBps": bf16["bandwidth_Bps"] / 1e12,
                               "roofline_bf16": bf16["roofline_tok_per_s"],
                               "bf16_share": bf16["roofline_share"],
                               "bf16_share_min": bf16["tok_per_s_min"] / bf16["roofline_tok_per_s"],
                               "bf16_share_max": bf16["tok_per_s_max"] / bf16["roofline_tok_per_s"]}
        if "int8" in paths.index:
            row["roofline_int8"] = paths.loc["int8", "roofline_tok_per_s"]
            row.update(_speed_ratio("int8_over_bf16", paths.loc["int8"], bf16))
        hf = paths[paths["library"] == "transformers"]
        if len(hf):
            fastest = hf["tok_per_s"].idxmax()
            row["transformers"], row["transformers_tok_per_s"] = fastest, hf.loc[fastest, "tok_per_s"]
            row.update(_speed_ratio("bf16_over_transformers", bf16, hf.loc[fastest]))
        rows.append(row)
    return pd.DataFrame(rows).set_index("run")


def _speed_ratio(name: str, top: pd.Series, bottom: pd.Series) -> dict[str, float]:
    """Median over median, and the range the repeats' extremes allow."""
    return {name: top["tok_per_s"] / bottom["tok_per_s"], f"{name}_min": top["tok_per_s_min"] / bottom["tok_per_s_max"],
            f"{name}_max": top["tok_per_s_max"] / bottom["tok_per_s_min"]}


def load_fast_kernels(root: str | Path) -> pd.DataFrame:
    """The per-matrix kernel tables (``gemv`` in ``fast.json``) of the runs under ``root``: one row per run,
    weight matrix and kernel, with ``us`` per call and ``GBps`` of weights read (``run`` names the folder)."""
    tables = [pd.DataFrame(json.loads((d / "fast.json").read_text()).get("gemv", [])).assign(run=d.name)
              for d in _fast_dirs(root)]
    return pd.concat(tables, ignore_index=True)
