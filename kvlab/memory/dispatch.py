"""The dispatch-mode hook: sees every aten op, hands fresh output storages on, and tracks regions.

A ``TorchDispatchMode`` is the one place where every tensor a PyTorch program creates passes through
Python, on any device and under grad, ``no_grad`` and ``inference_mode`` alike. It is also the price
of exact accounting: PyTorch calls into Python once per op, whatever the mode does. So each op's
treatment is decided once (:func:`classify`) and looked up afterwards, and the common case, an op that
cannot create a storage (views, in-place and ``out=`` ops, ``record_function`` bookkeeping), does
nothing but run.

A mode lives on a thread's own dispatch stack: other threads are not seen. :func:`install_in_new_threads`
puts a hook on every thread started through :mod:`threading` while it is in effect.
"""

from __future__ import annotations

import functools
import sys
import threading
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode

from .regions import Attribution

__all__ = ["DispatchHook", "classify", "may_allocate", "install_in_new_threads"]

_DECOMPOSE = torch._C.DispatchKey.CompositeImplicitAutograd
_push_mode_stack = torch._C._push_on_torch_dispatch_stack
_pop_mode_stack = torch._C._pop_torch_dispatch_stack

# What an op does, decided once per op by classify().
PASS, ALLOCATES, DECOMPOSES, REGION_ENTER, REGION_EXIT = range(5)

Register = Callable[[Tensor, Attribution], None]


class DispatchHook(TorchDispatchMode):
    """Runs each op; passes new output tensors to ``register(tensor, attribution)`` and keeps the
    ``attribution``'s region stack from ``record_function``'s enter/exit ops.

    ``register`` may be ``None``: the hook then only tracks regions (for tools that need to know the
    open region, such as a saved-tensor hook). ``register`` is read on every allocation, so its owner
    may swap it while the hook runs.
    """

    def __init__(self, attribution: Attribution, register: Register | None = None) -> None:
        super().__init__()
        self.attribution = attribution
        self.register = register
        # id(op overload) -> (callable, kind, the overload): keyed by id because OpOverload.__hash__ is a
        # Python method, a call on every op; the overload is held, so its id cannot be reused.
        self._ops: dict[int, tuple[Callable[..., Any], int, Any]] = {}

    @classmethod
    def _should_skip_dynamo(cls) -> bool:
        # PyTorch wraps modes' __torch_dispatch__ in a "disable dynamo" decorator that costs microseconds
        # per op; this mode is never traced by the compiler, so it opts out.
        return False

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        try:
            op, kind, _ = self._ops[id(func)]
        except KeyError:  # first sight of this op: what to call, and what it does
            op, kind = classify(func)
            self._ops[id(func)] = (op, kind, func)
        if kind == PASS:
            return op(*args, **kwargs) if kwargs else op(*args)
        if kind == ALLOCATES:
            out = op(*args, **kwargs) if kwargs else op(*args)
            register = self.register
            if register is None:
                return out
            if isinstance(out, Tensor):
                register(out, self.attribution)
            elif isinstance(out, (tuple, list)):
                for item in out:
                    if isinstance(item, Tensor):
                        register(item, self.attribution)
            return out
        if kind == DECOMPOSES:
            # A CompositeImplicitAutograd op reached the mode undecomposed (inference mode excludes the
            # autograd keys where it is normally decomposed): run its decomposition with this hook back
            # on the stack, so that its inner ops are seen exactly as they are outside inference mode.
            _push_mode_stack(self)
            try:
                return op(*args, **kwargs) if kwargs else op(*args)
            finally:
                _pop_mode_stack(None)
        # record_function's handle is a fresh Python wrapper at each crossing; its hash is the address
        # of the C++ object behind it, the same at enter and exit.
        out = op(*args, **kwargs) if kwargs else op(*args)
        if kind == REGION_ENTER:
            self.attribution.enter(hash(out), args[0] if args else kwargs["name"])  # type: ignore[index]
        else:
            self.attribution.exit(hash(args[0] if args else next(iter(kwargs.values()))))  # type: ignore[union-attr]
        return out


def classify(func: Any) -> tuple[Callable[..., Any], int]:
    """``(callable, kind)`` for an op: track a region, decompose it, register its outputs, or just run it."""
    name = func.name()
    if name.startswith("profiler::_record_function_enter_new"):
        return func._op, REGION_ENTER
    if name.startswith("profiler::_record_function_exit"):
        return func._op, REGION_EXIT
    has = torch._C._dispatch_has_kernel_for_dispatch_key
    if has(name, "CompositeImplicitAutograd") and not any(
            has(name, k) for k in ("CompositeExplicitAutograd", "CompositeExplicitAutogradNonFunctional",
                                   "CPU", "CUDA")):
        # Mirrors the dispatcher: an implicit kernel is used when the backend has no kernel of its own.
        return functools.partial(func._op_dk, _DECOMPOSE), DECOMPOSES
    return func._op, ALLOCATES if may_allocate(func) else PASS


def may_allocate(func: Any) -> bool:
    """False for ops whose outputs always share an input's storage: views, in-place and ``out=`` ops
    (their schema says every output aliases an input) and ``_unsafe_view`` (a view that does not say so).

    Two exceptions bring a storage created outside the dispatcher into view: ``lift_fresh`` returns the
    tensor that ``torch.tensor(data)`` just built, and ``set_`` points a tensor at a storage made
    elsewhere (``torch.load`` builds tensors this way); storages already known are not counted twice.
    Ops that *may* alias, such as ``reshape`` or ``contiguous``, are CompositeImplicitAutograd ops and
    are decomposed (see :class:`DispatchHook`), never filtered here.
    """
    name = getattr(func, "__name__", "")
    if name.startswith(("lift_fresh", "set_.source_Storage")):
        return True
    if name.startswith("_unsafe_view"):
        return False
    returns = func._schema.returns
    return not returns or any(r.alias_info is None for r in returns)


def install_in_new_threads(make_hook: Callable[[], DispatchHook]) -> Callable[[], None]:
    """Put ``make_hook()`` on the dispatch stack of every thread started via :mod:`threading` from now on.

    Uses :func:`threading.setprofile`, whose function each new thread calls on its first Python event:
    it pushes a fresh hook and removes itself, so the thread runs at full speed afterwards (a profile
    function set before is chained, and restored in the thread). Threads already running, and threads
    started without :mod:`threading`, are not reached. Returns a function that stops installing (hooks
    already installed stay until their thread ends). Hooks must tolerate running after their owner stopped.
    """
    previous = threading.getprofile()

    def first_event(frame: Any, event: str, arg: Any) -> None:
        sys.setprofile(previous)
        _push_mode_stack(make_hook())
        if previous is not None:
            previous(frame, event, arg)

    threading.setprofile(first_event)

    def stop() -> None:
        if threading.getprofile() is first_event:
            threading.setprofile(previous)

    return stop
