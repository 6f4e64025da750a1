"""Run a decode loop at several lengths and measure, exactly, what it keeps and why.

Every figure of the report comes from one call, :func:`diagnose`, and from kvlab's memory tools; nothing
here counts bytes itself:

- at each length, :func:`~kvlab.memory.leakguard.measure_retained` walks what ``run(steps)`` returned:
  the cache's own tensors, the tensors the autograd graph behind them saved for backward, anything else;
- the leak guard's judgement, :func:`~kvlab.memory.leakguard.compare_retained` on the two longest
  runs (N and 2N tokens), is the verdict;
- the longest run is traced by :class:`~kvlab.memory.trace.MemoryTracer` (attribution by region: peak and
  alive at the end) and explained by :func:`~kvlab.memory.retention.explain` (which leaves require
  grad, how many steps are chained, bytes by op);
- every module the loop uses is checked by :func:`~kvlab.memory.validate.validate_model`;
- the fix is verified by running the same loop under ``torch.inference_mode()`` and with every
  parameter frozen, at N and 2N tokens, judged by the same guard.

On CUDA the longest run is run once more, untraced, under the CUDA allocator's history (a memory snapshot).
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from kvlab.memory.leakguard import LeakReport, Retained, compare_retained, measure_retained
from kvlab.memory.retention import RetentionReport, explain
from kvlab.memory.trace import MemoryTracer
from kvlab.memory.validate import validate_model
from kvlab.study.memmodel import fit_growth
from kvlab.study.records import environment

from .findings import (
    describe_parts,
    headline,
    leak_causes,
    leaves_in_model_order,
    summarize_fix,
    with_growth,
)
from .results import Diagnosis
from .target import BadTarget, Target, _one_line, target_from_callable

__all__ = ["diagnose", "lengths_for"]

VARIANTS = {  # the fix, verified two ways: (label, how the loop is run)
    "inference_mode": "torch.inference_mode()",
    "frozen": "parameters frozen",
}


def lengths_for(tokens: int) -> list[int]:
    """Token counts the loop is run at: four points up to ``tokens`` (rounded down to even), the last two N and 2N."""
    if tokens < 4:
        raise BadTarget(f"--tokens must be at least 4 (the loop runs at several lengths up to it), got {tokens}")
    n = tokens // 2
    return sorted({max(1, n // 4), max(1, n // 2), n, 2 * n})


@contextlib.contextmanager
def _frozen(modules: dict[str, nn.Module]) -> Iterator[int]:
    """Every parameter of ``modules`` with ``requires_grad=False`` inside; the flags restored after.
    Yields how many parameters were frozen."""
    params = {id(p): p for m in modules.values() for p in m.parameters()}
    flags = {key: p.requires_grad for key, p in params.items()}
    try:
        for p in params.values():
            p.requires_grad_(False)
        yield sum(flags.values())
    finally:
        for key, p in params.items():
            p.requires_grad_(flags[key])


def _named(modules: dict[str, nn.Module]) -> nn.Module | None:
    """One module whose parameter names the tools print: the model itself, or a dict of several."""
    if len(modules) <= 1:
        return next(iter(modules.values()), None)
    return nn.ModuleDict(modules)


class _Runner:
    """Calls the loop, turning its failures into :class:`BadTarget`, and keeps a progress bar."""

    def __init__(self, target: Target, device: str, named: nn.Module | None, bar: Any) -> None:
        self.target, self.device, self.named, self.bar = target, device, named, bar

    def __call__(self, steps: int, label: str, context: Callable[[], Any] = contextlib.nullcontext) -> Any:
        self.bar.set_description(f"{label}, {steps} tokens")
        grad = torch.is_grad_enabled()
        try:
            with context():
                kept = self.target(steps, self.device)
        except BadTarget:
            raise
        except Exception as exc:  # the user's loop failed: one line, no traceback
            raise BadTarget(f"{self.target.name}: run({steps}) raised {_one_line(exc)}") from None
        finally:
            torch.set_grad_enabled(grad)  # a loop may switch grad mode off and fail half way
        self.bar.update(steps)
        return kept

    def measure(self, kept: Any, steps: int) -> Retained:
        retained = measure_retained(kept, self.named)
        if retained.total_bytes == 0:
            raise BadTarget(f"{self.target.name}: run({steps}) returned {type(kept).__name__}, which holds no "
                            "tensors: return what the loop keeps (its cache, logits, state)")
        return retained


def _kept_row(steps: int, r: Retained) -> dict[str, Any]:
    return {"tokens": steps, "total_bytes": r.total_bytes, "cache_bytes": r.cache_bytes, "saved_bytes": r.saved_bytes,
            "other_bytes": r.other_bytes, "graph_nodes": r.graph_nodes, "chained_steps": r.chained_steps}


@contextlib.contextmanager
def _traced(modules: dict[str, nn.Module], device: str) -> Iterator[MemoryTracer]:
    """The exact tracer around a run, with a decode step marked after each forward pass of the loop's
    model(s): the run's timeline, and the step in which each kept tensor was saved."""
    tracer = MemoryTracer(device=torch.device(device).type, modules=list(modules.values()) or "auto")
    hooks = [m.register_forward_hook(lambda *_: tracer.mark_step()) for m in modules.values()]
    try:
        with tracer:
            yield tracer
    finally:
        for hook in hooks:
            hook.remove()


def _snapshot_run(run: _Runner, steps: int, out: Path | None) -> dict[str, str]:
    """On CUDA, the longest run once more under the allocator's history, untraced (under the tracer every
    block's innermost Python frame would be the tracer's own); the snapshot's file names in ``out``."""
    if torch.device(run.device).type != "cuda" or out is None:
        return {}
    from kvlab.memory.cuda import cuda_memory_snapshot

    with cuda_memory_snapshot(out / "cuda_snapshot.html", out / "cuda_snapshot.pickle") as files:
        kept = run(steps, "as given, CUDA snapshot")
    del kept
    gc.collect()
    return {"html": files.html_path.name, "pickle": files.pickle_path.name}


def _validation(modules: dict[str, nn.Module]) -> tuple[pd.DataFrame, list[str]]:
    frames, verdicts = [], []
    for name, module in modules.items():
        report = validate_model(module)
        report.subject = f"{name} ({type(module).__name__})"
        verdicts.append(report.verdict)
        frames.append(report.findings.assign(module=name))
    columns = ["module", "parameter", "check", "severity", "detail"]
    table = pd.concat(frames, ignore_index=True)[columns] if frames else pd.DataFrame(columns=columns)
    return table, verdicts


def _fix_rows(run: _Runner, target: Target, n: int, config: Any) -> pd.DataFrame:
    """The same loop at N and 2N tokens under each variant of the fix, judged by the leak guard."""
    rows = []
    for variant in VARIANTS:
        if variant == "frozen" and not target.modules:
            continue  # nothing found to freeze: said in the report
        measured = {}
        for steps in (n, 2 * n):
            if variant == "frozen":
                with _frozen(target.modules):
                    kept = run(steps, VARIANTS[variant])
            else:
                kept = run(steps, VARIANTS[variant], torch.inference_mode)
            measured[steps] = run.measure(kept, steps)
            del kept
            gc.collect()
        guard = compare_retained(measured[n], measured[2 * n], n, config=config)
        r = measured[2 * n]
        rows.append({"variant": variant, "how": VARIANTS[variant], **_kept_row(2 * n, r),
                     "beyond_cache_bytes": r.total_bytes - r.cache_bytes, "growth_bytes": guard.growth,
                     "verdict": guard.verdict})
    return pd.DataFrame(rows)


@dataclass
class _AsGiven:
    """The loop as given, at every length: kept bytes, parts at N and 2N, the traced run's tables."""

    rows: list[dict[str, Any]]
    parts: pd.DataFrame
    guard: LeakReport
    retention: RetentionReport
    sites: pd.DataFrame
    timeline: pd.DataFrame
    snapshot: dict[str, str]


def _as_given(run: _Runner, target: Target, lengths: list[int], out: Path | None) -> _AsGiven:
    n = lengths[-1] // 2
    rows, parts, measured = [], {}, {}
    for steps in lengths:
        if steps == 2 * n:  # the longest run, traced: attribution by region
            with _traced(target.modules, run.device) as tracer:
                kept = run(steps, "as given, traced")
        else:
            kept = run(steps, "as given")
        measured[steps] = run.measure(kept, steps)
        rows.append(_kept_row(steps, measured[steps]))
        if steps in (n, 2 * n):
            parts[steps] = describe_parts(kept, run.named)
        if steps != 2 * n:
            del kept
            gc.collect()
    timeline = tracer.timeline()
    # Without step marks (no module's forward ran) every saved tensor would look saved in one step.
    retention = explain(kept, model=run.named, tracer=tracer if len(timeline) else None)
    del kept
    gc.collect()
    guard = compare_retained(measured[n], measured[2 * n], n, config=target.config)
    return _AsGiven(rows, with_growth(parts[2 * n], parts[n]), guard, retention, tracer.by_site(), timeline,
                    _snapshot_run(run, 2 * n, out))


def diagnose(target: Target | Callable[..., Any], tokens: int = 64, *, device: str = "cpu",
             out: str | Path | None = None, progress: bool = False) -> Diagnosis:
    """Diagnose a decode loop ``run(steps) -> kept`` (or a :class:`Target`); see the module doc.

    ``tokens`` is the longest run (2N); ``out`` is where a CUDA snapshot is written when ``device`` is
    CUDA. Raises :class:`~kvlab.diagnose.target.BadTarget` when the loop cannot be run or returns no tensors.
    """
    if not isinstance(target, Target):
        target = target_from_callable(target)
    lengths = lengths_for(tokens)
    n = lengths[-1] // 2
    gc.collect()
    total = sum(lengths) + 3 * n * len(VARIANTS) + (2 * n if torch.device(device).type == "cuda" else 0)
    with tqdm(total=total, unit="tok", disable=None if progress else True, leave=False) as bar:
        run = _Runner(target, device, _named(target.modules), bar)
        given = _as_given(run, target, lengths, Path(out) if out is not None else None)
        fix = _fix_rows(run, target, n, target.config)
    kept = pd.DataFrame(given.rows)
    fit = fit_growth(kept["tokens"], kept["total_bytes"])
    growth = {"slope": fit.slope, "prefactor": fit.prefactor, "law": fit.law}
    guard, retention = given.guard, given.retention
    validation, verdicts = _validation(target.modules)
    causes = leak_causes(guard, retention, given.parts, target.modules) if guard.leak else []
    meta = {"target": target.name, "kind": target.kind, "device": str(device), "tokens": 2 * n, "lengths": lengths,
            "modules": {k: type(m).__name__ for k, m in target.modules.items()},
            "config": getattr(target.config, "to_dict", lambda: None)(), "environment": environment(device),
            "validation_verdicts": verdicts}
    return Diagnosis(
        meta=meta, verdict=guard.verdict, headline=headline(guard, growth, causes), causes=causes,
        explanation=guard.explanation, retention=retention.summary(), growth=growth,
        fix_summary=summarize_fix(fix, given.parts, target.modules), snapshot=given.snapshot,
        tables={"kept": kept, "parts": given.parts, "sites": given.sites, "timeline": given.timeline,
                "saved_by_op": retention.by_op(), "saved_by_site": retention.by_site(),
                "leaves": leaves_in_model_order(retention), "validation": validation, "fix": fix,
                "guard": pd.DataFrame([guard.as_row()])})
