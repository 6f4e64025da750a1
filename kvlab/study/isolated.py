"""Measured runs in a fresh Python process: ``python -m kvlab.study.isolated MODULE:FUNCTION 'JSON'``.

Resident memory is only comparable between runs that start from a clean process: a heap that already
served one model keeps its pages, and glibc reads its allocator settings (``MALLOC_MMAP_THRESHOLD_``)
only at start-up. :func:`run_isolated` therefore calls a named function of kvlab in a child process,
with JSON arguments, and returns the JSON value it returns; the child is this module's entry point,
real code that can be read, tested and profiled, never a script held in a string.

Three children live here: :func:`rss_child` (one untraced decode with RSS sampled by memory_profiler,
behind :func:`rss_decode`), :func:`rss_vs_exact_child` (RSS growth against the exact tracer's bytes) and
:func:`loader_speed_child` (tokens/s and peak RSS of one loader, behind ``benchmarks/bench_loaders.py``).
"""

from __future__ import annotations

import importlib
import json
import os
import resource
import subprocess
import sys
from collections.abc import Mapping
from typing import Any

import pandas as pd
import torch

from kvlab.caches import ConcatCache
from kvlab.generate import generate
from kvlab.loaders import load_model, random_model
from kvlab.memory.rss import RSSTimeline, honest_malloc_env, rss_bytes, rss_timeline, rss_vs_exact

from .runs import Source, checkpoint, measure

__all__ = ["run_isolated", "rss_decode", "rss_child", "rss_vs_exact_child", "loader_speed_child", "main"]

_MALLOC_VARIABLES = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_ARENA_MAX")


def run_isolated(target: str, args: Mapping[str, Any], *, malloc: str = "default", timeout: float = 600) -> Any:
    """Call ``target`` (``"kvlab.<module>:<function>"``) with the keyword arguments ``args`` in a fresh
    Python process and return its JSON result. ``malloc``: glibc's settings in the child, ``"default"``
    (as a user runs it) or ``"honest"`` (:func:`_malloc_env`). Raises ``RuntimeError`` with the child's
    stderr when it fails."""
    command = [sys.executable, "-m", __name__, target, json.dumps(dict(args))]
    proc = subprocess.run(command, env=_malloc_env(malloc), capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{target} failed in a child process ({proc.returncode}):\n{proc.stderr[-4000:]}")
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    if not lines:
        raise RuntimeError(f"{target} printed nothing in a child process; stderr:\n{proc.stderr[-4000:]}")
    return json.loads(lines[-1])


def _malloc_env(malloc: str) -> dict[str, str]:
    """This environment without allocator overrides (``"default"``), or with glibc's mmap threshold fixed
    (``"honest"``: large freed tensors return to the OS, so RSS follows the live tensors)."""
    if malloc not in ("default", "honest"):
        raise ValueError(f"malloc must be 'default' or 'honest', got {malloc!r}")
    env = {k: v for k, v in os.environ.items() if k not in _MALLOC_VARIABLES}
    return honest_malloc_env(env) if malloc == "honest" else env


def rss_decode(source: Source, loader: str = "trainable", cache: str | None = "concat", tokens: int = 256, *,
               device: str | torch.device = "cpu", prompt_len: int = 1, malloc: str = "default",
               interval: float = 0.01, threads: int | None = None, seed: int = 0) -> RSSTimeline:
    """RSS over one untraced decode run in a fresh process, sampled by memory_profiler.

    ``malloc="default"``: glibc as a user runs it; ``"honest"``: a fixed mmap threshold
    (:func:`kvlab.memory.rss.honest_malloc_env`). The run is :func:`~kvlab.study.runs.measure` with
    no tracer, after a two-token warm-up before RSS sampling starts.
    """
    args = dict(directory=str(checkpoint(source, seed=seed)), loader=loader, cache=cache, tokens=tokens,
                device=str(device), prompt_len=prompt_len, interval=interval, seed=seed,
                threads=threads or torch.get_num_threads())
    out = run_isolated(f"{__name__}:rss_child", args, malloc=malloc)
    return RSSTimeline(samples=pd.DataFrame(out["samples"]), steps=pd.DataFrame(out["steps"]), result=None,
                       baseline_bytes=int(out["baseline_bytes"]))


def rss_child(directory: str, loader: str, cache: str | None, tokens: int, device: str, prompt_len: int,
              interval: float, seed: int, threads: int) -> dict[str, Any]:
    """In the child of :func:`rss_decode`: one untraced, measured decode while memory_profiler samples RSS."""
    torch.set_num_threads(threads)
    model = load_model(directory, loader, device=device)
    measure(model, cache, 2, prompt_len=prompt_len, seed=seed, trace=False)  # warm-up: kernels, pools
    timeline = rss_timeline(lambda mark: measure(model, cache, tokens, loader=loader, prompt_len=prompt_len,
                                                 seed=seed, trace=False, on_step=mark),
                            interval=interval)
    return {"samples": timeline.samples.to_dict(orient="list"), "steps": timeline.steps.to_dict(orient="list"),
            "baseline_bytes": timeline.baseline_bytes}


def rss_vs_exact_child(preset: str, loader: str, tokens: int, batch: int, threads: int = 1) -> dict[str, Any]:
    """In a child: RSS growth of one untraced decode against the exact tracer's bytes for the same decode
    (:func:`kvlab.memory.rss.rss_vs_exact`), seeded random weights, a concat cache, after a short warm-up."""
    torch.set_num_threads(threads)
    model = random_model(preset, loader)
    prompt = torch.arange(1, batch + 1)[:, None]  # (B, 1)
    generate(model, prompt, 8, cache=ConcatCache(model.config.num_hidden_layers))  # one-off allocations
    return rss_vs_exact(lambda on_step: generate(model, prompt, tokens, on_step=on_step,
                                                 cache=ConcatCache(model.config.num_hidden_layers)))


def loader_speed_child(directory: str, loader: str, tokens: int, threads: int, cache: str = "concat") -> dict[str, Any]:
    """In a child of the loader benchmark: decode ``tokens`` tokens after a warm-up; the run's seconds and
    the peak RSS it added above the loaded model (the process's high-water mark minus RSS before it)."""
    torch.set_num_threads(threads)
    model = load_model(directory, loader)
    before = rss_bytes()
    run = measure(model, cache, tokens, loader=loader, trace=False, warmup=4)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    return {"seconds": run.seconds, "peak_above_model": max(peak - before, 0), "tokens": run.generated[0].tolist()}


def main(argv: list[str] | None = None) -> int:
    """The child's entry point: ``MODULE:FUNCTION 'JSON keyword arguments'``; prints the JSON result."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2 or ":" not in argv[0] or not argv[0].startswith("kvlab."):
        print("usage: python -m kvlab.study.isolated kvlab.<module>:<function> '<JSON keyword arguments>'",
              file=sys.stderr)
        return 2
    module, function = argv[0].split(":", 1)
    result = getattr(importlib.import_module(module), function)(**json.loads(argv[1]))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
