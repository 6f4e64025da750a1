"""Real-scale experiments: the leak, the fix and the fast path at the Mistral-7B shape on one GPU.

``python -m kvlab.experiments --preset mistral-7b --device cuda --out DIR`` builds the model with
seeded random weights drawn directly on the device (values don't matter for memory or speed), then runs
the suites named by ``--suites``:

- ``bandwidth``: device-to-device copy bandwidth, the denominator of the decode roofline.
- ``parity``: max |logit difference| against transformers on the same weights, per dtype.
- ``compare``: eager kvlab decode (frozen weights) with every cache, timed token by token.
- ``fast``: the compiled decode path of :mod:`kvlab.fastpath`; tokens/s against the roofline.
- ``hf``: transformers' ``MistralForCausalLM`` over the *same* weight tensors: decode
  speed and peak memory with ``DynamicCache``/``StaticCache`` (hand-written loop and ``generate``), and
  its own leak when driven with grad enabled.
- ``hf-compile``: transformers' compiled static-cache ``generate``.
- ``leak``: decode until OOM or a token cap for each dtype × loader × cache (``--runs`` or the grid).
- ``incident``: traced runs at the incident's length (~140 tokens): live bytes by site.

Every decode step of every run is one row of ``steps.csv`` (memory, peak since the previous step, time,
and with ``--trace`` the exact live bytes by :mod:`kvlab.memory.regions` region); ``runs.csv`` has one row per
run; ``meta.json`` holds the environment, the command, the config and the suite-level results. All
three are rewritten after every run, so an interrupted session still leaves its data. An out-of-memory
error ends that run only: the step is recorded, memory is freed, the next run starts.

On a CPU the same entry point runs at small scale (``--preset tiny --device cpu --tokens 64``); CUDA's
allocator counters are then empty and ``live_bytes`` (always traced on CPU) is the memory measure.

``--summarize DIR [DIR ...] --out OUT`` runs nothing: it reads result folders and sets them against the
analytic model of :mod:`kvlab.study.memmodel` (``leak_vs_model.csv``, ``incident_by_site.csv``, ``summary.json``).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import gc
import inspect
import json
import math
import platform
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from kvlab.caches import KVCache, kv_bytes, make_cache
from kvlab.checkpoint import random_state_dict
from kvlab.config import DTYPES, MistralConfig, preset
from kvlab.fastpath import FastDecoder, sync
from kvlab.generate import generate
from kvlab.loaders import model_for_loader

OOM = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)
GiB = 1024 ** 3
LOADERS = ("trainable", "inference", "int8")
CACHES = ("concat", "static", "gqa")
SUITES = ("bandwidth", "parity", "compare", "hf", "fast", "hf-compile", "leak", "incident")  # run in this order
# The incident's own figures (mistral.rs issue #49/#134, Candle #2070; CPU, ~100-word story).
INCIDENT = {"unquantized_total_GB": 6.0, "quantized_total_GB": 0.1, "repeat_kv_GB": 5.0, "concat_GB": 2.0}


# ----------------------------------------------------------------------------- weights and models
def tensor_bytes(tensors: Any) -> int:
    """Bytes of the distinct storages behind ``tensors`` (shared weights counted once)."""
    seen: dict[int, int] = {}
    for t in tensors:
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def model_bytes(model: nn.Module) -> int:
    return tensor_bytes([*model.parameters(), *model.buffers()])


def kv_nbytes(cache: KVCache | None) -> int:
    if cache is None:
        return 0
    nbytes = cache.nbytes
    return int(nbytes() if callable(nbytes) else nbytes)


def cache_impl(cache: KVCache | None) -> str:
    if cache is None:
        return "none"
    grouped = "grouped" if getattr(cache, "grouped", False) else "repeat_kv"
    return f"{type(cache).__module__}.{type(cache).__qualname__}({grouped})"


# ----------------------------------------------------------------------------- exact live bytes by site
def make_tracer(device: torch.device) -> Any:
    """kvlab's exact tracer: live tensor bytes by :mod:`kvlab.memory.regions` region (foreign code: by Python frame)."""
    from kvlab.memory.trace import MemoryTracer

    return MemoryTracer(device=device.type, frames=True)


def per_step_sites(tracer: Any) -> dict[int, dict[str, int]]:
    """``{step: {"live_bytes": .., "live_peak_bytes": .., "live_<site>": ..}}`` from a stopped tracer."""
    out: dict[int, dict[str, int]] = {}
    for row in tracer.timeline().itertuples():
        out[int(row.step)] = {"live_bytes": int(row.live_bytes), "live_peak_bytes": int(row.peak_bytes)}
    for row in tracer.site_table().itertuples():
        out.setdefault(int(row.step), {})[f"live_{row.site}"] = int(row.live_bytes)
    return out


# ----------------------------------------------------------------------------- device helpers
def allocated(device: torch.device) -> float:
    return float(torch.cuda.memory_allocated(device)) if device.type == "cuda" else math.nan


def cleanup(device: str | torch.device = "cpu") -> None:
    """Collect garbage between runs; on CUDA also return cached blocks and reset the peak counter."""
    gc.collect()
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def measure_bandwidth(device: torch.device, nbytes: int = 4 * GiB, repeats: int = 20) -> dict[str, float]:
    """Device-to-device copy of ``nbytes``; bandwidth counts bytes read plus bytes written."""
    if device.type != "cuda":
        return {}
    n = nbytes // 2
    src = torch.empty(n, dtype=torch.bfloat16, device=device).normal_()
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(repeats):
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    times.sort()
    median = times[len(times) // 2]
    del src, dst
    cleanup(device)
    return {"copy_bytes": float(2 * n * 2), "copy_median_s": median, "bandwidth_Bps": 2 * n * 2 / median,
            "bandwidth_best_Bps": 2 * n * 2 / times[0]}


# ----------------------------------------------------------------------------- recording
@dataclass
class Recorder:
    """Accumulates per-step rows, per-run rows and metadata; rewrites the files after every run."""

    out: Path
    meta: dict[str, Any]
    steps: list[dict[str, Any]] = field(default_factory=list)
    runs: list[dict[str, Any]] = field(default_factory=list)

    def flush(self) -> None:
        import pandas as pd

        self.out.mkdir(parents=True, exist_ok=True)
        if self.steps:
            frame = pd.DataFrame(self.steps)
            site_cols = sorted(c for c in frame.columns if c.startswith("live_") and c not in STEP_COLUMNS)
            first = [c for c in STEP_COLUMNS if c in frame.columns]
            frame = frame[first + site_cols + [c for c in frame.columns if c not in first and c not in site_cols]]
            frame.to_csv(self.out / "steps.csv", index=False)
        if self.runs:
            pd.DataFrame(self.runs).to_csv(self.out / "runs.csv", index=False)
        self.meta["updated"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
        (self.out / "meta.json").write_text(json.dumps(self.meta, indent=2, default=_json_default) + "\n")


def _json_default(value: Any) -> Any:
    if isinstance(value, (torch.dtype, torch.device, Path)):
        return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return repr(value)


STEP_COLUMNS = ["run_id", "suite", "impl", "loader", "cache", "dtype", "traced", "step", "generated", "cache_len",
                "step_s", "cuda_allocated", "cuda_peak_step", "beyond_start_bytes", "kv_bytes", "live_bytes", "live_peak_bytes",
                "event"]


@dataclass
class RunSpec:
    suite: str
    loader: str
    cache: str
    dtype: str
    tokens: int
    trace: bool = False
    impl: str = "kvlab"
    note: str = ""

    @property
    def run_id(self) -> str:
        return f"{self.suite}:{self.impl}:{self.dtype}:{self.loader}:{self.cache}:{self.tokens}" + (":traced" if self.trace else "")


class StopRun(Exception):
    """Raised from a step callback to end a run early (time cap)."""


class StepProbe:
    """The per-step measurement shared by kvlab and transformers runs.

    Call :meth:`begin` just before the run's first allocation of its own (the cache), then
    :meth:`step` after every token: it synchronises, records memory (allocated; peak since the previous
    step, then resets the peak), the step's wall time and, when tracing, live bytes by site.
    """

    def __init__(self, rec: Recorder, spec: RunSpec, device: torch.device, prompt_len: int,
                 tracer: Any, deadline: float | None, kv_bytes: Callable[[], int] | None = None) -> None:
        self.rec, self.spec, self.device, self.prompt_len = rec, spec, device, prompt_len
        self.tracer, self.deadline, self.kv_bytes = tracer, deadline, kv_bytes
        self.rows: list[dict[str, Any]] = []
        self.start_bytes = math.nan
        self.last = 0.0

    def begin(self) -> None:
        sync(self.device)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        self.start_bytes = allocated(self.device)
        self.last = time.perf_counter()

    def merge_trace(self) -> None:
        """Copy a stopped tracer's per-step live bytes (total and by site) into the rows."""
        if self.tracer is None:
            return
        by_step = per_step_sites(self.tracer)
        for row in self.rows:
            row.update(by_step.get(row["step"], {}))
            if self.device.type != "cuda" and "live_bytes" in row:
                row["beyond_start_bytes"] = row["live_bytes"]

    def step(self, index: int) -> None:
        sync(self.device)
        now = time.perf_counter()
        row: dict[str, Any] = {
            "run_id": self.spec.run_id, "suite": self.spec.suite, "impl": self.spec.impl, "loader": self.spec.loader,
            "cache": self.spec.cache, "dtype": self.spec.dtype, "traced": self.tracer is not None, "step": index,
            "generated": index + 1, "cache_len": self.prompt_len + index, "step_s": now - self.last,
            "event": "prefill" if index == 0 else "",
        }
        if self.device.type == "cuda":
            row["cuda_allocated"] = torch.cuda.memory_allocated(self.device)
            row["cuda_peak_step"] = torch.cuda.max_memory_allocated(self.device)
            row["beyond_start_bytes"] = row["cuda_allocated"] - self.start_bytes
            torch.cuda.reset_peak_memory_stats(self.device)
        if self.kv_bytes is not None:
            row["kv_bytes"] = self.kv_bytes()
        if self.tracer is not None:
            self.tracer.mark_step(index)
        self.rows.append(row)
        self.last = time.perf_counter()
        if self.deadline is not None and self.last > self.deadline:
            raise StopRun(f"time cap reached after {index + 1} tokens")


def _fit(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Growth of memory beyond the start: quadratic fit and log-log slope over the second half."""
    import numpy as np

    pts = [(r["generated"], r["beyond_start_bytes"]) for r in rows
           if r.get("beyond_start_bytes") is not None and not _isnan(r.get("beyond_start_bytes")) and r["step"] > 0]
    if len(pts) < 8:
        return {}
    n = np.array([p[0] for p in pts], dtype=float)
    b = np.array([p[1] for p in pts], dtype=float)
    c2, c1, c0 = np.polyfit(n, b, 2)
    half = n >= n.max() / 2
    out = {"fit_bytes_per_token2": float(c2), "fit_bytes_per_token": float(c1), "fit_bytes0": float(c0),
           "bytes_per_token_last": float((b[-1] - b[len(b) // 2]) / max(n[-1] - n[len(n) // 2], 1))}
    lo, hi = b[half][0], b[-1]
    if lo > 0 and hi > lo and n[half][0] > 0:
        out["loglog_slope_2nd_half"] = float(math.log(hi / lo) / math.log(n[-1] / n[half][0]))
    return out


def _isnan(value: Any) -> bool:
    return isinstance(value, float) and math.isnan(value)


def finish_run(rec: Recorder, spec: RunSpec, probe: StepProbe, status: str, detail: str, extra: dict[str, Any],
               weights: int) -> dict[str, Any]:
    rows = probe.rows
    rec.steps.extend(rows)
    decode = [r["step_s"] for r in rows if r["step"] > 0]
    peaks = [r.get("cuda_peak_step", math.nan) for r in rows]
    run = {
        "run_id": spec.run_id, "suite": spec.suite, "impl": spec.impl, "loader": spec.loader, "cache": spec.cache,
        "dtype": spec.dtype, "traced": spec.trace, "tokens_requested": spec.tokens, "tokens_done": len(rows),
        "status": status, "detail": detail, "note": spec.note, "start_bytes": probe.start_bytes, "weights_bytes": weights,
        "peak_bytes": max(peaks) if peaks and not all(_isnan(p) for p in peaks) else math.nan,
        "final_beyond_start": rows[-1].get("beyond_start_bytes", math.nan) if rows else math.nan,
        "kv_bytes_end": rows[-1].get("kv_bytes", math.nan) if rows else math.nan,
        "decode_s": sum(decode), "tok_per_s": len(decode) / sum(decode) if decode and sum(decode) > 0 else math.nan,
        "step_median_s": sorted(decode)[len(decode) // 2] if decode else math.nan,
    }
    run["tok_per_s_median"] = 1 / run["step_median_s"] if run["step_median_s"] > 0 else math.nan
    if status == "oom":
        run["oom_step"] = len(rows)
        run["oom_generated"] = len(rows) + 1
    if rows and "live_bytes" in rows[-1]:
        for key, value in rows[-1].items():
            if key.startswith("live_"):
                run[f"end_{key}"] = value
    # One step's working set: the largest step peak above the allocation before that step.
    if len(rows) > 1 and "cuda_peak_step" in rows[0]:
        transients = [rows[i]["cuda_peak_step"] - rows[i - 1]["cuda_allocated"] for i in range(1, len(rows))]
        run["step_transient_last"] = transients[-1]
        run["step_transient_max"] = max(transients)
        # A fixed run's peak should be weights + KV cache + one step's working set, nothing retained.
        kv_end = run["kv_bytes_end"]
        if not _isnan(kv_end) and not _isnan(probe.start_bytes):
            run["weights_kv_step_bytes"] = probe.start_bytes + kv_end + transients[-1]
            run["peak_over_weights_kv_step"] = run["peak_bytes"] / run["weights_kv_step_bytes"]
    run.update(_fit(rows))
    run.update(extra)
    rec.runs.append(run)
    rec.flush()
    return run


# ----------------------------------------------------------------------------- kvlab eager runs
@dataclass
class Context:
    args: argparse.Namespace
    config: MistralConfig
    device: torch.device
    rec: Recorder
    t0: float
    weights: dict[str, dict[str, Tensor]] = field(default_factory=dict)  # dtype name -> state

    def remaining(self) -> float:
        return self.args.budget_s - (time.perf_counter() - self.t0) if self.args.budget_s else math.inf

    def deadline(self, cap: float | None = None) -> float | None:
        limits = [x for x in (cap, self.remaining() - 5 if self.args.budget_s else None) if x is not None]
        return time.perf_counter() + min(limits) if limits else None

    def state(self, dtype: str) -> dict[str, Tensor]:
        if dtype not in self.weights:
            for other in list(self.weights):  # one weight set at a time: maximal headroom
                del self.weights[other]
            cleanup(self.device)
            start = time.perf_counter()
            self.weights[dtype] = random_state_dict(self.config, self.args.seed, device=self.device,
                                                    dtype=DTYPES[dtype])
            sync(self.device)
            self.rec.meta.setdefault("weights", {})[dtype] = {
                "bytes": tensor_bytes(self.weights[dtype].values()),
                "params": sum(t.numel() for t in self.weights[dtype].values()),
                "build_s": time.perf_counter() - start}
        return self.weights[dtype]

    def prompt(self, length: int | None = None) -> Tensor:
        g = torch.Generator().manual_seed(self.args.seed)
        ids = torch.randint(3, self.config.vocab_size, (1, length or self.args.prompt_len), generator=g)
        return ids.to(self.device)


def run_kvlab(ctx: Context, spec: RunSpec, run_cap_s: float | None = None) -> dict[str, Any]:
    """One eager kvlab decode with per-step probes; OOM and the time cap end it cleanly."""
    device, config = ctx.device, ctx.config.replace(torch_dtype=spec.dtype)
    if ctx.remaining() < 10:
        run = {"run_id": spec.run_id, "suite": spec.suite, "status": "skipped", "detail": "time budget"}
        ctx.rec.runs.append(run)
        ctx.rec.flush()
        return run
    model = model_for_loader(config, ctx.state(spec.dtype), spec.loader)
    weights = model_bytes(model)
    prompt = ctx.prompt()
    # On a CPU the tracer is the only memory measure, so leak-type runs are always traced there.
    tracer = make_tracer(device) if spec.trace or (device.type != "cuda" and spec.suite != "compare") else None
    cache_box: list[KVCache | None] = [None]
    probe = StepProbe(ctx.rec, spec, device, prompt.shape[1], tracer, ctx.deadline(run_cap_s),
                      kv_bytes=lambda: kv_nbytes(cache_box[0]))
    status, detail, extra = "ok", "", {}
    cleanup(device)
    try:
        probe.begin()
        with tracer if tracer is not None else contextlib.nullcontext():
            cache_box[0] = make_cache(spec.cache, config, 1, prompt.shape[1] + spec.tokens, device,
                                      DTYPES[spec.dtype])
            extra["cache_impl"] = cache_impl(cache_box[0])
            generate(model, prompt, spec.tokens, cache=cache_box[0], on_step=lambda s: probe.step(s.index))
    except OOM as exc:
        status, detail = "oom", str(exc).splitlines()[0][:200]
        if probe.rows:
            probe.rows[-1]["event"] = (probe.rows[-1]["event"] + " last-before-oom").strip()
    except StopRun as exc:
        status, detail = "capped", str(exc)
    except Exception as exc:  # a failing run must not end the session
        status, detail = "error", f"{type(exc).__name__}: {exc}"[:300]
        traceback.print_exc()
    probe.merge_trace()
    cache_box[0] = probe.tracer = None
    del model, tracer
    cleanup(device)
    extra["allocated_after_cleanup"] = allocated(device)
    extra["weights_dtype_bytes"] = ctx.rec.meta.get("weights", {}).get(spec.dtype, {}).get("bytes")
    run = finish_run(ctx.rec, spec, probe, status, detail, extra, weights)
    _say(run)
    return run


def _say(run: dict[str, Any]) -> None:
    end = run.get("final_beyond_start", math.nan)
    tqdm.write(f"{run['run_id']:<55} {run['status']:<7} tokens={run.get('tokens_done', 0):>5} "
               f"beyond_start={end / GiB if not _isnan(end) else math.nan:8.3f} GiB "
               f"tok/s={run.get('tok_per_s', math.nan):7.1f} {run.get('detail', '')[:80]}")


# ----------------------------------------------------------------------------- transformers
def hf_model(config: MistralConfig, weights: dict[str, Tensor], device: torch.device, attn: str) -> nn.Module:
    """transformers' ``MistralForCausalLM`` holding the same weight tensors (storage shared, no copy)."""
    import transformers

    fields = {k: v for k, v in config.to_dict().items() if k not in ("torch_dtype", "architectures")}
    hf_config = transformers.MistralConfig(**fields, attn_implementation=attn)
    dtype = next(iter(weights.values())).dtype
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = transformers.MistralForCausalLM(hf_config)
    finally:
        torch.set_default_dtype(default)
    state = {k: v.detach() for k, v in weights.items()}
    if config.tie_word_embeddings:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    missing = [m for m in missing if not m.endswith("inv_freq")]
    if missing or unexpected:
        raise RuntimeError(f"HF state dict mismatch: missing {missing[:5]}, unexpected {unexpected[:5]}")
    cleanup(device)
    return model.eval()


def _hf_cache_kw(model: nn.Module) -> str:
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params and "past_key_values" not in params else "past_key_values"


def _hf_takes_cache_position(model: nn.Module) -> bool:
    return "cache_position" in inspect.signature(model.model.forward).parameters


def hf_new_cache(model: nn.Module, kind: str, max_len: int) -> Any:
    import transformers

    if kind == "DynamicCache":
        try:
            return transformers.DynamicCache(config=model.config)
        except TypeError:
            return transformers.DynamicCache()
    weight = model.lm_head.weight
    try:
        return transformers.StaticCache(config=model.config, max_cache_len=max_len)
    except TypeError:
        return transformers.StaticCache(config=model.config, max_batch_size=1, max_cache_len=max_len,
                                        device=weight.device, dtype=weight.dtype)


def run_hf_loop(ctx: Context, spec: RunSpec, model: nn.Module, grad: bool) -> dict[str, Any]:
    """transformers driven by a hand-written greedy loop (its forward, our loop), probed per step."""
    device = ctx.device
    prompt = ctx.prompt()
    t = prompt.shape[1]
    tracer = make_tracer(device) if device.type != "cuda" and spec.suite == "hf-leak" else None
    probe = StepProbe(ctx.rec, spec, device, t, tracer, ctx.deadline())
    status, detail, extra = "ok", "", {"hf_attn": model.config._attn_implementation}
    key, with_position = _hf_cache_kw(model), _hf_takes_cache_position(model)
    weights = model_bytes(model)
    cache = None
    model.requires_grad_(grad)
    try:
        probe.begin()
        cache = hf_new_cache(model, spec.cache, t + spec.tokens)
        extra["cache_impl"] = f"{type(cache).__module__}.{type(cache).__qualname__}"
        with contextlib.nullcontext() if grad else torch.no_grad(), tracer or contextlib.nullcontext():
            ids, pos = prompt, torch.arange(t, device=device)
            for index in range(spec.tokens):
                kwargs = {key: cache, "use_cache": True, "position_ids": pos[None], "logits_to_keep": 1}
                if with_position:
                    kwargs["cache_position"] = pos
                logits = model(input_ids=ids, **kwargs).logits[:, -1]
                ids = logits.argmax(dim=-1, keepdim=True)
                pos = pos[-1:] + 1
                probe.step(index)
        del logits
    except OOM as exc:
        status, detail = "oom", str(exc).splitlines()[0][:200]
    except StopRun as exc:
        status, detail = "capped", str(exc)
    except Exception as exc:
        status, detail = "error", f"{type(exc).__name__}: {exc}"[:300]
        traceback.print_exc()
    probe.merge_trace()
    cache = tracer = probe.tracer = None
    model.requires_grad_(False)
    cleanup(device)
    run = finish_run(ctx.rec, spec, probe, status, detail, extra, weights)
    _say(run)
    return run


def hf_generate_speed(ctx: Context, model: nn.Module, tokens: int, cache_implementation: str | None,
                      repeats: int = 2) -> dict[str, Any]:
    """Tokens/s of transformers' own ``generate`` (the first call compiles a static cache; timed: the last)."""
    import transformers

    device = ctx.device
    prompt = ctx.prompt()
    config = transformers.GenerationConfig(max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False,
                                           eos_token_id=None, pad_token_id=0,
                                           cache_implementation=cache_implementation)
    times, result = [], {"cache_implementation": cache_implementation or "dynamic", "tokens": tokens}
    try:
        with torch.no_grad():
            for _ in range(repeats):
                cleanup(device)
                sync(device)
                start = time.perf_counter()
                out = model.generate(prompt, generation_config=config)
                sync(device)
                times.append(time.perf_counter() - start)
                result["peak_bytes"] = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
        result.update(first_call_s=times[0], timed_s=times[-1], new_tokens=int(out.shape[1] - prompt.shape[1]),
                      tok_per_s=(out.shape[1] - prompt.shape[1]) / times[-1], status="ok")
    except Exception as exc:
        result.update(status="error", detail=f"{type(exc).__name__}: {exc}"[:300], times=times)
        traceback.print_exc()
    cleanup(device)
    tqdm.write(f"hf generate {result['cache_implementation']:<8} {result.get('status')} "
               f"tok/s={result.get('tok_per_s', math.nan):7.1f} first call {result.get('first_call_s', math.nan):.1f} s")
    return result


def logit_parity(ctx: Context, dtype: str, attn: str) -> dict[str, Any]:
    config = ctx.config.replace(torch_dtype=dtype)
    weights = ctx.state(dtype)
    ours, theirs = model_for_loader(config, weights, "inference"), hf_model(config, weights, ctx.device, attn)
    ids = ctx.prompt(ctx.args.parity_len)
    with torch.no_grad():
        a, b = ours(ids).float(), theirs(input_ids=ids).logits.float()
    diff = (a - b).abs()
    result = {"dtype": dtype, "hf_attn": attn, "prompt_tokens": ids.shape[1], "max_abs_logit_diff": diff.max().item(),
              "mean_abs_logit_diff": diff.mean().item(), "max_abs_logit": b.abs().max().item(),
              "argmax_agreement": (a.argmax(-1) == b.argmax(-1)).float().mean().item()}
    del ours, theirs, a, b, diff
    cleanup(ctx.device)
    tqdm.write(f"parity {dtype} {attn}: max |dlogit| = {result['max_abs_logit_diff']:.3g} "
               f"(max |logit| {result['max_abs_logit']:.3g}), argmax agreement {result['argmax_agreement']:.3f}")
    return result


# ----------------------------------------------------------------------------- suites
def suite_bandwidth(ctx: Context) -> None:
    ctx.rec.meta["bandwidth"] = measure_bandwidth(ctx.device, int(ctx.args.copy_gib * GiB))
    ctx.rec.flush()


def suite_compare(ctx: Context) -> None:
    """Eager kvlab (frozen weights) with each cache: the speed/peak side of the HF comparison."""
    for cache in ctx.args.caches:
        run_kvlab(ctx, RunSpec("compare", "inference", cache, ctx.args.dtypes[0], ctx.args.speed_tokens))


def suite_fast(ctx: Context) -> None:
    """The compiled decode path; tokens/s against the copy-bandwidth roofline."""
    args, device = ctx.args, ctx.device
    dtype = args.dtypes[0]
    config = ctx.config.replace(torch_dtype=dtype)
    weights = ctx.state(dtype)
    prompt = ctx.prompt()
    new = args.speed_tokens
    results = ctx.rec.meta.setdefault("fast", {})
    compile_on = device.type == "cuda" if args.compile is None else args.compile
    for grouped in args.fast_variants:
        label = "gqa" if grouped else "static"
        if ctx.remaining() < (240 if compile_on else 20):
            results[label] = {"status": "skipped", "detail": "time budget"}
            continue
        model = model_for_loader(config, weights, "inference")
        cleanup(device)
        result: dict[str, Any] = {"grouped": grouped, "compiled": compile_on, "prompt_tokens": prompt.shape[1],
                                  "new_tokens": new, "max_tokens": prompt.shape[1] + new + args.static_slack}
        try:
            decoder = FastDecoder(model, result["max_tokens"], grouped=grouped, compile=compile_on,
                                  backend=args.compile_backend)
            timing = decoder.generate(prompt, new, warmup=args.warmup if compile_on else 0)
            again = decoder.generate(prompt, new)  # a second timed pass: the spread between the two is noise
            result.update(status="ok", compile_s=timing.compile_seconds, decode_steps=timing.decode_steps,
                          tok_per_s=max(timing.tokens_per_s, again.tokens_per_s),
                          tok_per_s_runs=[timing.tokens_per_s, again.tokens_per_s],
                          kv_buffer_bytes=decoder.cache.nbytes, weights_bytes=model_bytes(model),
                          peak_bytes=torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
                          same_tokens_both_runs=bool(torch.equal(timing.tokens, again.tokens)))
            # Same computation as the eager loop? Greedy tokens of the compiled path vs eager with the same cache.
            eager = FastDecoder(model, result["max_tokens"], grouped=grouped, compile=False)
            eager_tokens = eager.generate(prompt, min(new, 64)).tokens
            n = eager_tokens.shape[1]
            agree = (eager_tokens[0] == timing.tokens[0, :n]).long()
            result["tokens_equal_eager_prefix"] = int(agree.cumprod(0).sum().item())
            result["tokens_compared"] = n
            del decoder, eager
        except Exception as exc:
            result.update(status="error", detail=f"{type(exc).__name__}: {exc}"[:500])
            traceback.print_exc()
        del model
        if compile_on:
            torch._dynamo.reset()
        cleanup(device)
        results[label] = result
        tqdm.write(f"fast {label}: {result.get('status')} tok/s={result.get('tok_per_s', math.nan):.1f} "
                   f"compile {result.get('compile_s', math.nan):.1f} s")
        ctx.rec.flush()
    summarize_speed(ctx)


def summarize_speed(ctx: Context) -> None:
    """Roofline and ratios from whatever speed results exist so far."""
    meta = ctx.rec.meta
    bw = meta.get("bandwidth", {}).get("bandwidth_Bps")
    dtype = ctx.args.dtypes[0]
    wbytes = meta.get("weights", {}).get(dtype, {}).get("bytes")
    summary: dict[str, Any] = {}
    kvlab_paths = {f"kvlab fast {k}": v["tok_per_s"] for k, v in meta.get("fast", {}).items() if v.get("status") == "ok"}
    for run in ctx.rec.runs:
        if run.get("suite") == "compare" and run.get("status") == "ok":
            kvlab_paths[f"kvlab eager {run['cache']}"] = run["tok_per_s"]
    hf_paths = {}
    for run in ctx.rec.runs:
        if run.get("suite") == "hf" and run.get("status") == "ok" and run.get("loader") == "hf-nograd":
            hf_paths[f"hf loop {run['cache']}"] = run["tok_per_s"]
    for name, res in meta.get("hf_generate", {}).items():
        if res.get("status") == "ok":
            hf_paths[f"hf generate {name}"] = res["tok_per_s"]
    summary["kvlab_tok_per_s"], summary["hf_tok_per_s"] = kvlab_paths, hf_paths
    if kvlab_paths:
        best = max(kvlab_paths, key=kvlab_paths.get)
        summary["kvlab_best"] = {"path": best, "tok_per_s": kvlab_paths[best]}
    if hf_paths:
        best = max(hf_paths, key=hf_paths.get)
        summary["hf_best"] = {"path": best, "tok_per_s": hf_paths[best]}
    if kvlab_paths and hf_paths:
        summary["kvlab_best_over_hf_best"] = summary["kvlab_best"]["tok_per_s"] / summary["hf_best"]["tok_per_s"]
    if bw and wbytes:
        tokens = ctx.args.prompt_len + ctx.args.speed_tokens / 2  # mean cache length while timing
        kv_per_token = kv_bytes(ctx.config, 1, 1, DTYPES[dtype])
        summary["roofline_weights_only_tok_per_s"] = bw / wbytes
        summary["roofline_with_kv_tok_per_s"] = bw / (wbytes + kv_per_token * tokens)
        if kvlab_paths:
            summary["kvlab_best_roofline_fraction"] = summary["kvlab_best"]["tok_per_s"] / summary["roofline_weights_only_tok_per_s"]
        if hf_paths:
            summary["hf_best_roofline_fraction"] = summary["hf_best"]["tok_per_s"] / summary["roofline_weights_only_tok_per_s"]
    meta["speed_summary"] = summary
    ctx.rec.flush()


def suite_hf(ctx: Context) -> None:
    args, device = ctx.args, ctx.device
    dtype = args.dtypes[0]
    config = ctx.config.replace(torch_dtype=dtype)
    meta = ctx.rec.meta
    model = hf_model(config, ctx.state(dtype), device, args.hf_attn)
    for kind in ("DynamicCache", "StaticCache"):
        run_hf_loop(ctx, RunSpec("hf", "hf-nograd", kind, dtype, args.speed_tokens, impl="hf"), model, grad=False)
    gen = meta.setdefault("hf_generate", {})
    if args.hf_generate:
        gen["dynamic"] = hf_generate_speed(ctx, model, args.speed_tokens, None)
    # transformers' own leak: its forward, grad enabled, trainable parameters, a hand-written loop.
    for grad in (True, False):
        name = "hf-grad" if grad else "hf-nograd"
        run_hf_loop(ctx, RunSpec("hf-leak", name, "DynamicCache", dtype, args.hf_leak_tokens, impl="hf"), model, grad)
    leak = {}
    for run_rows in _rows_by_run(ctx.rec.steps, "hf-leak"):
        name = run_rows[0]["loader"]
        leak[name] = {str(n): _beyond_at(run_rows, n) for n in args.hf_leak_points}
    meta["hf_leak_GiB_beyond_start"] = leak
    del model
    cleanup(device)
    summarize_speed(ctx)


def suite_parity(ctx: Context) -> None:
    """Max |logit difference| between kvlab and transformers on the same weights, per dtype and attention."""
    results = ctx.rec.meta.setdefault("hf_parity", [])
    for dtype in ctx.args.dtypes:
        for attn in ctx.args.hf_attn_parity:
            try:
                results.append(logit_parity(ctx, dtype, attn))
            except Exception as exc:
                results.append({"dtype": dtype, "hf_attn": attn, "status": "error",
                                "detail": f"{type(exc).__name__}: {exc}"[:300]})
                traceback.print_exc()
            ctx.rec.flush()


def suite_hf_compile(ctx: Context) -> None:
    if ctx.remaining() < 150:
        ctx.rec.meta.setdefault("hf_generate", {})["static"] = {"status": "skipped", "detail": "time budget"}
        return
    dtype = ctx.args.dtypes[0]
    model = hf_model(ctx.config.replace(torch_dtype=dtype), ctx.state(dtype), ctx.device, ctx.args.hf_attn)
    ctx.rec.meta.setdefault("hf_generate", {})["static"] = hf_generate_speed(ctx, model, ctx.args.speed_tokens, "static")
    del model
    torch._dynamo.reset()
    cleanup(ctx.device)
    summarize_speed(ctx)


def _rows_by_run(rows: list[dict[str, Any]], suite: str) -> list[list[dict[str, Any]]]:
    groups: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        if row["suite"] == suite:
            groups.setdefault(row["run_id"], []).append(row)
    return list(groups.values())


def _beyond_at(rows: list[dict[str, Any]], generated: int) -> float | None:
    for row in rows:
        if row["generated"] == generated:
            value = row.get("beyond_start_bytes")
            return None if value is None or _isnan(value) else value / GiB
    return None


def parse_runs(specs: list[str], default_tokens: int, suite: str) -> list[RunSpec]:
    """``dtype:loader:cache[:tokens]`` strings, e.g. ``bfloat16:trainable:concat:2048``."""
    out = []
    for text in specs:
        parts = text.split(":")
        if len(parts) not in (3, 4):
            raise SystemExit(f"--runs entry {text!r}: expected dtype:loader:cache[:tokens]")
        dtype, loader, cache = parts[:3]
        if dtype not in DTYPES or loader not in LOADERS or cache not in CACHES:
            raise SystemExit(f"--runs entry {text!r}: dtype in {sorted(DTYPES)}, loader in {LOADERS}, cache in {CACHES}")
        out.append(RunSpec(suite, loader, cache, dtype, int(parts[3]) if len(parts) == 4 else default_tokens))
    return out


def suite_leak(ctx: Context) -> None:
    args = ctx.args
    if args.runs:
        specs = parse_runs(args.runs, args.tokens, "leak")
    else:
        specs = [RunSpec("leak", loader, cache, dtype, args.tokens)
                 for dtype in args.dtypes for loader in args.loaders for cache in args.caches]
    specs.sort(key=lambda s: args.dtypes.index(s.dtype) if s.dtype in args.dtypes else 99)  # one weight set at a time
    for spec in tqdm(specs, desc="leak runs", unit="run", disable=not args.progress):
        run_kvlab(ctx, spec, args.run_cap_s)


def suite_incident(ctx: Context) -> None:
    """Traced runs at the incident's length; the table of live bytes by site next to its figures."""
    args = ctx.args
    specs = parse_runs(args.incident_runs, args.incident_tokens, "incident") if args.incident_runs else [
        RunSpec("incident", loader, "concat", args.dtypes[0], args.incident_tokens) for loader in args.loaders]
    table = [{"source": "incident (mistral.rs #49/#134, CPU, ~100-word story)", "run": "unquantized",
              "total_GB": INCIDENT["unquantized_total_GB"], "repeat_kv_GB": INCIDENT["repeat_kv_GB"],
              "concat_GB": INCIDENT["concat_GB"]},
             {"source": "incident (mistral.rs #49/#134, CPU, ~100-word story)", "run": "quantized",
              "total_GB": INCIDENT["quantized_total_GB"]}]
    for spec in specs:
        spec.trace = True
        run = run_kvlab(ctx, spec, args.run_cap_s)
        row = {"source": f"kvlab {ctx.config_name} on {ctx.rec.meta['device']['name']}", "run": spec.run_id,
               "status": run.get("status"), "tokens": run.get("tokens_done"),
               "total_GB": _gb(run.get("end_live_bytes")), "repeat_kv_GB": _gb(run.get("end_live_repeat_kv")),
               "concat_GB": _gb(run.get("end_live_cache")),
               "cuda_beyond_start_GB": _gb(run.get("final_beyond_start")) if ctx.device.type == "cuda" else None}
        row["step_peak_live_GB"] = _gb(run.get("end_live_peak_bytes"))
        for key, value in run.items():
            if key.startswith("end_live_") and key not in ("end_live_bytes", "end_live_repeat_kv", "end_live_cache",
                                                            "end_live_peak_bytes"):
                row[key.removeprefix("end_live_") + "_GB"] = _gb(value)
        table.append(row)
    import pandas as pd

    pd.DataFrame(table).to_csv(ctx.rec.out / "incident.csv", index=False)
    ctx.rec.meta["incident_table"] = table
    ctx.rec.flush()


def _gb(value: Any) -> float | None:
    return None if value is None or _isnan(value) else value / 1e9


# ----------------------------------------------------------------------------- summary against the model
def summarize(dirs: list[Path], out: Path) -> dict[str, Any]:
    """Read result folders written by :func:`main` and set them against :mod:`kvlab.study.memmodel`.

    Writes ``leak_vs_model.csv`` (measured memory beyond the start vs the analytic leak + KV cache, for
    trainable + concat runs), ``incident_by_site.csv`` (live bytes by site vs the model's leak by site)
    and ``summary.json`` (the headline numbers of every folder). Needs no GPU: rerun it any time. The
    folders are read, and set against the model, by :mod:`kvlab.study.sweeps`.
    """
    import pandas as pd

    from kvlab.study.sweeps import leak_vs_model, load_results, peak_breakdown
    from kvlab.study.memmodel import leak_by_site, weight_bytes

    leak_rows: list[dict[str, Any]] = []
    site_rows: list[dict[str, Any]] = []
    summary: dict[str, Any] = {"sources": {}, "fixed_peak_check": [], "leak_runs": []}
    for folder in dirs:
        meta = json.loads((folder / "meta.json").read_text())
        summary["sources"][folder.name] = {k: meta.get(k) for k in (
            "command", "date", "torch", "transformers", "device", "bandwidth", "weights", "hf_parity", "fast",
            "hf_generate", "speed_summary", "hf_leak_GiB_beyond_start", "suite_seconds", "suite_errors")
            if meta.get(k) is not None}
        if not (folder / "runs.csv").is_file():  # no runs recorded (e.g. bandwidth only)
            continue
        results = load_results(folder)
        config, prompt_len = results.config, meta["args"]["prompt_len"]
        for run in results.runs.to_dict("records"):
            if run.get("impl") != "kvlab" or run.get("status") not in ("ok", "oom", "capped"):
                continue
            run_id, dtype = run["run_id"], run["dtype"]
            rows = results.run_steps(run_id).set_index("generated")
            if run["loader"] == "trainable":
                summary["leak_runs"].append({k: run.get(k) for k in (
                    "run_id", "status", "tokens_done", "oom_generated", "final_beyond_start", "fit_bytes_per_token2",
                    "loglog_slope_2nd_half", "tok_per_s", "cache_impl")})
            if run["loader"] == "trainable" and run["cache"] == "concat":
                last = int(rows.index.max())
                points = sorted({n for n in (16, 32, 64, 128, 140, 256, 384, 512, 640) if n <= last} | {last})
                for row in leak_vs_model(results, run_id, tokens=points).itertuples():
                    leak_rows.append({"run_id": run_id, "dtype": dtype, "generated": row.generated,
                                      "measured_beyond_start_GiB": row.measured_bytes / GiB,
                                      "model_leak_GiB": row.predicted_leak_bytes / GiB,
                                      "model_kv_GiB": row.predicted_kv_bytes / GiB,
                                      "model_total_GiB": row.predicted_bytes / GiB, "measured_over_model": row.ratio})
                if run.get("traced") and "live_bytes" in rows.columns:
                    n = last
                    model_sites = leak_by_site(config, n, prompt_len, dtype=dtype)
                    measured_sites = {c.removeprefix("live_"): float(rows.loc[n, c]) for c in rows.columns
                                      if c.startswith("live_") and c not in ("live_bytes", "live_peak_bytes")
                                      and pd.notna(rows.loc[n, c]) and rows.loc[n, c] > 0}
                    for name in sorted(set(model_sites) | set(measured_sites)):
                        site_rows.append({"run_id": run_id, "dtype": dtype, "generated": n, "site": name,
                                          "measured_GB": measured_sites.get(name, 0.0) / 1e9,
                                          "model_leak_GB": model_sites.get(name, 0) / 1e9})
            if run["loader"] in ("inference", "int8") and run["suite"] == "leak" and pd.notna(run.get("peak_bytes")):
                check = peak_breakdown(results, run_id)
                weights = weight_bytes(config, dtype, "int8" if run["loader"] == "int8" else None)
                transient = int(check["analytic_step_bytes"])
                kv = check["kv_bytes"]
                other = check["start_bytes"] - weights  # cuBLAS workspace; for int8 also the float weights
                summary["fixed_peak_check"].append({
                    "run_id": run_id, "cache_len": int(rows["cache_len"].iloc[-1]), "peak_bytes": run["peak_bytes"],
                    "model_weights_bytes": weights, "other_at_start_bytes": other, "kv_bytes": kv,
                    "model_step_transient_bytes": transient,
                    "measured_step_transient_bytes": run.get("step_transient_max"),
                    "predicted_peak_bytes": check["predicted_peak_bytes"],
                    "peak_over_predicted": check["peak_over_predicted"],
                    # Only meaningful when nothing but the model's weights was alive at the start (the
                    # int8 runs keep the shared float weights alive beside their int8 copies).
                    "peak_over_weights_kv_transient": run["peak_bytes"] / (weights + kv + transient)
                    if other < GiB else None})
    out.mkdir(parents=True, exist_ok=True)
    if leak_rows:
        pd.DataFrame(leak_rows).to_csv(out / "leak_vs_model.csv", index=False)
    if site_rows:
        pd.DataFrame(site_rows).to_csv(out / "incident_by_site.csv", index=False)
    summary["incident_figures"] = INCIDENT
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=_json_default) + "\n")
    return summary


# ----------------------------------------------------------------------------- entry point
def environment(device: torch.device) -> dict[str, Any]:
    env: dict[str, Any] = {"torch": torch.__version__, "python": platform.python_version(),
                           "platform": platform.platform(), "device": {"type": device.type}}
    try:
        import transformers

        env["transformers"] = transformers.__version__
    except ImportError:
        env["transformers"] = None
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env["device"].update(name=props.name, total_bytes=props.total_memory,
                             multiprocessors=props.multi_processor_count, capability=f"{props.major}.{props.minor}",
                             cuda=torch.version.cuda)
    else:
        env["device"].update(name=platform.processor() or "cpu", threads=torch.get_num_threads())
    return env


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m kvlab.experiments", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    csv = lambda s: [x for x in s.split(",") if x]  # noqa: E731
    p.add_argument("--preset", default="tiny")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", type=Path, default=Path("reports/experiments"))
    p.add_argument("--suites", type=csv, default=["bandwidth", "parity", "compare", "hf", "fast", "leak", "incident"],
                   help=f"comma-separated, from {SUITES}")
    p.add_argument("--dtypes", type=csv, default=None, help="first = the dtype of speed runs (default: preset's)")
    p.add_argument("--loaders", type=csv, default=list(LOADERS))
    p.add_argument("--caches", type=csv, default=list(CACHES))
    p.add_argument("--tokens", type=int, default=64, help="token cap of leak runs")
    p.add_argument("--runs", nargs="*", default=None, help="leak runs as dtype:loader:cache[:tokens] (overrides the grid)")
    p.add_argument("--run-cap-s", type=float, default=None, help="wall-time cap of one leak run")
    p.add_argument("--budget-s", type=float, default=None, help="stop starting new work after this many seconds")
    p.add_argument("--prompt-len", type=int, default=8)
    p.add_argument("--parity-len", type=int, default=32)
    p.add_argument("--speed-tokens", type=int, default=None, help="tokens timed by compare/fast/hf (default: --tokens)")
    p.add_argument("--static-slack", type=int, default=0, help="extra static-cache slots beyond prompt + tokens")
    p.add_argument("--fast-variants", type=csv, default=["gqa"], help="fast paths: gqa (grouped) and/or static")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None, help="default: on CUDA only")
    p.add_argument("--compile-backend", default="inductor")
    p.add_argument("--warmup", type=int, default=8, help="decode calls spent compiling/capturing before timing")
    p.add_argument("--hf-attn", default="sdpa", help="transformers attention for speed/leak runs")
    p.add_argument("--hf-attn-parity", type=csv, default=["eager", "sdpa"])
    p.add_argument("--hf-generate", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--hf-leak-tokens", type=int, default=None, help="default: max of --hf-leak-points")
    p.add_argument("--hf-leak-points", type=lambda s: [int(x) for x in s.split(",")], default=[16, 32, 48, 64])
    p.add_argument("--incident-tokens", type=int, default=140)
    p.add_argument("--incident-runs", nargs="*", default=None, help="traced runs as dtype:loader:cache[:tokens]")
    p.add_argument("--trace", action="store_true", help="trace live bytes by site in leak runs too (slower)")
    p.add_argument("--copy-gib", type=float, default=4.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--summarize", type=Path, nargs="+", default=None, metavar="DIR",
                   help="no runs: read these result folders, compare with kvlab.study.memmodel, write into --out")
    return p


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parser().parse_args(argv)
    if args.summarize:
        return summarize(args.summarize, args.out)
    unknown = sorted(set(args.suites) - set(SUITES))
    if unknown:
        raise SystemExit(f"unknown suite(s) {unknown}; choose from {SUITES}")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but CUDA is not available")
    config = preset(args.preset)
    args.dtypes = args.dtypes or [config.torch_dtype]
    args.speed_tokens = args.speed_tokens or args.tokens
    args.hf_leak_tokens = args.hf_leak_tokens or max(args.hf_leak_points)
    args.fast_variants = [v == "gqa" for v in args.fast_variants]
    meta = environment(device)
    meta.update(date=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                command="python -m kvlab.experiments " + " ".join(argv if argv is not None else sys.argv[1:]),
                preset=args.preset, config=config.to_dict(),
                args={k: v for k, v in vars(args).items()}, incident_figures=INCIDENT,
                notes={"beyond_start_bytes": "allocated minus allocated before the run's cache existed "
                                             "(CUDA); live tensor bytes created during the run (CPU)",
                       "cuda_peak_step": "max_memory_allocated since the previous step (reset every step)",
                       "live_<site>": "exact bytes of tensor storages allocated in that kvlab.memory.regions region (or "
                                      "Python frame, outside regions) and alive at the step's end "
                                      "(kvlab.memory.trace.MemoryTracer)"})
    rec = Recorder(args.out, meta)
    ctx = Context(args, config, device, rec, time.perf_counter())
    ctx.config_name = args.preset  # type: ignore[attr-defined]
    rec.flush()
    order = [s for s in SUITES if s in args.suites]
    for name in order:
        if ctx.remaining() < 10:
            meta.setdefault("skipped_suites", []).append(name)
            continue
        start = time.perf_counter()
        tqdm.write(f"== suite {name} ({ctx.remaining():.0f} s left)" if args.budget_s else f"== suite {name}")
        try:
            {"bandwidth": suite_bandwidth, "parity": suite_parity, "compare": suite_compare, "fast": suite_fast, "hf": suite_hf,
             "hf-compile": suite_hf_compile, "leak": suite_leak, "incident": suite_incident}[name](ctx)
        except Exception as exc:  # record and go on with the next suite
            meta.setdefault("suite_errors", {})[name] = f"{type(exc).__name__}: {exc}"[:500]
            traceback.print_exc()
        meta.setdefault("suite_seconds", {})[name] = time.perf_counter() - start
        rec.flush()
    ctx.weights.clear()
    cleanup(device)
    meta["total_s"] = time.perf_counter() - ctx.t0
    rec.flush()
    return meta


