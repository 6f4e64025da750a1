"""pytest fixtures for decode-loop memory checks; enable with ``pytest_plugins = ["kvlab.memory.pytest_plugin"]``.

``leak_guard`` turns "this loop must not keep a graph" into one line of a test::

    def test_my_server_loop_does_not_leak(leak_guard):
        leak_guard(lambda n: my_decode(model, prompt, n), steps=16)  # fails the test on a leak

The check runs the loop for N and 2N steps and fails when what it returns keeps anything beyond its own
state (its cache, of any class or container, its tokens, its last logits), or when that state grows faster than
linearly (see :func:`kvlab.memory.leakguard.check_decode_leak`); the failure message names what requires
grad and how many steps the cache chains together. ``memory_monitor`` gives a started
:class:`kvlab.memory.monitor.MemoryMonitor` that is stopped when the test ends, pass or fail.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch

from .leakguard import LeakReport, check_decode_leak
from .monitor import MemoryMonitor


@pytest.fixture
def leak_guard() -> Iterator[Callable[..., LeakReport]]:
    """A function ``leak_guard(run, steps=16, **options) -> LeakReport`` that raises on a leak.

    ``options`` are those of :func:`~kvlab.memory.leakguard.check_decode_leak` (``model``, ``config``,
    ``kv_per_token``, ``raise_on_leak``). Reports of every call are kept on ``leak_guard.reports``. The test's grad
    mode is checked to be unchanged afterwards: a loop under test must not leak global state either.
    """
    reports: list[LeakReport] = []
    grad = torch.is_grad_enabled()

    def guard(run: Callable[[int], Any], steps: int = 16, **options: Any) -> LeakReport:
        report = check_decode_leak(run, steps, **options)
        reports.append(report)
        return report

    guard.reports = reports  # type: ignore[attr-defined]
    yield guard
    assert torch.is_grad_enabled() == grad, "grad mode changed during the test and was not restored"


@pytest.fixture
def memory_monitor() -> Iterator[MemoryMonitor]:
    """A running :class:`~kvlab.memory.monitor.MemoryMonitor` (10 ms interval), stopped at teardown."""
    monitor = MemoryMonitor(interval=0.01)
    with monitor:
        yield monitor
