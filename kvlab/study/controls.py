"""Control experiments a careful reader asks for, each one function the notebooks call.

An investigation is believed when its alternatives were tried. The main runs show that trainable
weights leak and frozen ones do not; these controls take the explanation apart:

- :func:`int8_with_trainable_floats`: the int8 loader with its float norms and embeddings made
  trainable. Is it the integer dtype that keeps quantized models clean, or the absence of any leaf
  that requires grad?
- :class:`DetachingCache`: a concat cache that ``detach()``\\ es what it stores, as Candle's
  ``ConcatKvCache`` later did defensively. What does it save, and what does it leave? It is measured
  like every other run, by :func:`kvlab.study.runs.measure`, which takes a cache object as well as a
  design's name.
- :func:`cat_transients`: ``torch.cat`` holds the old and the new cache at once for an instant
  (transformers #25930 / PR #30536). A transient peak that returns every step is not a leak, and the
  tracer tells the two apart.
- :func:`loading_rss`: the fair test of the first fix attempt (mistral.rs PR #154, single-threaded
  loading): resident memory with one loading thread against one per shard, where glibc gives each
  thread its own allocator arena, measured in a fresh child process.
- :func:`decode_flops` and :func:`decode_ops`: costs as counts (matmul FLOPs, operators dispatched per
  step), which do not depend on how busy the machine is, unlike a clock.
"""

from __future__ import annotations

import ctypes
import gc
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode

from kvlab.caches import ConcatCache, KVCache, kv_bytes, make_cache
from kvlab.config import MistralConfig
from kvlab.generate import generate
from kvlab.loaders import load_model
from kvlab.memory.rss import rss_bytes
from kvlab.memory.trace import MemoryTracer
from kvlab.memory.units import MiB

from .isolated import run_isolated
from .probes import prompt_ids

__all__ = ["DetachingCache", "int8_with_trainable_floats", "cat_transients", "loading_rss", "release_freed_heap",
           "decode_flops", "decode_ops"]


class DetachingCache(ConcatCache):
    """A ``concat`` cache that stores ``k.detach()``/``v.detach()`` and detaches the grown tensor.

    Candle's ``ConcatKvCache`` gained this as a defence ("KV caches are inference-only"). It cuts the
    chain from one step's cache to the previous step's graph; it does not stop each step from recording
    a graph when the weights require grad, and the last step's graph stays reachable from its logits.
    """

    kind = "detach"

    def update(self, layer: int, k: Tensor, v: Tensor, positions: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        keys, values, positions = super().update(layer, k.detach(), v.detach(), positions)
        self.keys[layer], self.values[layer] = keys.detach(), values.detach()
        return self.keys[layer], self.values[layer], positions


def int8_with_trainable_floats(directory: str | Path,
                               device: str | torch.device = "cpu") -> tuple[nn.Module, list[str]]:
    """The ``int8`` loader's model with every floating-point parameter (norms, embeddings, an untied
    ``lm_head`` if kept in float) set to ``requires_grad=True``; the int8 matrices stay buffers.

    Returns the model and the names made trainable.
    """
    model = load_model(directory, "int8", device=device)
    names = []
    for name, p in model.named_parameters():
        if p.is_floating_point():
            p.requires_grad_(True)
            names.append(name)
    return model, names


def cat_transients(config: MistralConfig, tokens: int, *, hold_previous: bool = False, seed: int = 0) -> pd.DataFrame:
    """Grow a ``concat`` cache by one position per step, with random K/V and no model, under the tracer.

    ``hold_previous=False``: kvlab's cache, which replaces each layer's tensor as soon as it is regrown,
    so for an instant one layer's old K (or V) and its new copy coexist. ``True``: the caller also holds
    the whole previous cache until the step ends, as transformers' tuple cache did before PR #30536, so
    at the step's peak two full copies coexist. Either way nothing outlives its step.

    Returns per step: ``positions``, ``live_bytes`` (at the step's end), ``peak_bytes`` (inside the
    step), ``kv_bytes`` (the analytic cache size).
    """
    g = torch.Generator().manual_seed(seed)
    shape = (1, config.num_key_value_heads, 1, config.head_dim)  # (B, Hkv, T, D)
    cache = ConcatCache(config.num_hidden_layers)
    rows = []
    with MemoryTracer(device="cpu") as tracer:
        for step in range(tokens):
            held = list(cache.tensors()) if hold_previous else []
            positions = torch.full((1, 1), step)
            for layer in range(config.num_hidden_layers):
                k = torch.randn(shape, generator=g, dtype=config.dtype)
                v = torch.randn(shape, generator=g, dtype=config.dtype)
                cache.update(layer, k, v, positions)
            del held, k, v, positions
            tracer.mark_step(step)
            rows.append({"positions": cache.seq_len, "kv_bytes": kv_bytes(config, 1, cache.seq_len),
                         "nbytes": cache.nbytes})
    timeline = tracer.timeline()
    table = pd.DataFrame(rows)
    table["live_bytes"] = timeline["live_bytes"].to_numpy()
    table["peak_bytes"] = timeline["peak_bytes"].to_numpy()
    return table


# ------------------------------------------------------------------------------------- loading threads
def _glibc_arenas() -> int | None:
    """Number of glibc malloc arenas (heaps) in this process, from ``malloc_info``; ``None`` off glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return None
    libc.fopen.restype = ctypes.c_void_p  # a FILE*, which the default int return type would truncate
    libc.fopen.argtypes = [ctypes.c_char_p, ctypes.c_char_p]
    with tempfile.NamedTemporaryFile(suffix=".xml") as out:
        stream = libc.fopen(out.name.encode(), b"w")
        if not stream:
            return None
        libc.malloc_info(0, ctypes.c_void_p(stream))
        libc.fclose(ctypes.c_void_p(stream))
        return Path(out.name).read_text().count("<heap nr=")


def loading_child(directory: str, loader: str, tokens: int) -> dict[str, Any]:
    """In the child process of :func:`loading_rss`: warm up, load, measure RSS, decode, measure RSS."""
    torch.set_num_threads(1)
    load_model(directory, "inference")  # one-time costs (lazy imports, first ops), on the main thread
    gc.collect()
    before = rss_bytes()
    model = load_model(directory, loader)
    gc.collect()
    loaded = rss_bytes()
    arenas = _glibc_arenas()
    prompt = prompt_ids(model.config.vocab_size, 1)
    gen = generate(model, prompt, tokens, cache=ConcatCache(model.config.num_hidden_layers))
    decoded = rss_bytes()
    return {"loader": loader, "rss_before": before, "rss_loaded": loaded, "rss_decoded": decoded,
            "arenas": arenas, "tokens": gen.tokens.shape[1] - 1}


def loading_rss(directory: str | Path, loaders: tuple[str, ...] = ("trainable", "threaded"), tokens: int = 64,
                repeats: int = 1) -> pd.DataFrame:
    """RSS of a fresh process that loads ``directory`` with each loader and decodes ``tokens`` tokens
    with the concat cache, with glibc's default allocator settings (as a user runs it).

    One row per loader and repeat: ``arenas`` (glibc malloc arenas after loading: one per thread that
    allocated), ``loaded MiB`` (RSS the load added), ``decode MiB`` (what decoding added). The children
    of one repeat run side by side (one per loader), each in its own process and heap.
    """
    child = lambda loader: run_isolated(f"{__name__}:loading_child",  # noqa: E731
                                        {"directory": str(directory), "loader": loader, "tokens": tokens},
                                        malloc="default")
    rows = []
    with ThreadPoolExecutor(len(loaders)) as pool:
        for _ in range(repeats):
            rows += list(pool.map(child, loaders))
    table = pd.DataFrame(rows)
    table["loaded MiB"] = (table["rss_loaded"] - table["rss_before"]) / MiB
    table["decode MiB"] = (table["rss_decoded"] - table["rss_loaded"]) / MiB
    return table[["loader", "arenas", "loaded MiB", "decode MiB"]]


def release_freed_heap() -> bool:
    """Ask glibc to give freed heap pages back to the OS (``malloc_trim(0)``); ``False`` off glibc.

    After a leaking run's tensors are freed, RSS stays high: glibc keeps freed heap memory for reuse.
    If RSS falls after this call, what it showed was the allocator's reserve, not live data.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.malloc_trim(0)) or True
    except (OSError, AttributeError):
        return False


# ------------------------------------------------------------------------------------------ compute
def decode_flops(model: nn.Module, cache: KVCache | None, tokens: int) -> pd.DataFrame:
    """Matmul FLOPs of each decode step (``torch.utils.flop_counter``), greedy from kvlab's standard one-token prompt.

    ``cache=None`` recomputes the whole sequence every step (the incident's ``--no-kv-cache``). A count,
    not a clock: the same on an idle machine and a busy one. Returns ``tokens`` (generated so far),
    ``positions`` (what the step processed), ``flops``.
    """
    from torch.utils.flop_counter import FlopCounterMode

    device = next(model.parameters()).device
    prompt = prompt_ids(model.config.vocab_size, 1, device=device)
    totals: list[int] = []
    counter = FlopCounterMode(display=False)
    with counter, torch.inference_mode():
        generate(model, prompt, tokens, cache=cache, on_step=lambda step: totals.append(counter.get_total_flops()))
    flops = pd.Series(totals).diff().fillna(totals[0]).astype("int64")
    n = pd.RangeIndex(1, tokens + 1)
    return pd.DataFrame({"tokens": n, "positions": n if cache is None else 1, "flops": flops.to_numpy()})


class _OpCounter(TorchDispatchMode):
    """Counts the operators dispatched to kernels (one per call, whatever the tensors' sizes)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        self.ops += 1
        return func(*args, **(kwargs or {}))


def decode_ops(model: nn.Module, cache: str, batch: int, tokens: int) -> pd.DataFrame:
    """Operators dispatched in each decode step of a greedy decode of ``batch`` rows with a ``cache``
    cache: the fixed per-call cost of a step, as a number. Returns ``tokens``, ``ops``."""
    device = next(model.parameters()).device
    prompt = prompt_ids(model.config.vocab_size, 1, batch=batch, device=device)
    kv_cache = make_cache(cache, model.config, batch, max_tokens=tokens + 1, device=device)
    totals: list[int] = []
    counter = _OpCounter()
    with torch.inference_mode(), counter:
        generate(model, prompt, tokens, cache=kv_cache, on_step=lambda step: totals.append(counter.ops))
    ops = pd.Series(totals).diff().fillna(totals[0]).astype("int64")
    return pd.DataFrame({"tokens": range(1, tokens + 1), "ops": ops.to_numpy()})
