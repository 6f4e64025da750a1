"""The exact tracer's books: live storages, running figures per site and per step, and their tables.

A :class:`Ledger` is told of each new storage (a weak reference carrying its bytes, site and step) and
learns of its death through that reference's callback. It keeps, per *site*, the live bytes, the
bytes allocated in the open step and the highest live bytes inside it; :meth:`Ledger.mark_step` closes
a step into one timeline row and one row per site. :class:`~kvlab.memory.trace.MemoryTracer` is a
ledger fed by a dispatch hook.

Only the thread that opened the books changes them. Other threads (a traced worker, or one that drops
the last reference to a traced tensor) queue their events, which the owner applies in order at its
next allocation, free or step mark: plain updates of Python ints are not atomic across threads.
"""

from __future__ import annotations

import time
import weakref
from collections import deque
from threading import get_ident
from typing import Any

import pandas as pd

from .units import step_index

__all__ = ["Ledger", "StorageRef", "TracerError"]


class TracerError(RuntimeError):
    """A memory tool was used in a way that cannot give a correct answer (e.g. two exact tracers at once)."""


class StorageRef(weakref.ref):
    """A weak reference to a storage's Python object that remembers what the storage was charged."""

    __slots__ = ("ptr", "nbytes", "site", "step")


class _Site:
    """Running figures of one site; a mutable record so the hot path does one dict lookup per allocation."""

    __slots__ = ("live", "peak", "allocated", "step_allocated", "step_peak")

    def __init__(self) -> None:
        self.live = self.peak = self.allocated = self.step_allocated = self.step_peak = 0


class Ledger:
    """Live storages and the figures made of them; see the module docstring."""

    def _open_books(self) -> None:
        self._live: dict[int, StorageRef] = {}  # storage data_ptr -> reference of a live registered storage
        self._sites: dict[str, _Site] = {}
        self.live_bytes = 0
        self.peak_bytes = 0
        self._at_peak: dict[str, int] = {}  # live per site at the moment of the global peak
        self._peak_pending = False
        self._step: int | None = None  # last marked step
        self._step_open = 0  # label of allocations made now: the step being computed
        self._step_freed = 0
        self._step_peak = 0
        self._allocated_before = 0  # bytes allocated in earlier (closed) steps
        self._timeline: list[dict[str, Any]] = []
        self._site_rows: list[dict[str, Any]] = []
        self._end: dict[str, int] | None = None
        self._end_rows: list[dict[str, Any]] | None = None
        # Events of other threads, applied by the owner: (True, ref) registers, (False, ref) frees.
        self._pending: deque[tuple[bool, StorageRef]] = deque()
        self._owner = get_ident()
        self._on_free = self._freed  # one bound method for every weak reference's callback
        self._t0 = time.perf_counter()
        self.running = False

    # -------------------------------------------------------------- events
    def _add(self, ref: StorageRef) -> None:
        if ref.ptr in self._live:
            return  # queued twice by another thread
        nbytes = ref.nbytes
        self._live[ref.ptr] = ref
        site = self._sites.get(ref.site)
        if site is None:
            site = self._sites[ref.site] = _Site()
        live = site.live + nbytes
        site.live = live
        if live > site.step_peak:
            site.step_peak = live
        site.step_allocated += nbytes  # whole-run figures are folded in at each mark_step()
        total = self.live_bytes + nbytes
        self.live_bytes = total
        if total > self._step_peak:
            self._step_peak = total
            if total > self.peak_bytes:
                self.peak_bytes = total
                self._peak_pending = True

    def _freed(self, ref: StorageRef) -> None:
        """The weak reference's callback, run by whichever thread dropped the storage's last reference."""
        if get_ident() != self._owner:
            self._pending.append((False, ref))
            return
        if self._pending:
            self._drain()  # the storage may have been registered by another thread
        self._remove(ref)

    def _remove(self, ref: StorageRef) -> None:
        if self._live.get(ref.ptr) is ref:
            del self._live[ref.ptr]
        else:
            return  # already forgotten (books closed)
        if self._peak_pending:  # the state just before the first free after a new peak is the peak
            self._at_peak = {name: s.live for name, s in self._sites.items() if s.live}
            self._peak_pending = False
        nbytes = ref.nbytes
        self._sites[ref.site].live -= nbytes
        self.live_bytes -= nbytes
        self._step_freed += nbytes

    def _drain(self) -> None:
        """Apply the events other threads queued, in their order (popped one by one: re-entrant)."""
        pending = self._pending
        while pending:
            registers, ref = pending.popleft()
            if registers:
                self._add(ref)
            else:
                self._remove(ref)

    # -------------------------------------------------------------- steps
    def mark_step(self, step: Any = None) -> None:
        """Close the current decode step. Accepts kvlab's ``Step``, an int, or ``None`` (counts up).

        Rows for the step describe the interval since the previous mark: bytes alive now, bytes
        allocated in the interval, and the highest live total (and per-site live) inside it.
        """
        if not self.running:
            raise TracerError("mark_step() called while the tracer is not running")
        self._drain()
        index = step_index(step, self._step)
        now = time.perf_counter() - self._t0
        allocated = 0
        for name in sorted(self._sites):
            site = self._sites[name]
            if site.live or site.step_allocated:
                self._site_rows.append(dict(step=index, site=name, live_bytes=site.live,
                                            allocated_bytes=site.step_allocated,
                                            peak_bytes=max(site.step_peak, site.live)))
            allocated += site.step_allocated
            self._fold(site)
        self._timeline.append(dict(step=index, time_s=now, live_bytes=self.live_bytes,
                                   peak_bytes=self._step_peak, allocated_bytes=allocated,
                                   freed_bytes=self._step_freed, live_storages=len(self._live)))
        self._allocated_before += allocated
        self._step = index
        self._step_open = index + 1
        self._step_freed = 0
        self._step_peak = self.live_bytes

    __call__ = mark_step  # so a tracer can be passed as on_step directly

    @staticmethod
    def _fold(site: _Site) -> None:
        """Add a closed step's figures to the site's whole-run figures and open the next step."""
        site.allocated += site.step_allocated
        site.peak = max(site.peak, site.step_peak, site.live)
        site.step_allocated = 0
        site.step_peak = site.live

    def _close_books(self) -> None:
        self._drain()
        for site in self._sites.values():
            self._allocated_before += site.step_allocated
            self._fold(site)
        if self._peak_pending:
            self._at_peak = {name: s.live for name, s in self._sites.items() if s.live}
            self._peak_pending = False
        self._end = {name: s.live for name, s in self._sites.items() if s.live}
        self._end_rows = [dict(site=r.site, step=r.step, bytes=r.nbytes, ptr=r.ptr) for r in self._live.values()]
        self._live.clear()  # dropping the weak references cancels their callbacks: the figures freeze

    # -------------------------------------------------------------- results
    @property
    def allocated_bytes(self) -> int:
        """All bytes allocated while tracing (freed or not)."""
        return self._allocated_before + sum(s.step_allocated for s in self._sites.values())

    @property
    def end_bytes(self) -> int:
        """Bytes allocated while tracing and still alive at the end (or now, while running)."""
        if self._end is not None:
            return sum(self._end.values())
        return self.live_bytes

    def timeline(self) -> pd.DataFrame:
        """One row per marked step: ``step, time_s, live_bytes, peak_bytes, allocated_bytes, freed_bytes,
        live_storages``. Bytes exclude the baseline; ``peak_bytes`` is the highest live total inside the
        step (the transient peak), ``live_bytes`` what is left when the step ends."""
        cols = ["step", "time_s", "live_bytes", "peak_bytes", "allocated_bytes", "freed_bytes", "live_storages"]
        return pd.DataFrame(self._timeline, columns=cols)

    def site_table(self) -> pd.DataFrame:
        """One row per (step, site): ``live_bytes`` at the end of the step, ``allocated_bytes`` during it and
        ``peak_bytes``, the site's highest live bytes inside it."""
        return pd.DataFrame(self._site_rows, columns=["step", "site", "live_bytes", "allocated_bytes", "peak_bytes"])

    def by_site(self) -> pd.DataFrame:
        """Heaptrack's two views, one row per site, largest still-alive first.

        ``alive_end_bytes``: allocated while tracing and still alive at the end (what leaks), with its
        share ``alive_end_share``. ``at_peak_bytes``: the site's part of the highest live total (what
        made the peak). ``peak_bytes``: the site's own highest live bytes. ``allocated_bytes``: all it
        allocated.
        """
        end = self._end if self._end is not None else {n: s.live for n, s in list(self._sites.items()) if s.live}
        rows = [dict(site=name, alive_end_bytes=end.get(name, 0), at_peak_bytes=self._at_peak.get(name, 0),
                     peak_bytes=max(s.peak, s.step_peak), allocated_bytes=s.allocated + s.step_allocated)
                for name, s in list(self._sites.items())]
        df = pd.DataFrame(rows, columns=["site", "alive_end_bytes", "at_peak_bytes", "peak_bytes", "allocated_bytes"])
        df = df.sort_values(["alive_end_bytes", "peak_bytes"], ascending=False, ignore_index=True)
        total = df["alive_end_bytes"].sum()
        df["alive_end_share"] = df["alive_end_bytes"] / total if total else 0.0
        return df

    def alive_at_end(self) -> pd.DataFrame:
        """Every storage still alive at the end: ``site, step`` (when it was allocated), ``bytes`` and
        ``ptr`` (its address, which the retention explainer uses to name the site of saved tensors)."""
        if self._end_rows is None:
            raise TracerError("alive_at_end() is available once the tracer has stopped")
        return pd.DataFrame(self._end_rows, columns=["site", "step", "bytes", "ptr"])

    def site_of(self) -> dict[int, tuple[str, int]]:
        """Address -> (site, step) of every storage alive at the end."""
        if self._end_rows is None:
            raise TracerError("site_of() is available once the tracer has stopped")
        return {r["ptr"]: (r["site"], r["step"]) for r in self._end_rows}
