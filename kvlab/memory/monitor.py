"""A background memory monitor with an alarm: the lesson "watch memory while serving" as a tool.

The incident's leak went unnoticed until a user compared 6 GB against 100 MB by hand. A monitor that
samples process RSS (and, on CUDA, the caching allocator's ``memory_allocated`` / ``memory_reserved``)
every few milliseconds and warns when memory climbs past a threshold or grows faster than a rate would
have flagged it on the first long generation.

RSS is what the operating system charges, so it is what an alarm should watch: the whole process,
every thread, tensors or not. It also mixes in the allocator's behaviour (freed blocks that are not
returned), so it says *that* memory grows, not *why*. When an exact
:class:`~kvlab.memory.trace.MemoryTracer` is running, the alarm message adds its top sites -- tensor
storages only, from the threads that tracer sees; the monitor works without it.

Usage::

    with MemoryMonitor(interval=0.05, threshold_bytes=512 * 2**20) as mon:
        serve_requests()
    mon.samples  # a DataFrame: t, rss_bytes, cuda_allocated_bytes, cuda_reserved_bytes, label
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import pandas as pd
import torch

from .rss import rss_bytes
from .trace import MemoryTracer
from .units import fmt_bytes

__all__ = ["Alarm", "MemoryMonitor", "COLUMNS"]

log = logging.getLogger("kvlab.memory.monitor")
COLUMNS = ["t", "rss_bytes", "cuda_allocated_bytes", "cuda_reserved_bytes", "label"]


@dataclass
class Alarm:
    """One alarm: which limit was crossed, by how much, and (when a tracer was active) where."""

    t: float  # seconds since the monitor started
    kind: str  # "threshold" (growth above the baseline) or "rate" (bytes per second)
    metric: str  # the column watched, e.g. "rss_bytes"
    value: float  # growth in bytes, or rate in bytes/s
    limit: float
    message: str
    top_sites: list[tuple[str, int]] = field(default_factory=list)


def _top_sites(limit: int = 5) -> list[tuple[str, int]]:
    """Top (site, live bytes) of the running :class:`~kvlab.memory.trace.MemoryTracer`, if there is one.

    Optional by design: without a tracer, or if reading it fails, the alarm just names no sites. The
    tracer is updated on the traced thread while this runs on the monitor's, so a read that races
    with it is retried.
    """
    tracer = MemoryTracer._active
    if tracer is None:
        return []
    for _ in range(3):
        try:
            frame = tracer.by_site()
            frame = frame[frame["alive_end_bytes"] > 0].head(limit)
            return [(str(s), int(b)) for s, b in zip(frame["site"], frame["alive_end_bytes"])]
        except RuntimeError:  # "dictionary changed size during iteration": try again
            continue
        except Exception:
            return []
    return []


class MemoryMonitor:
    """Sample memory on a daemon thread; warn (log + optional callback) when a limit is crossed.

    - ``threshold_bytes``: alarm when the watched metric exceeds its first sample (the baseline) by
      this much. Growth, not an absolute level, so the same limit works in any process.
    - ``rate_bytes_per_s``: alarm when the metric grew faster than this over the last
      ``rate_window_s`` seconds — the shape of a leak, before it reaches any threshold.
    - ``metric``: ``"rss_bytes"``, ``"cuda_allocated_bytes"``, ``"cuda_reserved_bytes"``, or ``"auto"``
      (CUDA allocated when ``device`` is a CUDA device, else RSS).

    Each kind fires once, and re-arms when the metric falls back below its limit. A callback that
    raises is logged and otherwise ignored: the monitor must outlive its observers. As a context
    manager the thread is always stopped, also when the body raises.
    """

    def __init__(self, interval: float = 0.05, *, threshold_bytes: int | None = None,
                 rate_bytes_per_s: float | None = None, rate_window_s: float = 1.0,
                 callback: Callable[[Alarm], None] | None = None, device: torch.device | str | None = None,
                 metric: str = "auto", logger: logging.Logger | None = None) -> None:
        if not interval > 0:
            raise ValueError(f"interval must be positive, got {interval!r}")
        self.interval = float(interval)
        self.threshold_bytes = threshold_bytes
        self.rate_bytes_per_s = rate_bytes_per_s
        self.rate_window_s = float(rate_window_s)
        self.callback = callback
        self.device = torch.device(device) if device is not None else None
        self._cuda = self.device is not None and self.device.type == "cuda" and torch.cuda.is_available()
        if metric == "auto":
            metric = "cuda_allocated_bytes" if self._cuda else "rss_bytes"
        if metric not in COLUMNS[1:4]:
            raise ValueError(f"metric must be one of {COLUMNS[1:4]} or 'auto', got {metric!r}")
        if metric.startswith("cuda") and not self._cuda:
            raise ValueError(f"metric {metric!r} needs a CUDA device (device={device!r})")
        self.metric = metric
        self.log = logger or log
        self.alarms: list[Alarm] = []
        self._rows: list[tuple[float, int, float, float, str | None]] = []
        self._label: str | None = None
        self._armed = {"threshold": True, "rate": True}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._t0 = 0.0
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> MemoryMonitor:
        if self._thread is not None:
            raise RuntimeError("this MemoryMonitor was already started; create a new one per run")
        self._t0 = time.perf_counter()
        self._sample()  # the baseline, taken before start() returns
        self._thread = threading.Thread(target=self._run, name="kvlab-memory-monitor", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> MemoryMonitor:
        """Stop and join the thread (idempotent); a last sample is taken so short runs have an end."""
        thread = self._thread
        if thread is not None and thread.is_alive():
            self._stop.set()
            thread.join()
            self._sample()
        return self

    def __enter__(self) -> MemoryMonitor:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def mark(self, label: str | None) -> None:
        """Label the following samples (e.g. ``"prefill"``, ``"decode"``), to slice the frame later."""
        self._label = label

    # ------------------------------------------------------------------ sampling
    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self._sample()
            except Exception:  # psutil can fail transiently; a monitor must not die of it
                self.log.exception("memory sample failed")

    def _sample(self) -> None:
        t = time.perf_counter() - self._t0
        rss = rss_bytes()
        if self._cuda:
            allocated = float(torch.cuda.memory_allocated(self.device))
            reserved = float(torch.cuda.memory_reserved(self.device))
        else:
            allocated = reserved = math.nan
        with self._lock:
            self._rows.append((t, rss, allocated, reserved, self._label))
        self._check_alarms()

    def _value(self, row: tuple[float, int, float, float, str | None]) -> float:
        return float(row[COLUMNS.index(self.metric)])

    def _check_alarms(self) -> None:
        with self._lock:
            rows = self._rows
            now, first = rows[-1], rows[0]
            window = [r for r in rows if r[0] >= now[0] - self.rate_window_s]
        value = self._value(now)
        if self.threshold_bytes is not None:
            growth = value - self._value(first)
            self._maybe_fire("threshold", growth, self.threshold_bytes, now[0],
                             lambda: f"{self.metric} grew {fmt_bytes(growth)} above its baseline of "
                                     f"{fmt_bytes(self._value(first))} (threshold {fmt_bytes(self.threshold_bytes)})")
        # Only over at least half a window: a rate over a few milliseconds is noise, not a trend.
        if self.rate_bytes_per_s is not None and now[0] - window[0][0] >= 0.5 * self.rate_window_s:
            rate = (value - self._value(window[0])) / (now[0] - window[0][0])
            self._maybe_fire("rate", rate, self.rate_bytes_per_s, now[0],
                             lambda: f"{self.metric} grows at {fmt_bytes(rate)}/s over the last "
                                     f"{now[0] - window[0][0]:.2f} s (limit {fmt_bytes(self.rate_bytes_per_s)}/s)")

    def _maybe_fire(self, kind: str, value: float, limit: float, t: float, describe: Callable[[], str]) -> None:
        if value <= limit:
            self._armed[kind] = True
            return
        if not self._armed[kind]:
            return
        self._armed[kind] = False
        sites = _top_sites()
        message = "memory alarm: " + describe()
        if sites:
            message += "; top sites (live tensor bytes): " + ", ".join(f"{s} {fmt_bytes(b)}" for s, b in sites)
        alarm = Alarm(t, kind, self.metric, value, limit, message, sites)
        self.alarms.append(alarm)
        self.log.warning(message)
        if self.callback is not None:
            try:
                self.callback(alarm)
            except Exception:
                self.log.exception("memory alarm callback failed")

    # ------------------------------------------------------------------ results
    @property
    def samples(self) -> pd.DataFrame:
        """All samples so far, one row each (CUDA columns are NaN without a CUDA device)."""
        with self._lock:
            rows = list(self._rows)
        return pd.DataFrame(rows, columns=COLUMNS)

    def growth(self) -> float:
        """Last minus first sample of the watched metric, in bytes."""
        with self._lock:
            if not self._rows:
                return 0.0
            return self._value(self._rows[-1]) - self._value(self._rows[0])

    def peak(self) -> float:
        """Highest sample of the watched metric, in bytes (a sampling monitor can miss short peaks)."""
        with self._lock:
            return max((self._value(r) for r in self._rows), default=math.nan)

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return (f"MemoryMonitor({state}, {len(self._rows)} samples every {self.interval * 1000:.0f} ms, "
                f"metric={self.metric}, alarms={len(self.alarms)})")

