"""Figures shared by the notebooks: memory growth against tokens, fitted growth laws, memory by site,
and RSS next to exact accounting.

Every function returns a matplotlib ``Figure`` built with the object API (nothing depends on pyplot's
global state), puts units on its axes (MiB, tokens), and takes its colours from
:mod:`kvlab.study.palette`, so a loader or a cache design has the same colour in every notebook.
Choices made for the reader, each after a figure that misled:

- A claim "quadratic against linear" is shown on log-log axes, where a power law is a straight line
  whose slope is its exponent, with the K/V-cache size drawn as a reference line and slope guides;
  a log-y axis alone bends both curves the same way.
- Measured points are small hollow markers and fitted lines are drawn over them, solid and thicker,
  so the fit is never hidden under the data.
- Series that may coincide (two clean loaders on one cache line) get distinct sparse markers and
  decreasing line widths, so every legend entry stays visible.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from kvlab.memory.units import MiB

from .memmodel import fit_growth
from .palette import REFERENCE, color_of, loader_color, site_color, site_label

__all__ = ["describe", "plot_growth", "plot_scaling", "plot_by_site", "plot_site_bars", "plot_timeline",
           "add_slope_guide"]

Series = Mapping[str, tuple[Sequence[float], Sequence[float]]]
_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")


def describe(config: Any = None, *, dtype: str | None = None, **labels: Any) -> str:
    """A short title fragment naming the model shape and run: ``"4L h256 8/2 heads fp32, trainable, concat"``.

    ``dtype`` overrides the config's dtype in the title (e.g. ``"bf16 and fp32"`` for a figure that
    shows runs of both), so a title never names a dtype the figure does not hold.
    """
    parts = []
    if config is not None:
        get = config.get if isinstance(config, Mapping) else (lambda k, d=None: getattr(config, k, d))
        shown = dtype if dtype is not None else str(get("torch_dtype", None) or get("dtype", "") or "")
        shown = shown.replace("torch.", "").replace("bfloat", "bf").replace("float", "fp")
        parts.append(f"{get('num_hidden_layers')}L h{get('hidden_size')} "
                     f"{get('num_attention_heads')}/{get('num_key_value_heads')} heads {shown}".strip())
    parts += [f"{v}" if k in ("loader", "cache", "device") else f"{k}={v}" for k, v in labels.items() if v is not None]
    return ", ".join(parts)


def _arrays(tokens: Sequence[float], values: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    x, y = np.asarray(tokens, dtype=float), np.asarray(values, dtype=float)
    ok = np.isfinite(x) & np.isfinite(y) & (x > 0) & (y > 0)
    return x[ok], y[ok]


def add_slope_guide(ax: Axes, x: Sequence[float], anchor: tuple[float, float], slope: float, label: str) -> None:
    """A grey dash-dot line ``y ∝ x**slope`` through ``anchor`` (in data units), labelled at its left end."""
    xs = np.geomspace(min(x), max(x), 20)
    ys = anchor[1] * (xs / anchor[0]) ** slope
    ax.plot(xs, ys, **REFERENCE["guide"])
    ax.annotate(label, (xs[0], ys[0]), xytext=(2, 4), textcoords="offset points", color=REFERENCE["guide"]["color"],
                fontsize="small")


def plot_growth(series: Series, *, kind: str = "loader", colors: Mapping[str, str] | None = None,
                kv: Series | None = None, linear_panel: bool = True, guides: bool = True,
                title: str | None = None, ylabel: str = "MiB alive beyond the weights") -> Figure:
    """Memory held against tokens generated: one line per run, on log-log axes (and linear axes beside).

    ``series``: ``{label: (tokens, bytes)}``; colours by label from the ``kind`` palette (``"loader"`` or
    ``"cache"``) unless ``colors`` gives them. ``kv``: each run's K/V-cache size, ``{label: (tokens,
    bytes)}``, drawn dotted — in the run's colour when the label is a run's, black otherwise. With
    ``guides``, slope-1 and slope-2 guides are drawn through the largest run's last point.
    """
    colors = dict(colors or {})
    fig = Figure(figsize=(12 if linear_panel else 9.5, 4.8), layout="constrained")
    axes = fig.subplots(1, 2) if linear_panel else [fig.add_subplot()]
    loglog = axes[-1]
    top: tuple[float, float] | None = None
    for ax in axes:
        for k, (name, (tokens, values)) in enumerate(series.items()):
            x, y = _arrays(tokens, values)
            color = colors.get(name) or color_of(name, kind)
            every = max(1, len(x) // 8)
            width = 1.5 + 1.3 * (len(series) - 1 - k) / max(len(series) - 1, 1)  # earlier runs wider: overlaps show
            ax.plot(x, y / MiB, "-", color=color, lw=width, marker=_MARKERS[k % len(_MARKERS)], markevery=(k, every),
                    ms=5, mfc="none", label=name)
            if ax is loglog and len(x) and (top is None or y[-1] / MiB > top[1]):
                top = (x[-1], y[-1] / MiB)
        own = False
        for name, (tokens, values) in (kv or {}).items():
            x, y = _arrays(tokens, values)
            style = dict(REFERENCE["kv"])
            if name in series:  # a run's own K/V bytes: its colour, one legend entry for all of them
                style["color"] = colors.get(name) or color_of(name, kind)
                own, name = True, None
            ax.plot(x, y / MiB, label=name, **style)
        if own:
            ax.plot([], [], label="dotted: each run's own K/V-cache bytes", **REFERENCE["kv"])
        ax.set(xlabel="tokens generated", ylabel=ylabel)
        ax.grid(alpha=0.35)
    loglog.set_xscale("log")
    loglog.set_yscale("log")
    if guides and top is not None:  # slope 2, offset above the steepest run; the K/V lines are the slope-1 reference
        add_slope_guide(loglog, [top[0] / 30, top[0]], (top[0], 2 * top[1]), 2, "∝ tokens² (slope 2)")
    if linear_panel:
        axes[0].set_title("linear axes")
        loglog.set_title("log-log axes: a power law is a straight line")
        axes[0].legend(loc="upper left", fontsize="small")
    else:
        loglog.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize="small")
    if title:
        fig.suptitle(title)
    return fig


def plot_scaling(series: Series | pd.DataFrame, *, config: Any = None, title: str | None = None,
                 min_tokens: float | None = None, colors: Mapping[str, str] | None = None, kind: str = "loader",
                 model: tuple[Sequence[float], Sequence[float]] | None = None, model_label: str = "analytic model",
                 styles: Mapping[str, str] | None = None, ax: Axes | None = None, **labels: Any) -> Figure:
    """Memory against tokens on log-log axes, each series with its fitted power law and slope.

    ``series``: ``{"trainable": (tokens, bytes), ...}`` or a DataFrame with a ``tokens`` column. The
    data are small hollow markers; the fit (from ``min_tokens`` on) is a solid line drawn over them,
    extended dotted to the left of the fitted range (``styles`` gives a series another line style for its
    fit, e.g. dashed for fp32 next to bf16 in one colour). ``model``: an analytic curve, a wide grey band
    under everything, so that a fit lying on it stays visible. A
    slope of ~2 is the quadratic leak, ~1 a growing KV cache.
    """
    if isinstance(series, pd.DataFrame):
        series = {c: (series["tokens"], series[c]) for c in series.columns if c != "tokens"}
    colors = dict(colors or {})
    fig = ax.figure if ax is not None else Figure(figsize=(7.5, 5), layout="constrained")
    ax = ax or fig.add_subplot()
    for k, (name, (tokens, values)) in enumerate(series.items()):
        x, y = _arrays(tokens, values)
        color = colors.get(name) or color_of(name, kind)
        width = 1.6 + 1.8 * (len(series) - 1 - k) / max(len(series) - 1, 1)  # later fits narrower: both show
        pick = np.unique(np.geomspace(1, len(x), min(len(x), 28)).astype(int) - 1) if len(x) else []
        ax.plot(x[pick], y[pick] / MiB, "o", color=color, ms=5, mfc="none", alpha=0.7, zorder=2)
        try:
            fit = fit_growth(x, y, min_tokens=min_tokens)
        except ValueError:
            ax.plot([], [], "o", color=color, mfc="none", label=f"{name} (too few points to fit)")
            continue
        fitted = np.geomspace(fit.tokens.min(), fit.tokens.max(), 50)
        ax.plot(fitted, fit.predict(fitted) / MiB, (styles or {}).get(name, "-"), color=color, lw=width, zorder=3,
                label=f"{name}: fitted slope {fit.slope:.2f}")
        if x.min() < fit.tokens.min():
            before = np.geomspace(x.min(), fit.tokens.min(), 20)
            ax.plot(before, fit.predict(before) / MiB, ":", color=color, lw=1.4, zorder=3)
    if model is not None:  # a wide pale band under the data: a fit lying on it stays visible
        x, y = _arrays(*model)
        ax.plot(x, y / MiB, color="0.78", lw=7, solid_capstyle="round", zorder=1, label=model_label)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("tokens generated")
    ax.set_ylabel("MiB")
    what = describe(config, **labels)
    ax.set_title(title or (f"Growth law (log-log) — {what}" if what else "Growth law (log-log)"))
    ax.grid(alpha=0.3, which="both")
    note = f"fits from {min_tokens:g} tokens on (solid); dotted: the fit extended" if min_tokens else None
    ax.legend(loc="upper left", fontsize="small", title=note, title_fontsize="x-small")
    return fig


def plot_by_site(site_table: Any, *, value: str = "live_bytes", top: int = 6, config: Any = None,
                 title: str | None = None, **labels: Any) -> Figure:
    """Stacked area of memory by site over decode steps (``site_table()`` of a tracer, or the tracer).

    Sites get readable labels and fixed colours (:func:`kvlab.study.palette.site_label`); the ``top``
    largest by their final value are shown, the rest summed as "other", largest at the bottom.
    """
    df = site_table.site_table() if hasattr(site_table, "site_table") else site_table
    wide = df.pivot_table(index="step", columns="site", values=value, aggfunc="sum", fill_value=0).sort_index()
    order = list(wide.iloc[-1].sort_values(ascending=False).index) if len(wide) else list(wide.columns)
    keep = order[:top]
    if len(order) > top:
        wide["other"] = wide[order[top:]].sum(axis=1)
        keep.append("other")
    fig = Figure(figsize=(8.5, 4.5), layout="constrained")
    ax = fig.add_subplot()
    if len(wide):
        total = wide[keep].iloc[-1].sum()
        names = [f"{site_label(c)}: {wide[c].iloc[-1] / total:.0%}" if total else site_label(c) for c in keep]
        ax.stackplot(wide.index + 1, *(wide[c] / MiB for c in keep), labels=names,
                     colors=[site_color(c) for c in keep], alpha=0.9)
    ax.set_xlabel("tokens generated")
    ax.set_ylabel(f"MiB {value.replace('_bytes', '').replace('_', ' ')} at each step's end")
    what = describe(config, **labels)
    ax.set_title(title or (f"Memory by allocation site — {what}" if what else "Memory by allocation site"))
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", fontsize="small", title="site: share at the end", title_fontsize="small")
    return fig


def plot_site_bars(by_site: pd.DataFrame, *, title: str) -> Figure:
    """Two runs' memory by site as horizontal bars, side by side: MiB allocated over the run and MiB
    still alive at the end. ``by_site``: columns ``(loader, "allocated MiB" | "alive at end MiB")``,
    one row per site; bars take the loaders' colours."""
    fig = Figure(figsize=(11, 4.2), layout="constrained")
    axes = fig.subplots(1, 2, sharey=True)
    for ax, (column, name) in zip(axes, [("allocated MiB", "allocated over the run"),
                                         ("alive at end MiB", "still alive at the end")]):
        data = by_site.xs(column, axis=1, level=1).iloc[::-1].rename(index=site_label)
        data.plot.barh(ax=ax, color=[loader_color(c) for c in data.columns], title=name)
        ax.set(xlabel="MiB", ylabel="")
        ax.grid(alpha=0.3, axis="x")
    fig.suptitle(title)
    return fig


def plot_timeline(tracer: Any = None, rss: Any = None, *, config: Any = None, title: str | None = None,
                  **labels: Any) -> Figure:
    """Memory (MiB) against tokens generated: exact live tensors at each step's end (tracer) and RSS
    growth sampled by memory_profiler (``rss``: a :class:`~kvlab.memory.rss.RSSTimeline`).

    The tracer's in-step peak is left out: on a leaking run it sits a few KiB above the live line and
    would only add an entry no one can see.
    """
    if tracer is None and rss is None:
        raise ValueError("plot_timeline needs a tracer timeline, an RSS timeline, or both")
    fig = Figure(figsize=(8.5, 4.5), layout="constrained")
    ax = fig.add_subplot()
    if rss is not None:
        s = rss.samples.dropna(subset=["step_pos"])
        ax.plot(s["step_pos"], (s["rss_bytes"] - rss.baseline_bytes) / MiB, color="0.35", lw=2.4, alpha=0.55,
                label="RSS growth, sampled by memory_profiler (what top shows)")
    if tracer is not None:
        tl = tracer.timeline() if hasattr(tracer, "timeline") else tracer
        ax.plot(tl["step"], tl["live_bytes"] / MiB, color=color_of(labels.get("loader", "trainable")), lw=1.6,
                label="tensors alive at each step's end (exact tracer)")
    ax.set_xlabel("decode step (tokens generated − 1)")
    ax.set_ylabel("MiB above the start of decoding")
    what = describe(config, **labels)
    ax.set_title(title or (f"RSS and exact live tensors — {what}" if what else "RSS and exact live tensors"))
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", fontsize="small")
    return fig
