"""Figures about the KV cache itself: each design's memory, speed and reads, the cost of having no
cache, and ``torch.cat``'s transient copy.

Kept apart from :mod:`kvlab.study.figures` (the leak's figures) because these describe a cache doing
its legitimate job. Designs keep their colours from :mod:`kvlab.study.palette`; a measurement taken at
a few discrete points (two lengths, two batches) is drawn as bars, never as lines joining points that
have nothing in between.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from kvlab.memory.units import MiB

from .palette import REFERENCE, cache_color

__all__ = ["plot_cache_memory", "plot_speed_bars", "plot_cat_transients", "plot_flops"]

KiB = 1024


def _style(kind: str) -> dict[str, object]:
    # gqa stores exactly static's buffer: drawn dashed over a wide, pale static line so both stay visible
    if kind == "static":
        return {"color": cache_color(kind), "lw": 4.5, "alpha": 0.45}
    return {"color": cache_color(kind), "lw": 1.7, "ls": "--" if kind == "gqa" else "-"}


def plot_cache_memory(sweep: pd.DataFrame, caches: Sequence[str], *, batch: int, window: int, title: str) -> Figure:
    """Left: each design's own ``nbytes`` against cached positions; right: the peak of live tensors inside
    each decode step (cache + the step's transients), both at ``batch``."""
    rows = sweep[sweep["batch"] == batch]
    fig = Figure(figsize=(12, 4.9), layout="constrained")
    left, right = fig.subplots(1, 2)
    for kind in caches:
        mine = rows[rows["cache"] == kind]
        left.plot(mine["positions"], mine["nbytes"] / MiB, label=kind, **_style(kind))
        steps = mine[mine["step"] > 0]
        right.plot(steps["positions"], steps["peak_bytes"] / MiB, **_style(kind))
    left.axvline(window, color="grey", lw=0.8, ls=":")
    left.annotate(f"window = {window}", (window, 0.02), xycoords=("data", "axes fraction"), xytext=(4, 0),
                  textcoords="offset points", color="grey")
    left.set(title=f"Cache size (nbytes), batch {batch}", xlabel="cached positions (tokens)", ylabel="MiB")
    right.set(title=f"Peak live tensors inside each decode step, batch {batch}", xlabel="cached positions (tokens)",
              ylabel="MiB (cache + the step's activations)")
    for ax in (left, right):
        ax.grid(alpha=0.3)
    fig.legend(*left.get_legend_handles_labels(), loc="outside lower center", ncols=len(caches), title="cache design")
    fig.suptitle(title)
    return fig


def plot_speed_bars(speed: pd.DataFrame, caches: Sequence[str], *, title: str) -> Figure:
    """Tokens/s of each design as grouped bars: one panel per batch size, one group per cached length."""
    batches = sorted(speed["batch"].unique())
    lengths = sorted(speed["positions"].unique())
    fig = Figure(figsize=(5.5 * len(batches) + 1.5, 4.4), layout="constrained")
    axes = fig.subplots(1, len(batches), sharey=True, squeeze=False)[0]
    width = 0.8 / len(caches)
    for ax, b in zip(axes, batches):
        for k, kind in enumerate(caches):
            mine = speed[(speed["cache"] == kind) & (speed["batch"] == b)].set_index("positions")
            values = [mine["tokens_per_s"].get(n, np.nan) for n in lengths]
            offset = (k - (len(caches) - 1) / 2) * width
            ax.bar(np.arange(len(lengths)) + offset, values, width, color=cache_color(kind), label=kind)
        ax.set_xticks(np.arange(len(lengths)), [f"{n} cached positions" for n in lengths])
        ax.set(title=f"batch {b}", ylabel="tokens/s")
        ax.grid(alpha=0.3, axis="y")
    fig.legend(*axes[0].get_legend_handles_labels(), loc="outside right center", title="cache design")
    fig.suptitle(title)
    return fig


def plot_cat_transients(tables: Mapping[str, pd.DataFrame], *, title: str) -> Figure:
    """A cache grown by ``torch.cat`` (:func:`kvlab.study.controls.cat_transients`): what is alive at
    each step's end against the peak inside the step. A transient comes back down every step; a leak
    would show in the end-of-step line."""
    fig = Figure(figsize=(9, 4.6), layout="constrained")
    ax = fig.add_subplot()
    first = next(iter(tables.values()))
    ax.plot(first["positions"], first["kv_bytes"] / KiB, label="KV cache, analytic size", **REFERENCE["kv"])
    ax.plot(first["positions"], first["live_bytes"] / KiB, color=cache_color("concat"), lw=1.6,
            label="alive at each step's end, either way (the cache and its positions)")
    for (label, table), hatch in zip(tables.items(), ("", "//")):  # the same cache: one colour, told by hatching
        ax.fill_between(table["positions"], table["live_bytes"] / KiB, table["peak_bytes"] / KiB, hatch=hatch,
                        facecolor=cache_color("concat") if not hatch else "none", edgecolor=cache_color("concat"),
                        alpha=0.3 if not hatch else 0.8, lw=0, label=f"{label}: extra at the peak inside a step")
    ax.set(xlabel="cached positions (tokens)", ylabel="KiB", title=title)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", fontsize="small")
    return fig


def plot_flops(flops: Mapping[str, pd.DataFrame], *, seconds: Mapping[str, pd.Series] | None = None,
               title: str) -> Figure:
    """Matmul FLOPs per decode step (counted), and beside it the measured time per token (not asserted:
    a clock on a shared machine), for each of ``flops``' runs, coloured by cache (``"none"``: no cache)."""
    panels = 2 if seconds else 1
    fig = Figure(figsize=(6 * panels + 1, 4.4), layout="constrained")
    axes = fig.subplots(1, panels, squeeze=False)[0]
    for label, table in flops.items():
        color = cache_color(None if "no cache" in label else "concat")
        axes[0].plot(table["tokens"], table["flops"] / 1e6, color=color, lw=1.8, label=label)
        if seconds:
            ms = seconds[label] * 1e3
            axes[1].plot(ms.index, ms.rolling(9, center=True, min_periods=1).median(), color=color, lw=1.6, label=label)
    axes[0].set(xlabel="tokens generated", ylabel="MFLOPs in the step's matmuls", title="work per token (counted)")
    if seconds:
        axes[1].set(xlabel="tokens generated", ylabel="ms per token (rolling median of 9)",
                    title="time per token (measured, this machine)")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(loc="upper left", fontsize="small")
    fig.suptitle(title)
    return fig
