"""The investigation's composite figures, each drawn from a measurement the notebooks already hold.

These are the figures that needed more than one call of :mod:`kvlab.study.plotting`: the mechanism
picture (the cache's ``grad_fn`` chain and what hangs off each step, from the retention explainer's
own graph walk), the before/after overlay of the fix, the memory monitor with its phases, the
real-scale leak read from the GPU recording, and the fast decode path's runs against the roofline.
Notebook cells stay a line or two; the layout choices live here, written once, with their reasons.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch, Patch

from kvlab.memory.retention import RetentionReport
from kvlab.memory.units import GiB, MiB

from .palette import DTYPE_STYLE, LOADER_COLORS, REFERENCE, cache_color, color_of, loader_color, site_color, site_label
from .results import FAST_LABELS

__all__ = ["plot_mechanism", "plot_before_after", "plot_monitor", "plot_real_scale", "plot_speed_roofline",
           "plot_fast_runs"]

KiB = 1024


def _box(ax: Any, x: float, y: float, text: str, color: str, width: float = 0.8, height: float = 0.5) -> None:
    ax.add_patch(FancyBboxPatch((x - width / 2, y - height / 2), width, height, boxstyle="round,pad=0.02",
                                fc=color, ec="0.2", lw=0.8, alpha=0.9))
    ax.text(x, y, text, ha="center", va="center", fontsize="small")


def _arrow(ax: Any, start: tuple[float, float], end: tuple[float, float], color: str = "0.2", **kw: Any) -> None:
    ax.add_patch(FancyArrowPatch(start, end, arrowstyle="-|>", mutation_scale=10, color=color, lw=1.0, **kw))


def plot_mechanism(report: RetentionReport, *, tokens: int, kv_bytes: int, title: str) -> Figure:
    """The retention mechanism of one short decode, as the explainer found it.

    Top: one box per decode step's cache, linked right to left by the links the graph walk counted
    (``report.state_chain``: forward passes chained through the cache's updates; for a concat cache each
    link is a ``CatBackward0``, each cache's ``grad_fn`` pointing at the previous step's), and the
    leaves that require grad (``report.parameters_requiring_grad``) feeding every step. Bottom: the
    saved tensors still alive, by the step that allocated them and by site (``report.saved``): what
    hangs off each link. ``report`` must come from a traced run (sites and steps known).
    """
    saved = report.saved.dropna(subset=["step"])
    by = saved.groupby(["step", "site"])["bytes"].sum().unstack(fill_value=0) if len(saved) else pd.DataFrame()
    steps = np.arange(tokens)
    by = by.reindex(steps, fill_value=0)
    fig = Figure(figsize=(max(9.5, 0.85 * tokens + 5), 6.2), layout="constrained")
    top, bottom = fig.subplots(2, 1, height_ratios=[1.15, 1.6], sharex=True)
    # -- the chain
    # forward passes linked through the cache's own updates (the walk's state chain), one link fewer
    links = max(getattr(report, "state_chain", report.cat_chain + 1) - 1, 0)
    first_linked = tokens - 1 - links  # the chain reaches back from the final cache
    for s in steps:
        chained = s >= first_linked
        _box(top, s, 1.0, f"cache\nstep {s}", "#e8e0f3" if chained else "#f3f3f3")
        if s > first_linked:
            _arrow(top, (s - 0.42, 1.0), (s - 0.58, 1.0))
    if links:
        top.text((first_linked + tokens - 1) / 2, 1.42, f"{links} links (CatBackward0 for a concat cache): each "
                 "step's cache.grad_fn → the previous step's cache", ha="center", fontsize="small")
    else:
        top.text((tokens - 1) / 2, 1.42, "no link: no cache tensor carries a graph from one step to the next",
                 ha="center", fontsize="small")
    n_params = len(report.parameters_requiring_grad)
    leaf = (f"{n_params} of {report.parameters_total} parameters require grad\n(AccumulateGrad leaves: every op "
            "that uses them records a node)") if n_params else "no parameter requires grad: no op records a node"
    _box(top, (tokens - 1) / 2, 0.1, leaf, "#fde0dd" if n_params else "#e5f5e0", width=min(tokens, 7.5), height=0.5)
    if n_params and report.retains:
        for s in steps:
            _arrow(top, ((tokens - 1) / 2 + (s - (tokens - 1) / 2) * 0.55, 0.36), (s, 0.74), color="0.6")
    top.set(ylim=(-0.25, 1.6), xlim=(-0.7, tokens - 0.3))
    top.axis("off")
    # -- what hangs off each step
    if len(by.columns):
        order = by.sum().sort_values(ascending=False).index
        base = np.zeros(tokens)
        for site in order:
            values = by[site].to_numpy() / KiB
            bottom.bar(steps, values, bottom=base, color=site_color(site), width=0.7, label=site_label(site))
            base += values
        bottom.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize="small",
                      title="saved tensors, by the region\nthat allocated them", title_fontsize="small")
        bottom.set_ylim(0, 1.08 * base.max())
    bottom.axhline(kv_bytes / KiB, **REFERENCE["kv"])
    bottom.annotate(f"the whole KV cache after {tokens} steps: {kv_bytes / KiB:.0f} KiB", (-0.5, kv_bytes / KiB),
                    xytext=(2, 3), textcoords="offset points", fontsize="small")
    bottom.set(xlabel="decode step that allocated the saved tensors (0: the prefill)",
               ylabel="KiB kept alive from that step")
    bottom.set_xticks(steps)
    bottom.grid(alpha=0.3, axis="y")
    passes = getattr(report, "forward_passes", report.steps_chained) if report.retains else 0
    fig.suptitle(f"{title}\n{report.graph_nodes:,} graph nodes hold {report.saved_bytes / KiB:,.0f} KiB of saved "
                 f"tensors from {passes} forward pass{'es' if passes != 1 else ''}")
    return fig


def plot_before_after(live: pd.DataFrame, model: pd.DataFrame, *, before: str, after: str, title: str) -> Figure:
    """The fix on one axis and zoomed: live MiB per token for the loader before and after the fix, with
    the analytic leak + KV cache (``model``: ``tokens, leak_bytes, kv_cache_bytes``) as black dashed lines."""
    fig = Figure(figsize=(12, 4.6), layout="constrained")
    left, right = fig.subplots(1, 2)
    for name in (before, after):
        left.plot(live.index, live[name], color=loader_color(name), lw=1.8, label=f"{name} loader (measured)")
    left.plot(model["tokens"], (model["leak_bytes"] + model["kv_cache_bytes"]) / MiB, label="analytic: leak + KV cache",
              **REFERENCE["model"])
    left.set(title="Before vs after the fix, one axis", ylabel="MiB alive beyond the weights")
    right.plot(live.index, live[after], color=loader_color(after), lw=1.8, label=f"{after} loader (measured)")
    right.plot(model["tokens"], model["kv_cache_bytes"] / MiB, label="analytic: KV cache", **REFERENCE["model"])
    right.set(title="After the fix, zoomed in: the KV cache alone", ylabel="MiB alive beyond the weights")
    for ax in (left, right):
        ax.set_xlabel("tokens generated")
        ax.grid(alpha=0.3)
        ax.legend(loc="upper left", fontsize="small")
    fig.suptitle(title)
    return fig


def plot_monitor(monitors: Mapping[str, Any], *, threshold_bytes: int, title: str) -> Figure:
    """Memory-monitor samples of each run (``{loader: MemoryMonitor}``) against time, with the phases the
    run labelled (``monitor.mark``) shaded and named, the alarm threshold, and every alarm."""
    names = list(monitors)
    fig = Figure(figsize=(12, 4.4 * len(names) ** 0.5), layout="constrained")
    axes = fig.subplots(1, len(names), sharey=True, squeeze=False)[0]
    for ax, name in zip(axes, names):
        monitor = monitors[name]
        s, metric = monitor.samples, monitor.metric
        y = (s[metric] - s[metric].iloc[0]) / MiB
        ax.plot(s["t"], y, color=loader_color(name), lw=1.6, label=f"{name} loader: {metric.replace('_bytes', '')}")
        phases = s.dropna(subset=["label"]).groupby("label", sort=False)["t"].agg(["min", "max"])
        for k, (phase, span) in enumerate(phases.iterrows()):
            ax.axvspan(span["min"], span["max"], color="0.85" if k % 2 else "0.93", zorder=0)
            ax.annotate(phase, ((span["min"] + span["max"]) / 2, 1.0), xycoords=("data", "axes fraction"),
                        xytext=(0, -12 - 12 * (k % 2)), textcoords="offset points", ha="center",
                        fontsize="small")  # staggered: short phases side by side stay readable
        for alarm in monitor.alarms:
            ax.plot(alarm.t, alarm.value / MiB, "v", color="black", ms=9, label=f"alarm at {alarm.t:.2f} s")
        ax.axhline(threshold_bytes / MiB, label=f"alarm threshold ({threshold_bytes / MiB:.0f} MiB)",
                   **REFERENCE["limit"])
        ax.set(xlabel="seconds since the monitor started", title=f"{name} loader")
        ax.grid(alpha=0.3)
        ax.legend(loc="center left", fontsize="small")
    axes[0].set_ylabel("MiB above the monitor's first sample")
    fig.suptitle(title)
    return fig


def plot_real_scale(results: Any, groups: Mapping[str, Mapping[str, str]], *, capacity_gib: Mapping[str, float],
                    models: Mapping[str, pd.DataFrame], title: str) -> Figure:
    """Memory held beyond each run's start at the 7B shape, one panel per group of runs.

    ``groups``: ``{panel title: {run_id: label}}``. A run is coloured by its loader, or by its cache
    design in a panel whose title starts with "cache" (runs of one loader with several caches); its
    dtype sets the line style (bf16 solid, fp32 dashed). An x marks
    where a run ran out of GPU memory; ``capacity_gib`` (by dtype) is the GPU's capacity minus what a
    run of that dtype had allocated when it started (its weights), a grey line in the dtype's style;
    ``models`` are analytic curves (``generated, predicted_bytes``) drawn as hollow black circles.
    """
    fig = Figure(figsize=(13, 5.4), layout="constrained")
    axes = fig.subplots(1, len(groups), sharey=True, squeeze=False)[0]
    for ax, (panel, runs) in zip(axes, groups.items()):
        by_cache = panel.startswith("cache")
        for run_id, label in runs.items():
            row = results.run(run_id)
            steps = results.run_steps(run_id)
            color = _run_color(row, label, by_cache)
            ls = DTYPE_STYLE.get(str(row.get("dtype", "bfloat16")), "-")
            ax.plot(steps["generated"], steps["beyond_start_bytes"] / GiB, color=color, ls=ls, lw=1.8, label=label)
            if row["status"] == "oom":
                ax.plot(steps["generated"].iloc[-1], steps["beyond_start_bytes"].iloc[-1] / GiB, "x", color=color,
                        ms=11, mew=2.5)
            if run_id in models:
                m = models[run_id]
                ax.plot(m["generated"], m["predicted_bytes"] / GiB, "o", color="black", ms=5, mfc="none")
        ax.plot([], [], "o", color="black", ms=5, mfc="none", label="analytic model (kvlab.study.memmodel)")
        ax.plot([], [], "x", color="black", ms=9, mew=2, label="out of memory: the next step's allocation failed")
        dtypes = {str(results.run(r).get("dtype", "bfloat16")) for r in runs}
        for dtype, gib in capacity_gib.items():
            if dtype in dtypes:
                ax.axhline(gib, **{**REFERENCE["limit"], "ls": DTYPE_STYLE.get(dtype, "-")})
                ax.annotate(f"capacity minus the {dtype} weights: {gib:.0f} GiB", (0, gib),
                            xycoords=("axes fraction", "data"), xytext=(4, 3), textcoords="offset points",
                            fontsize="small")
        ax.set(title=panel, xlabel="tokens generated")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small", loc="center right")
    axes[0].set_ylabel("GiB held beyond the run's start")
    fig.suptitle(title)
    return fig


def _run_color(row: Any, label: str, by_cache: bool) -> str:
    if label.startswith("transformers"):
        return color_of("transformers, grad on" if "grad enabled" in label else "transformers, no_grad")
    if by_cache:
        return cache_color(str(row.get("cache", "concat")))
    return LOADER_COLORS.get(str(row.get("loader", "")), "#444444")


def plot_speed_roofline(speed: pd.DataFrame, *, title: str) -> Figure:
    """Tokens/s of each decode path (``speed_summary``: ``path, library, tokens_per_s, roofline_share``)
    as horizontal bars, with the weights-only roofline. Every path runs frozen weights: kvlab's bars take
    the ``inference`` loader's colour, transformers' its no_grad colour."""
    fig = Figure(figsize=(9.5, 4.6), layout="constrained")
    ax = fig.add_subplot()
    library = {"kvlab": loader_color("inference"), "transformers": color_of("transformers, no_grad")}
    ax.barh(speed["path"], speed["tokens_per_s"], color=speed["library"].map(library))
    roofline = speed["tokens_per_s"].iloc[0] / speed["roofline_share"].iloc[0]
    ax.axvline(roofline, **REFERENCE["model"])
    ax.annotate(f"roofline (weights only): {roofline:.0f} tok/s", (roofline, 0), xytext=(-4, 0),
                textcoords="offset points", ha="right")
    ax.invert_yaxis()
    ax.set(title=title, xlabel="tokens/s")
    ax.legend(handles=[Patch(color=c) for c in library.values()], labels=list(library), loc="lower right")
    ax.grid(alpha=0.3, axis="x")
    return fig


def _fast_color(path: Any) -> tuple[str, float]:
    """Colour and opacity of a fast-path bar: kvlab's bf16 paths the ``inference`` loader's colour (an
    ablation paler), int8 the ``int8`` loader's, transformers its no_grad colour."""
    if path.library == "transformers":
        return color_of("transformers, no_grad"), 1.0
    return loader_color(path.loader or "inference"), 1.0 if path.path in ("bf16", "int8") else 0.45


def plot_fast_runs(fast: pd.DataFrame, *, title: str) -> Figure:
    """Tokens/s of each path in each ``bench_fast.py`` run (:func:`~kvlab.study.results.load_fast_runs`)
    as horizontal bars, one per run and path (runs told apart by hatching; whiskers span the repeats'
    min..max), with the bf16 and int8 rooflines of the runs as reference lines."""
    runs = sorted(fast["run"].unique())
    order = list(dict.fromkeys(FAST_LABELS.values()))  # one row per path label, kvlab's first
    labels = sorted(dict.fromkeys(fast["label"]), key=lambda x: order.index(x) if x in order else len(order))
    height = 0.8 / len(runs)
    hatches = ["", "//", "..", "xx"]
    fig = Figure(figsize=(10.5, 1.2 + 0.6 * len(labels) * len(runs)), layout="constrained")
    ax = fig.add_subplot()
    for i, run in enumerate(runs):
        for path in fast[fast["run"] == run].itertuples():
            y = labels.index(path.label) + (i - (len(runs) - 1) / 2) * height
            color, alpha = _fast_color(path)
            spread = [[path.tok_per_s - path.tok_per_s_min], [path.tok_per_s_max - path.tok_per_s]]
            ax.barh(y, path.tok_per_s, height=height * 0.9, color=color, alpha=alpha, hatch=hatches[i % len(hatches)],
                    edgecolor="white", xerr=spread, error_kw={"ecolor": "0.2", "capsize": 2, "lw": 0.8})
            ax.annotate(f"{path.tok_per_s:.0f}" + (f"\n{path.settings}" if path.settings else ""),
                        (path.tok_per_s_max, y), xytext=(4, 0), textcoords="offset points", va="center",
                        fontsize="small", linespacing=1.0)
        for label in set(labels) - set(fast.loc[fast["run"] == run, "label"]):
            ax.annotate(f"not run in {run}", (0, labels.index(label) + (i - (len(runs) - 1) / 2) * height),
                        xytext=(4, 0), textcoords="offset points", va="center", fontsize="small", color="0.4")
    handles, names = [], []
    for loader, style in (("inference", "model"), ("int8", "guide")):
        roof = fast.loc[fast["loader"] == loader, "roofline_tok_per_s"]
        if len(roof):
            low, high = roof.min(), roof.max()
            handles.append(ax.axvline((low + high) / 2, **{**REFERENCE[style], "color": "black"}))
            names.append(f"roofline, {'bf16' if loader == 'inference' else 'int8'} weights: "
                         f"{low:.1f}" + (f"–{high:.1f}" if round(high, 1) != round(low, 1) else "") + " tok/s")
    for i, run in enumerate(runs):
        handles.append(Patch(facecolor="0.55", hatch=hatches[i % len(hatches)], edgecolor="white"))
        names.append(f"{run} ({str(fast.loc[fast['run'] == run, 'date'].iloc[0])[:10]})")
    ax.set_yticks(range(len(labels)), labels)
    ax.invert_yaxis()
    ax.set(title=title, xlabel="tokens/s (batch 1, greedy; bars: median of the repeats, whiskers: min..max)")
    ax.set_xlim(0, 1.08 * max(fast["roofline_tok_per_s"].max(), fast["tok_per_s_max"].max()))
    ax.legend(handles, names, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=2, fontsize="small")
    ax.grid(alpha=0.3, axis="x")
    return fig
