"""Several measured runs side by side: the tables and series the investigation notebooks show.

Each function here runs or reads :class:`~kvlab.study.runs.DecodeRun` objects and returns a tidy
``pandas`` table: one row per run (:func:`measure_grid`, :func:`expected_vs_measured`), one column per
run (:func:`live_table`), one row per loader before decoding (:func:`inspect_loaders`), one row per
step of an untraced, timed run (:func:`time_decode`).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import pandas as pd
import torch
from torch import nn

from kvlab.loaders import load_model
from kvlab.memory.units import MiB

from .env import cleanup, model_bytes
from .runs import DecodeRun, Source, checkpoint, measure_decode

__all__ = ["measure_grid", "expected_vs_measured", "live_table", "inspect_loaders", "time_decode"]


def measure_grid(source: Source, loaders: Iterable[str] = ("trainable",), caches: Iterable[str | None] = ("concat",),
                 tokens: int = 256, **kwargs: Any) -> tuple[pd.DataFrame, dict[tuple[str, str], DecodeRun]]:
    """:func:`~kvlab.study.runs.measure_decode` for every loader x cache: a table with one row per run,
    and the runs themselves keyed by ``(loader, cache)``."""
    runs: dict[tuple[str, str], DecodeRun] = {}
    for loader in loaders:
        for cache in caches:
            run = measure_decode(source, loader, cache, tokens, **kwargs)
            runs[(loader, run.cache)] = run
    return pd.DataFrame([r.row() for r in runs.values()]), runs


def expected_vs_measured(runs: Iterable[DecodeRun]) -> pd.DataFrame:
    """What the loop should hold (weights + KV cache, from the config) against what it holds (measured
    weights + tensors still alive after decoding), one row per run, in MiB."""
    rows = []
    for r in runs:
        expected = (r.weights_expected or 0) + (r.kv_expected or 0)
        measured = r.weights_bytes + r.end_bytes
        rows.append({"loader": r.loader, "cache": r.cache, "weights, analytic": (r.weights_expected or 0) / MiB,
                     "weights, measured": r.weights_bytes / MiB, "KV cache, analytic": (r.kv_expected or 0) / MiB,
                     "expected total": expected / MiB, "measured total": measured / MiB,
                     "measured / expected": measured / expected})
    return pd.DataFrame(rows)


def live_table(runs: Iterable[DecodeRun], label: str = "loader") -> pd.DataFrame:
    """Live MiB after each generated token, one column per run (named by ``label``: an attribute such
    as ``"loader"`` or ``"cache"``), indexed by tokens generated: ready for ``.plot()``."""
    columns = {str(getattr(r, label)): r.timeline.set_index("tokens")["live_bytes"] / MiB for r in runs}
    table = pd.DataFrame(columns)
    table.index.name = "tokens generated"
    return table


def inspect_loaders(source: Source, loaders: Iterable[str], device: str | torch.device = "cpu") -> pd.DataFrame:
    """What each loader hands back, before any decoding: parameters requiring grad, train/eval mode,
    weight bytes and the dtype of the attention projections."""
    directory = checkpoint(source)
    rows = []
    for loader in loaders:
        model = load_model(directory, loader, device=device)
        params = list(model.parameters())
        q_proj = model.model.layers[0].self_attn.q_proj.weight
        rows.append({"loader": loader, "parameters": len(params),
                     "requiring grad": sum(p.requires_grad for p in params),
                     "training mode": model.training, "weights MiB": model_bytes(model) / MiB,
                     "q_proj dtype": str(q_proj.dtype).removeprefix("torch."),
                     "q_proj is a Parameter": isinstance(q_proj, nn.Parameter)})
        del model, params, q_proj
        cleanup(device)
    return pd.DataFrame(rows)


def time_decode(source: Source, loader: str = "trainable", cache: str | None = "concat", tokens: int = 256, *,
                device: str | torch.device = "cpu", prompt_len: int = 1, seed: int = 0) -> pd.DataFrame:
    """Seconds per generated token of an untraced run after a short warm-up: ``step, tokens, position``
    (the positions the step processed: the sequence without a cache, the cache length with one) ``,
    seconds`` (synchronised wall time)."""
    run = measure_decode(source, loader, cache, tokens, device=device, seed=seed, prompt_len=prompt_len,
                         trace=False, warmup=min(8, tokens))
    steps = run.timeline
    return pd.DataFrame({"step": steps["step"], "tokens": steps["tokens"], "position": steps["positions"],
                         "seconds": steps["step_s"]})
