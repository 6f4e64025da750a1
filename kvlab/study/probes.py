"""What a measured run records at every decode step, whichever loop it drives, and the prompt it starts from.

A :class:`StepProbe` is called once per generated token, by kvlab's ``generate`` (its ``on_step``) or
by the transformers loop of :mod:`kvlab.study.hf`, and reads everything cheap enough to read every
step: wall and CPU time, the cache's own byte count next to the analytic KV size, process RSS, CUDA's
allocator counters, and, at chosen steps, the exact bytes the loop keeps alive through its cache and
autograd graph (:func:`kvlab.memory.leakguard.measure_retained`). It also marks the exact tracer's
steps and ends a run that passed its deadline. :func:`kv_read_bytes` counts the K/V bytes attention
reads, from inside a cache's ``update``.

:func:`prompt_ids` is the one prompt recipe of every run in kvlab: notebooks, CLI, demo, benchmarks
and GPU experiments decode from the same seeded ids, so their tokens can be compared with each other.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from typing import Any

import pandas as pd
import torch
from torch import Tensor, nn

from kvlab.fastpath import sync
from kvlab.memory.leakguard import Retained, measure_retained
from kvlab.memory.rss import rss_bytes

__all__ = ["FIRST_PROMPT_ID", "prompt_ids", "StopRun", "StepProbe", "kv_read_bytes"]

#: Ids below this are Mistral's special tokens (``<unk>``, ``<s>``, ``</s>``): never in a prompt.
FIRST_PROMPT_ID = 3


def prompt_ids(vocab_size: int, length: int = 1, *, batch: int = 1, seed: int = 0,
               device: str | torch.device = "cpu") -> Tensor:
    """The prompt every kvlab run decodes from: (B, T) ids drawn uniformly from ``[3, vocab_size)``.

    Drawn on the CPU from a generator seeded with ``seed``, then moved to ``device``, so the ids are
    the same on every machine and device. Memory figures do not depend on the ids (only on the prompt's
    shape); the generated tokens do, which is why one recipe serves everywhere.
    """
    if length < 1 or batch < 1:
        raise ValueError(f"a prompt needs at least one row and one token, got batch={batch}, length={length}")
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(FIRST_PROMPT_ID, vocab_size, (batch, length), generator=generator).to(device)


class StopRun(Exception):
    """Raised by a probe to end a run at its deadline (the run is then "capped", not failed)."""


class StepProbe:
    """Per-step figures of one decode run: one row per generated token.

    Call :meth:`begin` just before the run makes its first allocation of its own (the cache), then
    :meth:`step` after every token. Columns of :meth:`frame`: ``step`` (0 is the prefill), ``tokens``
    (generated so far), ``positions`` (positions the model has processed: prompt + step), ``step_s``
    (synchronised wall time of the step), ``cpu_s`` (this process's CPU time in it, which other
    processes' load cannot inflate), ``cache_bytes`` (the cache's own count), ``kv_analytic_bytes``
    (the closed form, where one is given), and as asked ``rss_bytes``, ``cuda_allocated_bytes`` and
    ``cuda_peak_bytes`` (the allocator's peak since the previous step, reset every step).
    """

    def __init__(self, device: torch.device, prompt_len: int, *, cache_bytes: Callable[[Any], int],
                 kv_analytic: Callable[[int], int | None] | None = None, tracer: Any = None, rss: bool = False,
                 retain_at: Iterable[int] = (), model: nn.Module | None = None, deadline: float | None = None,
                 on_step: Callable[[Any], Any] | None = None) -> None:
        self.device, self.prompt_len = device, prompt_len
        self.cache_bytes, self.kv_analytic, self.tracer, self.rss = cache_bytes, kv_analytic, tracer, rss
        self.retain_at, self.model, self.deadline, self.on_step = set(retain_at), model, deadline, on_step
        self.rows: list[dict[str, Any]] = []
        self.tokens: list[Tensor] = []
        self.retained: dict[int, Retained] = {}
        self.start_bytes = math.nan  # CUDA memory allocated before the run's own first allocation
        self._wall = self._cpu = 0.0

    def begin(self) -> None:
        sync(self.device)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start_bytes = float(torch.cuda.memory_allocated(self.device))
        self._wall, self._cpu = time.perf_counter(), time.process_time()

    def step(self, step: Any) -> None:
        """Record one step; ``step`` has ``index``, ``tokens`` (B, 1), ``logits`` and ``cache`` (kvlab's ``Step``)."""
        sync(self.device)
        wall, cpu = time.perf_counter(), time.process_time()
        if self.tracer is not None:
            self.tracer.mark_step(step.index)
        positions = self.prompt_len + step.index
        row: dict[str, Any] = {"step": step.index, "tokens": step.index + 1, "positions": positions,
                               "step_s": wall - self._wall, "cpu_s": cpu - self._cpu,
                               "cache_bytes": self.cache_bytes(step.cache)}
        if self.kv_analytic is not None:
            row["kv_analytic_bytes"] = self.kv_analytic(positions)
        if self.rss:
            row["rss_bytes"] = rss_bytes()
        if self.device.type == "cuda":
            row["cuda_allocated_bytes"] = torch.cuda.memory_allocated(self.device)
            row["cuda_peak_bytes"] = torch.cuda.max_memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        if step.index + 1 in self.retain_at:
            self.retained[step.index + 1] = measure_retained((step.cache, step.logits), self.model)
        self.rows.append(row)
        self.tokens.append(step.tokens)
        if self.on_step is not None:
            self.on_step(step)
        self._wall, self._cpu = time.perf_counter(), time.process_time()
        if self.deadline is not None and self._wall > self.deadline:
            raise StopRun(f"time cap reached after {step.index + 1} tokens")

    __call__ = step  # so a probe can be passed as ``on_step`` directly

    def frame(self) -> pd.DataFrame:
        """The rows, with ``beyond_start_bytes`` (CUDA memory allocated beyond the run's start)."""
        frame = pd.DataFrame(self.rows)
        if "cuda_allocated_bytes" in frame:
            frame["beyond_start_bytes"] = frame["cuda_allocated_bytes"] - self.start_bytes
        return frame

    def generated(self) -> Tensor:
        """(B, steps recorded) the tokens generated, on the CPU."""
        return torch.cat(self.tokens, dim=1).cpu() if self.tokens else torch.empty(0, 0, dtype=torch.long)


def kv_read_bytes(cache: Any, n_rep: int) -> list[int]:
    """Wrap ``cache.update`` to add up, per forward step, the K/V bytes attention's matmuls read: what the
    cache returns, times ``n_rep`` when attention materialises repeat_kv copies of it (all layers).

    Returns the list it fills as the cache is used: one entry per step, the prefill first. The wrapper
    refers back to the cache: ``del cache.update`` when done, or only the garbage collector frees it.
    """
    update = cache.update
    reads: list[int] = []

    def recording_update(layer: int, k: Tensor, v: Tensor, positions: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        keys, values, key_positions = update(layer, k, v, positions)
        touched = keys.nbytes + values.nbytes  # a view's own elements, not its base buffer
        if layer == 0:
            reads.append(0)
        reads[-1] += touched if cache.grouped else touched * n_rep
        return keys, values, key_positions

    cache.update = recording_update
    return reads
