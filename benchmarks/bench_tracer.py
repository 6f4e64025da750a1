"""How much the exact tracer slows kvlab's decode loop (tiny preset, inference weights, 256 tokens).

Untraced and traced runs alternate in one process, so machine load affects both alike; the ratio of
the fastest run of each is printed (the fastest is the least disturbed by other processes), with the
medians for context. Target: at most 1.5x.

A third variant runs the loop under an empty ``TorchDispatchMode``: the price PyTorch charges for
calling into Python on every aten op, before the tracer does any work. It shows how much of the
slowdown is the tracer's own bookkeeping and how much is the mechanism.

    python benchmarks/bench_tracer.py [--tokens 256] [--repeats 5] [--threads 1] [--no-frames]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from kvlab.caches import ConcatCache
from kvlab.generate import generate
from kvlab.loaders import random_model
from kvlab.memory.trace import MemoryTracer
from kvlab.model import MistralForCausalLM
from torch.utils._python_dispatch import TorchDispatchMode


class EmptyMode(TorchDispatchMode):
    """Calls every op and does nothing else (with the same compiler opt-out as the tracer's mode)."""

    @classmethod
    def _should_skip_dynamo(cls) -> bool:
        return False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return func(*args, **kwargs) if kwargs else func(*args)


def tiny_model(seed: int = 0) -> MistralForCausalLM:
    """The tiny preset with seeded random weights, frozen (inference loader)."""
    return random_model("tiny", "inference", seed)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 keeps timings steady)")
    parser.add_argument("--no-frames", dest="frames", action="store_false",
                        help="charge allocations outside kvlab's sites to '<unlabelled>' instead of their Python frame")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = tiny_model()
    prompt = torch.tensor([[1]])
    layers = model.config.num_hidden_layers

    def plain() -> float:
        start = time.perf_counter()
        generate(model, prompt, args.tokens, cache=ConcatCache(layers))
        return time.perf_counter() - start

    def traced() -> float:
        start = time.perf_counter()
        with MemoryTracer(baseline=[model], frames=args.frames) as tracer:
            generate(model, prompt, args.tokens, cache=ConcatCache(layers), on_step=tracer.mark_step)
        return time.perf_counter() - start

    def empty_mode() -> float:
        with EmptyMode():
            return plain()

    plain(), empty_mode(), traced()  # warm-up
    base, floor, trace = [], [], []
    for _ in range(args.repeats):
        base.append(plain())
        floor.append(empty_mode())
        trace.append(traced())
    ratio = min(trace) / min(base)
    print(f"decode loop, tiny preset, inference weights, {args.tokens} tokens, {args.threads} thread(s), "
          f"frames={'on' if args.frames else 'off'}")
    print(f"  untraced:            best {min(base) * 1e3:8.1f} ms   median {statistics.median(base) * 1e3:8.1f} ms")
    print(f"  empty dispatch mode: best {min(floor) * 1e3:8.1f} ms   median {statistics.median(floor) * 1e3:8.1f} ms"
          f"   ({min(floor) / min(base):.2f}x: the mechanism's own floor)")
    print(f"  traced:              best {min(trace) * 1e3:8.1f} ms   median {statistics.median(trace) * 1e3:8.1f} ms")
    print(f"  slowdown: {ratio:.2f}x (best/best), {statistics.median(trace) / statistics.median(base):.2f}x "
          f"(median/median); target <= 1.5x")


if __name__ == "__main__":
    main()
