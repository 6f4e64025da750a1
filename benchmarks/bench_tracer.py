"""How much the exact tracer slows kvlab's decode loop, next to the floor any dispatch mode costs.

For each preset (inference weights, one sequence, a concat cache) three variants run in turn, so that
machine load affects them alike: the plain loop, the loop under an empty ``TorchDispatchMode`` (the
price PyTorch charges for calling into Python on every aten op, before a tracer does any work), and
the loop under :class:`~kvlab.memory.trace.MemoryTracer` with its defaults except ``baseline=[model]``
(regions, module names, Python lines, thread hooks). Times are this process's CPU seconds (one torch
thread), which other processes on a shared machine disturb far less than wall time; the fastest run
of each variant is compared, with medians for context. Target: at most 1.5x on ``small``.

The tracer also costs a fixed time per trace, not per token: starting and stopping, including the
garbage-collector census it takes when other threads are running (tqdm's monitor thread counts) or
``baseline="auto"``. It is printed apart, with the slowdown it makes of the whole traced run.

    python benchmarks/bench_tracer.py [--presets tiny,small] [--tokens 128] [--repeats 3] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from kvlab.caches import ConcatCache
from kvlab.generate import generate
from kvlab.loaders import random_model
from kvlab.memory.trace import MemoryTracer


class EmptyMode(TorchDispatchMode):
    """Calls every op and does nothing else (with the same compiler opt-out as the tracer's hook)."""

    @classmethod
    def _should_skip_dynamo(cls) -> bool:
        return False

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        return func(*args, **kwargs) if kwargs else func(*args)


def measure(preset: str, tokens: int, repeats: int, frames: bool) -> dict[str, list[float]]:
    """CPU seconds of each variant's decode loop (and of the whole traced run), ``repeats`` times each
    after one warm-up round."""
    model = random_model(preset, "inference")
    prompt = torch.tensor([[1]])
    layers = model.config.num_hidden_layers
    clock = time.process_time

    def decode(on_step: Callable[[Any], None] | None = None) -> float:
        start = clock()
        generate(model, prompt, tokens, cache=ConcatCache(layers), on_step=on_step)
        return clock() - start

    def empty_mode() -> float:
        with EmptyMode():
            return decode()

    whole: list[float] = []

    def traced() -> float:
        start = clock()
        with MemoryTracer(baseline=[model], frames=frames) as tracer:
            loop = decode(tracer.mark_step)
        whole.append(clock() - start)
        return loop

    variants: dict[str, Callable[[], float]] = {"untraced": decode, "empty mode": empty_mode, "tracer": traced}
    times: dict[str, list[float]] = {name: [] for name in variants}
    for round_ in range(repeats + 1):
        for name, run in variants.items():
            seconds = run()
            if round_:  # the first round warms caches and the allocator up
                times[name].append(seconds)
    times["traced run"] = whole[1:]
    return times


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", default="tiny,small", help="comma-separated kvlab presets")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 keeps timings steady)")
    parser.add_argument("--no-frames", dest="frames", action="store_false",
                        help="charge allocations outside regions to '<unlabelled>' instead of module or line")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"decode loop, inference weights, batch 1, {args.tokens} tokens, {args.threads} torch thread(s), "
          f"CPU ms, best of {args.repeats} (median), frames={'on' if args.frames else 'off'}")
    print(f"{'preset':7} {'untraced':>16} {'empty mode':>16} {'tracer':>16} {'floor':>6} {'tracer':>7} "
          f"{'tracer/floor':>12} {'start+stop':>11} {'whole run':>9}")
    for preset in args.presets.split(","):
        t = measure(preset, args.tokens, args.repeats, args.frames)
        best = {k: min(v) for k, v in t.items()}
        cells = " ".join(f"{best[k] * 1e3:7.1f} ({statistics.median(t[k]) * 1e3:6.1f})"
                         for k in ("untraced", "empty mode", "tracer"))
        floor, tracer = best["empty mode"] / best["untraced"], best["tracer"] / best["untraced"]
        fixed = statistics.median(w - loop for w, loop in zip(t["traced run"], t["tracer"]))
        print(f"{preset:7} {cells} {floor:5.2f}x {tracer:6.2f}x {tracer / floor:11.2f}x {fixed * 1e3:8.1f} ms "
              f"{best['traced run'] / best['untraced']:8.2f}x")
    print("floor: empty dispatch mode / untraced; tracer: traced decode loop / untraced (target <= 1.5x on "
          "small); whole run: with the tracer's start and stop")


if __name__ == "__main__":
    main()
