"""One measured decode run: model + loader + cache + prompt + probes, and the result as one object.

The investigation's measured decodes go through :func:`measure` (:func:`measure_decode` loads a checkpoint
first): the notebooks' runs and controls, ``kvlab reproduce``, ``kvlab demo``, the cache sweeps, the GPU
experiments, the cache-change test and the loader benchmark. It takes a loaded model (kvlab's, or
transformers' driven by :func:`kvlab.study.hf.greedy`) and a cache design, built inside the measured
region (or a control's cache object), decodes from :func:`~kvlab.study.probes.prompt_ids`' prompt, and
returns a :class:`DecodeRun`:

- per step (:class:`~kvlab.study.probes.StepProbe`): time, cache bytes next to the analytic KV size,
  RSS, CUDA's counters, and with ``trace=True`` the exact live and peak tensor bytes of
  :class:`~kvlab.memory.trace.MemoryTracer`, by region;
- with ``retained=True`` the exact bytes the loop keeps through its cache and autograd graph after N/2
  and N tokens, judged by :func:`kvlab.memory.leakguard.compare_retained`;
- with ``explain=True`` the retention explainer's report on what the run keeps at the end.

Running out of memory or past a deadline ends a run, not the session: the run comes back with
``status`` "oom" or "capped" and the steps done. Only tables and numbers are kept: the cache and
whatever graph it held are released before :func:`measure` returns (:func:`measure_decode` also
releases the model it loaded).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch import Tensor, nn

from kvlab.caches import kv_bytes, make_cache
from kvlab.checkpoint import load_state_dict
from kvlab.config import MistralConfig, preset
from kvlab.fastpath import sync
from kvlab.generate import generate
from kvlab.loaders import load_model
from kvlab.memory.leakguard import LeakReport, Retained, compare_retained
from kvlab.memory.retention import RetentionReport
from kvlab.memory.retention import explain as explain_retention
from kvlab.memory.trace import MemoryTracer
from kvlab.memory.units import MiB
from kvlab.synthetic import build_checkpoint

from . import hf
from .env import OOM, cleanup, model_bytes
from .memmodel import weight_bytes
from .probes import StepProbe, StopRun, kv_read_bytes, prompt_ids

__all__ = ["Source", "checkpoint", "DecodeRun", "measure", "measure_decode", "hf_decode"]

#: Sources accepted everywhere: a preset name, a checkpoint directory, or a config (built on demand).
Source = str | Path | MistralConfig


def checkpoint(source: Source, *, seed: int = 0, max_shard_bytes: int | None = None) -> Path:
    """The checkpoint directory for ``source``, built deterministically if it is a preset or a config.

    ``max_shard_bytes`` splits the weights over several safetensors files, so that the ``threaded``
    loader has more than one shard to read in parallel.
    """
    if isinstance(source, MistralConfig):
        return build_checkpoint(source, seed=seed, max_shard_bytes=max_shard_bytes)
    path = Path(source)
    if isinstance(source, str) and not path.is_dir():
        preset(source)  # a clear ConfigError for a name that is neither a preset nor a directory
        return build_checkpoint(source, seed=seed, max_shard_bytes=max_shard_bytes)
    return path


@dataclass
class DecodeRun:
    """One measured decode run. Bytes are exact tensor-storage bytes; "live" excludes what existed before."""

    loader: str
    cache: str
    tokens: int  # tokens asked for; ``len(timeline)`` were generated (fewer after "oom" or "capped")
    device: str
    config: Any  # kvlab's MistralConfig, or a transformers config
    timeline: pd.DataFrame  # one row per step: the probe's columns, and the tracer's when traced
    site_table: pd.DataFrame  # per (step, region): live_bytes, allocated_bytes, peak_bytes (tracer)
    by_site: pd.DataFrame  # heaptrack-style: alive_end_bytes, at_peak_bytes, peak_bytes ... per region (tracer)
    weights_bytes: int  # parameters and buffers of the model, measured
    weights_expected: int | None  # the same from the config alone (kvlab.study.memmodel.weight_bytes)
    kv_nbytes: int  # the cache's own report of its K/V bytes at the end
    kv_expected: int | None  # the analytic size for the positions the cache holds
    end_bytes: int  # tensors allocated during the run and still alive at the end (tracer; 0 untraced)
    peak_bytes: int  # highest live total during the run (tracer; 0 untraced)
    params_requiring_grad: int
    params_total: int
    generated: Tensor  # (B, steps done) the generated token ids
    seconds: float  # wall time of the run (tracing adds overhead)
    status: str = "ok"  # "ok", "oom" (out of memory) or "capped" (deadline)
    detail: str = ""
    start_bytes: float = float("nan")  # CUDA memory allocated before the run's cache existed
    retained: dict[int, Retained] = field(default_factory=dict)  # exact kept bytes after N/2 and N tokens
    leak: LeakReport | None = None  # the leak guard's verdict on ``retained``
    retention: RetentionReport | None = None  # set when measured with explain=True
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def half(self) -> int:
        return self.tokens // 2

    def live_at(self, tokens: int) -> int:
        """Live bytes once ``tokens`` tokens have been generated (what an N-token run would end with)."""
        row = self.timeline.loc[self.timeline["tokens"] == tokens]
        if row.empty or "live_bytes" not in row:
            raise ValueError(f"no traced step with {tokens} generated tokens in a {self.tokens}-token run")
        return int(row["live_bytes"].iloc[0])

    @property
    def growth_ratio(self) -> float:
        """Live bytes after N tokens over live bytes after N/2: 2 for a KV cache, about 4 for the leak."""
        return self.live_at(self.tokens) / max(self.live_at(self.half), 1)

    @property
    def beyond_cache_bytes(self) -> int:
        """What the loop keeps besides its KV cache (the leak, plus the last logits and token ids)."""
        return self.end_bytes - self.kv_nbytes

    @property
    def top_site(self) -> str:
        """The region holding the most bytes still alive at the end (heaptrack's "leaked" view)."""
        return str(self.by_site["site"].iloc[0])

    def row(self) -> dict[str, Any]:
        """One summary row, in MiB, for tables of several runs."""
        row = {"loader": self.loader, "cache": self.cache, "tokens": self.tokens,
               "weights MiB": self.weights_bytes / MiB,
               "KV analytic MiB": (self.kv_expected or 0) / MiB, "KV nbytes MiB": self.kv_nbytes / MiB,
               f"live MiB @{self.half}": self.live_at(self.half) / MiB,
               f"live MiB @{self.tokens}": self.end_bytes / MiB,
               "growth x (N/2→N)": self.growth_ratio,
               "beyond cache MiB": self.beyond_cache_bytes / MiB, "top site": self.top_site,
               "params requiring grad": self.params_requiring_grad}
        if self.retention is not None:
            row["steps chained"] = self.retention.steps_chained if self.retention.retains else 0
            row["graph nodes"] = self.retention.graph_nodes
        row["traced s"] = self.seconds
        return row


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _cache_factory(model: nn.Module, kind: Any, batch: int, options: dict[str, Any]) -> Callable[[int], Any]:
    """``new(max_tokens)``: a fresh ``kind`` cache for ``model`` (``None``/"none": no cache; an object: itself)."""
    if not _is_name(kind):
        return lambda max_tokens: kind
    if hf.is_transformers(model):
        return lambda max_tokens: hf.new_cache(model, kind or "DynamicCache", max_tokens)
    if kind in (None, "none"):
        return lambda max_tokens: None
    weight = model.model.embed_tokens.weight
    return lambda max_tokens: make_cache(kind, model.config, batch, max_tokens=max_tokens, device=weight.device,
                                         dtype=weight.dtype, **options)


def _is_name(cache: Any) -> bool:
    return cache is None or isinstance(cache, str)


def _analytic_kv(model: nn.Module, kind: Any, batch: int, max_tokens: int,
                 options: dict[str, Any]) -> Callable[[int], int | None] | None:
    """Positions -> the closed-form KV bytes of a kvlab cache built here (None where no closed form covers it)."""
    if hf.is_transformers(model) or not _is_name(kind):
        return None
    if kind in (None, "none"):
        return lambda positions: 0
    sizes = {k: v for k, v in options.items() if k == "block_size"}

    def analytic(positions: int) -> int | None:
        try:
            return kv_bytes(model.config, batch, positions, kind=kind, max_tokens=max_tokens, **sizes)
        except ValueError:
            return None

    return analytic


def _grad_mode(grad: bool | None, inference_mode: bool) -> contextlib.AbstractContextManager:
    if inference_mode:
        return torch.inference_mode()
    return contextlib.nullcontext() if grad is None else torch.set_grad_enabled(grad)


def measure(model: nn.Module, cache: Any = "concat", tokens: int = 256, *, loader: str = "",
            prompt: Tensor | None = None, prompt_len: int = 1, batch: int = 1, seed: int = 0,
            trace: bool = True, frames: bool = True, retained: bool = False, explain: bool = False,
            rss: bool = False, kv_reads: bool = False, grad: bool | None = None, inference_mode: bool = False,
            warmup: int = 0, deadline: float | None = None, progress: bool = False,
            on_step: Callable[[Any], Any] | None = None, phase: Callable[[str], Any] | None = None,
            cache_options: dict[str, Any] | None = None) -> DecodeRun:
    """Greedily decode ``tokens`` tokens with a fresh ``cache`` cache and measure the run.

    ``cache``: a kvlab design (:data:`kvlab.caches.CACHES`), ``None``/"none" (recompute the whole sequence
    each step), for a transformers model "DynamicCache"/"StaticCache", or a cache object (a control such
    as :class:`kvlab.study.controls.DetachingCache`), used as it is: what it allocated when built is not
    the run's, and it has no analytic size. ``prompt``: (B, T) ids; default
    :func:`~kvlab.study.probes.prompt_ids` of ``prompt_len`` tokens, ``batch`` rows, ``seed``. ``loader``
    only labels the run.

    Probes: ``trace`` (exact tracer; ``frames`` attributes code outside regions to Python lines),
    ``retained`` (kept bytes after N/2 and N tokens and the leak verdict), ``explain`` (retention
    report at the end), ``rss`` (process RSS per step), ``kv_reads`` (K/V bytes attention reads per
    step, kvlab caches). Grad mode: ``grad=None`` leaves it as it is (the incident's ordinary loop),
    ``False``/``True`` sets it; ``inference_mode=True`` decodes under ``torch.inference_mode()``.
    ``warmup`` tokens are decoded first with a throwaway cache, unmeasured (a cache name only). ``on_step``
    gets each step (kvlab's ``Step``); ``phase`` (a memory monitor's ``mark``, say) is told ``"decode"``
    and ``"explain"`` as each begins. Past ``deadline`` (a ``time.perf_counter()`` value) the run stops
    as "capped"; out of memory it stops as "oom".
    Garbage is collected first when memory is measured (a full collection takes a good part of a
    second; untraced speed runs skip it).
    """
    if warmup and not _is_name(cache):
        raise ValueError("warmup decodes with a throwaway cache: pass a cache name, not a cache object")
    device, config, phase = _device_of(model), model.config, phase or (lambda name: None)
    options = dict(cache_options or {})
    if prompt is None:
        prompt = prompt_ids(config.vocab_size, prompt_len, batch=batch, seed=seed, device=device)
    batch, prompt_len = prompt.shape
    max_tokens = prompt_len + tokens
    new_cache = _cache_factory(model, cache, batch, options)
    loop = hf.greedy if hf.is_transformers(model) else generate
    if warmup:  # first-call allocations (thread pools, kernels, allocator pools) are not the run's cost
        with torch.no_grad():
            loop(model, prompt, warmup, new_cache(prompt_len + warmup))
    params = list(model.parameters())
    tracer = MemoryTracer(device=device.type, frames=frames) if trace else None
    probe = StepProbe(device, prompt_len, tracer=tracer, rss=rss, model=model, deadline=deadline, on_step=on_step,
                      cache_bytes=hf.cache_bytes if hf.is_transformers(model) else _kvlab_cache_bytes,
                      kv_analytic=_analytic_kv(model, cache, batch, max_tokens, options),
                      retain_at={tokens // 2, tokens} if retained else ())
    status, detail, reads, kv_cache, result = "ok", "", None, None, None
    if trace or retained or rss or device.type == "cuda":
        cleanup(device)  # earlier work's garbage must not be freed (or counted) inside this run
    phase("decode")
    start = time.perf_counter()
    try:
        probe.begin()
        with tracer if tracer is not None else contextlib.nullcontext():
            kv_cache = new_cache(max_tokens)  # inside the measured region: every design pays for its own
            reads = kv_read_bytes(kv_cache, config.num_key_value_groups) if kv_reads else None
            with _grad_mode(grad, inference_mode):
                kwargs = {} if loop is hf.greedy else {"progress": progress}
                result = loop(model, prompt, tokens, kv_cache, on_step=probe, **kwargs)
            sync(device)
    except OOM as exc:
        status, detail = "oom", str(exc).splitlines()[0][:200]
    except StopRun as exc:
        status, detail = "capped", str(exc)
    seconds = time.perf_counter() - start
    if reads is not None:
        del kv_cache.update  # the recording wrapper refers back to the cache
    frame = probe.frame()
    if reads is not None:
        frame["kv_read_bytes"] = reads[: len(frame)]  # reads[0]: the prefill, then one per decode step
    if tracer is not None and len(frame):
        frame = frame.merge(tracer.timeline(), on="step", how="left")
        if device.type != "cuda":
            frame["beyond_start_bytes"] = frame["live_bytes"]
    leak = None
    if retained and status == "ok":
        half = tokens // 2
        leak = compare_retained(probe.retained[half], probe.retained[tokens], tokens - half, config=config)
    report = None
    if explain and result is not None:
        phase("explain")
        report = explain_retention(result.cache, result.logits, model=model, tracer=tracer)
    last = frame.iloc[-1] if len(frame) else None
    kv_expected = last.get("kv_analytic_bytes") if last is not None else None
    label = (cache or "none") if _is_name(cache) else getattr(cache, "kind", "") or type(cache).__name__
    run = DecodeRun(
        loader=loader, cache=label, tokens=tokens, device=str(device), config=config, timeline=frame,
        site_table=tracer.site_table() if tracer is not None else pd.DataFrame(),
        by_site=tracer.by_site() if tracer is not None else pd.DataFrame(),
        weights_bytes=model_bytes(model), weights_expected=_weights_expected(model, loader),
        kv_nbytes=int(last["cache_bytes"]) if last is not None else 0,
        kv_expected=None if kv_expected is None or pd.isna(kv_expected) else int(kv_expected),
        end_bytes=tracer.end_bytes if tracer is not None else 0,
        peak_bytes=tracer.peak_bytes if tracer is not None else 0,
        params_requiring_grad=sum(p.requires_grad for p in params), params_total=len(params),
        generated=probe.generated(), seconds=seconds, status=status, detail=detail, start_bytes=probe.start_bytes,
        retained=dict(probe.retained), leak=leak, retention=report,
        extra={"cache_impl": _cache_impl(kv_cache), "prompt": prompt.cpu()})
    del result, kv_cache, probe, tracer, params
    return run


def _kvlab_cache_bytes(cache: Any) -> int:
    return int(cache.nbytes) if cache is not None else 0


def _cache_impl(cache: Any) -> str:
    """The cache's class, and for kvlab's whether attention reads it grouped or through repeat_kv."""
    if cache is None:
        return "none"
    name = f"{type(cache).__module__}.{type(cache).__qualname__}"
    if hf.is_transformers(cache) or not hasattr(cache, "grouped"):
        return name
    return f"{name}({'grouped' if cache.grouped else 'repeat_kv'})"


def _weights_expected(model: nn.Module, loader: str) -> int | None:
    if not isinstance(model.config, MistralConfig):
        return None
    return weight_bytes(model.config, quant="int8" if loader == "int8" else None)


def measure_decode(source: Source, loader: str = "trainable", cache: str | None = "concat", tokens: int = 256, *,
                   device: str | torch.device = "cpu", seed: int = 0, max_shard_bytes: int | None = None,
                   **probes: Any) -> DecodeRun:
    """Load ``source`` (a preset, checkpoint directory or config) with ``loader`` and :func:`measure` a
    ``tokens``-token decode with a ``cache`` cache; ``probes`` go to :func:`measure` (``explain=True``,
    ``retained=True``, ``prompt_len`` ...). The model is freed before it returns."""
    directory = checkpoint(source, seed=seed, max_shard_bytes=max_shard_bytes)
    model = load_model(directory, loader, device=device)
    run = measure(model, cache, tokens, loader=loader, seed=seed, **probes)
    run.extra.update(checkpoint=directory.name, shards=len(list(directory.glob("*.safetensors"))))
    del model
    cleanup(device)
    return run


def hf_decode(source: Source, tokens: int = 256, *, grad: bool = True, device: str | torch.device = "cpu",
              seed: int = 0, attn: str = "eager", cache: str = "DynamicCache", **probes: Any) -> DecodeRun:
    """:func:`measure` transformers' ``MistralForCausalLM`` over the weights of ``source`` (eager attention,
    which materialises repeat_kv as kvlab's model does), decoded by :func:`kvlab.study.hf.greedy`.

    ``grad=True`` leaves grad mode on, as an ordinary loop does; ``False`` decodes under
    ``torch.no_grad()``. Parameters keep transformers' default ``requires_grad=True``. Traced and
    explained by default; the loader is labelled ``hf-grad`` or ``hf-nograd``.
    """
    config, state = load_state_dict(checkpoint(source, seed=seed))
    model = hf.hf_model(config, {k: v.to(device) for k, v in state.items()}, device, attn)
    del state
    probes.setdefault("explain", True)
    run = measure(model, cache, tokens, loader="hf-grad" if grad else "hf-nograd", grad=grad, seed=seed, **probes)
    run.extra["attn_implementation"] = model.config._attn_implementation
    del model
    cleanup(device)
    return run
