"""The explorer: measured runs with the leak guard's verdict, figures, and the JupyterLab controls.

A leaking configuration must be judged LEAK and a clean one ok, the clean one keeping exactly the
KV cache's analytic bytes (:func:`kvlab.caches.kv_bytes`) and nothing held by a graph; the widget UI
must build and re-measure on a change without a kernel; kvlab must import without ipywidgets.
"""

from __future__ import annotations

import pytest

from kvlab.caches import kv_bytes
from kvlab.config import preset
from kvlab.memory.units import MiB
from kvlab.study.explorer import Exploration, explore, plot_grid

TOKENS = 32
CASES = [("trainable", "concat", "LEAK"), ("trainable", "static", "LEAK"),
         ("inference", "concat", "ok"), ("inference", "static", "ok")]


@pytest.fixture(scope="module")
def explored(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, str], Exploration]:
    """The four corners of the static grid, measured once (checkpoints in a temporary data folder)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("KVLAB_DATA", str(tmp_path_factory.mktemp("kvlab-data")))
        return {(loader, cache): explore(loader, cache, TOKENS, batch=2) for loader, cache, _ in CASES}


@pytest.mark.parametrize(("loader", "cache", "verdict"), CASES)
def test_verdict_is_the_leak_guards(explored, loader: str, cache: str, verdict: str) -> None:
    e = explored[loader, cache]
    assert e.verdict == e.run.leak.verdict == verdict
    assert e.line().startswith(f"{verdict}: after {TOKENS} tokens")
    if verdict == "LEAK":
        assert e.graph_bytes > 10 * e.cache_bytes  # the graph, not the cache, holds the memory
        assert e.run.end_bytes >= e.graph_bytes  # the tracer sees what the graph holds
    else:
        assert e.graph_bytes == 0 and e.run.retained[TOKENS].graph_nodes == 0


@pytest.mark.parametrize("cache", ["concat", "static"])
def test_clean_run_keeps_the_analytic_kv_cache(explored, cache: str) -> None:
    e = explored["inference", cache]
    config = preset("tiny")
    positions = TOKENS  # a one-token prompt plus TOKENS - 1 tokens fed back: the last one is not cached yet
    expected = kv_bytes(config, 2, positions, kind=cache, max_tokens=TOKENS + 1)
    assert e.cache_bytes == e.kv_bytes == expected
    # every step: the cache's own nbytes on its analytic size
    frame = e.run.timeline
    per_step = [kv_bytes(config, 2, int(p), kind=cache, max_tokens=TOKENS + 1) for p in frame["positions"]]
    assert frame["cache_bytes"].tolist() == frame["kv_analytic_bytes"].tolist() == per_step
    # besides the cache, only the last logits and the cache's position bookkeeping (int64, per layer)
    rest = e.kept_bytes - e.cache_bytes
    bound = 2 * config.vocab_size * config.dtype.itemsize + 8 * 2 * (TOKENS + 1) * (config.num_hidden_layers + 1)
    assert 0 < rest <= bound, (rest, bound)


def test_leak_shape_follows_the_cache(explored) -> None:
    """Quadratic through the concat cache's chain, linear through the static cache's in-place writes."""
    assert explored["trainable", "concat"].run.leak.growth_ratio > 2.5
    assert 1.8 < explored["trainable", "static"].run.leak.growth_ratio < 2.2


def test_figures_have_units_legend_and_one_panel_per_run(explored) -> None:
    e = explored["trainable", "concat"]
    ax = e.figure.axes[0]
    assert "MiB" in e.figure.get_suptitle() and "MiB" in ax.get_ylabel() and ax.get_xlabel() == "tokens generated"
    labels = [t.get_text() for legend in e.figure.legends for t in legend.get_texts()]
    assert "KV cache, analytic (kv_bytes)" in labels and len(labels) == 4
    grid = plot_grid(list(explored.values()), title="grid")
    titles = sorted(ax.get_title() for ax in grid.axes if ax.get_visible())
    assert titles == sorted(f"{loader} loader, {cache} cache, batch 2" for loader, cache, _ in CASES)
    # a row shares its y range, and it holds the row's highest run
    top = max(explored["trainable", c].run.end_bytes for c in ("concat", "static")) / MiB
    assert all(ax.get_ylim()[1] >= top for ax in grid.axes if "trainable" in ax.get_title())


@pytest.mark.parametrize(("args", "message"), [(("fp16",), "unknown loader"), (("trainable", "lru"), "unknown cache"),
                                               (("trainable", "concat", 8), "tokens must be"),
                                               (("trainable", "concat", 64, 0), "batch must be")])
def test_bad_choices_are_one_clear_error(args: tuple, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        explore(*args)


def test_widget_ui_builds_and_remeasures_without_a_kernel(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("ipywidgets")
    from kvlab.study.explorer import explorer

    monkeypatch.setenv("KVLAB_DATA", str(tmp_path))
    ui = explorer("trainable", "concat", tokens=16)
    bar, verdict, image = ui.children
    controls = {c.description: c for c in bar.children}
    assert list(controls) == ["loader", "cache", "tokens", "batch"]
    tokens, batch = controls["tokens"], controls["batch"]
    assert (tokens.min, tokens.max, batch.min, batch.max) == (16, 256, 1, 8)
    assert "LEAK" in verdict.value and bytes(image.value).startswith(b"\x89PNG")
    first = bytes(image.value)
    controls["loader"].value = "inference"  # observers run synchronously: the run is measured again
    assert "ok" in verdict.value and "LEAK" not in verdict.value and bytes(image.value) != first


def test_widget_ui_shows_a_run_already_measured(explored) -> None:
    pytest.importorskip("ipywidgets")
    from kvlab.study.explorer import explorer

    e = explored["inference", "static"]
    bar, verdict, image = explorer(shown=e).children
    assert [c.value for c in bar.children] == ["inference", "static", TOKENS, 2]
    assert verdict.value.endswith(e.line().split(":", 1)[1].replace("'", "&#x27;"))

