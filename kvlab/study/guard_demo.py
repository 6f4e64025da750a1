"""The regression test the incident did not have, as a project would keep it; notebook 04 runs it.

One test per loader, each one line through the ``leak_guard`` fixture of
:mod:`kvlab.memory.pytest_plugin`: kvlab's ``generate`` over the ``tiny`` checkpoint with the ``concat``
cache, checked for keeping anything beyond its own state. With the ``trainable`` loader the test fails,
on purpose, with the guard's explanation; with ``inference`` it passes. It lives here rather than in
``tests/`` because it demonstrates a failing test; kvlab's own suite never collects it. Run it with::

    pytest -p kvlab.memory.pytest_plugin kvlab/study/guard_demo.py

``KVLAB_GUARD_PRESET``, ``KVLAB_GUARD_DEVICE`` and ``KVLAB_GUARD_STEPS`` choose the model shape, the
device and the guard's N (it decodes N and 2N tokens).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import pytest

from kvlab.caches import make_cache
from kvlab.generate import generate
from kvlab.loaders import load_model
from kvlab.study.probes import prompt_ids
from kvlab.study.runs import checkpoint

PRESET = os.environ.get("KVLAB_GUARD_PRESET", "tiny")
DEVICE = os.environ.get("KVLAB_GUARD_DEVICE", "cpu")
STEPS = int(os.environ.get("KVLAB_GUARD_STEPS", "16"))


def decode_loop(loader: str) -> Callable[[int], Any]:
    """``run(n)``: decode ``n`` tokens with a fresh cache and return what the loop keeps."""
    model = load_model(checkpoint(PRESET), loader, device=DEVICE)
    prompt = prompt_ids(model.config.vocab_size, 1, device=DEVICE)
    return lambda n: generate(model, prompt, n, cache=make_cache("concat", model.config, max_tokens=n + 1,
                                                                 device=DEVICE))


@pytest.mark.parametrize("loader", ["trainable", "inference"])
def test_decode_keeps_only_its_cache(leak_guard: Callable[..., Any], loader: str) -> None:
    leak_guard(decode_loop(loader), steps=STEPS)
