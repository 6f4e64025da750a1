"""A decode-loop leak check: does the loop keep anything beyond its own state?

A decode loop legitimately keeps its state between steps: a KV cache (of any class or container), the
tokens so far, the last logits. The incident's "cache leak" was something else: with trainable weights
each step recorded an autograd graph, the cache's ``grad_fn`` linked every step to the previous one,
and all saved activations stayed alive -- memory that no part of the state owns, held only by the
graph, attributed by heap tools to ``repeat_kv`` and ``cat``.

:func:`check_decode_leak` runs a user's loop for N and 2N steps and measures, from the objects the
loop returns, exactly what they keep (:func:`kvlab.memory.graph.walk_graph`): the state tensors, and
every tensor the autograd graph behind them saved for backward, each storage once, weights excluded.
What the cache is, is decided from the tensors, never from a class name. Only what the returned objects
reach is seen (containers and attributes, five levels deep, never into a module): tensors kept elsewhere
(a global list, a module attribute, a hook) and memory that is not a tensor storage (the graph's nodes
themselves, Python objects) are not. The loop leaks when

- anything is held by an autograd graph: a graph hanging off a decode loop's state is never needed,
  and whatever it holds is kept beyond the state, whether it grows linearly (a static cache written
  in place under grad), quadratically (a concat cache) or into a list of returned logits; or
- the state itself grows faster than linearly: doubling the steps more than doubled it, which no
  cache does (its size is at most proportional to the tokens it holds).

There is no byte tolerance: the figures are exact, so a leak of a few KiB at batch 1 fails like a
leak of GiB, and a legitimate cache of any size passes. Scratch buffers freed within a step are not
kept, so they never count. On a leak, the error explains what keeps the memory and why (the leaves
that require grad, the steps chained through the cache) with advice that follows the cause.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import inspect
import math
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .graph import GraphWalk, walk_graph
from .retention import advice, explain_walk
from .units import fmt_bytes

__all__ = ["DecodeLeakError", "Retained", "LeakReport", "measure_retained", "compare_retained", "check_decode_leak",
           "kv_bytes_per_token", "preserved_autograd_state"]


class DecodeLeakError(AssertionError):
    """A decode loop keeps memory beyond its own state; ``.report`` is the :class:`LeakReport`.

    An ``AssertionError`` so that test runners report it as a failed check rather than a crash.
    """

    def __init__(self, report: LeakReport) -> None:
        self.report = report
        super().__init__(report.explanation)


@dataclass
class Retained:
    """What a loop's returned objects keep alive, in bytes of unique storages (weights excluded)."""

    total_bytes: int  # everything below, each storage once
    cache_bytes: int  # K/V-shaped state tensors (three or more dimensions)
    saved_bytes: int  # tensors held only by the autograd graph behind the state
    other_bytes: int  # other state tensors (tokens, positions, logits ...)
    graph_nodes: int
    saved_tensors: int  # unique storages among the saved tensors
    cache_tensors: int
    graph_cache_tensors: int  # cache tensors with a grad_fn or requires_grad
    chained_steps: int  # forward passes linked through a cache tensor's updates
    forward_passes: int  # forward passes whose graphs are kept
    params_requiring_grad: list[str]  # parameters the graph reaches that require grad, by name
    inputs_requiring_grad: list[str] = field(default_factory=list)  # other leaves that do (by shape)
    saved_by_op: dict[str, int] = field(default_factory=dict)  # saved bytes by autograd node
    cache_element_size: int | None = None
    cache_batch: int | None = None
    cause: str = ""  # why a graph was recorded (empty without one)
    fix: str = ""

    @property
    def has_graph(self) -> bool:
        return self.graph_nodes > 0

    @property
    def state_bytes(self) -> int:
        """What the loop keeps on purpose: its state tensors."""
        return self.cache_bytes + self.other_bytes


def measure_retained(kept: object, model: nn.Module | None = None) -> Retained:
    """Bytes that ``kept`` holds alive through its tensors and their autograd graph.

    Measured by :func:`kvlab.memory.graph.walk_graph`: saved tensors are deduplicated by storage against
    each other and against the state tensors, and the storages of ``model``'s parameters and buffers and
    of any graph leaf are excluded -- weights exist whether or not a loop runs.
    """
    return _retained(walk_graph(kept, model=model))


def _retained(walk: GraphWalk) -> Retained:
    """:func:`measure_retained` from a walk already made (a leak check also explains the walk it measured)."""
    by_op: dict[str, int] = defaultdict(int)
    for saved in walk.saved:
        by_op[saved.op] += saved.nbytes
    order = {name: i for i, name in enumerate(walk.names.values())}  # model order reads best: embed, layer 0 ...
    leaves = [v for v in walk.leaves if v.requires_grad]
    params = sorted((walk.leaf_name(v) for v in leaves if walk.is_parameter(v)),
                    key=lambda n: (order.get(n, len(order)), n))
    inputs = [walk.leaf_name(v) for v in leaves if not walk.is_parameter(v)]
    sizes = {t.element_size() for t in walk.cache}
    batches = {t.shape[0] for t in walk.cache if t.dim() == 4}
    cause, fix = advice(walk) if walk.nodes else ("", "")
    return Retained(
        total_bytes=walk.state_bytes + walk.saved_bytes, cache_bytes=walk.cache_bytes, saved_bytes=walk.saved_bytes,
        other_bytes=walk.other_bytes, graph_nodes=walk.nodes, saved_tensors=len(walk.saved),
        cache_tensors=len(walk.cache), graph_cache_tensors=len(walk.graph_cache_tensors),
        chained_steps=walk.state_chain, forward_passes=walk.forward_passes if walk.nodes else 0,
        params_requiring_grad=params, inputs_requiring_grad=inputs,
        saved_by_op=dict(sorted(by_op.items(), key=lambda kv: -kv[1])),
        cache_element_size=sizes.pop() if len(sizes) == 1 else None,
        cache_batch=batches.pop() if len(batches) == 1 else None, cause=cause, fix=fix)


# ---------------------------------------------------------------------------------------- analytic size
def _element_size(config: Any) -> int:
    """Bytes per element of a config's dtype (``dtype`` or ``torch_dtype``, a dtype or its name); 4 if none."""
    for name in ("dtype", "torch_dtype"):
        dtype = getattr(config, name, None)
        if isinstance(dtype, str):
            dtype = getattr(torch, dtype.removeprefix("torch."), None)
        if isinstance(dtype, torch.dtype):
            return dtype.itemsize
    return 4


def _kv_geometry(config: Any) -> tuple[int, int, int] | None:
    """(layers, kv_heads, head_dim) under transformers' field names, or ``None`` if the config lacks them."""
    def field_of(*names: str) -> int | None:
        values = [getattr(config, n, None) for n in names]
        return next((int(v) for v in values if isinstance(v, int) and not isinstance(v, bool) and v > 0), None)

    layers = field_of("num_hidden_layers", "n_layer")
    heads = field_of("num_attention_heads", "n_head")
    hidden = field_of("hidden_size", "n_embd")
    head_dim = field_of("head_dim") or (hidden // heads if hidden and heads else None)
    kv_heads = field_of("num_key_value_heads") or heads
    return (layers, kv_heads, head_dim) if layers and kv_heads and head_dim else None


def kv_bytes_per_token(config: Any, element_size: int | None = None, batch: int = 1) -> int:
    """Analytic KV-cache bytes per token: 2 (K and V) x layers x kv_heads x head_dim x batch x bytes.

    ``config`` is anything with transformers' field names (``num_hidden_layers``,
    ``num_attention_heads``, optional ``num_key_value_heads``, ``head_dim`` or ``hidden_size``; GPT-2's
    ``n_layer``/``n_head``/``n_embd`` too). ``element_size`` defaults to the config's dtype. A config
    without those fields is a ``ValueError``, not a guess.
    """
    geometry = _kv_geometry(config)
    if geometry is None:
        raise ValueError(f"{type(config).__name__} does not give layers, KV heads and head size under "
                         "transformers' field names; pass kv_per_token= instead")
    layers, kv_heads, head_dim = geometry
    return 2 * layers * kv_heads * head_dim * batch * (element_size or _element_size(config))


@contextlib.contextmanager
def preserved_autograd_state() -> Iterator[None]:
    """Restore this thread's grad mode on exit, whatever the code inside did or raised (a loop under test
    may call ``torch.set_grad_enabled(False)`` and fail half way; ``inference_mode`` restores itself)."""
    grad = torch.is_grad_enabled()
    try:
        yield
    finally:
        torch.set_grad_enabled(grad)


# ---------------------------------------------------------------------------------------- the verdict
def _law(before: int, after: int) -> str:
    """How a quantity grew when the steps doubled: the ratio and the exponent of a power law through both
    (1 linear, 2 quadratic; a quadratic leak reads lower at small N, where its linear part still counts)."""
    if before <= 0 or after <= 0:
        return f"{fmt_bytes(before)} -> {fmt_bytes(after)}"
    return f"x{after / before:.2f}, growth exponent {math.log2(after / before):.2f}"


@dataclass
class LeakReport:
    """The outcome of :func:`check_decode_leak`: measurements at N and 2N steps and a verdict."""

    steps: int
    at_n: Retained
    at_2n: Retained
    kv_per_token: int | None  # analytic KV bytes per token, when a config or a value was given
    expected_growth: int  # what a KV cache adds from N to 2N steps: analytic if known, else measured
    reasons: list[str]
    explanation: str = ""

    @property
    def leak(self) -> bool:
        return bool(self.reasons)

    @property
    def growth(self) -> int:
        return self.at_2n.total_bytes - self.at_n.total_bytes

    @property
    def growth_ratio(self) -> float:
        """Retained at 2N over retained at N: about 2 for a KV cache alone, up to 4 for a chained graph."""
        return self.at_2n.total_bytes / self.at_n.total_bytes if self.at_n.total_bytes else float("nan")

    @property
    def verdict(self) -> str:
        return "LEAK" if self.leak else "ok"

    def as_row(self) -> dict[str, Any]:
        return {"steps": self.steps, "retained_n_bytes": self.at_n.total_bytes,
                "retained_2n_bytes": self.at_2n.total_bytes, "growth_bytes": self.growth,
                "expected_growth_bytes": self.expected_growth, "growth_ratio": self.growth_ratio,
                "kv_cache_2n_bytes": self.at_2n.cache_bytes, "beyond_state_2n_bytes": self.at_2n.saved_bytes,
                "saved_tensors_2n": self.at_2n.saved_tensors, "graph_nodes_2n": self.at_2n.graph_nodes,
                "verdict": self.verdict}

    def summary(self) -> str:
        a, b = self.at_n, self.at_2n
        return (f"{self.verdict}: retained {fmt_bytes(a.total_bytes)} after {self.steps} steps, "
                f"{fmt_bytes(b.total_bytes)} after {2 * self.steps} (x{self.growth_ratio:.2f}); its own state "
                f"{fmt_bytes(a.state_bytes)} -> {fmt_bytes(b.state_bytes)} (K/V-shaped {fmt_bytes(b.cache_bytes)}), "
                f"held by an autograd graph beyond it {fmt_bytes(a.saved_bytes)} -> {fmt_bytes(b.saved_bytes)}")


def _models_near(run: Callable[..., Any]) -> list[nn.Module]:
    """Modules a ``run`` callable closes over, for parameter names and the config (best effort)."""
    found: list[nn.Module] = []
    if isinstance(run, functools.partial):
        found += [a for a in (*run.args, *run.keywords.values()) if isinstance(a, nn.Module)]
        run = run.func
    owner = getattr(run, "__self__", None)
    if isinstance(owner, nn.Module):
        found.append(owner)
    try:
        closure = inspect.getclosurevars(run)
        found += [v for v in (*closure.nonlocals.values(), *closure.globals.values()) if isinstance(v, nn.Module)]
    except (TypeError, ValueError):  # builtins and callable objects have no closure to read
        pass
    return list({id(m): m for m in found}.values())  # each module once, in the order first found


def _explain(report: LeakReport) -> str:
    a, r = report.at_n, report.at_2n
    lines = [f"decode leak: after {2 * report.steps} steps the loop keeps {fmt_bytes(r.total_bytes)}: its own state "
             f"{fmt_bytes(r.state_bytes)} (K/V-shaped {fmt_bytes(r.cache_bytes)} in {r.cache_tensors} tensors) and "
             f"{fmt_bytes(r.saved_bytes)} beyond it (after {report.steps} steps: {fmt_bytes(a.total_bytes)}, of which "
             f"{fmt_bytes(a.saved_bytes)} beyond the state)."]
    lines += [f"  - {reason}" for reason in report.reasons]
    for kind, names in (("parameters", r.params_requiring_grad), ("input tensors", r.inputs_requiring_grad)):
        if names:
            more = f" (+{len(names) - 6} more)" if len(names) > 6 else ""
            lines.append(f"  - the graph reaches {len(names)} {kind} that require grad: {', '.join(names[:6])}{more}")
    if r.saved_tensors:
        ops = ", ".join(f"{op} {fmt_bytes(b)}" for op, b in list(r.saved_by_op.items())[:5])
        lines.append(f"  - largest by the op that saved them: {ops}")
    if r.has_graph:
        lines.append(f"  - cause: {r.cause}; allocation-site tools would point at where the saved tensors were made "
                     "(repeat_kv, cat), not at this.")
        lines.append(f"  - fix: {r.fix}.")
    return "\n".join(lines)


def compare_retained(at_n: Retained, at_2n: Retained, steps: int, *, config: Any = None,
                     kv_per_token: int | None = None) -> LeakReport:
    """Judge two measurements taken after ``steps`` and ``2 * steps`` decode steps (see :func:`check_decode_leak`).

    Separate from the runs so that one long run measured at N and 2N (as a study does) is judged exactly
    like two runs. ``config`` / ``kv_per_token`` only inform the report (``expected_growth``): the
    verdict is read from the tensors.
    """
    per_token = kv_per_token
    if per_token is None and config is not None:
        per_token = kv_bytes_per_token(config, at_2n.cache_element_size, at_2n.cache_batch or 1)
    expected = per_token * steps if per_token is not None else at_2n.cache_bytes - at_n.cache_bytes
    reasons: list[str] = []
    if at_2n.has_graph:
        reasons.append(f"an autograd graph hangs off the state: {at_2n.graph_nodes:,} nodes hold "
                       f"{at_2n.saved_tensors:,} "
                       f"tensors saved for backward, {fmt_bytes(at_2n.saved_bytes)} that no part of the state owns "
                       f"(after {steps} steps {fmt_bytes(at_n.saved_bytes)}: "
                       f"{_law(at_n.saved_bytes, at_2n.saved_bytes)}); it holds the graphs of {at_2n.forward_passes} "
                       "forward passes")
        if at_2n.graph_cache_tensors:
            chain = (f", chained across {at_2n.chained_steps} steps by their updates: each step's cache references the "
                     "previous step's graph, so nothing recorded since the first step can be freed"
                     if at_2n.chained_steps > 1 else "")
            reasons.append(f"{at_2n.graph_cache_tensors} of {at_2n.cache_tensors} K/V-shaped state tensors carry the "
                           f"graph (grad_fn / requires_grad){chain}")
    if at_n.state_bytes > 0 and at_2n.state_bytes > 2 * at_n.state_bytes:
        reasons.append(f"the state the loop returns grew from {fmt_bytes(at_n.state_bytes)} to "
                       f"{fmt_bytes(at_2n.state_bytes)} ({_law(at_n.state_bytes, at_2n.state_bytes)}) when the steps "
                       "doubled: more than doubled, which no cache does (its size is at most proportional to the "
                       "tokens it holds), so something kept per step grows with the context")
    report = LeakReport(steps, at_n, at_2n, per_token, expected, reasons)
    report.explanation = _explain(report) if report.leak else report.summary()
    return report


def check_decode_leak(run: Callable[[int], object], steps: int = 16, *, model: nn.Module | None = None,
                      config: Any = None, kv_per_token: int | None = None, raise_on_leak: bool = True) -> LeakReport:
    """Run ``run(steps)`` and ``run(2 * steps)``; fail if what they keep goes beyond the loop's state.

    ``run`` must build its own cache each call and return what the loop keeps (a cache of any class,
    a dict, list or tuple of tensors, a result object ...). ``model`` (else the modules ``run`` closes
    over) names the parameters in the message; ``config`` / ``kv_per_token`` (else the model's
    ``config``) give the analytic KV growth shown beside the measured one. See the module docstring for
    what counts as a leak. On a leak, raises :class:`DecodeLeakError` whose message explains what keeps
    the memory (with the retention explainer's summary), or returns the report if
    ``raise_on_leak=False``. Grad mode is restored afterwards even if ``run`` raises.
    """
    if not callable(run):
        raise TypeError("run must be a callable taking a step count and returning what the loop keeps")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    models = [model] if model is not None else _models_near(run)
    named = models[0] if models else None
    if config is None and kv_per_token is None:  # a model's own config, when it reads like a transformer's
        config = next((m.config for m in models if _kv_geometry(getattr(m, "config", None)) is not None), None)

    with preserved_autograd_state():
        kept = run(steps)
        at_n = measure_retained(kept, named)
        del kept
        gc.collect()
        kept = run(2 * steps)
        try:
            walk = walk_graph(kept, model=named)
            at_2n = _retained(walk)
            report = compare_retained(at_n, at_2n, steps, config=config, kv_per_token=kv_per_token)
            if report.leak and at_2n.has_graph:
                report.explanation += "\n\nretention explainer:\n" + explain_walk(walk).summary()
        finally:
            del kept
            walk = None  # it holds the same tensors
            gc.collect()
    if report.leak and raise_on_leak:
        raise DecodeLeakError(report)
    return report
