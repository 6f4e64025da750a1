"""The explorer: pick a loader, a cache design, a length and a batch; see what the decode keeps, and the verdict.

The notebooks each fix a few configurations to make one point. A reader who wants to ask "and with
the static cache at batch 4?" gets :func:`explore`: one measured decode (:func:`kvlab.study.runs.measure_decode`,
traced by the exact tracer and judged by the leak guard) and its figure, memory against tokens with
the KV cache's analytic size for reference. :func:`explorer` puts it behind four controls in
JupyterLab and redraws on every change. A rendered report has no kernel to drive the controls, so
:func:`plot_grid` draws several explorations side by side as a static figure instead.

What the figure shows, per run:

- the bytes alive beyond the weights after every token (exact tracer): everything the run allocated
  and has not freed, the leak included;
- the cache's own ``nbytes`` (a wide band in the cache design's colour) and the analytic size from
  :func:`kvlab.caches.kv_bytes` (black dotted): they coincide, so the band is what a cache should cost;
- what the returned state keeps after N/2 and N tokens (:func:`kvlab.memory.leakguard.measure_retained`),
  the two points the leak guard compares.

ipywidgets is imported inside :func:`explorer` only: ``import kvlab.study.explorer`` works without it.
"""

from __future__ import annotations

import copy
import html
import io
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from kvlab.caches import CACHES
from kvlab.config import MistralConfig
from kvlab.config import preset as preset_config
from kvlab.loaders import LOADERS
from kvlab.memory.units import MiB, fmt_bytes

from .palette import REFERENCE, cache_color, loader_color
from .plotting import describe
from .runs import DecodeRun, measure_decode

if TYPE_CHECKING:
    import ipywidgets

__all__ = ["TOKENS_RANGE", "BATCH_RANGE", "SLIDING_WINDOW", "Exploration", "explore", "draw", "plot_grid",
           "png", "explorer"]

#: The explorer's slider ranges: lengths the tiny preset decodes in about a second, and batch sizes.
TOKENS_RANGE = (16, 256)
BATCH_RANGE = (1, 8)
#: The window written into the config when the ``sliding`` design is picked (a preset attends to every
#: position, and a sliding cache needs a model with a window): notebook 05 uses the same.
SLIDING_WINDOW = 32


_ALIVE, _NBYTES = "alive beyond the weights (exact tracer)", "the cache's own nbytes"
#: Legend labels of the lines drawn in a run's colours, as a grid of several runs labels them.
_COLOURED = {_ALIVE: f"{_ALIVE}, in the loader's colour", _NBYTES: f"{_NBYTES}, in the cache's colour"}


@dataclass
class Exploration:
    """One explored configuration: the measured run and its figure."""

    run: DecodeRun  # timeline (per token: live_bytes, cache_bytes, kv_analytic_bytes), retained, leak
    figure: Figure
    batch: int

    @property
    def verdict(self) -> str:
        """The leak guard's verdict: "LEAK" or "ok" ("n/a" when the run stopped early)."""
        return self.run.leak.verdict if self.run.leak is not None else "n/a"

    def _kept(self, part: str) -> int:
        """One figure of what the state keeps after the last token (0 for a run that stopped before it)."""
        retained = self.run.retained.get(self.run.tokens)
        return getattr(retained, part) if retained is not None else 0

    @property
    def kept_bytes(self) -> int:
        """What the returned state (cache, logits, and any graph behind them) keeps after the last token."""
        return self._kept("total_bytes")

    @property
    def cache_bytes(self) -> int:
        """The K/V-shaped tensors among what is kept (the leak guard's ``cache_bytes``)."""
        return self._kept("cache_bytes")

    @property
    def graph_bytes(self) -> int:
        """Bytes held only by an autograd graph behind the state: the leak."""
        return self._kept("saved_bytes")

    @property
    def kv_bytes(self) -> int | None:
        """The cache's analytic size at the end of the run (:func:`kvlab.caches.kv_bytes`)."""
        return self.run.kv_expected

    def line(self) -> str:
        """The verdict in one sentence, with the measured figures it rests on."""
        run = self.run
        if run.leak is None:
            return f"n/a: the run stopped after {len(run.timeline)} of {run.tokens} tokens ({run.status}: {run.detail})"
        leak, half = run.leak, run.half
        growth = f"x{leak.growth_ratio:.2f} from {half} to {run.tokens} tokens"
        if leak.leak:
            return (f"LEAK: after {run.tokens} tokens the loop keeps {fmt_bytes(self.kept_bytes)}, of which "
                    f"{fmt_bytes(self.graph_bytes)} is held by an autograd graph and {fmt_bytes(self.cache_bytes)} "
                    f"is the KV cache ({growth}).")
        rest = self.kept_bytes - self.cache_bytes
        return (f"ok: after {run.tokens} tokens the loop keeps {fmt_bytes(self.kept_bytes)}: its KV cache "
                f"{fmt_bytes(self.cache_bytes)} and {fmt_bytes(rest)} of other state (the cache's positions, the last "
                f"logits), nothing held by a graph ({growth}).")

    def row(self) -> dict[str, Any]:
        """One row for a table of explorations, in MiB."""
        run = self.run
        return {"loader": run.loader, "cache": run.cache, "tokens": run.tokens, "batch": self.batch,
                "alive MiB (tracer)": run.end_bytes / MiB, "kept MiB (leak guard)": self.kept_bytes / MiB,
                "held by a graph MiB": self.graph_bytes / MiB, "KV cache MiB (kept)": self.cache_bytes / MiB,
                "KV cache MiB (analytic)": (self.kv_bytes or 0) / MiB,
                "growth x (N/2→N)": run.leak.growth_ratio if run.leak else float("nan"), "verdict": self.verdict}


def _check(loader: str, cache: str, tokens: int, batch: int) -> None:
    """One clear ``ValueError`` for a choice the explorer does not offer."""
    if loader not in LOADERS:
        raise ValueError(f"unknown loader {loader!r}; choose from {', '.join(LOADERS)}")
    if cache not in CACHES:
        raise ValueError(f"unknown cache {cache!r}; choose from {', '.join(CACHES)}")
    for name, value, (low, high) in (("tokens", tokens, TOKENS_RANGE), ("batch", batch, BATCH_RANGE)):
        if isinstance(value, bool) or not isinstance(value, int | np.integer) or not low <= value <= high:
            raise ValueError(f"{name} must be an integer from {low} to {high}, got {value!r}")


def _source(preset: str, cache: str) -> str | MistralConfig:
    """The preset, or for the ``sliding`` design the preset with a window (see :data:`SLIDING_WINDOW`)."""
    config = preset_config(preset)
    if cache == "sliding" and config.sliding_window is None:
        return config.replace(sliding_window=SLIDING_WINDOW)
    return preset


def explore(loader: str = "trainable", cache: str = "concat", tokens: int = 64, batch: int = 1,
            preset: str = "tiny", *, device: str | torch.device = "cpu", seed: int = 0) -> Exploration:
    """Decode ``tokens`` tokens for ``batch`` sequences with the ``loader``'s model and a ``cache`` cache,
    measured and judged; return the run and its figure.

    The run is :func:`~kvlab.study.runs.measure_decode` with the exact tracer (bytes alive after every
    token) and ``retained=True`` (what the returned state keeps after N/2 and N tokens, and the leak
    guard's verdict on the two). Choices outside the controls' ranges are a ``ValueError``.
    """
    _check(loader, cache, tokens, batch)
    run = measure_decode(_source(preset, cache), loader, cache, int(tokens), device=device, seed=seed,
                         batch=int(batch), retained=True, frames=False)
    exploration = Exploration(run, Figure(figsize=(8, 4.8), layout="constrained"), int(batch))
    ax = exploration.figure.add_subplot()
    ax.set_ylim(0, 1.1 * draw(ax, exploration))
    _legend(exploration.figure, ax)
    exploration.figure.suptitle(f"Memory (MiB) against tokens generated: "
                                  f"{describe(run.config, window=run.config.sliding_window, device=run.device)}")
    return exploration


def draw(ax: Axes, exploration: Exploration, *, panel_title: bool = True) -> float:
    """Draw one exploration on ``ax``: alive bytes, the cache's bytes and analytic size, the guard's points.

    Returns the highest value drawn, in MiB: the caller sets the y range (from 0), once per shared axis.
    """
    run = exploration.run
    frame = run.timeline
    x = frame["tokens"].to_numpy()
    color = loader_color(run.loader)
    ax.plot(x, frame["cache_bytes"] / MiB, color=cache_color(run.cache), lw=7, alpha=0.35, solid_capstyle="butt",
            label=_NBYTES)
    if "kv_analytic_bytes" in frame:
        ax.plot(x, frame["kv_analytic_bytes"].astype(float) / MiB, label="KV cache, analytic (kv_bytes)",
                **REFERENCE["kv"])
    if "live_bytes" in frame:
        ax.plot(x, frame["live_bytes"] / MiB, color=color, lw=1.8, label=_ALIVE)
    if run.retained:
        steps = sorted(run.retained)
        ax.plot(steps, [run.retained[n].total_bytes / MiB for n in steps], "o", ms=9, mfc="none", mec="black",
                mew=1.4, label="kept by the returned state (leak guard)")
    ax.set(xlabel="tokens generated", ylabel="memory (MiB)", xlim=(0, run.tokens * 1.02))
    ax.grid(alpha=0.35)
    if panel_title:
        ax.set_title(f"{run.loader} loader, {run.cache} cache, batch {exploration.batch}", color=color)
    leak = exploration.verdict == "LEAK"
    kv = f", KV cache {fmt_bytes(exploration.cache_bytes)}"
    note = {"LEAK": f"LEAK: {fmt_bytes(exploration.graph_bytes)} held by a graph{kv}",
            "ok": f"ok: keeps {fmt_bytes(exploration.kept_bytes)}{kv}"}.get(
        exploration.verdict, f"n/a: {run.status} after {len(frame)} tokens")
    ax.text(0.98, 0.04, note, transform=ax.transAxes, ha="right", va="bottom", fontsize="small", weight="bold",
            color="white" if leak else "black",
            bbox={"boxstyle": "round,pad=0.3", "fc": color if leak else "white", "ec": color})
    columns = [c for c in ("cache_bytes", "kv_analytic_bytes", "live_bytes") if c in frame]
    drawn = [float(np.nanmax(frame[columns].to_numpy(dtype=float)))] if len(frame) else []
    return max([*drawn, *(r.total_bytes for r in run.retained.values()), 1.0]) / MiB


def _legend(fig: Figure, ax: Axes, *, neutral: bool = False) -> None:
    """One legend under the figure; ``neutral`` draws the run's lines in grey, for panels of several colours."""
    handles, labels = ax.get_legend_handles_labels()
    if neutral:
        handles = [copy.copy(h) for h in handles]
        for handle, label in zip(handles, labels):
            if isinstance(handle, Line2D) and label in _COLOURED:
                handle.set_color("0.45")
        labels = [_COLOURED.get(label, label) for label in labels]
    columns = 4 if fig.get_figwidth() >= 10 else 2  # one row under a grid, two under a single panel
    fig.legend(handles, labels, loc="outside lower center", ncols=columns, fontsize="small")


def plot_grid(explorations: Sequence[Exploration], *, title: str | None = None) -> Figure:
    """Several explorations as a static grid: one row per loader, one column per cache design.

    Panels of one row share their y axis (the same loader: compare the caches); rows do not, since a
    leaking loader keeps hundreds of times what a clean one does. One legend for all panels.
    """
    loaders = list(dict.fromkeys(e.run.loader for e in explorations))
    caches = list(dict.fromkeys(e.run.cache for e in explorations))
    fig = Figure(figsize=(4.6 * len(caches) + 0.6, 3.1 * len(loaders) + 1), layout="constrained")
    axes = np.atleast_2d(fig.subplots(len(loaders), len(caches), sharex=True, sharey="row", squeeze=False))
    tops = np.zeros(len(loaders))
    for e in explorations:
        row = loaders.index(e.run.loader)
        tops[row] = max(tops[row], draw(axes[row, caches.index(e.run.cache)], e))
    for row, top in enumerate(tops):
        axes[row, 0].set_ylim(0, 1.1 * top)
    for ax in axes.flat:
        ax.label_outer()
        if not ax.has_data():
            ax.set_visible(False)
    _legend(fig, axes.flat[0], neutral=len(loaders) > 1 or len(caches) > 1)
    if title:
        fig.suptitle(title)
    return fig


def png(figure: Figure, dpi: int = 100) -> bytes:
    """A figure as PNG bytes (the explorer shows figures as images, which need no plotting backend)."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi)
    return buffer.getvalue()


def explorer(loader: str = "trainable", cache: str = "concat", tokens: int = 64, batch: int = 1,
             preset: str = "tiny", *, device: str | torch.device = "cpu",
             shown: Exploration | None = None) -> ipywidgets.VBox:
    """A JupyterLab explorer: dropdowns for the loader and the cache, sliders for tokens and batch.

    Every change re-runs :func:`explore` and redraws its figure under a one-line verdict; the sliders
    act when released. Returns an ``ipywidgets.VBox`` of three children: the controls (an ``HBox``
    of the four widgets, by ``description``), the verdict line (``HTML``) and the figure (``Image``).
    The arguments are the first configuration shown, measured before this returns; or ``shown``, a run
    :func:`explore` already measured (of ``preset`` on ``device``), is shown first and sets the controls.
    """
    import ipywidgets as widgets  # only here: kvlab imports without ipywidgets

    if shown is not None:
        loader, cache, tokens, batch = shown.run.loader, shown.run.cache, shown.run.tokens, shown.batch
    _check(loader, cache, tokens, batch)
    slider = {"continuous_update": False, "style": {"description_width": "initial"}}
    controls = [widgets.Dropdown(options=list(LOADERS), value=loader, description="loader"),
                widgets.Dropdown(options=list(CACHES), value=cache, description="cache"),
                widgets.IntSlider(value=tokens, min=TOKENS_RANGE[0], max=TOKENS_RANGE[1], step=16,
                                  description="tokens", **slider),
                widgets.IntSlider(value=batch, min=BATCH_RANGE[0], max=BATCH_RANGE[1], description="batch", **slider)]
    verdict = widgets.HTML()
    image = widgets.Image(format="png", layout=widgets.Layout(max_width="100%"))

    def show(result: Exploration) -> None:
        image.value = png(result.figure)
        head, rest = result.line().split(":", 1)
        colour = loader_color(result.run.loader) if result.verdict == "LEAK" else "black"
        verdict.value = f'<b style="color:{colour}">{html.escape(head)}</b>:{html.escape(rest)}'

    def update(_: object = None) -> None:
        choice = {c.description: c.value for c in controls}
        verdict.value = "<i>measuring ...</i>"
        try:
            result = explore(**choice, preset=preset, device=device)
        except (ValueError, RuntimeError) as error:  # a choice the model cannot run: say so, keep the old figure
            verdict.value = f"<b>cannot run</b>: {html.escape(str(error).splitlines()[0])}"
            return
        show(result)

    for control in controls:
        control.observe(update, names="value")
    if shown is not None:
        show(shown)
    else:
        update()
    return widgets.VBox([widgets.HBox(controls), verdict, image])
