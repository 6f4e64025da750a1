"""The one walk of an autograd graph: what the tensors a loop keeps hold alive, decided from the tensors.

A decode loop keeps some objects between steps (a cache, the last logits, a list of outputs ...). Two
kinds of memory hang off them:

- **state**: the tensors reachable from those objects through containers and attributes. Among them,
  tensors of three or more dimensions are *K/V-shaped* -- (B, Hkv, S, D) and its relatives: paged
  blocks, int8 K/V with their scales -- and are reported as the cache; tokens, positions and
  last-position logits have two. No class name is read: a ``dict``, a ``tuple`` or an object of any
  class is searched the same way.
- **graph**: when grad mode recorded a graph, every node reachable from a state tensor's ``grad_fn``
  holds the tensors it saved for backward (its ``_saved_*`` attributes). They are alive only because
  the graph is.

:func:`walk_graph` finds both in one pass, counting each storage once (views of one buffer count
once; a model's parameters and buffers and the graph's leaves are weights, never counted), and reads
the graph's shape: how many forward passes it holds and how many of them are linked through the
state's own updates. :func:`kvlab.memory.retention.explain` and :func:`kvlab.memory.leakguard.measure_retained`
both read it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, fields, is_dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .census import keyed_storage

__all__ = ["walk_graph", "collect_tensors", "GraphWalk", "SavedStorage", "kv_shaped"]

# Never searched for tensors: scalars, text, torch handles, classes, and modules (their parameters and
# buffers are weights, which exist whether or not a loop runs).
_NOT_SEARCHED = (str, bytes, int, float, complex, bool, nn.Module, torch.dtype, torch.device, torch.Generator, type)


def kv_shaped(t: Tensor) -> bool:
    """A K/V-shaped state tensor: at least three dimensions (see the module docstring)."""
    return t.dim() >= 3


def collect_tensors(*objects: Any, max_depth: int = 5) -> list[Tensor]:
    """Every tensor reachable from ``objects``, each once, in discovery order: tensors, containers
    (dict, list, tuple, set), dataclasses and any object's attributes (``__dict__`` or ``__slots__``),
    up to ``max_depth`` levels deep. Modules are not searched (see ``_NOT_SEARCHED``)."""
    found: dict[int, Tensor] = {}
    seen: set[int] = set()
    todo: list[tuple[Any, int]] = [(obj, 0) for obj in reversed(objects)]
    while todo:
        obj, depth = todo.pop()
        if isinstance(obj, Tensor):
            found.setdefault(id(obj), obj)
            continue
        if obj is None or isinstance(obj, _NOT_SEARCHED) or depth > max_depth or id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, dict):
            items: Iterable[Any] = obj.values()
        elif isinstance(obj, (list, tuple, set, frozenset)):
            items = obj
        elif is_dataclass(obj):
            items = [getattr(obj, f.name, None) for f in fields(obj)]
        else:
            attrs = getattr(obj, "__dict__", None)
            if not isinstance(attrs, dict) and not callable(obj):
                slots = [n for c in type(obj).__mro__ for n in getattr(c, "__slots__", ()) if isinstance(n, str)]
                attrs = {n: getattr(obj, n, None) for n in slots}
            if not isinstance(attrs, dict):
                continue
            items = attrs.values()
        todo.extend((item, depth + 1) for item in reversed(list(items)))
    return list(found.values())


def _saved_attrs(cls: type, node: Any, cache: dict[type, tuple[str, ...]]) -> tuple[str, ...]:
    attrs = cache.get(cls)
    if attrs is None:
        attrs = tuple(a for a in dir(node) if a.startswith("_saved_"))
        if hasattr(node, "saved_tensors") and "saved_tensors" not in attrs:  # custom autograd.Function
            attrs = attrs + ("saved_tensors",)
        cache[cls] = attrs
    return attrs


def _same_kind_inputs(node: Any) -> list[Any]:
    """The nodes feeding ``node`` (its ``next_functions``) that are of its own kind."""
    kind = type(node)
    return [m for m, _ in node.next_functions if m is not None and type(m) is kind]


def _run_length(node: Any, memo: dict[Any, int]) -> int:
    """Longest run of nodes of ``node``'s own kind linked back from it through ``next_functions``: for a
    cache updated by ``cat`` (or written in place), one link per update. Iterative, to survive
    thousands of steps without recursion limits."""
    todo = [node]
    while todo:
        n = todo[-1]
        if n in memo:
            todo.pop()
            continue
        prev = _same_kind_inputs(n)
        missing = [m for m in prev if m not in memo]
        if missing:
            todo.extend(missing)
            continue
        memo[n] = 1 + max((memo[m] for m in prev), default=0)
        todo.pop()
    return memo[node]


def _bottom(node: Any) -> Any:
    """The deepest node of ``node``'s run of its own kind (see :func:`_run_length`)."""
    while True:
        prev = _same_kind_inputs(node)
        if not prev:
            return node
        node = prev[0]


def _state_chain(node: Any, memo: dict[Any, int]) -> int:
    """Forward passes linked through one state tensor's updates. Every update (``cat(previous, new)`` or
    an in-place write) is one link; when the state the first update started from was itself computed
    by a graph (kvlab's cache stores the prefill's K/V as they are), that pass counts too, while a
    first update onto a tensor without a graph (an empty or zeroed buffer) adds nothing."""
    first = _bottom(node).next_functions
    start = first[0][0] if first else None
    earlier = start is not None and type(start).__name__ != "AccumulateGrad"
    return _run_length(node, memo) + int(earlier)


def _forward_passes(uses: Counter) -> int:
    """Forward passes whose graphs are present, read from how often the graph uses its leaves: a weight
    is used once per pass, so the largest use count that at least two leaves share is the number of
    passes (a tied embedding, used twice per pass by itself, is skipped). One leaf: its count."""
    counts = Counter(uses.values())
    shared = [c for c, n in counts.items() if n >= 2]
    return max(shared) if shared else max(uses.values(), default=0)


@dataclass
class SavedStorage:
    """One storage a graph node keeps for backward (found first in ``op``'s ``attr``)."""

    ptr: int
    nbytes: int
    op: str
    attr: str
    tensor: Tensor  # the saved tensor's base (the view's storage owner)


@dataclass
class GraphWalk:
    """What the tensors reachable from some objects keep alive, found by one walk of their autograd graph.

    Storages are counted once: ``cache_bytes`` (K/V-shaped state), then ``other_bytes`` (the rest of
    the state), then ``saved`` (what the graph's nodes saved for backward, in walk order). The model's
    parameters and buffers, and any leaf of the graph, are never counted.
    """

    cache: list[Tensor]  # K/V-shaped state tensors (three or more dimensions)
    other: list[Tensor]  # the other state tensors (tokens, positions, logits ...)
    cache_bytes: int
    other_bytes: int
    nodes: int
    node_counts: dict[str, int]
    saved: list[SavedStorage]
    leaves: list[Tensor]  # tensors of the graph's AccumulateGrad nodes (parameters requiring grad ...)
    leaf_uses: list[int]  # how many graph nodes use each leaf, in the order of ``leaves``
    names: dict[int, str]  # the model's parameter and buffer names, by tensor id, in model order
    parameters_requiring_grad: list[str]  # of the model, each parameter once
    parameters_total: int
    cat_chain: int  # longest run of consecutive CatBackward nodes anywhere in the graph
    state_chain: int  # most forward passes linked through one state tensor's updates (see _state_chain)
    forward_passes: int  # forward passes whose graphs are present (see _forward_passes), at least state_chain

    @property
    def saved_bytes(self) -> int:
        return sum(s.nbytes for s in self.saved)

    @property
    def state_bytes(self) -> int:
        return self.cache_bytes + self.other_bytes

    @property
    def graph_cache_tensors(self) -> list[Tensor]:
        """K/V-shaped state tensors that carry a graph (a grad_fn, or require grad themselves)."""
        return [t for t in self.cache if t.grad_fn is not None or t.requires_grad]

    def leaf_name(self, t: Tensor) -> str:
        """A leaf's parameter name in the model, else its shape and dtype."""
        return self.names.get(id(t), f"<tensor {tuple(t.shape)} {str(t.dtype).removeprefix('torch.')}>")

    def is_parameter(self, t: Tensor) -> bool:
        """A leaf that is a weight: a parameter of the model given, or any ``nn.Parameter`` without one."""
        return id(t) in self.names if self.names else isinstance(t, nn.Parameter)


def walk_graph(*objects: Any, model: nn.Module | None = None, max_depth: int = 5) -> GraphWalk:
    """Walk the state reachable from ``objects`` (see :func:`collect_tensors`) and the autograd graph
    behind it. ``model`` names parameters and excludes its parameters' and buffers' storage from every
    count."""
    reachable = collect_tensors(*objects, max_depth=max_depth)
    names: dict[int, str] = {}
    weights: set[tuple[str, int]] = set()
    params_rg: list[str] = []
    params_total = 0
    if model is not None:
        for name, t in [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]:
            names.setdefault(id(t), name)
            info = keyed_storage(t)
            if info:
                weights.add(info[0])
        for name, p in model.named_parameters():
            params_total += 1
            if p.requires_grad:
                params_rg.append(name)

    counted: set[tuple[str, int]] = set()

    def count(tensors: Iterable[Tensor]) -> int:
        total = 0
        for t in tensors:
            info = keyed_storage(t)
            if info and info[0] not in weights and info[0] not in counted:
                counted.add(info[0])
                total += info[1]
        return total

    cache = [t for t in reachable if kv_shaped(t)]
    other = [t for t in reachable if not kv_shaped(t)]
    cache_bytes, other_bytes = count(cache), count(other)
    roots = {info[0] for t in reachable if (info := keyed_storage(t))}

    attr_cache: dict[type, tuple[str, ...]] = {}
    visited: set[Any] = set()
    stack = [t.grad_fn for t in reachable if t.grad_fn is not None]
    node_counts: Counter = Counter()
    uses: Counter = Counter()  # AccumulateGrad node -> nodes using its leaf
    saved: dict[tuple[str, int], SavedStorage] = {}
    cat_nodes: list[Any] = []
    while stack:
        node = stack.pop()
        if node in visited:
            continue
        visited.add(node)
        cls = type(node)
        op = cls.__name__
        node_counts[op] += 1
        if op.startswith("CatBackward"):
            cat_nodes.append(node)
        for attr in _saved_attrs(cls, node, attr_cache):
            try:
                value = getattr(node, attr)
            except (RuntimeError, AttributeError):
                continue  # freed by a backward pass, or not a tensor attribute
            for t in (value if isinstance(value, (tuple, list)) else (value,)):
                if not isinstance(t, Tensor):
                    continue
                info = keyed_storage(t)
                if info is None or info[0] in saved:
                    continue
                saved[info[0]] = SavedStorage(info[0][1], info[1], op, attr.removeprefix("_saved_"),
                                              t._base if t._base is not None else t)
        for nxt, _ in node.next_functions:
            if nxt is None:
                continue
            if type(nxt).__name__ == "AccumulateGrad":
                uses[nxt] += 1
            if nxt not in visited:
                stack.append(nxt)

    leaves = {node: node.variable for node in uses if isinstance(getattr(node, "variable", None), Tensor)}
    leaf_storages = {info[0] for t in leaves.values() if (info := keyed_storage(t))}
    # Parameters', buffers', leaves' and the roots' own storage are not "saved": weights exist anyway,
    # and the roots are counted above.
    kept = [s for key, s in saved.items() if key not in weights and key not in leaf_storages and key not in roots]
    memo: dict[Any, int] = {}
    cat_chain = max((_run_length(n, memo) for n in cat_nodes), default=0)
    state_chain = max((_state_chain(t.grad_fn, memo) for t in cache if t.grad_fn is not None), default=0)
    passes = max(_forward_passes(uses), state_chain, 1 if visited else 0)
    return GraphWalk(cache=cache, other=other, cache_bytes=cache_bytes, other_bytes=other_bytes, nodes=len(visited),
                     node_counts=dict(node_counts), saved=kept, leaves=list(leaves.values()),
                     leaf_uses=[uses[n] for n in leaves], names=names, parameters_requiring_grad=params_rg,
                     parameters_total=params_total, cat_chain=cat_chain, state_chain=state_chain,
                     forward_passes=passes)
