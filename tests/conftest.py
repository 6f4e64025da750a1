"""Shared fixtures: seeded tiny models, one intra-op thread, and kvlab's own pytest plugin."""

from __future__ import annotations

import gc
import importlib
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

pytest_plugins = ["kvlab.memory.pytest_plugin"]
SITE_FIXTURE = "rendered_site"
# What nearly every test module imports anyway (transformers and torch's compiler stay out: importing
# them creates modules, and they load only where a test needs them).
LIBRARIES = ("numpy", "pandas", "matplotlib.pyplot", "hypothesis", "nbformat", "kvlab.cli", "kvlab.diagnose",
             "kvlab.experiments.command", "kvlab.report.cli", "kvlab.study.explorer")


def _freeze_imported_libraries() -> None:
    """Move the imported libraries' objects to the collector's permanent generation, once, before any test.

    kvlab's measurements call ``gc.collect()`` some 330 times in a session, and each call walks every
    object the collector tracks -- mostly these libraries' functions, classes and dicts, which live as
    long as the process: about 0.35 s a call, a third of the suite's time. Frozen, they are not walked
    again. Done only while no tensor and no module exists yet, so that the census of live tensors and
    modules (``gc.get_objects()``, which leaves out frozen objects) finds exactly what it found before.
    """
    from kvlab.memory.census import live_objects

    for name in LIBRARIES:
        try:
            importlib.import_module(name)
        except ImportError:  # a bare environment (e.g. a GPU box running one test file): nothing to freeze there
            continue
    gc.collect()  # nothing that is garbage now is frozen
    tensors, modules = live_objects()
    if not tensors and not modules:
        gc.freeze()


_freeze_imported_libraries()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The tests of the rendered site run last, so that the render started with the session
    (``_background_render``) has the whole rest of the suite's time to finish."""
    items.sort(key=lambda item: SITE_FIXTURE in getattr(item, "fixturenames", ()))  # stable: order kept otherwise


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: decode steps on the tiny preset are too small to gain from two, and
    two threads on a busy 2-core machine thrash."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def isolated(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """For tests that run kvlab's commands: checkpoints go to a temporary data folder, and torch runs on
    one thread, restored after each test (a command may set its own ``--threads``)."""
    monkeypatch.setenv("KVLAB_DATA", str(tmp_path_factory.getbasetemp() / "kvlab-data"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def copy_checkpoint() -> Callable[[Path, Path], Path]:
    """``copy_checkpoint(source, target)``: a byte copy of a checkpoint directory, to break without
    touching the shared one; returns ``target``."""
    def copy(source: Path, target: Path) -> Path:
        target.mkdir()
        for f in source.iterdir():
            (target / f.name).write_bytes(f.read_bytes())
        return target

    return copy


@pytest.fixture
def transformers(monkeypatch: pytest.MonkeyPatch) -> Any:
    """transformers (the ``hf`` extra), offline; the test is skipped where it is not installed."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    return pytest.importorskip("transformers")


@pytest.fixture(scope="session")
def hf_mistral() -> Callable[..., torch.nn.Module]:
    """``hf_mistral(**sizes)``: a small transformers ``MistralForCausalLM`` with seeded weights, eager
    attention and full (no sliding window) attention, in eval mode -- which does not turn autograd off.
    Skips the test where transformers is not installed."""
    transformers = pytest.importorskip("transformers")

    def make(**sizes: object) -> torch.nn.Module:
        config = transformers.MistralConfig(**{"sliding_window": None, "attn_implementation": "eager", **sizes})
        torch.manual_seed(0)
        return transformers.MistralForCausalLM(config).eval()

    return make


class BackgroundRender:
    """``python -m kvlab.report -o OUT`` -- what ``make report`` runs, on every notebook -- in a child process.

    Started with the session, it runs while the other tests do: the notebooks' kernels (one thread each)
    take one core, the rest of the suite the other, instead of the suite waiting for the notebooks.
    """

    def __init__(self, out: Path) -> None:
        self.out, self.log = out, out.with_suffix(".log")
        with self.log.open("w") as log:  # the per-notebook times and verdicts, for a failing session
            # its own process group, so that stopping it also stops the notebook kernels it started
            self.process = subprocess.Popen([sys.executable, "-m", "kvlab.report", "-o", str(out)], stdout=log,
                                            stderr=subprocess.STDOUT, start_new_session=True)

    def site(self, notebooks: list[Path]) -> Any:
        """The rendered site, once the child is done: its executed notebooks rendered again here, as with
        ``KVLAB_REPORTS``, for the :class:`~kvlab.report.build.Site` the tests read."""
        from kvlab.report.cli import render

        self.process.wait()  # exit 1 is a failed notebook or site check: the tests say which
        missing = [p.name for p in notebooks if not (self.out / "executed" / p.name).is_file()]
        if missing:
            pytest.fail(f"kvlab report did not execute {missing}:\n{self.log.read_text()[-4000:]}")
        return render([], self.out, {}, echo=lambda *args, **kwargs: None)

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            self.process.wait()


@pytest.fixture(scope="session", autouse=True)
def _background_render(request: pytest.FixtureRequest,
                       tmp_path_factory: pytest.TempPathFactory) -> Iterator[BackgroundRender | None]:
    """Starts the notebooks' render at the session's first test when a selected test needs the site,
    and stops it at the end (an interrupted or ``-x`` session does not leave kernels running)."""
    wanted = any(SITE_FIXTURE in getattr(item, "fixturenames", ()) for item in request.session.items)
    if not wanted or os.environ.get("KVLAB_REPORTS"):
        yield None
        return
    render = BackgroundRender(tmp_path_factory.mktemp("reports"))
    yield render
    render.stop()


@pytest.fixture(scope="session")
def rendered_site(_background_render: BackgroundRender | None):
    """The whole suite executed and rendered once per session (``kvlab.report``), for the notebook and
    site tests alike. ``KVLAB_REPORTS=reports`` reuses the notebooks ``make report`` executed there and
    only rebuilds the site from them."""
    from kvlab.report.cli import NOTEBOOKS, render

    if os.environ.get("KVLAB_REPORTS"):
        return render([], Path(os.environ["KVLAB_REPORTS"]), {}, echo=lambda *args, **kwargs: None)
    assert _background_render is not None  # started for every session that selects a site test
    return _background_render.site(sorted(NOTEBOOKS.glob("[0-9]*.ipynb")))
