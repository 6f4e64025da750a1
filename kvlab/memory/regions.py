"""Named regions of a forward pass, so that memory tools can say *where* an allocation happened.

kvlab's model wraps the places the incident's heap traces named (``repeat_kv``, the cache update,
attention, the MLP, ``lm_head``) in ``site("...")``. Entering a site costs a list append; it records
nothing unless a tracer is listening. Tracers read :func:`current_site` (the innermost region) when an
allocation happens; foreign models without sites are attributed by Python frame instead.
"""

from __future__ import annotations

from typing import Callable

_stack: list[str] = []
# Called with (name, entering) on every enter/exit; tracers register here, e.g. to open a
# torch.profiler.record_function of the same name. Empty in normal runs.
_listeners: list[Callable[[str, bool], None]] = []


class site:
    """Context manager marking a named region; cheap enough to leave in the model's hot path."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __enter__(self) -> "site":
        _stack.append(self.name)
        for listener in _listeners:
            listener(self.name, True)
        return self

    def __exit__(self, *exc: object) -> None:
        for listener in _listeners:
            listener(self.name, False)
        _stack.pop()


def current_site() -> str | None:
    """The innermost open region, or ``None`` outside any labelled region."""
    return _stack[-1] if _stack else None


def site_path() -> tuple[str, ...]:
    """All open regions, outermost first (e.g. ``("layer", "attention", "repeat_kv")``)."""
    return tuple(_stack)


def add_listener(listener: Callable[[str, bool], None]) -> None:
    _listeners.append(listener)


def remove_listener(listener: Callable[[str, bool], None]) -> None:
    _listeners.remove(listener)
