"""One call per experiment of the investigation notebooks, one tidy result back.

The notebooks ask small questions ("does the int8 loader leak?", "is the cache the size it should
be?") and each answer is a decode run measured with kvlab's own tools. This module wires those tools
together so a notebook cell stays one line:

- :func:`measure_decode` loads a checkpoint with a named loader, decodes under the exact tracer of
  :mod:`kvlab.memory.trace` (and optionally the retention explainer of :mod:`kvlab.memory.retention`), sets the
  cache's ``nbytes`` against :func:`kvlab.caches.kv_bytes`, and drops the model before it returns, so
  experiments in one notebook never see each other's tensors. :func:`measure_grid` runs it over
  loaders x caches and returns one row per run.
- :func:`time_decode` times decoding token by token, untraced (the tracer's bookkeeping would blur it).
- :func:`rss_decode` records RSS, what ``top`` shows, with memory_profiler in a fresh process, with
  glibc's default allocator settings or with a fixed mmap threshold (see :func:`kvlab.memory.rss.honest_malloc_env`).
- :func:`hf_decode` drives transformers' ``MistralForCausalLM`` over the same weights with a hand-written
  greedy loop and ``DynamicCache``, with grad mode on or off.

Nothing here measures anything itself: the numbers come from :class:`~kvlab.memory.trace.MemoryTracer`,
:func:`~kvlab.memory.retention.explain`, :mod:`kvlab.memory.rss` and the analytic sizes of :mod:`kvlab.study.memmodel`.
"""

from __future__ import annotations

import gc
import importlib
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import pandas as pd
import torch
from torch import Tensor, nn

from kvlab.caches import kv_bytes, make_cache
from kvlab.checkpoint import build_checkpoint, inspect_checkpoint
from kvlab.config import MistralConfig, preset
from kvlab.experiments.suites import cleanup, model_bytes
from kvlab.fastpath import sync
from kvlab.generate import generate
from kvlab.loaders import load_model
from .memmodel import weight_bytes
from kvlab.memory.trace import MemoryTracer, MiB
from kvlab.memory.retention import RetentionReport, explain
from kvlab.memory.rss import RSSTimeline, honest_malloc_env, run_python

__all__ = ["checkpoint", "environment", "cleanup", "DecodeRun", "measure_decode", "explain_run", "measure_grid",
           "expected_vs_measured", "live_table", "inspect_loaders", "time_decode", "rss_decode", "hf_available",
           "hf_decode", "HFRun"]

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


def environment(device: str | torch.device = "cpu") -> dict[str, Any]:
    """Versions and the device a notebook ran on (its first output cell)."""
    from kvlab import __version__

    device = torch.device(device)
    info = {"python": platform.python_version(), "torch": torch.__version__, "kvlab": __version__,
            "device": str(device), "torch threads": torch.get_num_threads()}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    else:
        info["cpu"] = platform.processor() or platform.machine()
    return info


def _new_cache(kind: str | None, config: MistralConfig, max_tokens: int, device: torch.device):
    if kind in (None, "none"):
        return None
    return make_cache(kind, config, batch_size=1, max_tokens=max_tokens, device=device)


def _expected_kv(kind: str | None, config: MistralConfig, positions: int, max_tokens: int) -> int:
    if kind in (None, "none"):
        return 0
    return kv_bytes(config, 1, positions, kind=kind, max_tokens=max_tokens)


# --------------------------------------------------------------------------------------------- one run
@dataclass
class DecodeRun:
    """One traced decode run. Bytes are exact tensor-storage bytes; "live" excludes the weights."""

    loader: str
    cache: str
    tokens: int
    device: str
    config: MistralConfig
    timeline: pd.DataFrame  # per step: step, tokens (generated so far), live_bytes, peak_bytes, ... (tracer)
    site_table: pd.DataFrame  # per (step, site): live_bytes, allocated_bytes, peak_bytes (tracer)
    by_site: pd.DataFrame  # heaptrack-style: alive_end_bytes, at_peak_bytes, peak_bytes, allocated_bytes per site
    weights_bytes: int  # parameters and buffers of the loaded model, measured
    weights_expected: int  # the same from the config alone (kvlab.study.memmodel.weight_bytes)
    kv_nbytes: int  # the cache's own report of its K/V bytes at the end
    kv_expected: int  # kvlab.caches.kv_bytes for the positions the cache holds
    end_bytes: int  # tensors allocated while decoding and still alive at the end
    peak_bytes: int  # highest live total during the run
    params_requiring_grad: int
    params_total: int
    generated: Tensor  # (B, tokens) the generated token ids
    seconds: float  # wall time of the traced run (the tracer adds overhead)
    retention: RetentionReport | None = None  # set when measured with explain=True
    extra: dict[str, Any] = field(default_factory=dict)

    def live_at(self, tokens: int) -> int:
        """Live bytes once ``tokens`` tokens have been generated (what an N-token run would end with)."""
        row = self.timeline.loc[self.timeline["tokens"] == tokens]
        if row.empty:
            raise ValueError(f"no step with {tokens} generated tokens in a {self.tokens}-token run")
        return int(row["live_bytes"].iloc[0])

    @property
    def half(self) -> int:
        return self.tokens // 2

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
        """The site holding the most bytes still alive at the end (heaptrack's "leaked" view)."""
        return str(self.by_site["site"].iloc[0])

    def row(self) -> dict[str, Any]:
        """One summary row, in MiB, for tables of several runs."""
        row = {
            "loader": self.loader, "cache": self.cache, "tokens": self.tokens,
            "weights MiB": self.weights_bytes / MiB,
            "KV analytic MiB": self.kv_expected / MiB, "KV nbytes MiB": self.kv_nbytes / MiB,
            f"live MiB @{self.half}": self.live_at(self.half) / MiB,
            f"live MiB @{self.tokens}": self.end_bytes / MiB,
            "growth x (N/2→N)": self.growth_ratio,
            "beyond cache MiB": self.beyond_cache_bytes / MiB,
            "top site": self.top_site,
            "params requiring grad": self.params_requiring_grad,
        }
        if self.retention is not None:
            row["steps chained"] = self.retention.steps_chained if self.retention.retains else 0
            row["graph nodes"] = self.retention.graph_nodes
        row["traced s"] = self.seconds
        return row


def measure_decode(source: Source, loader: str = "trainable", cache: str | None = "concat", tokens: int = 256, *,
                   device: str | torch.device = "cpu", prompt_len: int = 1, explain: bool = False, seed: int = 0,
                   max_shard_bytes: int | None = None) -> DecodeRun:
    """Load ``source`` with ``loader``, greedily decode ``tokens`` tokens with a ``cache`` cache
    (``None``/``"none"``: recompute the whole sequence each step), and trace every tensor.

    The prompt is ``prompt_len`` copies of token 1. With ``explain=True`` the retention explainer walks
    the autograd graph hanging off the cache and the last logits and names what it keeps alive
    (sites from the tracer: where each saved tensor was allocated). The model, cache and graph are
    freed before returning; only tables and numbers are kept.
    """
    device = torch.device(device)
    directory = checkpoint(source, seed=seed, max_shard_bytes=max_shard_bytes)
    model = load_model(directory, loader, device=device)
    config = model.config
    max_tokens = prompt_len + tokens
    kv_cache = _new_cache(cache, config, max_tokens, device)
    prompt = torch.ones((1, prompt_len), dtype=torch.long, device=device)
    params = list(model.parameters())
    cleanup(device)
    start = time.perf_counter()
    with MemoryTracer(device=device.type) as tracer:
        gen = generate(model, prompt, tokens, cache=kv_cache, on_step=tracer.mark_step)
        sync(device)
    seconds = time.perf_counter() - start
    report = explain_run(gen, model, tracer) if explain else None
    timeline = tracer.timeline()
    timeline.insert(1, "tokens", timeline["step"] + 1)
    positions = kv_cache.seq_len if kv_cache is not None else 0
    run = DecodeRun(
        loader=loader, cache=cache or "none", tokens=tokens, device=str(device), config=config,
        timeline=timeline, site_table=tracer.site_table(), by_site=tracer.by_site(),
        weights_bytes=model_bytes(model),
        weights_expected=weight_bytes(config, quant="int8" if loader == "int8" else None),
        kv_nbytes=int(kv_cache.nbytes) if kv_cache is not None else 0,
        kv_expected=_expected_kv(cache, config, positions, max_tokens),
        end_bytes=tracer.end_bytes, peak_bytes=tracer.peak_bytes,
        params_requiring_grad=sum(p.requires_grad for p in params), params_total=len(params),
        generated=gen.tokens[:, prompt_len:].cpu(), seconds=seconds, retention=report,
        extra={"checkpoint": directory.name, "shards": len(inspect_checkpoint(directory).by_shard())})
    del model, params, gen, kv_cache, tracer
    cleanup(device)
    return run


def explain_run(gen: Any, model: nn.Module, tracer: MemoryTracer | None = None) -> RetentionReport:
    """The retention report for what a ``generate`` call keeps: its cache and its last logits."""
    return explain(gen.cache, gen.logits, model=model, tracer=tracer)


def measure_grid(source: Source, loaders: Iterable[str] = ("trainable",), caches: Iterable[str | None] = ("concat",),
                 tokens: int = 256, **kwargs: Any) -> tuple[pd.DataFrame, dict[tuple[str, str], DecodeRun]]:
    """:func:`measure_decode` for every loader x cache: a table with one row per run, and the runs
    themselves keyed by ``(loader, cache)``."""
    runs: dict[tuple[str, str], DecodeRun] = {}
    for loader in loaders:
        for cache in caches:
            run = measure_decode(source, loader, cache, tokens, **kwargs)
            runs[(loader, run.cache)] = run
    return pd.DataFrame([r.row() for r in runs.values()]), runs


def expected_vs_measured(runs: Iterable[DecodeRun]) -> pd.DataFrame:
    """What the loop should hold (weights + KV cache, from the config) against what it holds (measured
    weights + tensors still alive after decoding), one row per run, in MiB."""
    rows = []
    for r in runs:
        expected = r.weights_expected + r.kv_expected
        measured = r.weights_bytes + r.end_bytes
        rows.append({"loader": r.loader, "cache": r.cache, "weights, analytic": r.weights_expected / MiB,
                     "weights, measured": r.weights_bytes / MiB, "KV cache, analytic": r.kv_expected / MiB,
                     "expected total": expected / MiB, "measured total": measured / MiB,
                     "measured / expected": measured / expected})
    return pd.DataFrame(rows)


def live_table(runs: Iterable[DecodeRun], label: str = "loader") -> pd.DataFrame:
    """Live MiB after each generated token, one column per run (named by ``label``: an attribute such
    as ``"loader"`` or ``"cache"``), indexed by tokens generated: ready for ``.plot()``."""
    columns = {str(getattr(r, label)): r.timeline.set_index("tokens")["live_bytes"] / MiB for r in runs}
    table = pd.DataFrame(columns)
    table.index.name = "tokens generated"
    return table


def inspect_loaders(source: Source, loaders: Iterable[str], device: str | torch.device = "cpu") -> pd.DataFrame:
    """What each loader hands back, before any decoding: parameters requiring grad, train/eval mode,
    weight bytes and the dtype of the attention projections."""
    directory = checkpoint(source)
    rows = []
    for loader in loaders:
        model = load_model(directory, loader, device=device)
        params = list(model.parameters())
        q_proj = model.model.layers[0].self_attn.q_proj.weight
        rows.append({"loader": loader, "parameters": len(params),
                     "requiring grad": sum(p.requires_grad for p in params),
                     "training mode": model.training, "weights MiB": model_bytes(model) / MiB,
                     "q_proj dtype": str(q_proj.dtype).removeprefix("torch."),
                     "q_proj is a Parameter": isinstance(q_proj, nn.Parameter)})
        del model, params, q_proj
        cleanup(device)
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------------------------- speed
def time_decode(source: Source, loader: str = "trainable", cache: str | None = "concat", tokens: int = 256, *,
                device: str | torch.device = "cpu", prompt_len: int = 1, seed: int = 0) -> pd.DataFrame:
    """Seconds per generated token, untraced: ``step, tokens, position`` (sequence length the step
    processed without a cache, the cache length with one) ``, seconds``. A short warm-up run first."""
    device = torch.device(device)
    model = load_model(checkpoint(source, seed=seed), loader, device=device)
    prompt = torch.ones((1, prompt_len), dtype=torch.long, device=device)
    max_tokens = prompt_len + tokens
    generate(model, prompt, min(8, tokens), cache=_new_cache(cache, model.config, max_tokens, device))  # warm-up
    cleanup(device)
    stamps: list[float] = []

    def stamp(step: Any) -> None:
        sync(device)
        stamps.append(time.perf_counter())

    sync(device)
    start = time.perf_counter()
    generate(model, prompt, tokens, cache=_new_cache(cache, model.config, max_tokens, device), on_step=stamp)
    del model
    cleanup(device)
    seconds = pd.Series([start, *stamps]).diff().dropna().to_numpy()
    steps = range(tokens)
    return pd.DataFrame({"step": steps, "tokens": [s + 1 for s in steps],
                         "position": [prompt_len + s for s in steps], "seconds": seconds})


# --------------------------------------------------------------------------------------------- RSS
_RSS_CHILD = """
import json, torch
torch.set_num_threads({threads})
from .runs import _rss_child
print(json.dumps(_rss_child({args!r})))
"""


def _rss_child(args: dict[str, Any]) -> dict[str, Any]:
    """Runs in the child process of :func:`rss_decode`: one untraced decode under memory_profiler."""
    from kvlab.memory.rss import rss_timeline

    device = torch.device(args["device"])
    model = load_model(args["directory"], args["loader"], device=device)
    prompt = torch.ones((1, args["prompt_len"]), dtype=torch.long, device=device)
    kv_cache = _new_cache(args["cache"], model.config, args["prompt_len"] + args["tokens"], device)
    generate(model, prompt, 2, cache=_new_cache(args["cache"], model.config, 8, device))  # warm-up: kernels, pools
    gc.collect()
    timeline = rss_timeline(lambda mark: generate(model, prompt, args["tokens"], cache=kv_cache, on_step=mark),
                            interval=args["interval"])
    return {"samples": timeline.samples.to_dict(orient="list"), "steps": timeline.steps.to_dict(orient="list"),
            "baseline_bytes": timeline.baseline_bytes}


def rss_decode(source: Source, loader: str = "trainable", cache: str | None = "concat", tokens: int = 256, *,
               device: str | torch.device = "cpu", prompt_len: int = 1, malloc: str = "default",
               interval: float = 0.01, threads: int | None = None, seed: int = 0) -> RSSTimeline:
    """RSS over one untraced decode run in a fresh Python process (a clean baseline, and allocator
    settings that only a new process reads), sampled by memory_profiler.

    ``malloc="default"``: glibc as a user runs it; ``"honest"``: a fixed mmap threshold, so large
    freed tensors go back to the OS and RSS follows the live tensors (:func:`kvlab.memory.rss.honest_malloc_env`).
    """
    if malloc not in ("default", "honest"):
        raise ValueError(f"malloc must be 'default' or 'honest', got {malloc!r}")
    env = dict(os.environ)
    for name in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_ARENA_MAX"):
        env.pop(name, None)
    if malloc == "honest":
        env = honest_malloc_env(env)
    args = dict(directory=str(checkpoint(source, seed=seed)), loader=loader, cache=cache, tokens=tokens,
                device=str(device), prompt_len=prompt_len, interval=interval)
    code = _RSS_CHILD.format(threads=threads or torch.get_num_threads(), args=args)
    out = run_python(code, env=env)
    return RSSTimeline(samples=pd.DataFrame(out["samples"]), steps=pd.DataFrame(out["steps"]), result=None,
                       baseline_bytes=int(out["baseline_bytes"]))


# --------------------------------------------------------------------------------------------- transformers
def hf_available() -> bool:
    """Whether transformers (a test/benchmark extra of kvlab) can be imported."""
    try:
        importlib.import_module("transformers")
    except ImportError:
        return False
    return True


@dataclass
class HFRun:
    """A transformers decode run: the tracer's tables, the retention report, the generated tokens."""

    grad: bool
    tokens: int
    timeline: pd.DataFrame
    by_site: pd.DataFrame
    end_bytes: int
    kv_bytes: int  # the DynamicCache's K/V tensors at the end
    retention: RetentionReport
    generated: Tensor
    params_requiring_grad: int
    params_total: int
    model_class: str
    attn_implementation: str

    def live_at(self, tokens: int) -> int:
        return int(self.timeline.loc[self.timeline["tokens"] == tokens, "live_bytes"].iloc[0])

    @property
    def growth_ratio(self) -> float:
        return self.live_at(self.tokens) / max(self.live_at(self.tokens // 2), 1)


def hf_decode(source: Source, tokens: int = 256, *, grad: bool = True, device: str | torch.device = "cpu",
              prompt_len: int = 1, seed: int = 0) -> HFRun:
    """Greedy decoding with transformers' ``MistralForCausalLM`` (eager attention) over the weights of
    ``source``, loaded with ``load_state_dict`` into a model built from the same config.

    The loop is hand-written (forward, argmax, feed back) with a ``DynamicCache``, as a server would
    drive the model; ``grad=True`` leaves grad mode on, as an ordinary loop does, ``False`` runs it
    under ``torch.no_grad()``. Parameters keep transformers' default ``requires_grad=True``.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers

    from kvlab.checkpoint import load_state_dict
    from kvlab.experiments.suites import _hf_cache_kw, hf_model

    device = torch.device(device)
    config, state = load_state_dict(checkpoint(source, seed=seed))
    model = hf_model(config, {k: v.to(device) for k, v in state.items()}, device, "eager")
    del state
    params = list(model.parameters())
    ids = torch.ones((1, prompt_len), dtype=torch.long, device=device)
    positions = torch.arange(prompt_len, device=device)
    cache = transformers.DynamicCache(config=model.config)
    cache_kw = _hf_cache_kw(model)  # "past_key_values", or "cache" in newer transformers
    out: list[Tensor] = []
    cleanup(device)
    with MemoryTracer(device=device.type) as tracer, torch.set_grad_enabled(grad):
        for index in range(tokens):
            logits = model(input_ids=ids, **{cache_kw: cache}, use_cache=True, position_ids=positions[None],
                           logits_to_keep=1).logits[:, -1]  # (B, V)
            ids = logits.argmax(dim=-1, keepdim=True)  # (B, 1)
            positions = positions[-1:] + 1
            out.append(ids)
            tracer.mark_step(index)
    report = explain(cache, logits, model=model, tracer=tracer)
    timeline = tracer.timeline()
    timeline.insert(1, "tokens", timeline["step"] + 1)
    kv = sum(t.untyped_storage().nbytes() for layer in cache.layers for t in (layer.keys, layer.values))
    run = HFRun(grad=grad, tokens=tokens, timeline=timeline, by_site=tracer.by_site(), end_bytes=tracer.end_bytes,
                kv_bytes=int(kv), retention=report, generated=torch.cat(out, dim=1).cpu(),
                params_requiring_grad=sum(p.requires_grad for p in params), params_total=len(params),
                model_class=f"{type(model).__module__}.{type(model).__name__}",
                attn_implementation=model.config._attn_implementation)
    del model, params, cache, logits, tracer, out
    cleanup(device)
    return run

