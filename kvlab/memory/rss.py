"""Resident set size over a decode loop: what ``top`` shows, with decode steps marked on it.

:func:`rss_timeline` runs a function while memory_profiler samples this process's RSS from a helper
process, and the loop marks each decode step through a callback (``generate``'s ``on_step``), which
records the time and the RSS at that instant. The result is two tidy tables: the samples, each placed
on a fractional decode-step axis, and one row per step.

RSS mixes the allocator's behaviour into the signal (see :func:`kvlab.memory.trace.rss_vs_exact`): glibc
keeps freed heap pages resident, so RSS can stay high after tensors die. :func:`honest_malloc_env`
gives the environment for a child process in which large tensors come and go with ``mmap``, so that
RSS follows the tensors; :func:`run_python` runs code in such a process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import numpy as np
import pandas as pd
import psutil

from .trace import MiB, _step_index

__all__ = ["rss_bytes", "RSSTimeline", "rss_timeline", "honest_malloc_env", "run_python"]

_process = psutil.Process()


def rss_bytes() -> int:
    """This process's resident set size now, in bytes."""
    return _process.memory_info().rss


@dataclass
class RSSTimeline:
    """``samples``: ``time_s, rss_bytes, rss_mib, step_pos`` (fractional decode step, interpolated between
    marks; NaN before the first); ``steps``: ``step, time_s, rss_bytes, rss_mib`` read at each mark;
    ``result``: what the function returned; ``baseline_bytes``: RSS just before it started."""

    samples: pd.DataFrame
    steps: pd.DataFrame
    result: Any
    baseline_bytes: int

    @property
    def growth_bytes(self) -> int:
        """RSS at the last mark (or the last sample) minus RSS before the run."""
        last = self.steps["rss_bytes"].iloc[-1] if len(self.steps) else self.samples["rss_bytes"].iloc[-1]
        return int(last) - self.baseline_bytes


def rss_timeline(fn: Callable[[Callable[[Any], None]], Any], *, interval: float = 0.01) -> RSSTimeline:
    """Run ``fn(mark)`` while sampling RSS every ``interval`` seconds; ``mark`` is the step callback.

    ``mark`` accepts kvlab's ``Step``, an int, or nothing (counts up), so both of these work::

        rss_timeline(lambda mark: generate(model, prompt, 256, cache=cache, on_step=mark))
        rss_timeline(lambda mark: [mark(i) for i in my_loop()])
    """
    from memory_profiler import memory_usage

    marks: list[tuple[int, float, int]] = []

    def mark(step: Any = None) -> None:
        index = _step_index(step, marks[-1][0] if marks else None)
        marks.append((index, time.time(), rss_bytes()))

    baseline = rss_bytes()
    # memory_profiler samples from a child process, in MiB (2**20 bytes), with time.time() stamps.
    usage, result = memory_usage((fn, (mark,), {}), interval=interval, timestamps=True, retval=True,
                                 max_iterations=1)
    samples = pd.DataFrame(usage, columns=["rss_mib", "time"])
    steps = pd.DataFrame(marks, columns=["step", "time", "rss_bytes"])
    t0 = samples["time"].iloc[0] if len(samples) else (steps["time"].iloc[0] if len(steps) else time.time())
    samples["time_s"] = samples["time"] - t0
    samples["rss_bytes"] = (samples["rss_mib"] * MiB).round().astype("int64")
    steps["time_s"] = steps["time"] - t0
    steps["rss_mib"] = steps["rss_bytes"] / MiB
    if len(steps) >= 2:
        pos = np.interp(samples["time_s"], steps["time_s"], steps["step"].astype(float),
                        left=np.nan, right=np.nan)
        after = samples["time_s"] > steps["time_s"].iloc[-1]
        pos[after.to_numpy()] = float(steps["step"].iloc[-1])
        samples["step_pos"] = pos
    else:
        samples["step_pos"] = np.nan
    return RSSTimeline(samples=samples[["time_s", "rss_bytes", "rss_mib", "step_pos"]],
                       steps=steps[["step", "time_s", "rss_bytes", "rss_mib"]], result=result,
                       baseline_bytes=baseline)


def honest_malloc_env(base: Mapping[str, str] | None = None, threshold: int = 65536) -> dict[str, str]:
    """An environment in which glibc serves every block of ``threshold`` bytes or more with ``mmap``.

    glibc's default threshold starts at 128 KiB and rises after large frees, after which big tensors
    come from the heap and their pages stay resident when freed; a fixed threshold stops that, so RSS
    follows the live tensors. Only a new process reads it: use it with :func:`run_python`.
    """
    env = dict(os.environ if base is None else base)
    env["MALLOC_MMAP_THRESHOLD_"] = str(threshold)
    return env


def run_python(code: str, *, env: Mapping[str, str] | None = None, timeout: float = 600,
               threads: int | None = None) -> Any:
    """Run ``code`` in a fresh Python process (by default with :func:`honest_malloc_env`) and return the
    JSON value of the last line it prints. Raises ``RuntimeError`` with its stderr if it fails."""
    env = dict(honest_malloc_env() if env is None else env)
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"child process failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    if not lines:
        raise RuntimeError(f"child process printed nothing; stderr:\n{proc.stderr[-4000:]}")
    return json.loads(lines[-1])
