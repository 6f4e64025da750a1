"""A decode-loop leak check: does what the loop keeps grow faster than its KV cache?

A decode loop legitimately keeps one thing that grows with the number of tokens: the KV cache, whose
size is known in closed form (2 x layers x kv_heads x head_dim x tokens x batch x bytes). The
incident's "cache leak" was everything else: with trainable weights each step recorded an autograd
graph, the cache's ``grad_fn`` linked every step to the previous one, and all saved activations
stayed alive — growth quadratic in tokens, attributed by heap tools to ``repeat_kv`` and ``cat``.

:func:`check_decode_leak` runs a user's loop for N and 2N steps and measures, from the objects the
loop returns, the bytes it really keeps: the cache tensors plus every tensor the autograd graph
reachable from them has saved for backward, deduplicated by storage, parameters excluded. That is an
exact count, independent of the allocator and of RSS noise. The loop fails when the growth from N to
2N exceeds the KV cache's analytic growth (with a tolerance), or at once when a cache tensor carries a
graph — then the error explains *why* memory is kept (parameters requiring grad, steps chained through
the cache), not where it was allocated.

It works on any model: the loop is a callable ``run(steps) -> kept`` (a kvlab ``Generation``, a cache,
a transformers ``DynamicCache``, a tuple of those ...).
"""

from __future__ import annotations

import contextlib
import functools
import gc
import inspect
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from kvlab.caches import kv_bytes
from kvlab.config import MistralConfig
from .trace import fmt_bytes
from .retention import explain, walk_graph

__all__ = ["DecodeLeakError", "Retained", "LeakReport", "measure_retained", "compare_retained", "check_decode_leak",
           "kv_bytes_per_token", "preserved_autograd_state"]

_KIB = 1024


class DecodeLeakError(AssertionError):
    """A decode loop keeps more memory than its KV cache explains; ``.report`` is the :class:`LeakReport`.

    An ``AssertionError`` so that test runners report it as a failed check rather than a crash.
    """

    def __init__(self, report: "LeakReport") -> None:
        self.report = report
        super().__init__(report.explanation)


@dataclass
class Retained:
    """What a loop's returned objects keep alive, in bytes of unique storages (parameters excluded)."""

    total_bytes: int  # everything below, each storage once
    cache_bytes: int  # the KV cache's own tensors
    saved_bytes: int  # tensors saved for backward by the graph reachable from the kept tensors
    other_bytes: int  # other kept tensors (tokens, logits, ...)
    graph_nodes: int
    saved_tensors: int  # unique storages among the saved tensors
    cache_tensors: int
    graph_cache_tensors: int  # cache tensors with a grad_fn or requires_grad
    chained_steps: int  # longest run of the cache's own op (e.g. cat) linking steps together
    params_requiring_grad: list[str]  # leaves the graph reaches: parameter names (or shapes)
    saved_by_op: dict[str, int] = field(default_factory=dict)  # saved bytes by autograd node
    cache_element_size: int | None = None
    cache_batch: int | None = None

    @property
    def has_graph(self) -> bool:
        return self.graph_nodes > 0


def measure_retained(kept: object, model: nn.Module | None = None) -> Retained:
    """Bytes that ``kept`` holds alive through its tensors and their autograd graph.

    Measured by :func:`kvlab.memory.retention.walk_graph`: saved tensors are deduplicated by storage against
    each other and against the kept tensors, and the storages of ``model``'s parameters and buffers and
    of any graph leaf are excluded — weights exist whether or not a loop runs.
    """
    walk = walk_graph(kept, model=model)
    by_op: dict[str, int] = defaultdict(int)
    for saved in walk.saved:
        by_op[saved.op] += saved.nbytes
    order = {name: i for i, name in enumerate(walk.names.values())}  # model order reads best: embed, layer 0 ...
    params = sorted((walk.names.get(id(v), f"<tensor {tuple(v.shape)} {str(v.dtype).removeprefix('torch.')}>")
                     for v in walk.leaves if v.requires_grad), key=lambda n: (order.get(n, len(order)), n))
    sizes = {t.element_size() for t in walk.cache}
    batches = {t.shape[0] for t in walk.cache if t.dim() == 4}
    saved_bytes = walk.saved_bytes
    return Retained(
        total_bytes=walk.cache_bytes + walk.other_bytes + saved_bytes, cache_bytes=walk.cache_bytes,
        saved_bytes=saved_bytes, other_bytes=walk.other_bytes, graph_nodes=walk.nodes, saved_tensors=len(walk.saved),
        cache_tensors=len(walk.cache), graph_cache_tensors=len(walk.graph_cache_tensors),
        chained_steps=walk.cache_chain, params_requiring_grad=params,
        saved_by_op=dict(sorted(by_op.items(), key=lambda kv: -kv[1])),
        cache_element_size=sizes.pop() if len(sizes) == 1 else None,
        cache_batch=batches.pop() if len(batches) == 1 else None)


# ---------------------------------------------------------------------------------------- the check
def _element_size(config: Any) -> int:
    """Bytes per element of a config's dtype (kvlab's ``dtype``, transformers' ``dtype``/``torch_dtype``);
    4 when it names none."""
    dtype = getattr(config, "dtype", None)
    if not isinstance(dtype, torch.dtype):
        dtype = getattr(config, "torch_dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, torch.float32)
    return dtype.itemsize if isinstance(dtype, torch.dtype) else 4


def _kv_shape(config: Any) -> MistralConfig:
    """``config`` itself when it is kvlab's; else a kvlab config with the fields that size a KV cache
    taken from anything that has the same field names (a transformers config)."""
    if isinstance(config, MistralConfig):
        return config
    heads = int(config.num_attention_heads)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
    return MistralConfig(hidden_size=int(getattr(config, "hidden_size", None) or heads * head_dim),
                         num_hidden_layers=int(config.num_hidden_layers), num_attention_heads=heads,
                         num_key_value_heads=int(getattr(config, "num_key_value_heads", None) or heads),
                         head_dim=head_dim, sliding_window=None, torch_dtype="float32")


def kv_bytes_per_token(config: Any, element_size: int | None = None, batch: int = 1) -> int:
    """Analytic KV-cache bytes per token: 2 (K and V) x layers x kv_heads x head_dim x batch x bytes.

    ``config`` is a kvlab :class:`~kvlab.config.MistralConfig` or anything with the same field names
    (a transformers config). ``element_size`` defaults to the config's dtype. The formula is
    :func:`kvlab.caches.kv_bytes`'s, for one token.
    """
    if element_size is None:
        element_size = _element_size(config)
    elements = kv_bytes(_kv_shape(config), batch, 1, dtype=torch.uint8)  # at one byte each: the element count
    return elements * element_size


@contextlib.contextmanager
def preserved_autograd_state() -> Iterator[None]:
    """Restore grad mode on exit, whatever the code inside did or raised.

    A loop under test may call ``torch.set_grad_enabled(False)`` and fail half way; the caller's mode
    must not depend on that. (``inference_mode`` is only entered as a context, which restores itself.)
    """
    grad = torch.is_grad_enabled()
    try:
        yield
    finally:
        torch.set_grad_enabled(grad)


@dataclass
class LeakReport:
    """The outcome of :func:`check_decode_leak`: measurements at N and 2N steps and a verdict."""

    steps: int
    at_n: Retained
    at_2n: Retained
    kv_per_token: int | None  # analytic bytes per token, when a config was available
    expected_growth: int  # what the KV cache may add from N to 2N steps
    rtol: float
    atol_bytes: int
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
                "kv_cache_2n_bytes": self.at_2n.cache_bytes, "saved_tensors_2n": self.at_2n.saved_tensors,
                "graph_nodes_2n": self.at_2n.graph_nodes, "verdict": self.verdict}

    def summary(self) -> str:
        return (f"{self.verdict}: retained {fmt_bytes(self.at_n.total_bytes)} after {self.steps} steps, "
                f"{fmt_bytes(self.at_2n.total_bytes)} after {2 * self.steps} (x{self.growth_ratio:.2f}); "
                f"growth {fmt_bytes(self.growth)} vs KV cache growth {fmt_bytes(self.expected_growth)}")


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
    except (TypeError, ValueError):
        pass
    unique: dict[int, nn.Module] = {}
    for m in found:
        unique.setdefault(id(m), m)
    return list(unique.values())


def _retention_summary(kept: object, model: nn.Module | None) -> str:
    """The retention explainer's summary of ``kept`` (:func:`kvlab.memory.retention.explain`)."""
    try:
        return explain(kept, model=model).summary()
    except Exception as exc:  # the explanation must never hide the leak itself
        return f"(retention explainer unavailable for this object: {type(exc).__name__}: {exc})"


def _explain(report: LeakReport) -> str:
    r = report.at_2n
    lines = [f"decode leak: what the loop keeps grew by {fmt_bytes(report.growth)} from {report.steps} to "
             f"{2 * report.steps} steps, while the KV cache accounts for {fmt_bytes(report.expected_growth)} "
             f"(retained {fmt_bytes(report.at_n.total_bytes)} -> {fmt_bytes(r.total_bytes)}, x{report.growth_ratio:.2f})."]
    lines += [f"  - {reason}" for reason in report.reasons]
    if r.params_requiring_grad:
        shown = ", ".join(r.params_requiring_grad[:6])
        more = f" (+{len(r.params_requiring_grad) - 6} more)" if len(r.params_requiring_grad) > 6 else ""
        lines.append(f"  - the graph reaches {len(r.params_requiring_grad)} parameters that require grad: {shown}{more}")
    if r.saved_tensors:
        ops = ", ".join(f"{op} {fmt_bytes(b)}" for op, b in list(r.saved_by_op.items())[:5])
        lines.append(f"  - {r.saved_tensors} tensors saved for backward over {r.graph_nodes} graph nodes hold "
                     f"{fmt_bytes(r.saved_bytes)}; largest by op: {ops}")
    if r.has_graph:
        lines.append("  - allocation-site tools would point at repeat_kv and cat, where these tensors were made; "
                     "the cause is that a graph is recorded and kept at all.")
        lines.append("  - fix: load weights with requires_grad=False (model.requires_grad_(False)), "
                     "or decode under torch.inference_mode(); a cache can also detach() what it stores.")
    return "\n".join(lines)


def compare_retained(at_n: Retained, at_2n: Retained, steps: int, *, config: Any = None,
                     kv_per_token: int | None = None, rtol: float = 0.5, atol_bytes: int = 64 * _KIB) -> LeakReport:
    """Judge two measurements taken after ``steps`` and ``2 * steps`` decode steps (see :func:`check_decode_leak`).

    Separate from the runs so that one long run measured at N and 2N (as the demo does) is judged
    exactly like two runs.
    """
    per_token = kv_per_token
    if per_token is None and config is not None:
        with contextlib.suppress(AttributeError, TypeError, ValueError):
            per_token = kv_bytes_per_token(config, at_2n.cache_element_size, at_2n.cache_batch or 1)
    cache_growth = at_2n.cache_bytes - at_n.cache_bytes
    analytic = per_token * steps if per_token is not None else None
    expected = max(analytic or 0, cache_growth)
    reasons: list[str] = []
    if at_2n.graph_cache_tensors:
        chain = (f", chained across {at_2n.chained_steps} steps: each step's cache references the previous "
                 "step's graph, so nothing recorded since the first step can be freed") if at_2n.chained_steps > 1 else ""
        reasons.append(f"{at_2n.graph_cache_tensors} of {at_2n.cache_tensors} cache tensors carry an autograd "
                       f"graph (grad_fn / requires_grad){chain}")
    excess = (at_2n.total_bytes - at_n.total_bytes) - expected
    allowed = rtol * (analytic if analytic is not None else expected) + atol_bytes
    if excess > allowed:
        reasons.append(f"retained memory grew {fmt_bytes(excess)} more than the KV cache's "
                       f"{'analytic ' if analytic is not None else 'measured '}growth (allowed: {fmt_bytes(allowed)})")
    report = LeakReport(steps, at_n, at_2n, per_token, expected, rtol, atol_bytes, reasons)
    report.explanation = _explain(report) if report.leak else report.summary()
    if at_2n.cache_tensors == 0:
        report.explanation += ("\n(no cache tensors were found in what the loop returned: return the cache "
                               "or a Generation so that its growth can be compared)")
    return report


def check_decode_leak(run: Callable[[int], object], steps: int = 16, *, model: nn.Module | None = None,
                      config: Any = None, kv_per_token: int | None = None, rtol: float = 0.5,
                      atol_bytes: int = 64 * _KIB, raise_on_leak: bool = True) -> LeakReport:
    """Run ``run(steps)`` and ``run(2 * steps)``; fail if what they keep grows faster than a KV cache.

    ``run`` must build its own cache each call and return what the loop keeps (a ``Generation``, the
    cache, a tuple ...). The KV cache's growth from N to 2N steps is ``kv_per_token x N`` bytes, taken
    from ``kv_per_token``, else from ``config`` (or the config of ``model`` / a module ``run`` closes
    over) with the cache's element size and batch, else from the measured growth of the cache tensors;
    a cache's own tensors may always grow as its allocation policy dictates. The loop leaks when

    - a cache tensor has a ``grad_fn`` or requires grad (every step then links to the previous one), or
    - retained growth exceeds the cache's by more than ``rtol`` x expected growth + ``atol_bytes``.

    On a leak, raises :class:`DecodeLeakError` whose message explains what keeps the memory (with the
    retention explainer's summary), or returns the report if ``raise_on_leak=False``.
    Grad mode is restored afterwards even if ``run`` raises.
    """
    if not callable(run):
        raise TypeError("run must be a callable taking a step count and returning what the loop keeps")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    models = [model] if model is not None else _models_near(run)
    named = models[0] if models else None
    if config is None:
        config = next((getattr(m, "config") for m in models if getattr(m, "config", None) is not None), None)

    with preserved_autograd_state():
        kept = run(steps)
        at_n = measure_retained(kept, named)
        del kept
        gc.collect()
        kept = run(2 * steps)
        try:
            at_2n = measure_retained(kept, named)
            report = compare_retained(at_n, at_2n, steps, config=config, kv_per_token=kv_per_token,
                                      rtol=rtol, atol_bytes=atol_bytes)
            if report.leak:
                report.explanation += "\n\nretention explainer:\n" + _retention_summary(kept, named)
        finally:
            del kept
            gc.collect()
    if report.leak and raise_on_leak:
        raise DecodeLeakError(report)
    return report
