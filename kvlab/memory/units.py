"""Byte units, the one byte formatter, and the step-callback helpers every memory tool shares.

Decode loops report progress through a step callback (kvlab's ``generate`` calls ``on_step(step)``);
the tools accept whatever such a loop passes: kvlab's ``Step``, a plain int, or nothing at all.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

__all__ = ["KiB", "MiB", "GiB", "fmt_bytes", "step_index", "chain_callbacks"]

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30


def fmt_bytes(nbytes: float) -> str:
    """``"1.50 MiB"`` from one MiB up (either sign), else ``"12.0 KiB"``: one format for every report."""
    return f"{nbytes / MiB:.2f} MiB" if abs(nbytes) >= MiB else f"{nbytes / KiB:.1f} KiB"


def step_index(step: Any, previous: int | None) -> int:
    """The index of a decode step as passed to a step callback.

    ``step`` may be an int, an object with an int ``.index`` (kvlab's ``Step``), or ``None``, which
    counts up from ``previous`` (the last index seen, ``None`` before the first step).
    """
    if step is None:
        return 0 if previous is None else previous + 1
    if isinstance(step, int):
        return step
    index = getattr(step, "index", None)
    if isinstance(index, int):
        return index
    raise TypeError(f"a step callback takes a step index, an object with .index (kvlab's Step) or None, got {step!r}")


def chain_callbacks(*callbacks: Callable[[Any], Any] | None) -> Callable[[Any], None]:
    """One ``on_step`` callback that calls each given one in turn (``None`` entries are skipped)."""
    live = [cb for cb in callbacks if cb is not None]

    def on_step(step: Any) -> None:
        for cb in live:
            cb(step)

    return on_step
