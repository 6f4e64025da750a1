"""Figures for the notebooks: memory over decode steps, memory by site, and scaling with fitted slopes.

Every function returns a matplotlib ``Figure`` (drawn with the object API, so nothing depends on
pyplot's global state), puts MiB and tokens/steps on its axes, and titles itself with the config when
one is given. The inputs are the tidy tables of :mod:`kvlab.memory.trace`, :mod:`kvlab.memory.rss` and
:mod:`kvlab.study.memmodel`.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from .memmodel import fit_growth
from kvlab.memory.trace import MiB

__all__ = ["describe", "plot_timeline", "plot_by_site", "plot_scaling"]


def describe(config: Any = None, **labels: Any) -> str:
    """A short title fragment naming the model shape and run: ``"4L h256 8/2 heads fp32, trainable, concat"``."""
    parts = []
    if config is not None:
        get = config.get if isinstance(config, Mapping) else (lambda k, d=None: getattr(config, k, d))
        dtype = str(get("torch_dtype", None) or get("dtype", "") or "").replace("float", "fp").replace("bfp", "bf")
        parts.append(f"{get('num_hidden_layers')}L h{get('hidden_size')} "
                     f"{get('num_attention_heads')}/{get('num_key_value_heads')} heads {dtype}".strip())
    parts += [f"{v}" if k in ("loader", "cache", "device") else f"{k}={v}" for k, v in labels.items() if v is not None]
    return ", ".join(parts)


def _title(base: str, config: Any, labels: dict[str, Any], title: str | None) -> str:
    if title is not None:
        return title
    what = describe(config, **labels)
    return f"{base} — {what}" if what else base


def plot_timeline(tracer: Any = None, rss: Any = None, *, config: Any = None, title: str | None = None,
                  marker_every: int | None = None, **labels: Any) -> Figure:
    """Memory (MiB) against decode step.

    ``tracer``: a :class:`~kvlab.memory.trace.MemoryTracer` or its ``timeline()`` table — plots live bytes
    at each step's end and the peak inside each step. ``rss``: a :class:`~kvlab.memory.rss.RSSTimeline` —
    plots RSS growth over the run, each sample placed between the step marks, with a dot at each mark.
    ``labels`` (``loader="trainable"``, ``cache="concat"`` ...) go into the title.
    """
    if tracer is None and rss is None:
        raise ValueError("plot_timeline needs a tracer timeline, an RSS timeline, or both")
    fig = Figure(figsize=(8, 4.5), layout="constrained")
    ax = fig.add_subplot()
    if tracer is not None:
        tl = tracer.timeline() if hasattr(tracer, "timeline") else tracer
        ax.plot(tl["step"], tl["live_bytes"] / MiB, label="live tensors at step end (exact)", color="C0")
        ax.plot(tl["step"], tl["peak_bytes"] / MiB, label="peak inside step (exact)", color="C0",
                linestyle=":", alpha=0.8)
    if rss is not None:
        s = rss.samples.dropna(subset=["step_pos"])
        base = rss.baseline_bytes
        ax.plot(s["step_pos"], (s["rss_bytes"] - base) / MiB, label="RSS growth (sampled)", color="C3", alpha=0.8)
        st = rss.steps
        every = marker_every or max(1, len(st) // 32)
        marks = st.iloc[::every]
        ax.plot(marks["step"], (marks["rss_bytes"] - base) / MiB, "o", markersize=3, color="C3",
                label="RSS at step marks")
    ax.set_xlabel("decode step (tokens generated − 1)")
    ax.set_ylabel("MiB above baseline")
    ax.set_title(_title("Memory over decoding", config, labels, title))
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left")
    return fig


def plot_by_site(site_table: Any, *, value: str = "live_bytes", top: int = 7, config: Any = None,
                 title: str | None = None, **labels: Any) -> Figure:
    """Stacked area of memory by site over decode steps (``site_table()`` of a tracer, or the tracer).

    ``value``: ``"live_bytes"`` (alive at each step's end) or ``"peak_bytes"``/``"allocated_bytes"``.
    The ``top`` largest sites (by their final value) are shown; the rest are summed as "other".
    """
    df = site_table.site_table() if hasattr(site_table, "site_table") else site_table
    wide = df.pivot_table(index="step", columns="site", values=value, aggfunc="sum", fill_value=0).sort_index()
    order = wide.iloc[-1].sort_values(ascending=False).index if len(wide) else wide.columns
    keep = list(order[:top])
    if len(order) > top:
        wide["other"] = wide[[c for c in wide.columns if c not in keep]].sum(axis=1)
        keep.append("other")
    fig = Figure(figsize=(8, 4.5), layout="constrained")
    ax = fig.add_subplot()
    if len(wide):
        ax.stackplot(wide.index, *(wide[c] / MiB for c in keep), labels=keep, alpha=0.85)
    ax.set_xlabel("decode step (tokens generated − 1)")
    ax.set_ylabel(f"MiB ({value.replace('_bytes', '').replace('_', ' ')})")
    ax.set_title(_title("Memory by site", config, labels, title))
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", fontsize="small")
    return fig


def plot_scaling(series: Mapping[str, tuple[Sequence[float], Sequence[float]]] | pd.DataFrame, *,
                 config: Any = None, title: str | None = None, min_tokens: float | None = None,
                 **labels: Any) -> Figure:
    """Memory against tokens on log-log axes, each series with its fitted power law and slope.

    ``series``: ``{"leak (trainable)": (tokens, bytes), "KV cache": (tokens, bytes), ...}`` or a
    DataFrame with a ``tokens`` column and one bytes column per series. A slope of ~2 is the
    quadratic leak, ~1 a growing KV cache, ~0 the weights.
    """
    if isinstance(series, pd.DataFrame):
        series = {c: (series["tokens"], series[c]) for c in series.columns if c != "tokens"}
    fig = Figure(figsize=(7, 5), layout="constrained")
    ax = fig.add_subplot()
    for k, (name, (tokens, values)) in enumerate(series.items()):
        x = np.asarray(tokens, dtype=float)
        y = np.asarray(values, dtype=float)
        ok = (x > 0) & (y > 0)
        color = f"C{k}"
        ax.plot(x[ok], y[ok] / MiB, "o", color=color, markersize=4)
        try:
            fit = fit_growth(x, y, min_tokens=min_tokens)
        except ValueError:
            ax.plot([], [], "o", color=color, label=name)
            continue
        xs = np.geomspace(fit.tokens.min(), fit.tokens.max(), 50)
        ax.plot(xs, fit.predict(xs) / MiB, "-", color=color, alpha=0.7,
                label=f"{name}: slope {fit.slope:.2f}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("tokens generated")
    ax.set_ylabel("MiB")
    ax.set_title(_title("Scaling with tokens (log-log)", config, labels, title))
    ax.grid(alpha=0.3, which="both")
    ax.legend(loc="upper left", fontsize="small")
    return fig
