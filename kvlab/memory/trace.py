"""Exact tensor-memory accounting for any PyTorch decode loop, attributed to the code that allocated it.

RSS (see :mod:`kvlab.memory.rss`) says *that* memory grows; this module says *which tensors* it is and
*where* they were allocated, to the byte. :class:`MemoryTracer` runs a dispatch mode
(:mod:`kvlab.memory.dispatch`) that sees every aten op's outputs, registers each storage it has not
seen before, and learns of the storage's death through a weak reference to its Python object. PyTorch
keeps a storage's Python object alive for as long as the C++ storage lives (also when only autograd's
saved variables hold it), so the weak reference dies exactly when the memory is returned to the
allocator. Views, in-place ops and ``_unsafe_view`` outputs share a storage already registered and
cost nothing.

Every allocation is charged to a *site* (:mod:`kvlab.memory.regions`): the innermost
``torch.profiler.record_function`` region, else the innermost named ``nn.Module`` running
(``model.layers.3.self_attn``), else the calling Python line. Decode steps are delimited by
:meth:`MemoryTracer.mark_step`, which has the signature of ``generate``'s ``on_step``.
"""

from __future__ import annotations

import contextlib
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

from . import census
from .dispatch import DispatchHook, install_in_new_threads
from .ledger import Ledger, StorageRef, TracerError
from .regions import Attribution, ModuleNames, find_root_modules
from .units import fmt_bytes

__all__ = ["MemoryTracer", "TracerError", "TracerWarning", "trace_memory"]


class TracerWarning(RuntimeWarning):
    """The tracer's figures are incomplete: tensors were created where its dispatch mode could not see them."""


class MemoryTracer(Ledger):
    """Exact live tensor bytes per decode step and per site, with the peak inside each step.

    Use as a context manager around the decode loop and pass :meth:`mark_step` as its step callback::

        with MemoryTracer() as tracer:
            generate(model, prompt, 256, cache=ConcatCache(4), on_step=tracer.mark_step)
        tracer.timeline()     # one row per step: live_bytes, peak_bytes, allocated_bytes, freed_bytes
        tracer.site_table()   # one row per (step, site): live_bytes, allocated_bytes, peak_bytes
        tracer.by_site()      # heaptrack-style views: peak by site, still alive at the end by site

    Args:
        device: track only storages on this device type ("cpu", "cuda"); ``None`` tracks all.
        baseline: tensors and modules whose storages are the baseline, reported apart and never
            charged to a site; ``"auto"`` (the default) takes every tensor alive when tracing starts.
        frames: attribute allocations made outside any region to the innermost named module or the
            calling Python line (a frame walk, microseconds per such allocation); ``False`` charges
            them to ``"<unlabelled>"``.
        modules: whose ``named_modules()`` names label allocations outside regions. ``"auto"``: the
            modules in ``baseline`` if it names any, else every module alive at the start that is no
            other's submodule; ``None``: no module names (Python lines only).
        threads: also trace threads started (through :mod:`threading`) while the tracer runs, and, if
            other threads were already running at the start, look for tensors they made (see below).
            ``False``: this thread only, and no such check.

    Threads: a dispatch mode is per thread. Allocations in threads started while tracing are counted
    exactly (their bookkeeping reaches the figures at this thread's next allocation or step mark, so a
    peak made only in another thread can be missed). Threads already running at the start (a thread
    pool created earlier, a notebook kernel's own threads) are not seen: when there were any, a census
    of live tensors at :meth:`stop` finds what was created while tracing, missed and still alive (also
    any tensor built outside PyTorch's dispatcher), and reports it in ``unseen_bytes`` (not in the
    figures) with a :class:`TracerWarning`.

    Not seen at all: memory that is not a tensor storage (autograd's graph nodes, Python objects, the
    allocator's own slack), and scratch buffers a kernel allocates and frees internally. Bytes are
    storage bytes, rounded up to the caching allocator's 512-byte blocks on CUDA (what
    ``torch.cuda.memory_allocated()`` counts). Only one tracer may run at a time: nested ones would
    count each other's work, so a second one raises :class:`TracerError`.
    """

    _active: MemoryTracer | None = None

    def __init__(self, *, device: str | torch.device | None = None,
                 baseline: Iterable[Tensor | nn.Module] | str | None = "auto", frames: bool = True,
                 modules: Iterable[nn.Module] | str | None = "auto", threads: bool = True) -> None:
        for name, value in (("baseline", baseline), ("modules", modules)):
            if isinstance(value, str) and value != "auto":
                raise ValueError(f"{name} must be 'auto', None or a list, got {value!r}")
        self.device_type = None if device is None else torch.device(device).type
        self.frames = frames
        self.threads = threads
        self._baseline_spec = baseline if baseline is None or isinstance(baseline, str) else list(baseline)
        self._modules_spec = modules if modules is None or isinstance(modules, str) else list(modules)
        self._hook: DispatchHook | None = None
        self._reset()

    def _reset(self) -> None:
        self._open_books()
        self._baseline = census.StorageSet()  # storages of the baseline, while they live
        self._baseline_refs = self._baseline.refs  # its dict, read on the hot path
        self._before = self._baseline  # every storage alive at the start (a superset, see _take_census)
        self._modules: ModuleNames | None = None
        self._stop_threads: Callable[[], None] | None = None
        self.threads_traced = 0  # threads started while tracing that got a hook
        self._others_running = False  # threads were running at the start (see _take_census)
        self.unseen_bytes = 0  # see _check_unseen
        self.unseen_storages = 0

    @property
    def baseline_bytes(self) -> dict[str, int]:
        """Bytes of the baseline per device (``"cpu"``, ``"cuda:0"``), as found at the start."""
        return self._baseline.bytes_by_device

    @property
    def baseline_total(self) -> int:
        """Bytes of tensors alive before tracing started (weights, mostly), all devices together."""
        return sum(self.baseline_bytes.values())

    # -------------------------------------------------------------- lifecycle
    def __enter__(self) -> MemoryTracer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> MemoryTracer:
        if MemoryTracer._active is not None:
            raise TracerError("a MemoryTracer is already running; exact tracers cannot be nested "
                              "(each would count the other's bookkeeping and double-charge every tensor)")
        self._reset()
        self._take_census()
        self._hook = DispatchHook(Attribution(self._modules, self.frames), self._register)
        MemoryTracer._active = self
        try:
            self._hook.__enter__()
        except BaseException:
            MemoryTracer._active = None
            raise
        if self.threads:
            self._stop_threads = install_in_new_threads(self._thread_hook)
        self.running = True
        self._t0 = time.perf_counter()
        return self

    def stop(self) -> None:
        if not self.running:
            return
        try:
            if self._stop_threads is not None:
                self._stop_threads()
            assert self._hook is not None
            self._hook.__exit__(None, None, None)
        finally:
            self.running = False
            MemoryTracer._active = None
            self._hook = None
            self._drain()
            self._check_unseen()
            self._finish()

    def _take_census(self) -> None:
        """Baseline, the storages alive before tracing, and the modules whose names label allocations.

        The garbage collector's census costs tens of milliseconds in a large process, so it is taken
        only when needed: for ``"auto"`` arguments, and when other threads are running (their tensors
        cannot be seen, so the end-of-run check needs to know what existed before).
        """
        base, mods = self._baseline_spec, self._modules_spec
        if mods == "auto" and isinstance(base, list):
            mods = [m for m in base if isinstance(m, nn.Module)] or "auto"
        me = threading.current_thread()
        self._others_running = self.threads and any(t is not me and t.is_alive() for t in threading.enumerate())
        need = base == "auto" or mods == "auto" or self._others_running
        tensors, modules = census.live_objects() if need else ([], [])
        if base == "auto":
            self._baseline.add_tensors(tensors, self.device_type)
        else:
            self._baseline.add_tensors(census.expand_modules(base or ()), self.device_type)
            self._before = census.StorageSet()
            self._before.add_tensors(tensors, self.device_type)
        if mods == "auto":
            mods = find_root_modules(modules)
        self._modules = ModuleNames(mods) if mods else None

    def _thread_hook(self) -> DispatchHook:
        """The hook for a thread started while tracing: its own regions, its events queued to the owner."""
        self.threads_traced += 1
        return DispatchHook(Attribution(self._modules, self.frames), self._register_foreign)

    def _check_unseen(self) -> None:
        if not self._others_running:
            return  # every thread that ran was started while tracing, and so was traced

        def known(ptr: int) -> bool:
            return ptr in self._live or ptr in self._baseline or ptr in self._before

        unseen = census.unseen_storages(known, self.device_type)
        self.unseen_storages, self.unseen_bytes = len(unseen), sum(unseen.values())
        if unseen:
            warnings.warn(
                f"{self.unseen_storages} tensor storage(s) ({fmt_bytes(self.unseen_bytes)}) alive at the end were "
                "created while tracing where the tracer could not see them (in a thread already running when "
                "it started, or outside PyTorch's dispatcher); they are not in its "
                "figures (see MemoryTracer.unseen_bytes)", TracerWarning, stacklevel=4)

    # -------------------------------------------------------------- hot path
    def _register(self, t: Tensor, attribution: Attribution) -> None:
        # Runs for every output of every allocating op: lookups are hoisted into attributes, and the
        # attribution's region stack is read here (a method call only outside regions).
        if self._pending:
            self._drain()
        try:
            st = t.untyped_storage()
        except (RuntimeError, NotImplementedError):
            return  # sparse or otherwise storage-less
        ptr = st.data_ptr()
        if not ptr or ptr in self._live or ptr in self._baseline_refs:
            return  # no memory, an alias of a storage already known, or a baseline tensor
        if self.device_type is not None and t.device.type != self.device_type:
            return
        ref = StorageRef(st, self._on_free)
        ref.ptr = ptr
        ref.nbytes = census.charge(st.nbytes(), True) if t.is_cuda else st.nbytes()
        regions = attribution.regions
        ref.site = regions[-1] if regions else attribution.label()
        ref.step = self._step_open
        self._add(ref)

    def _register_foreign(self, t: Tensor, attribution: Attribution) -> None:
        """:meth:`_register` for another thread: the same checks, but the figures are left to the owner."""
        if not self.running:
            return  # a thread that outlived the tracer
        found = census.storage_of(t, self.device_type)
        if found is None or found[1] in self._live or found[1] in self._baseline_refs:
            return
        st, ptr = found
        ref = StorageRef(st, self._on_free)
        ref.ptr, ref.nbytes = ptr, census.charge(st.nbytes(), t.is_cuda)
        ref.site, ref.step = attribution.label(), self._step_open
        self._pending.append((True, ref))

    def _finish(self) -> None:
        self._close_books()
        self._baseline.clear()
        self._before.clear()
        self._modules = None


@contextlib.contextmanager
def trace_memory(**kwargs: Any) -> Iterator[MemoryTracer]:
    """``with trace_memory() as tracer:`` — the same as ``with MemoryTracer(**kwargs) as tracer:``."""
    with MemoryTracer(**kwargs) as tracer:
        yield tracer
