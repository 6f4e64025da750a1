"""Cache designs side by side, and the readers of recorded real-scale results.

Two small toolboxes for the notebooks that come after the fix:

- **Comparison sweeps** (one model with frozen weights, every cache of :data:`kvlab.caches.CACHES`):
  :func:`token_agreement` (tokens and logits against the no-cache run), :func:`sweep_caches` (per decode
  step: time, ``nbytes`` next to :func:`kvlab.caches.kv_bytes`, the K/V bytes attention reads, and with
  ``trace=True`` exact live/peak bytes), :func:`time_caches` (tokens/s by batch and sequence length,
  fastest of interleaved rounds) and :func:`ragged_batch` (rows of different lengths: bytes held against
  bytes needed).
- **Recorded results** of ``python -m kvlab.experiments``: :func:`load_results` reads one output folder
  or a folder of them (``steps.csv``, ``runs.csv``, ``meta.json``, ``incident.csv``) into
  :class:`RecordedResults`; :func:`leak_vs_model` puts a leaking run next to the analytic model of
  :mod:`kvlab.study.memmodel`; :func:`peak_breakdown` splits a fixed run's peak into weights, KV cache and one
  step's working set; :func:`speed_summary` tabulates kvlab and transformers tokens/s against the
  roofline.

Everything is measured with the package's own pieces (``generate``, ``make_cache``, ``MemoryTracer``,
``memmodel``); the one count of its own is the K/V bytes attention reads per step, which a thin wrapper
around the cache's ``update`` adds up from the tensors it returns.
"""

from __future__ import annotations

import contextlib
import gc
import json
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn

from kvlab.caches import CACHES, KVCache, kv_bytes, make_cache
from kvlab.config import MistralConfig
from kvlab.fastpath import sync
from kvlab.generate import Step, generate
from .memmodel import leak_curve, step_transient_bytes
from kvlab.memory.trace import MemoryTracer

__all__ = [
    "usable_caches", "random_prompt", "token_agreement", "kv_read_bytes", "sweep_caches", "time_caches",
    "ragged_batch",
    "RecordedResults", "load_results", "leak_vs_model", "peak_breakdown", "speed_summary",
]


# ============================================================================================ sweeps
def usable_caches(config: MistralConfig, caches: Sequence[str] = tuple(CACHES)) -> list[str]:
    """``caches`` minus ``sliding`` when the config attends to every position (no window to slide)."""
    return [c for c in caches if c != "sliding" or config.sliding_window is not None]


def random_prompt(config: MistralConfig, batch: int, length: int, seed: int = 0,
                  device: torch.device | str = "cpu") -> Tensor:
    """Seeded random token ids (B, T), the same for every design compared."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, config.vocab_size, (batch, length), generator=g).to(device)


def _model_device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    return model.model.embed_tokens.weight.device, model.model.embed_tokens.weight.dtype


def _new_cache(model: nn.Module, kind: str, batch: int, max_tokens: int, **options: Any) -> KVCache:
    device, dtype = _model_device_dtype(model)
    return make_cache(kind, model.config, batch, max_tokens=max_tokens, device=device, dtype=dtype, **options)


def _logits_of(steps: list[Tensor]) -> Callable[[Step], None]:
    return lambda s: steps.append(s.logits.detach().float().cpu())


def token_agreement(model: nn.Module, prompt: Tensor, tokens: int,
                    caches: Sequence[str] = tuple(CACHES)) -> pd.DataFrame:
    """Greedy tokens and logits of every cache against the no-cache run (full recompute each step).

    One row per cache: ``tokens_equal``; ``matching_tokens`` (generated tokens equal to the reference
    before the first difference, the worst row of the batch); ``max_abs_logit_error`` over the steps whose
    inputs still agree (after a divergence, logits differ because the inputs do); ``max_abs_logit`` of
    the reference, for scale. Runs under ``inference_mode``.
    """
    ref_logits: list[Tensor] = []
    ref = generate(model, prompt, tokens, cache=None, inference_mode=True, on_step=_logits_of(ref_logits))
    ref_new = ref.tokens[:, prompt.shape[1]:].cpu()
    scale = max(float(x.abs().max()) for x in ref_logits)
    rows = []
    for kind in usable_caches(model.config, caches):
        logits: list[Tensor] = []
        cache = _new_cache(model, kind, prompt.shape[0], prompt.shape[1] + tokens)
        out = generate(model, prompt, tokens, cache=cache, inference_mode=True, on_step=_logits_of(logits))
        new = out.tokens[:, prompt.shape[1]:].cpu()
        same = (new == ref_new).all(dim=0).long()
        matching = int(same.cumprod(0).sum())
        compared = min(matching + 1, tokens)  # the step that diverged still had equal inputs
        error = max(float((a - b).abs().max()) for a, b in zip(logits[:compared], ref_logits[:compared]))
        rows.append(dict(cache=kind, tokens=tokens, tokens_equal=bool(torch.equal(new, ref_new)),
                         matching_tokens=matching, max_abs_logit_error=error, max_abs_logit=scale))
    return pd.DataFrame(rows)


def kv_read_bytes(cache: KVCache, n_rep: int) -> list[int]:
    """Wrap ``cache.update`` to add up, per forward step, the K/V bytes attention's matmuls read: what the
    cache returns, times ``n_rep`` when attention materialises repeat_kv copies of it (all layers).

    Returns the list it fills as the cache is used: one entry per step, the prefill first. The wrapper
    refers back to the cache: ``del cache.update`` when done, or only the garbage collector frees it.
    """
    update = cache.update
    reads: list[int] = []

    def recording_update(layer: int, k: Tensor, v: Tensor, positions: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        keys, values, key_positions = update(layer, k, v, positions)
        touched = keys.nbytes + values.nbytes  # a view's own elements, not its base buffer
        if layer == 0:
            reads.append(0)
        reads[-1] += touched if cache.grouped else touched * n_rep
        return keys, values, key_positions

    cache.update = recording_update  # type: ignore[method-assign]
    return reads


def _sweep_run(model: nn.Module, kind: str, prompt: Tensor, tokens: int, trace: bool, warmup: int) -> pd.DataFrame:
    """One decode of ``tokens`` tokens with a fresh ``kind`` cache; one row per step (see :func:`sweep_caches`)."""
    device, _ = _model_device_dtype(model)
    config = model.config
    batch, prompt_len = prompt.shape
    max_tokens = prompt_len + tokens
    if warmup:  # first-call allocations are not the design's cost
        with torch.no_grad():
            generate(model, prompt, warmup, cache=_new_cache(model, kind, batch, max_tokens))
    rows: list[dict[str, Any]] = []
    clock = [0.0]
    tracer = None

    def on_step(step: Step) -> None:
        sync(device)
        now = time.perf_counter()
        positions = prompt_len + step.index
        rows.append(dict(cache=kind, batch=batch, step=step.index, positions=positions, step_s=now - clock[0],
                         nbytes=step.cache.nbytes,
                         kv_bytes=kv_bytes(config, batch, positions, kind=kind, max_tokens=max_tokens)))
        if tracer is not None:
            tracer.mark_step(step.index)
        clock[0] = time.perf_counter()

    # The weights are the baseline; the cache is built inside the traced region, so that live bytes =
    # cache + activations for every design.
    tracer = MemoryTracer(device=device.type, frames=False, baseline=[model]) if trace else None
    with tracer if tracer is not None else contextlib.nullcontext():
        cache = _new_cache(model, kind, batch, max_tokens)
        reads = kv_read_bytes(cache, config.num_key_value_groups)
        sync(device)
        clock[0] = time.perf_counter()
        with torch.no_grad():  # not inference_mode: the tracer misses composite ops' copies under it
            generate(model, prompt, tokens, cache=cache, on_step=on_step)
    del cache.update  # the recording wrapper refers back to the cache: drop it, or only gc frees the cache
    frame = pd.DataFrame(rows)
    frame["kv_read_bytes"] = reads[: len(frame)]  # reads[0]: the prefill; then one per decode step
    if tracer is not None:
        frame = frame.merge(tracer.timeline()[["step", "live_bytes", "peak_bytes"]], on="step", how="left")
    return frame


def sweep_caches(model: nn.Module, caches: Sequence[str], batches: Sequence[int], tokens: int, *,
                 prompt_len: int = 16, seed: int = 0, trace: bool = False, warmup: int = 4) -> pd.DataFrame:
    """Decode ``tokens`` tokens with every cache x batch size; one row per decode step.

    Columns: ``cache, batch, step, positions`` (cached positions after the step), ``step_s`` (wall time
    of the step, device-synchronised), ``nbytes`` (the cache's own count), ``kv_bytes`` (the analytic
    :func:`kvlab.caches.kv_bytes` for that many positions), ``kv_read_bytes`` (K/V bytes attention read
    in that step, all layers) and, with ``trace=True``, ``live_bytes``/``peak_bytes`` of the exact tracer
    (tensors allocated during the run: cache + activations; the weights are the baseline). Tracing slows
    every op: measure speed with :func:`time_caches`.
    """
    device, _ = _model_device_dtype(model)
    gc.collect()  # tensors of earlier work waiting in reference cycles would free mid-run, inside the trace
    frames = []
    for batch in batches:
        prompt = random_prompt(model.config, batch, prompt_len, seed, device)
        for kind in usable_caches(model.config, caches):
            frames.append(_sweep_run(model, kind, prompt, tokens, trace, warmup))
    return pd.concat(frames, ignore_index=True)


def time_caches(model: nn.Module, caches: Sequence[str], batches: Sequence[int], lengths: Sequence[int], *,
                steps: int = 16, rounds: int = 3, seed: int = 0) -> pd.DataFrame:
    """Decode speed of every cache x batch size x sequence length, measured to survive a busy machine.

    One measurement prefills a prompt of ``length`` tokens (untimed) and times ``steps`` decode steps
    under ``inference_mode``. On a CPU the clock is this process's CPU time (``time.process_time``), which
    other processes' load cannot inflate and which equals wall time on an idle machine when torch runs
    one thread; on CUDA it is synchronised wall time. Every combination runs once per round, ``rounds``
    rounds in all, and keeps its fastest round. Columns ``cache, batch, positions`` (the prompt length),
    ``ms_per_step`` and ``tokens_per_s`` (batch / step time).
    """
    if steps < 2:
        raise ValueError(f"steps must be at least 2 (one prefill, then timed decode steps), got {steps}")
    device, _ = _model_device_dtype(model)
    config = model.config
    best: dict[tuple[str, int, int], float] = {}
    marks: list[float] = []

    clock = time.perf_counter if device.type == "cuda" else time.process_time

    def mark(step: Step) -> None:
        sync(device)
        marks.append(clock())

    for _ in range(rounds):
        for batch in batches:
            for length in lengths:
                prompt = random_prompt(config, batch, length, seed, device)
                for kind in usable_caches(config, caches):
                    marks.clear()
                    generate(model, prompt, steps, cache=_new_cache(model, kind, batch, length + steps),
                             inference_mode=True, on_step=mark)
                    per_step = (marks[-1] - marks[0]) / (steps - 1)  # marks[0]: end of the prefill
                    key = (kind, batch, length)
                    best[key] = min(best.get(key, math.inf), per_step)
    rows = [dict(cache=k, batch=b, positions=n, ms_per_step=s * 1e3, tokens_per_s=b / s)
            for (k, b, n), s in best.items()]
    return pd.DataFrame(rows)


def ragged_batch(model: nn.Module, prompts: Sequence[Sequence[int]], new_tokens: int,
                 caches: Sequence[str] = ("static", "sliding", "paged"), **options: Any) -> pd.DataFrame:
    """Decode prompts of different lengths in one batch (:func:`kvlab.caches.generate_ragged`) with each
    ragged-capable cache; compare every row with the same prompt decoded alone.

    One row per cache: ``nbytes`` (held), ``kv_bytes`` (analytic, per-row lengths), ``needed_bytes``
    (the positions actually written, at the cache's own bytes per position), ``waste_bytes`` = held -
    needed, and ``tokens_equal`` (every row equals its solo run). ``options`` go to ``make_cache``
    (e.g. ``block_size`` for ``paged``; sized the same for ``kv_bytes``).
    """
    from kvlab.caches import generate_ragged

    device, _ = _model_device_dtype(model)
    config = model.config
    batch = len(prompts)
    max_tokens = max(len(p) for p in prompts) + new_tokens
    solo = [generate(model, torch.tensor([list(p)], device=device), new_tokens, inference_mode=True,
                     cache=_new_cache(model, "concat", 1, max_tokens)).tokens[0].cpu() for p in prompts]
    per_position = kv_bytes(config, 1, 1)  # bytes of one position of one row, every layer, K and V
    rows = []
    for kind in usable_caches(config, caches):
        opts = options if kind == "paged" else {}
        cache = _new_cache(model, kind, batch, max_tokens, **opts)
        out = generate_ragged(model, [list(p) for p in prompts], new_tokens, cache, inference_mode=True)
        lengths = list(cache.lengths)
        held = cache.nbytes
        needed = sum(min(n, config.sliding_window) if kind == "sliding" else n for n in lengths) * per_position
        analytic = kv_bytes(config, batch, lengths, kind=kind, max_tokens=max_tokens,
                            **({"block_size": opts["block_size"]} if "block_size" in opts else {}))
        rows.append(dict(cache=kind, rows=batch, lengths=lengths, nbytes=held, kv_bytes=analytic,
                         needed_bytes=needed, waste_bytes=held - needed, waste_share=(held - needed) / held,
                         tokens_equal=all(torch.equal(a, b) for a, b in zip(out, solo))))
    return pd.DataFrame(rows)


# ============================================================================================ recorded results
RESULT_FILES = ("meta.json", "runs.csv", "steps.csv")


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
        repo = Path(__file__).resolve().parent.parent
        out = {}
        for name, meta in self.metas.items():
            where = (self.root if name == "." else self.root / name).resolve()
            if where.is_relative_to(repo):  # as run from the repository root
                where = where.relative_to(repo)
            out[name] = re.sub(r"--out \S+", f"--out {where.as_posix()}", meta.get("command", ""))
        return out


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
    is trainable) + :func:`~kvlab.study.memmodel.kv_cache_bytes` of the concat cache, both from
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
