"""How the exact tracer counts and where it charges the bytes: frees seen when only autograd holds a
tensor, views and in-place ops counted once, the peak inside a step, sites named by the calling line, by
``record_function`` regions and by module paths in models kvlab did not write, allocations and frees in
other threads, the same accounting under inference mode, and the state it leaves behind when a loop raises.
These are the rules every figure the tracer reports rests on."""

from __future__ import annotations

import functools
import gc
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from torch import nn
from torch.profiler import record_function

from kvlab.caches import ConcatCache
from kvlab.generate import generate
from kvlab.loaders import random_model
from kvlab.memory.cuda import cuda_memory_snapshot
from kvlab.memory.trace import MemoryTracer, TracerError, TracerWarning


# --------------------------------------------------------------------------------------------- mechanism
def test_frees_are_seen_when_only_autograd_holds_the_tensor() -> None:
    w = torch.randn(64, 64, requires_grad=True)
    with MemoryTracer(frames=False) as tracer:
        x = torch.randn(32, 64)  # 8 KiB, saved by mm for w's gradient
        y = torch.tanh(x @ w)  # tanh saves its 8 KiB output too
        del x
        gc.collect()
        held = tracer.live_bytes
        del y
        gc.collect()
        released = tracer.live_bytes
    assert held == 2 * 32 * 64 * 4  # x, kept by MmBackward0 only, and y; x @ w itself was freed
    assert released == 0  # dropping y freed the graph, and with it x


def test_views_and_in_place_ops_are_not_counted_twice() -> None:
    with MemoryTracer(frames=False) as tracer:
        a = torch.zeros(1000)
        b = a.view(10, 100).t()[1:]
        a.add_(1)
        b.mul_(2)
        c = a.reshape(100, 10)
        assert tracer.live_bytes == 4000
        del a, b, c
    assert tracer.end_bytes == 0 and tracer.peak_bytes == 4000


def test_peak_inside_a_step_is_caught_and_steps_are_rows() -> None:
    with MemoryTracer(frames=False) as tracer:
        keep = []
        for step in range(3):
            scratch = torch.empty(1 << 16)  # 256 KiB, freed within the step
            keep.append(torch.empty(1 << 10) + scratch[: 1 << 10])
            del scratch
            tracer.mark_step(step)
    tl = tracer.timeline()
    assert list(tl["step"]) == [0, 1, 2]
    assert list(tl["live_bytes"]) == [4096, 8192, 12288]
    assert (tl["peak_bytes"] - tl["live_bytes"].shift(1, fill_value=0) >= (1 << 18)).all()


def allocate_here() -> torch.Tensor:
    return torch.ones(100)


def test_code_outside_regions_and_modules_is_attributed_to_the_calling_line() -> None:
    with MemoryTracer() as tracer:
        t = allocate_here()
        with record_function("named"):
            u = torch.ones(10)
    sites = tracer.by_site().set_index("site")["alive_end_bytes"]
    (frame_site,) = [s for s in sites.index if s.endswith("allocate_here")]
    assert frame_site.startswith("tests/test_memtrace.py:")
    assert sites[frame_site] == 400 and sites["named"] == 40
    del t, u


# --------------------------------------------------------------------------------------------- foreign models
class Annotated(nn.Module):
    """A hand-written block labelled the standard way (``record_function``), importing nothing of kvlab."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(16, 32, bias=False)

    def forward(self, x: torch.Tensor, cache: list[torch.Tensor]) -> torch.Tensor:
        with record_function("project"):
            h = self.proj(x)  # (4, 32) float32: 512 bytes
        with record_function("store"):
            cache.append(h.detach().clone())  # 512 bytes kept per step
        with record_function("widen"):
            wide = torch.cat(cache).repeat(1, 2)  # (4n, 32) then (4n, 64): 512n + 1024n bytes, dropped
        return wide[0, 0] + h[0, 0]


@pytest.mark.parametrize("mode", ["grad", "no_grad", "inference_mode"])
def test_record_function_regions_of_a_foreign_model_are_sites(mode: str) -> None:
    model, steps = Annotated(), 6
    context = {"grad": torch.enable_grad, "no_grad": torch.no_grad, "inference_mode": torch.inference_mode}[mode]
    cache: list[torch.Tensor] = []
    with context(), MemoryTracer(modules=None) as tracer:
        for step in range(steps):
            model(torch.ones(4, 16), cache)
            tracer.mark_step(step)
    sites = tracer.by_site().set_index("site")
    assert sites.loc["store", "alive_end_bytes"] == steps * 512 == sum(c.untyped_storage().nbytes() for c in cache)
    assert sites.loc["project", "allocated_bytes"] == steps * 512
    assert sites.loc["widen", "allocated_bytes"] == sum(1536 * n for n in range(1, steps + 1))
    assert sites.loc["widen", "alive_end_bytes"] == 0 and sites.loc["widen", "peak_bytes"] == 1536 * steps
    per_step = tracer.site_table().query("site == 'store'")["live_bytes"].tolist()
    assert per_step == [512 * n for n in range(1, steps + 1)]


def passthrough(forward):
    """A decorator as libraries put on ``forward`` (transformers does): the module runs under a wrapper."""

    @functools.wraps(forward)
    def wrapper(*args, **kwargs):
        return forward(*args, **kwargs)

    return wrapper


class Repeat4(nn.Module):
    @passthrough
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.repeat(1, 4)


class Unlabelled(nn.Module):
    """A model without a single region: allocations can only be told apart by the module that made them."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(8, 16, bias=False), Repeat4())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x) * 2


@pytest.mark.parametrize("modules", ["auto", "given"])
def test_a_model_without_regions_is_attributed_by_module_path(modules: str) -> None:
    net, x = Unlabelled(), torch.ones(4, 8)
    with torch.no_grad(), MemoryTracer(modules=[net] if modules == "given" else "auto") as tracer:
        y = net(x)
        z = x + 1  # outside every module: the Python line
    allocated = tracer.by_site().set_index("site")["allocated_bytes"]
    line = next(s for s in allocated.index if s.startswith("tests/test_memtrace.py:"))
    # Linear's output (4, 16), Repeat4's (4, 64), the root's own product (4, 64) and the line's (4, 8).
    assert allocated.to_dict() == {"body.0": 256, "body.1": 1024, "Unlabelled": 1024, line: 128}
    assert line.endswith(" test_a_model_without_regions_is_attributed_by_module_path")
    del y, z


# --------------------------------------------------------------------------------------------- threads
def test_allocations_in_threads_started_while_tracing_are_counted() -> None:
    """A dispatch mode is per thread: the tracer puts its hook on every thread started while it runs, and
    frees done by another thread (of tensors allocated here) reach the figures too."""
    kept: list[torch.Tensor] = []
    handed_over = [torch.empty(2500) for _ in range(3)]  # baseline: 10,000 bytes each

    def worker(step: int) -> None:
        with record_function("worker"):
            for _ in range(10):
                kept.append(torch.ones(1000))  # 4,000 bytes each
        kept.append(torch.ones(250))  # outside the region: this line, 1,000 bytes
        if step == 2:
            del scratch[:]  # the last reference to tensors allocated by the tracing thread

    with MemoryTracer() as tracer:
        scratch = [torch.ones(500) for _ in range(4)]  # 2,000 bytes each, freed by the worker
        for step in range(3):
            thread = threading.Thread(target=worker, args=(step,))
            thread.start()
            thread.join()
            tracer.mark_step(step)
    assert tracer.threads_traced == 3 and tracer.unseen_bytes == 0
    assert tracer.timeline()["live_bytes"].tolist() == [8000 + 41000, 8000 + 82000, 123000]
    sites = tracer.by_site().set_index("site")["alive_end_bytes"]
    (line,) = [s for s in sites.index if s.endswith(" worker") and s != "worker"]
    assert sites["worker"] == 120_000 and sites[line] == 3000 and tracer.end_bytes == 123_000
    del handed_over


def test_tensors_from_a_thread_started_before_tracing_are_reported_as_unseen() -> None:
    with ThreadPoolExecutor(1) as pool:
        pool.submit(lambda: None).result()  # the pool's thread runs before tracing starts
        with pytest.warns(TracerWarning, match="not in its figures"):
            with MemoryTracer() as tracer:
                kept = [pool.submit(torch.ones, 10_000).result() for _ in range(4)]
                mine = torch.ones(10)
    assert tracer.end_bytes == 40 and tracer.unseen_storages == 4 and tracer.unseen_bytes == 160_000
    del kept, mine


def test_inference_mode_sees_what_no_grad_sees() -> None:
    """Under inference mode, CompositeImplicitAutograd ops (reshape, matmul, linear, softmax...) reach the
    dispatch mode undecomposed; repeat_kv's copy is made inside ``reshape``. The tracer decomposes them as
    autograd would, so both modes give the same accounting, site by site and step by step."""
    x = torch.randn(1, 2, 5, 4)
    with torch.inference_mode(), MemoryTracer(frames=False) as tracer:
        y = x[:, :, None].expand(1, 2, 3, 5, 4).reshape(1, 6, 5, 4)  # repeat_kv: a real copy
        z = y.reshape(6, 20)  # a view of y: nothing new
        assert tracer.live_bytes == y.untyped_storage().nbytes() == 6 * 5 * 4 * 4
    del y, z

    model = random_model("tiny", "inference")
    runs = {}
    for inference_mode in (False, True):
        with torch.no_grad(), MemoryTracer(baseline=[model]) as tracer:
            generate(model, torch.tensor([[1]]), 12, cache=ConcatCache(4), on_step=tracer.mark_step,
                     inference_mode=inference_mode)
        runs[inference_mode] = tracer
    plain, inference = runs[False], runs[True]
    assert plain.by_site().set_index("site").loc["repeat_kv", "allocated_bytes"] > 0
    assert plain.by_site().equals(inference.by_site())
    assert plain.site_table().equals(inference.site_table())
    columns = ["step", "live_bytes", "peak_bytes", "allocated_bytes", "freed_bytes", "live_storages"]
    assert plain.timeline()[columns].equals(inference.timeline()[columns])
    assert plain.peak_bytes == inference.peak_bytes and plain.allocated_bytes == inference.allocated_bytes


def test_a_freed_baseline_address_is_counted_when_reused() -> None:
    """A baseline tensor freed while tracing gives its address back; what is allocated there is new.

    64 MiB is above glibc's largest mmap threshold, so each block is its own mapping and the kernel hands
    the address just unmapped straight back: the reuse is what happens, not a lucky heap layout."""
    n = 16 << 20  # float32 elements: 64 MiB; torch.empty does not touch the pages
    reused = 0
    for _ in range(5):
        base = torch.empty(n)  # alive before tracing: baseline
        with MemoryTracer(baseline="auto", frames=False) as tracer:
            ptr = base.untyped_storage().data_ptr()
            del base
            fresh = torch.empty(n)
            reused += fresh.untyped_storage().data_ptr() == ptr
            assert tracer.live_bytes == tracer.peak_bytes == 4 * n
        assert tracer.end_bytes == 4 * n
        del fresh
    assert reused, "the allocator never handed the freed baseline block back: nothing was tested"


# --------------------------------------------------------------------------------------------- state
def test_state_is_restored_when_the_loop_raises() -> None:
    grad_before = torch.is_grad_enabled()
    profile_before = threading.getprofile()
    with pytest.raises(ZeroDivisionError):
        with MemoryTracer():
            torch.ones(3)
            raise ZeroDivisionError
    assert torch._C._len_torch_dispatch_stack() == 0
    assert MemoryTracer._active is None
    assert torch.is_grad_enabled() == grad_before and threading.getprofile() is profile_before
    with MemoryTracer() as tracer:  # usable again
        x = torch.ones(4)
    assert tracer.end_bytes == 16
    del x


def test_two_exact_tracers_cannot_nest() -> None:
    with MemoryTracer():
        with pytest.raises(TracerError, match="nested"):
            with MemoryTracer():
                pass
    assert torch._C._len_torch_dispatch_stack() == 0


def test_cuda_snapshot_needs_a_gpu_or_always_stops_recording(tmp_path, monkeypatch) -> None:
    if not torch.cuda.is_available():
        with pytest.raises(TracerError, match="CUDA"):
            with cuda_memory_snapshot(tmp_path / "snap.html"):
                pass
    # The control flow, with the allocator's functions stubbed: recording stops even if the block raises.
    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    monkeypatch.setattr(torch.cuda.memory, "_record_memory_history",
                        lambda enabled="all", **kw: calls.append(enabled))
    monkeypatch.setattr(torch.cuda.memory, "_snapshot", lambda: {"segments": [], "device_traces": []})
    with pytest.raises(KeyError):
        with cuda_memory_snapshot(tmp_path / "snap.html") as files:
            raise KeyError("boom")
    assert calls == ["all", None]
    assert files.pickle_path.exists() and "snapshot.pickle" in files.html_path.read_text()
