"""The report's figures, drawn from a :class:`~kvlab.diagnose.results.Diagnosis`'s tables.

Each function returns a matplotlib ``Figure`` (object API, no pyplot state) with a title, axis units and
a legend. One colour per kind of kept memory in every figure: the cache's own tensors blue (what a
decode loop must keep), tensors saved for backward red (the leak of the incident), other tensors the
loop returns orange. Byte axes are in KiB or MiB, whichever reads better for the largest value.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from kvlab.memory.units import KiB, MiB, fmt_bytes

from .results import Diagnosis

__all__ = ["KINDS", "plot_kept", "plot_timeline", "plot_sites", "plot_saved_by_op", "plot_fix"]

#: column -> (legend label, colour)
KINDS = {
    "cache_bytes": ("cache tensors", "#1f77b4"),
    "saved_bytes": ("saved for backward (autograd graph)", "#d62728"),
    "other_bytes": ("other tensors returned", "#ff7f0e"),
}
_FIT = {"color": "black", "ls": "--", "lw": 1.2}


def _unit(largest: float) -> tuple[float, str]:
    return (MiB, "MiB") if largest >= MiB else (KiB, "KiB")


def _short(text: str, width: int = 60) -> str:
    return text if len(text) <= width else "…" + text[-(width - 1):]


def plot_kept(d: Diagnosis) -> Figure:
    """Kept bytes against tokens, by kind, with the fitted growth law of the total (linear axes, then log-log)."""
    kept = d.kept
    scale, unit = _unit(kept["total_bytes"].max())
    fig = Figure(figsize=(9, 3.8), layout="constrained")
    linear, loglog = fig.subplots(1, 2)
    xs = np.linspace(kept["tokens"].min(), kept["tokens"].max(), 60)
    fit = d.growth["prefactor"] * xs ** d.growth["slope"]
    for ax in (linear, loglog):
        ax.plot(kept["tokens"], kept["total_bytes"] / scale, "o-", color="black", lw=1.8, label="total kept")
        for column, (label, color) in KINDS.items():
            if kept[column].any():
                ax.plot(kept["tokens"], kept[column] / scale, "s-", color=color, ms=4, lw=1.2, label=label)
        ax.plot(xs, fit / scale, label=f"fit: kept ∝ tokens^{d.growth['slope']:.2f}", **_FIT)
        ax.set(xlabel="tokens decoded", ylabel=f"{unit} kept (weights excluded)")
        ax.grid(alpha=0.3, which="both")
    loglog.set(xscale="log", yscale="log", title="log-log: the slope is the growth exponent")
    linear.set_title("What the loop keeps, by kind")
    linear.legend(loc="upper left", fontsize="small")
    fig.suptitle(f"Kept memory against tokens — {_short(d.meta['target'])}")
    return fig


def plot_timeline(d: Diagnosis) -> Figure:
    """Live bytes during the longest run, after each forward pass and at the peak inside it."""
    tl = d.timeline
    fig = Figure(figsize=(8, 3.4), layout="constrained")
    ax = fig.add_subplot()
    if len(tl):
        scale, unit = _unit(tl["peak_bytes"].max())
        passes = tl["step"] + 1
        ax.plot(passes, tl["live_bytes"] / scale, color="black", lw=1.8, label="live after the forward pass")
        ax.plot(passes, tl["peak_bytes"] / scale, color="0.45", ls=":", lw=1.4, label="peak inside it")
        ax.set(xlabel="forward passes (decode steps)", ylabel=f"{unit} live (weights excluded)")
        ax.legend(loc="upper left", fontsize="small")
        ax.grid(alpha=0.3)
    else:
        ax.text(0.5, 0.5, "no module's forward was seen: no per-step marks", ha="center", va="center")
        ax.set_axis_off()
    ax.set_title(f"Live tensor memory during the longest run ({int(d.kept['tokens'].iloc[-1])} tokens), exact")
    return fig


def plot_sites(d: Diagnosis, top: int = 8) -> Figure:
    """Attribution by region: each region's peak live bytes and what it allocated that is alive at the end."""
    sites = d.sites.sort_values(["alive_end_bytes", "peak_bytes"], ascending=False).head(top).iloc[::-1]
    scale, unit = _unit(max(sites["peak_bytes"].max(), 1) if len(sites) else 1)
    fig = Figure(figsize=(8, 0.35 * max(len(sites), 2) + 1.4), layout="constrained")
    ax = fig.add_subplot()
    y = np.arange(len(sites))
    ax.barh(y + 0.2, sites["peak_bytes"] / scale, height=0.4, color="#9ecae1", label="peak (highest live)")
    ax.barh(y - 0.2, sites["alive_end_bytes"] / scale, height=0.4, color="#08519c", label="alive at the end")
    ax.set_yticks(y, [_short(str(s), 45) for s in sites["site"]], fontsize="small")
    ax.set(xlabel=unit, title=f"Where the memory was allocated (top {len(sites)} regions, longest run)")
    ax.grid(alpha=0.3, axis="x")
    ax.legend(loc="lower right", fontsize="small")
    return fig


def plot_saved_by_op(d: Diagnosis, top: int = 8) -> Figure:
    """Bytes the autograd graph keeps, by the backward node that saved them."""
    ops = d.saved_by_op.head(top).iloc[::-1]
    fig = Figure(figsize=(8, 0.35 * max(len(ops), 2) + 1.4), layout="constrained")
    ax = fig.add_subplot()
    if len(ops):
        scale, unit = _unit(ops["bytes"].max())
        ax.barh(ops["op"], ops["bytes"] / scale, color=KINDS["saved_bytes"][1], label="saved for backward")
        ax.set_xlabel(unit)
        ax.legend(loc="lower right", fontsize="small")
    else:
        ax.text(0.5, 0.5, "no autograd graph: nothing saved for backward", ha="center", va="center")
        ax.set_axis_off()
    ax.set_title("Why it stays alive: tensors saved for backward, by op")
    return fig


def plot_fix(d: Diagnosis) -> Figure:
    """What the loop keeps after the longest run as given and under each variant of the fix, by kind."""
    as_given = d.kept.iloc[[-1]].assign(how="as given", verdict=d.verdict)
    rows = pd.concat([as_given, d.fix], ignore_index=True).iloc[::-1]
    scale, unit = _unit(rows["total_bytes"].max())
    fig = Figure(figsize=(8, 0.5 * len(rows) + 1.6), layout="constrained")
    ax = fig.add_subplot()
    left = np.zeros(len(rows))
    for column, (label, color) in KINDS.items():
        values = rows[column].to_numpy() / scale
        ax.barh(rows["how"], values, left=left, color=color, label=label if values.any() else None)
        left += values
    for y, (total, verdict) in enumerate(zip(rows["total_bytes"], rows["verdict"])):
        ax.annotate(f" {fmt_bytes(total)} ({verdict})", (left[y], y), va="center", fontsize="small")
    ax.set_xlim(0, left.max() * 1.3 if left.max() else 1)
    ax.set(xlabel=f"{unit} kept after {int(d.kept['tokens'].iloc[-1])} tokens",
           title="The fix verified: what remains under each variant")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.3), ncol=3, fontsize="small", frameon=False)
    ax.grid(alpha=0.3, axis="x")
    return fig
