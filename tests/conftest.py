"""Shared fixtures: seeded tiny models, one intra-op thread, and kvlab's own pytest plugin."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

pytest_plugins = ["kvlab.memory.pytest_plugin"]


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


@pytest.fixture(scope="session")
def rendered_site(tmp_path_factory: pytest.TempPathFactory):
    """The whole suite executed and rendered once per session (``kvlab.report``), for the notebook and
    site tests alike. ``KVLAB_REPORTS=reports`` reuses the notebooks ``make report`` executed there and
    only rebuilds the site from them."""
    from kvlab.report.cli import NOTEBOOKS, render

    quiet = lambda *args, **kwargs: None  # noqa: E731
    if os.environ.get("KVLAB_REPORTS"):
        return render([], Path(os.environ["KVLAB_REPORTS"]), {}, echo=quiet)
    return render(sorted(NOTEBOOKS.glob("[0-9]*.ipynb")), tmp_path_factory.mktemp("reports"), {}, echo=quiet)
