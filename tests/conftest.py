"""Shared fixtures: seeded tiny models, one intra-op thread, and kvlab's own pytest plugin."""

from __future__ import annotations

import pytest
import torch

pytest_plugins = ["kvlab.pytest_plugin"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: decode steps on the tiny preset are too small to gain from two, and
    two threads on a busy 2-core machine thrash."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
