"""Exact tensor-memory accounting for any PyTorch decode loop, attributed to the code that allocated it.

RSS (see :mod:`kvlab.memory.rss`) says *that* memory grows; this module says *which tensors* it is and *where*
they were allocated, to the byte. :class:`MemoryTracer` is a ``TorchDispatchMode``: it sees every aten
op's outputs, registers each storage it has not seen before, and learns of the storage's death through
a weak reference to its Python object. PyTorch keeps a storage's Python object alive for as long as the
C++ storage lives (also when only autograd's saved variables hold it), so the weak reference dies
exactly when the memory is returned to the allocator. Views, in-place ops and ``_unsafe_view`` outputs
share a storage already registered and cost nothing.

Every allocation is charged to a *site*: the innermost open :func:`kvlab.memory.regions.site` region in kvlab's
model, or, for code without regions (transformers' models, a hand-written loop), the innermost Python
frame outside PyTorch ("modeling_mistral.py:120 repeat_kv"), as a heap profiler would. Decode steps are
delimited by :meth:`MemoryTracer.mark_step`, which has the signature of ``generate``'s ``on_step``.

Tensors alive when tracing starts (the weights, typically) are the *baseline*: reported separately and
never charged to a site.

What is *not* seen: memory that is not a tensor storage (autograd's graph nodes, Python objects, the
allocator's own slack), and scratch buffers that a kernel allocates and frees internally. On CUDA the
tracer charges each storage the caching allocator's block size (a multiple of 512 bytes), which is what
``torch.cuda.memory_allocated()`` counts.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import functools
import gc
import json
import os
import pickle
import platform
import sys
import time
import weakref
from dataclasses import asdict, dataclass, is_dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import pandas as pd
import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode

from .regions import _stack as _site_stack  # read directly on the hot path: one less call per allocation

__all__ = [
    "MemoryTracer", "TracerError", "trace_memory", "caller_site", "chain_callbacks",
    "cuda_memory_snapshot", "rss_vs_exact", "save_results", "MiB", "fmt_bytes",
]

MiB = 1 << 20


def fmt_bytes(nbytes: float) -> str:
    """``"1.50 MiB"`` from one MiB up (either sign), else ``"12.0 KiB"``."""
    return f"{nbytes / MiB:.2f} MiB" if abs(nbytes) >= MiB else f"{nbytes / 1024:.1f} KiB"

UNLABELLED = "<unlabelled>"
_CUDA_BLOCK = 512  # the CUDA caching allocator rounds every block up to this many bytes


class TracerError(RuntimeError):
    """A memory tool was used in a way that cannot give a correct answer (e.g. two exact tracers at once)."""


# --------------------------------------------------------------------------------------------- sites
_TORCH_DIR = os.path.dirname(torch.__file__) + os.sep
_STDLIB_DIR = os.path.dirname(contextlib.__file__) + os.sep
# kvlab's own tooling files: never the "caller" of an allocation (kvlab.memory.retention adds itself).
TOOL_FILES: set[str] = {__file__}
_code_skip: dict[Any, str | None] = {}  # code object -> None (skip) or "dir/file.py" label prefix


def _frame_label(code: Any) -> str | None:
    label = _code_skip.get(code, "")
    if label != "":
        return label
    filename = code.co_filename
    stdlib = filename.startswith(_STDLIB_DIR) and "-packages" not in filename[len(_STDLIB_DIR):]
    if stdlib or filename.startswith(_TORCH_DIR) or filename in TOOL_FILES or filename.startswith("<frozen"):
        label = None
    else:
        parts = filename.replace("\\", "/").split("/")
        label = "/".join(parts[-2:])
    _code_skip[code] = label
    return label


def caller_site(depth: int = 1) -> str:
    """The innermost Python frame outside PyTorch and the standard library, as ``"dir/file.py:line function"``.

    This is how allocations in models without :func:`kvlab.memory.regions.site` regions are attributed: the line
    of model code that called into PyTorch. ``depth`` frames are skipped first (this function's caller).
    """
    frame = sys._getframe(depth)
    while frame is not None:
        prefix = _frame_label(frame.f_code)
        if prefix is not None:
            return f"{prefix}:{frame.f_lineno} {frame.f_code.co_name}"
        frame = frame.f_back
    return UNLABELLED


def chain_callbacks(*callbacks: Callable[[Any], Any] | None) -> Callable[[Any], None]:
    """One ``on_step`` callback that calls each given one in turn (``None`` entries are skipped)."""
    live = [cb for cb in callbacks if cb is not None]

    def on_step(step: Any) -> None:
        for cb in live:
            cb(step)

    return on_step


def _step_index(step: Any, previous: int | None) -> int:
    if step is None:
        return 0 if previous is None else previous + 1
    if isinstance(step, int):
        return step
    index = getattr(step, "index", None)
    if isinstance(index, int):
        return index
    raise TypeError(f"mark_step() takes a step index, an object with .index (kvlab's Step) or None, got {step!r}")


# --------------------------------------------------------------------------------------------- tracer
class _StorageRef(weakref.ref):
    """A weak reference to a storage's Python object that remembers what the storage was charged."""

    __slots__ = ("ptr", "nbytes", "site", "step")


class _Site:
    """Running figures of one site; a mutable record so the hot path does one dict lookup per allocation."""

    __slots__ = ("live", "peak", "allocated", "step_allocated", "step_peak")

    def __init__(self) -> None:
        self.live = self.peak = self.allocated = self.step_allocated = self.step_peak = 0


_DECOMPOSE = torch._C.DispatchKey.CompositeImplicitAutograd
_push_mode_stack = torch._C._push_on_torch_dispatch_stack
_pop_mode_stack = torch._C._pop_torch_dispatch_stack
# What an op does with its outputs, decided once per op (see _classify).
_PASS, _ALLOCATES, _DECOMPOSES = 0, 1, 2


class _DispatchHook(TorchDispatchMode):
    """Runs each op and hands fresh output storages to the tracer. Kept minimal: it runs for every aten op,
    and each op's treatment is decided once (:func:`_classify`) and looked up by ``func`` afterwards."""

    def __init__(self, tracer: "MemoryTracer") -> None:
        super().__init__()
        self._register = tracer._register
        self._ops: dict[Any, tuple[Callable[..., Any], int]] = {}

    @classmethod
    def _should_skip_dynamo(cls) -> bool:
        # PyTorch wraps modes' __torch_dispatch__ in a "disable dynamo" decorator that costs microseconds
        # per op; this mode is never traced by the compiler, so it opts out.
        return False

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        try:
            op, kind = self._ops[func]
        except KeyError:  # first sight of this op: what to call, and what it does with memory
            op, kind = self._ops[func] = _classify(func)
        if kind == _PASS:
            return op(*args, **kwargs) if kwargs else op(*args)
        if kind == _DECOMPOSES:
            # A CompositeImplicitAutograd op reached the mode undecomposed (inference mode excludes the
            # autograd keys where it is normally decomposed): run its decomposition with this mode back
            # on the stack, so that its inner ops are seen exactly as they are outside inference mode.
            _push_mode_stack(self)
            try:
                return op(*args, **kwargs) if kwargs else op(*args)
            finally:
                _pop_mode_stack(None)
        out = op(*args, **kwargs) if kwargs else op(*args)
        if isinstance(out, Tensor):
            self._register(out)
        elif isinstance(out, (tuple, list)):
            register = self._register
            for item in out:
                if isinstance(item, Tensor):
                    register(item)
        return out


def _classify(func: Any) -> tuple[Callable[..., Any], int]:
    """``(callable, kind)`` for an op: decompose it, register its outputs, or just run it."""
    name = func.name()
    has = torch._C._dispatch_has_kernel_for_dispatch_key
    if has(name, "CompositeImplicitAutograd") and not any(
            has(name, k) for k in ("CompositeExplicitAutograd", "CompositeExplicitAutogradNonFunctional",
                                   "CPU", "CUDA")):
        # Mirrors the dispatcher: an implicit kernel is used when the backend has no kernel of its own.
        return functools.partial(func._op_dk, _DECOMPOSE), _DECOMPOSES
    return func._op, _ALLOCATES if _may_allocate(func) else _PASS


def _may_allocate(func: Any) -> bool:
    """False for ops whose outputs always share an input's storage: views, in-place and ``out=`` ops
    (their schema says every output aliases an input) and ``_unsafe_view`` (a view that does not say so).

    ``lift_fresh`` is the exception: it returns the tensor that ``torch.tensor(data)`` just built outside
    the dispatcher, so its storage is new. Ops that *may* alias, such as ``reshape`` or ``contiguous``,
    are CompositeImplicitAutograd ops and are decomposed (see :class:`_DispatchHook`), never filtered here.
    """
    name = getattr(func, "__name__", "")
    if name.startswith("lift_fresh"):
        return True
    if name.startswith("_unsafe_view"):
        return False
    returns = func._schema.returns
    return not returns or any(r.alias_info is None for r in returns)


class MemoryTracer:
    """Exact live tensor bytes per decode step and per site, with the peak inside each step.

    Use as a context manager around the decode loop and pass :meth:`mark_step` as its step callback::

        with MemoryTracer() as tracer:
            generate(model, prompt, 256, cache=ConcatCache(4), on_step=tracer.mark_step)
        tracer.timeline()     # one row per step: live_bytes, peak_bytes, allocated_bytes, freed_bytes
        tracer.site_table()   # one row per (step, site): live_bytes, allocated_bytes, peak_bytes
        tracer.by_site()      # heaptrack-style views: peak by site, still alive at the end by site

    Args:
        device: track only storages on this device type ("cpu", "cuda"); ``None`` tracks all.
        baseline: tensors and modules whose storages are the baseline; ``"auto"`` (the default) takes
            every tensor reachable by the garbage collector when tracing starts.
        frames: attribute allocations outside kvlab's site regions to the calling Python frame (a few
            microseconds per allocation); ``False`` charges them to ``"<unlabelled>"``.

    Bytes are storage bytes (``untyped_storage().nbytes()``), rounded up to the caching allocator's
    512-byte blocks on CUDA. Only one tracer may run at a time: nested dispatch modes would see each
    other's work and double count, so a second one raises :class:`TracerError`.
    """

    _active: "MemoryTracer | None" = None

    def __init__(self, *, device: str | torch.device | None = None,
                 baseline: Iterable[Tensor | nn.Module] | str | None = "auto", frames: bool = True) -> None:
        self.device_type = None if device is None else torch.device(device).type
        self.frames = frames
        self._baseline_spec = baseline
        self._hook: _DispatchHook | None = None
        self._reset()

    # -------------------------------------------------------------- state
    def _reset(self) -> None:
        self._live: dict[int, _StorageRef] = {}  # storage data_ptr -> reference of a live registered storage
        self._sites: dict[str, _Site] = {}
        # storage data_ptr -> reference of a live baseline storage; dropped when the storage dies, since
        # its address may then be reused by a tensor allocated while tracing
        self._baseline: dict[int, weakref.ref] = {}
        self.baseline_bytes: dict[str, int] = {}
        self.live_bytes = 0
        self.peak_bytes = 0
        self._at_peak: dict[str, int] = {}  # live per site at the moment of the global peak
        self._peak_pending = False
        self._step: int | None = None  # last marked step
        self._step_open = 0  # label of allocations made now: the step being computed
        self._step_freed = 0
        self._step_peak = 0
        self._allocated_before = 0  # bytes allocated in earlier (closed) steps
        self._timeline: list[dict[str, Any]] = []
        self._site_rows: list[dict[str, Any]] = []
        self._end: dict[str, int] | None = None
        self._end_rows: list[dict[str, Any]] | None = None
        self._t0 = 0.0
        self.running = False

    # -------------------------------------------------------------- lifecycle
    def __enter__(self) -> "MemoryTracer":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> "MemoryTracer":
        if MemoryTracer._active is not None:
            raise TracerError("a MemoryTracer is already running; exact tracers cannot be nested "
                              "(each would count the other's bookkeeping and double-charge every tensor)")
        self._reset()
        self._take_baseline()
        self._hook = _DispatchHook(self)
        MemoryTracer._active = self
        try:
            self._hook.__enter__()
        except BaseException:
            MemoryTracer._active = None
            raise
        self.running = True
        self._t0 = time.perf_counter()
        return self

    def stop(self) -> None:
        if not self.running:
            return
        try:
            assert self._hook is not None
            self._hook.__exit__(None, None, None)
        finally:
            self.running = False
            MemoryTracer._active = None
            self._hook = None
            self._finish()

    def _take_baseline(self) -> None:
        spec = self._baseline_spec
        tensors: Iterable[Any]
        if spec is None:
            tensors = ()
        elif isinstance(spec, str):
            if spec != "auto":
                raise ValueError(f"baseline must be 'auto', None or tensors/modules, got {spec!r}")
            # type() rather than isinstance(): some lazy module attributes warn when asked for __class__.
            tensors = [obj for obj in gc.get_objects() if issubclass(type(obj), Tensor)]
        else:
            tensors = list(_expand_modules(spec))
        for t in tensors:
            try:
                if self.device_type is not None and t.device.type != self.device_type:
                    continue
                st = t.untyped_storage()
                ptr = st.data_ptr()
            except (RuntimeError, NotImplementedError, TypeError):
                continue  # sparse, meta, fake or otherwise storage-less tensors
            if ptr and ptr not in self._baseline:
                self._baseline[ptr] = weakref.ref(st, self._baseline_freed(ptr))
                dev = str(t.device)
                self.baseline_bytes[dev] = self.baseline_bytes.get(dev, 0) + _charge(st.nbytes(), t.is_cuda)

    def _baseline_freed(self, ptr: int) -> Callable[[weakref.ref], None]:
        """Callback forgetting a baseline storage's address when the storage dies (its figures in
        ``baseline_bytes`` stay: they describe the start of tracing)."""
        baseline = self._baseline

        def forget(ref: weakref.ref) -> None:
            if baseline.get(ptr) is ref:
                del baseline[ptr]

        return forget

    # -------------------------------------------------------------- hot path
    def _register(self, t: Tensor) -> None:
        try:
            st = t.untyped_storage()
        except (RuntimeError, NotImplementedError):
            return  # sparse or otherwise storage-less
        ptr = st.data_ptr()
        if not ptr or ptr in self._live or ptr in self._baseline:
            return  # no memory, an alias of a storage already known, or a baseline tensor
        if self.device_type is not None and t.device.type != self.device_type:
            return
        nbytes = st.nbytes()
        if t.is_cuda:
            nbytes = -(-nbytes // _CUDA_BLOCK) * _CUDA_BLOCK
        if _site_stack:
            name = _site_stack[-1]
        else:
            name = caller_site(3) if self.frames else UNLABELLED
        site = self._sites.get(name)
        if site is None:
            site = self._sites[name] = _Site()
        ref = _StorageRef(st, self._freed)
        ref.ptr = ptr
        ref.nbytes = nbytes
        ref.site = name
        ref.step = self._step_open
        self._live[ptr] = ref
        live = site.live + nbytes
        site.live = live
        if live > site.step_peak:
            site.step_peak = live
        site.step_allocated += nbytes  # whole-run figures are folded in at each mark_step()
        total = self.live_bytes + nbytes
        self.live_bytes = total
        if total > self._step_peak:
            self._step_peak = total
            if total > self.peak_bytes:
                self.peak_bytes = total
                self._peak_pending = True

    def _freed(self, ref: _StorageRef) -> None:
        if self._live.get(ref.ptr) is ref:
            del self._live[ref.ptr]
        else:
            return  # already forgotten (tracer stopped)
        if self._peak_pending:  # the state just before the first free after a new peak is the peak
            self._at_peak = {name: s.live for name, s in self._sites.items() if s.live}
            self._peak_pending = False
        nbytes = ref.nbytes
        self._sites[ref.site].live -= nbytes
        self.live_bytes -= nbytes
        self._step_freed += nbytes

    # -------------------------------------------------------------- steps
    def mark_step(self, step: Any = None) -> None:
        """Close the current decode step. Accepts kvlab's ``Step``, an int, or ``None`` (counts up).

        Rows for the step describe the interval since the previous mark: bytes alive now, bytes
        allocated in the interval, and the highest live total (and per-site live) inside it.
        """
        if not self.running:
            raise TracerError("mark_step() called while the tracer is not running")
        index = _step_index(step, self._step)
        now = time.perf_counter() - self._t0
        allocated = 0
        for name in sorted(self._sites):
            site = self._sites[name]
            if site.live or site.step_allocated:
                self._site_rows.append(dict(step=index, site=name, live_bytes=site.live,
                                            allocated_bytes=site.step_allocated,
                                            peak_bytes=max(site.step_peak, site.live)))
            allocated += site.step_allocated
            self._fold(site)
        self._timeline.append(dict(step=index, time_s=now, live_bytes=self.live_bytes,
                                   peak_bytes=self._step_peak, allocated_bytes=allocated,
                                   freed_bytes=self._step_freed, live_storages=len(self._live)))
        self._allocated_before += allocated
        self._step = index
        self._step_open = index + 1
        self._step_freed = 0
        self._step_peak = self.live_bytes

    @staticmethod
    def _fold(site: _Site) -> None:
        """Add a closed step's figures to the site's whole-run figures and open the next step."""
        site.allocated += site.step_allocated
        site.peak = max(site.peak, site.step_peak, site.live)
        site.step_allocated = 0
        site.step_peak = site.live

    __call__ = mark_step  # so a tracer can be passed as on_step directly

    def _finish(self) -> None:
        for site in self._sites.values():
            self._allocated_before += site.step_allocated
            self._fold(site)
        if self._peak_pending:
            self._at_peak = {name: s.live for name, s in self._sites.items() if s.live}
            self._peak_pending = False
        self._end = {name: s.live for name, s in self._sites.items() if s.live}
        self._end_rows = [dict(site=r.site, step=r.step, bytes=r.nbytes, ptr=r.ptr) for r in self._live.values()]
        # Dropping the weak references cancels their callbacks: the figures freeze at stop().
        self._live.clear()
        self._baseline.clear()

    # -------------------------------------------------------------- results
    @property
    def baseline_total(self) -> int:
        """Bytes of tensors alive before tracing started (weights, mostly), all devices together."""
        return sum(self.baseline_bytes.values())

    @property
    def allocated_bytes(self) -> int:
        """All bytes allocated while tracing (freed or not)."""
        return self._allocated_before + sum(s.step_allocated for s in self._sites.values())

    @property
    def end_bytes(self) -> int:
        """Bytes allocated while tracing and still alive at :meth:`stop` (or now, while running)."""
        if self._end is not None:
            return sum(self._end.values())
        return self.live_bytes

    def timeline(self) -> pd.DataFrame:
        """One row per marked step: ``step, time_s, live_bytes, peak_bytes, allocated_bytes, freed_bytes,
        live_storages``. Bytes exclude the baseline; ``peak_bytes`` is the highest live total inside the
        step (the transient peak), ``live_bytes`` what is left when the step ends."""
        cols = ["step", "time_s", "live_bytes", "peak_bytes", "allocated_bytes", "freed_bytes", "live_storages"]
        return pd.DataFrame(self._timeline, columns=cols)

    def site_table(self) -> pd.DataFrame:
        """One row per (step, site): ``live_bytes`` at the end of the step, ``allocated_bytes`` during it and
        ``peak_bytes``, the site's highest live bytes inside it."""
        return pd.DataFrame(self._site_rows, columns=["step", "site", "live_bytes", "allocated_bytes", "peak_bytes"])

    def by_site(self) -> pd.DataFrame:
        """Heaptrack's two views, one row per site, largest still-alive first.

        ``alive_end_bytes``: allocated while tracing and still alive at the end (what leaks), with its
        share ``alive_end_share``. ``at_peak_bytes``: the site's part of the highest live total (what
        made the peak). ``peak_bytes``: the site's own highest live bytes. ``allocated_bytes``: all it
        allocated.
        """
        end = self._end if self._end is not None else {n: s.live for n, s in self._sites.items() if s.live}
        rows = [dict(site=name, alive_end_bytes=end.get(name, 0), at_peak_bytes=self._at_peak.get(name, 0),
                     peak_bytes=max(s.peak, s.step_peak), allocated_bytes=s.allocated + s.step_allocated)
                for name, s in self._sites.items()]
        df = pd.DataFrame(rows, columns=["site", "alive_end_bytes", "at_peak_bytes", "peak_bytes", "allocated_bytes"])
        df = df.sort_values(["alive_end_bytes", "peak_bytes"], ascending=False, ignore_index=True)
        total = df["alive_end_bytes"].sum()
        df["alive_end_share"] = df["alive_end_bytes"] / total if total else 0.0
        return df

    def alive_at_end(self) -> pd.DataFrame:
        """Every storage still alive at :meth:`stop`: ``site, step`` (when it was allocated), ``bytes`` and
        ``ptr`` (its address, which :func:`kvlab.memory.retention.explain` uses to name the site of saved tensors)."""
        if self._end_rows is None:
            raise TracerError("alive_at_end() is available once the tracer has stopped")
        return pd.DataFrame(self._end_rows, columns=["site", "step", "bytes", "ptr"])

    def site_of(self) -> dict[int, tuple[str, int]]:
        """Address -> (site, step) of every storage alive at :meth:`stop`."""
        if self._end_rows is None:
            raise TracerError("site_of() is available once the tracer has stopped")
        return {r["ptr"]: (r["site"], r["step"]) for r in self._end_rows}


def _charge(nbytes: int, cuda: bool) -> int:
    return -(-nbytes // _CUDA_BLOCK) * _CUDA_BLOCK if cuda and nbytes else nbytes


def _expand_modules(items: Iterable[Tensor | nn.Module]) -> Iterator[Tensor]:
    for item in items:
        if isinstance(item, nn.Module):
            yield from item.parameters()
            yield from item.buffers()
        elif isinstance(item, Tensor):
            yield item
        else:
            raise TypeError(f"baseline items must be tensors or modules, got {type(item).__name__}")


@contextlib.contextmanager
def trace_memory(**kwargs: Any) -> Iterator[MemoryTracer]:
    """``with trace_memory() as tracer:`` — the same as ``with MemoryTracer(**kwargs) as tracer:``."""
    with MemoryTracer(**kwargs) as tracer:
        yield tracer


# --------------------------------------------------------------------------------------------- RSS cross-check
def rss_vs_exact(run: Callable[[Callable[[Any], None]], Any], *, untraced_first: bool = True) -> dict[str, Any]:
    """Compare RSS growth with exact tensor bytes for one decode loop, in this process.

    ``run(on_step)`` runs the loop and returns what it keeps (kept alive until both figures are read).
    With ``untraced_first`` the loop runs once without the tracer, measuring RSS growth free of the
    tracer's own bookkeeping; it is then dropped, and a second, traced run (the same computation, so the
    same tensors) gives the exact bytes.

    Why the two differ, and why to run this in a fresh process with ``MALLOC_MMAP_THRESHOLD_=65536``
    (see :func:`kvlab.memory.rss.honest_malloc_env`): glibc serves blocks above its mmap threshold with
    ``mmap`` and returns them to the OS on free, but after freeing a large block it *raises* that
    threshold, so later large tensors come from the heap, whose freed pages stay resident. RSS then
    counts memory that no tensor holds. Fixing the threshold keeps large tensors on ``mmap``. What
    remains is real but not tensor storage: about 1 KiB per autograd graph node (the node, the tensor
    handles of its saved variables, malloc's headers), heap fragmentation among small tensors, and page
    rounding. That part grows with the number of nodes, not with tensor sizes, so it is a few percent at
    real model sizes but a third of the leak on a 256-wide toy with one sequence (kvlab's tests use four
    sequences to keep it near 10%). Exact bytes are the ones to reason with; RSS is what ``top`` shows.
    """
    from .rss import rss_bytes

    result: dict[str, Any] = {}
    if untraced_first:
        gc.collect()
        before = rss_bytes()
        kept = run(lambda step: None)
        gc.collect()
        result["rss_growth_bytes"] = rss_bytes() - before
        del kept
        gc.collect()
    tracer = MemoryTracer(baseline="auto")
    before = rss_bytes()
    with tracer:
        kept = run(tracer.mark_step)
        gc.collect()
    traced_rss = rss_bytes() - before
    result["traced_rss_growth_bytes"] = traced_rss
    result.setdefault("rss_growth_bytes", traced_rss)
    result["exact_bytes"] = tracer.end_bytes
    result["exact_peak_bytes"] = tracer.peak_bytes
    result["ratio"] = result["rss_growth_bytes"] / max(tracer.end_bytes, 1)
    del kept
    return result


# --------------------------------------------------------------------------------------------- CUDA snapshot
_snapshot_active = False


@dataclass
class SnapshotFiles:
    pickle_path: Path
    html_path: Path


@contextlib.contextmanager
def cuda_memory_snapshot(html_path: str | Path, pickle_path: str | Path | None = None, *,
                         max_entries: int = 100_000) -> Iterator[SnapshotFiles]:
    """Record the CUDA caching allocator's history while the block runs; write a snapshot and its HTML.

    The pickle opens in PyTorch's memory viewer; the HTML (``torch.cuda._memory_viz.trace_plot``)
    embeds the same snapshot and loads the viewer's script from PyTorch's CDN when opened. Recording is
    stopped on exit whatever happens, and the snapshot is still written if the block raised (that is
    when it is most useful, e.g. after an out-of-memory error).

    The allocator's view names allocation stacks (``repeat_kv``, ``cat``), not why memory stays
    alive: use :mod:`kvlab.memory.retention` for that. CPU builds have no allocator history: raises
    :class:`TracerError`.
    """
    global _snapshot_active
    if not torch.cuda.is_available():
        raise TracerError("CUDA memory snapshots need a CUDA build of PyTorch and a visible GPU "
                          f"(this is torch {torch.__version__}, cuda available: False); on CPU use MemoryTracer")
    if _snapshot_active:
        raise TracerError("a CUDA memory snapshot is already being recorded; snapshots cannot be nested")
    html_path = Path(html_path)
    pickle_path = Path(pickle_path) if pickle_path is not None else html_path.with_suffix(".pickle")
    from torch.cuda import _memory_viz

    _snapshot_active = True
    torch.cuda.memory._record_memory_history(max_entries=max_entries)
    try:
        yield SnapshotFiles(pickle_path, html_path)
    finally:
        try:
            torch.cuda.synchronize()
            pickle_path.parent.mkdir(parents=True, exist_ok=True)
            torch.cuda.memory._dump_snapshot(str(pickle_path))
            with open(pickle_path, "rb") as f:
                snapshot = pickle.load(f)
            html_path.parent.mkdir(parents=True, exist_ok=True)
            html_path.write_text(_memory_viz.trace_plot(snapshot))
        finally:
            torch.cuda.memory._record_memory_history(enabled=None)
            _snapshot_active = False


# --------------------------------------------------------------------------------------------- results
def _jsonable(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "to_dict") and callable(value.to_dict):
        return _jsonable(value.to_dict())
    if is_dataclass(value) and not isinstance(value, type):
        return _jsonable(asdict(value))
    return str(value)


def save_results(df: pd.DataFrame, path: str | Path, *, config: Any = None, loader: str | None = None,
                 cache: str | None = None, device: str | torch.device | None = None,
                 command: str | None = None, **meta: Any) -> tuple[Path, Path]:
    """Write ``df`` as ``<path>.csv`` and its metadata as ``<path>.json``; return both paths.

    The JSON holds the model config (a kvlab or transformers config, or a dict), the loader, cache and
    device, plus what is filled in automatically: torch and Python versions, the UTC date and the
    command line, so that a CSV found later says how it was made.
    """
    path = Path(path)
    if path.suffix in (".csv", ".json"):
        path = path.with_suffix("")
    path.parent.mkdir(parents=True, exist_ok=True)
    csv_path, json_path = path.with_suffix(".csv"), path.with_suffix(".json")
    df.to_csv(csv_path, index=False)
    info = dict(config=_jsonable(config), loader=loader, cache=cache,
                device=str(device) if device is not None else None,
                torch_version=torch.__version__, python_version=platform.python_version(),
                date=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                command=command if command is not None else " ".join(sys.argv),
                columns=list(df.columns), rows=len(df))
    info.update({k: _jsonable(v) for k, v in meta.items()})
    json_path.write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
    return csv_path, json_path
