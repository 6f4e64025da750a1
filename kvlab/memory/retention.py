"""Why memory stays alive: walk the autograd graph hanging off what a decode loop keeps.

Allocation-site tools (heap profilers, :mod:`kvlab.memory.trace`, CUDA snapshots) point at ``repeat_kv``
and ``cat``: where the memory was *allocated*. The reason it is still alive is elsewhere. If any weight
requires grad, every op records a backward node that holds on to the tensors it will need (its
``SavedVariable``\\ s), and because each step's KV cache is ``cat(previous_cache, new)``, the cache's
``grad_fn`` reaches back through every earlier step. :func:`explain` follows ``grad_fn`` and
``next_functions`` from whatever the loop keeps (the cache, the last logits, any object holding
tensors), unpacks each node's ``_saved_*`` tensors, de-duplicates them by storage, and names the cause:
which parameters require grad, how many decode steps the graph chains together, and how many bytes
of saved tensors that pins, by op and by site. The walk itself is :func:`walk_graph`, kvlab's only one:
:func:`kvlab.memory.leakguard.measure_retained` counts bytes through it too.

:class:`SavedTensorTags` (optional, used around generation) tags every tensor autograd saves with the
site and decode step it was saved in, and records which site created each graph node, so the report
can say "allocated in repeat_kv" rather than only "saved by BmmBackward0".
"""

from __future__ import annotations

import bisect
import contextlib
from dataclasses import dataclass, fields, is_dataclass
from typing import Any, Iterable, Iterator

import pandas as pd
import torch
from torch import Tensor, nn

from . import trace as memtrace
from kvlab.caches import KVCache
from .trace import MiB, TracerError, caller_site
from .regions import add_listener, current_site, remove_listener, site_path

__all__ = ["explain", "RetentionReport", "SavedTensorTags", "tag_saved_tensors", "collect_tensors",
           "walk_graph", "GraphWalk", "SavedStorage"]

memtrace.TOOL_FILES.add(__file__)

try:  # the number the next autograd node will get; lets a node be matched to the site that created it
    _next_sequence_nr = torch._C._autograd._get_sequence_nr
except AttributeError:  # pragma: no cover - older PyTorch
    _next_sequence_nr = None


# --------------------------------------------------------------------------------------------- tagging
class SavedTensorTags:
    """Context manager tagging each tensor autograd saves with its site and decode step.

    Installs ``torch.autograd.graph.saved_tensors_hooks`` whose pack hook records, per storage, the
    site open when the tensor was saved (kvlab's :func:`~kvlab.memory.regions.site` name, else the calling
    Python frame) and the decode step, and returns the tensor unchanged, so memory behaves exactly as
    without it. For kvlab's model it also logs autograd's node sequence number at every site boundary,
    so a saved tensor can be charged to the site that *produced* it (``repeat_kv``) rather than the
    one that saved it (the attention matmul). Pass :meth:`mark_step` as the loop's ``on_step``.
    Only one may be active at a time.
    """

    _active: "SavedTensorTags | None" = None

    def __init__(self) -> None:
        self.saved: dict[int, tuple[str, int]] = {}  # storage address -> (site saved in, step)
        self._site_seq: list[int] = []  # node sequence numbers at which the innermost site changed
        self._site_names: list[str | None] = []
        self._step_seq: list[int] = []  # node sequence numbers at which each step started
        self._step_ids: list[int] = []
        self.step = 0  # the step being computed
        self._hooks: Any = None
        self.running = False

    # -------------------------------------------------------------- lifecycle
    def __enter__(self) -> "SavedTensorTags":
        if SavedTensorTags._active is not None:
            raise TracerError("saved-tensor tagging is already active; only the innermost saved_tensors_hooks "
                              "would run, so nested taggers cannot both see every saved tensor")
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, _unpack)
        self._hooks.__enter__()
        try:
            add_listener(self._on_site)
        except BaseException:
            self._hooks.__exit__(None, None, None)
            raise
        SavedTensorTags._active = self
        self.running = True
        self._log_step(0)
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            remove_listener(self._on_site)
        finally:
            try:
                self._hooks.__exit__(None, None, None)
            finally:
                SavedTensorTags._active = None
                self.running = False

    # -------------------------------------------------------------- hooks
    def _pack(self, t: Tensor) -> Tensor:
        try:
            ptr = t.untyped_storage().data_ptr()
        except (RuntimeError, NotImplementedError):
            return t
        name = current_site()
        self.saved[ptr] = (name if name is not None else caller_site(2), self.step)
        return t

    def _on_site(self, name: str, entering: bool) -> None:
        if _next_sequence_nr is None:
            return
        path = site_path()  # called before the region is pushed (enter) or popped (exit)
        inner = name if entering else (path[-2] if len(path) >= 2 else None)
        self._site_seq.append(_next_sequence_nr())
        self._site_names.append(inner)

    def _log_step(self, step: int) -> None:
        if _next_sequence_nr is not None:
            self._step_seq.append(_next_sequence_nr())
            self._step_ids.append(step)

    def mark_step(self, step: Any = None) -> None:
        """Close a decode step (kvlab's ``Step``, an int, or ``None`` to count up)."""
        index = memtrace._step_index(step, self.step - 1 if self.step else None)
        self.step = index + 1
        self._log_step(self.step)

    __call__ = mark_step

    # -------------------------------------------------------------- lookups
    def node_origin(self, node: Any) -> tuple[str | None, int | None]:
        """(site, step) in which autograd ``node`` was created, from its sequence number; ``None`` if unknown."""
        try:
            seq = node._sequence_nr()
        except (AttributeError, RuntimeError):
            return None, None
        site = step = None
        i = bisect.bisect_right(self._site_seq, seq) - 1
        if i >= 0:
            site = self._site_names[i]
        j = bisect.bisect_right(self._step_seq, seq) - 1
        if j >= 0:
            step = self._step_ids[j]
        return site, step


def _unpack(t: Tensor) -> Tensor:
    return t


@contextlib.contextmanager
def tag_saved_tensors() -> Iterator[SavedTensorTags]:
    """``with tag_saved_tensors() as tags: generate(..., on_step=tags.mark_step)``."""
    with SavedTensorTags() as tags:
        yield tags


# --------------------------------------------------------------------------------------------- roots
def _is_cache_object(obj: object) -> bool:
    """A KV cache: kvlab's, or transformers' (``DynamicCache``, ``StaticCache`` ... and their per-layer
    objects in ``cache_utils``)."""
    if isinstance(obj, KVCache):
        return True
    return any(c.__name__.endswith("Cache") or (c.__name__.endswith("Layer") and "cache" in c.__module__.lower())
               for c in type(obj).__mro__)


_NOT_SEARCHED = (str, bytes, int, float, bool, nn.Module, torch.dtype, torch.device, torch.Generator, type)


def _reachable(objects: Iterable[Any], max_depth: int) -> list[tuple[Tensor, bool]]:
    """Every tensor reachable from ``objects``, in discovery order, with whether it is KV-cache content.

    Cache content: a kvlab cache's ``tensors()`` (its K/V; its other attributes, such as positions, are
    bookkeeping), and whatever a transformers cache object's attributes hold.
    """
    found: dict[int, tuple[Tensor, bool]] = {}
    seen: set[int] = set()

    def visit(obj: Any, depth: int, in_cache: bool) -> None:
        if isinstance(obj, Tensor):
            found.setdefault(id(obj), (obj, in_cache))
            return
        if obj is None or isinstance(obj, _NOT_SEARCHED) or depth > max_depth or id(obj) in seen:
            return
        seen.add(id(obj))
        kv = isinstance(obj, KVCache)
        tensors = getattr(obj, "tensors", None)
        if callable(tensors) and not isinstance(obj, (dict, list, tuple)):
            try:
                for t in tensors():
                    visit(t, depth + 1, kv or in_cache or _is_cache_object(obj))
            except TypeError:
                pass
        child = in_cache
        if isinstance(obj, dict):
            items: Iterable[Any] = obj.values()
        elif isinstance(obj, (list, tuple, set, frozenset)):
            items = obj
        elif is_dataclass(obj):
            items = [getattr(obj, f.name, None) for f in fields(obj)]
        else:
            attrs = getattr(obj, "__dict__", None)
            if attrs is None and not callable(obj) and hasattr(type(obj), "__slots__"):
                attrs = {name: getattr(obj, name, None) for name in type(obj).__slots__ if isinstance(name, str)}
            if not isinstance(attrs, dict):
                return
            items = list(attrs.values())
            child = False if kv else in_cache or _is_cache_object(obj)
        for item in items:
            visit(item, depth + 1, child)

    for obj in objects:
        visit(obj, 0, False)
    return list(found.values())


def collect_tensors(*objects: Any, max_depth: int = 5) -> list[Tensor]:
    """Every tensor reachable from ``objects``: tensors, containers, dataclasses (kvlab's ``Generation``),
    kvlab caches (``.tensors()``) and plain objects' attributes (transformers' ``DynamicCache``).
    Modules are not searched: their parameters are what the report names, not what the loop keeps."""
    return [t for t, _ in _reachable(objects, max_depth)]


def _storage(t: Tensor) -> tuple[tuple[str, int], int] | None:
    """(key, bytes) of the storage behind ``t`` -- views of one buffer count once; ``None`` for tensors
    without data (meta, sparse, empty)."""
    if t.device.type == "meta" or t.is_sparse:
        return None
    try:
        st = t.untyped_storage()
    except (RuntimeError, NotImplementedError):
        return None
    ptr = st.data_ptr()
    return ((str(t.device), ptr), st.nbytes()) if ptr else None


def _saved_attrs(cls: type, node: Any, cache: dict[type, tuple[str, ...]]) -> tuple[str, ...]:
    attrs = cache.get(cls)
    if attrs is None:
        attrs = tuple(a for a in dir(node) if a.startswith("_saved_"))
        if hasattr(node, "saved_tensors") and "saved_tensors" not in attrs:  # custom autograd.Function
            attrs = attrs + ("saved_tensors",)
        cache[cls] = attrs
    return attrs


def _chain_length(node: Any, memo: dict[Any, int]) -> int:
    """Longest run of nodes of ``node``'s own kind linked back from it through ``next_functions``: for a
    cache updated by ``cat`` (or written in place), one link per decode step chained to the next.
    Iterative, to survive thousands of steps without recursion limits."""
    kind = type(node).__name__
    todo = [node]
    while todo:
        n = todo[-1]
        if n in memo:
            todo.pop()
            continue
        prev = [m for m, _ in n.next_functions if m is not None and type(m).__name__ == kind]
        missing = [m for m in prev if m not in memo]
        if missing:
            todo.extend(missing)
            continue
        memo[n] = 1 + max((memo[m] for m in prev), default=0)
        todo.pop()
    return memo[node]


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

    Storages are counted once: ``cache_bytes`` (KV-cache content), then ``other_bytes`` (every other
    reachable tensor), then ``saved`` (what the graph's nodes saved for backward, in walk order). The
    model's parameters and buffers, and any leaf of the graph, are never counted: weights exist whether
    or not a loop runs.
    """

    cache: list[Tensor]  # KV-cache tensors among the roots
    other: list[Tensor]  # the other root tensors (logits, tokens, position bookkeeping ...)
    cache_bytes: int
    other_bytes: int
    nodes: int
    node_counts: dict[str, int]
    saved: list[SavedStorage]
    leaves: list[Tensor]  # tensors of the graph's AccumulateGrad nodes (parameters requiring grad ...)
    names: dict[int, str]  # the model's parameter and buffer names, by tensor id, in model order
    parameters_requiring_grad: list[str]  # of the model, each parameter once
    parameters_total: int
    cat_chain: int  # longest run of consecutive CatBackward nodes anywhere in the graph
    cache_chain: int  # longest run of one op kind back from a cache tensor's grad_fn

    @property
    def saved_bytes(self) -> int:
        return sum(s.nbytes for s in self.saved)

    @property
    def graph_cache_tensors(self) -> list[Tensor]:
        """Cache tensors that carry a graph (a grad_fn, or require grad themselves)."""
        return [t for t in self.cache if t.grad_fn is not None or t.requires_grad]


def walk_graph(*objects: Any, model: nn.Module | None = None, max_depth: int = 5) -> GraphWalk:
    """Walk the autograd graph behind every tensor reachable from ``objects`` (see :func:`collect_tensors`).

    ``model`` names parameters and excludes its parameters' and buffers' storage from every count.
    The one graph walk of kvlab: :func:`explain` and :func:`kvlab.memory.leakguard.measure_retained` read it.
    """
    reachable = _reachable(objects, max_depth)
    names: dict[int, str] = {}
    weights: set[tuple[str, int]] = set()
    params_rg: list[str] = []
    params_total = 0
    if model is not None:
        for name, t in [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]:
            names.setdefault(id(t), name)
            info = _storage(t)
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
            info = _storage(t)
            if info and info[0] not in weights and info[0] not in counted:
                counted.add(info[0])
                total += info[1]
        return total

    cache = [t for t, in_cache in reachable if in_cache]
    other = [t for t, in_cache in reachable if not in_cache]
    cache_bytes, other_bytes = count(cache), count(other)
    roots = {info[0] for t, _ in reachable if (info := _storage(t))}

    attr_cache: dict[type, tuple[str, ...]] = {}
    visited: set[Any] = set()
    stack = [t.grad_fn for t, _ in reachable if t.grad_fn is not None]
    node_counts: dict[str, int] = {}
    saved: dict[tuple[str, int], SavedStorage] = {}
    leaves: dict[int, Tensor] = {}
    leaf_storages: set[tuple[str, int]] = set()
    cat_nodes: list[Any] = []
    while stack:
        node = stack.pop()
        if node in visited:
            continue
        visited.add(node)
        cls = type(node)
        op = cls.__name__
        node_counts[op] = node_counts.get(op, 0) + 1
        if op == "AccumulateGrad":
            var = getattr(node, "variable", None)
            if isinstance(var, Tensor):
                leaves[id(var)] = var
                info = _storage(var)
                if info:
                    leaf_storages.add(info[0])
        elif op.startswith("CatBackward"):
            cat_nodes.append(node)
        for attr in _saved_attrs(cls, node, attr_cache):
            try:
                value = getattr(node, attr)
            except (RuntimeError, AttributeError):
                continue  # freed by a backward pass, or not a tensor attribute
            for t in (value if isinstance(value, (tuple, list)) else (value,)):
                if not isinstance(t, Tensor):
                    continue
                info = _storage(t)
                if info is None or info[0] in saved:
                    continue
                saved[info[0]] = SavedStorage(info[0][1], info[1], op, attr.removeprefix("_saved_"),
                                              t._base if t._base is not None else t)
        for nxt, _ in node.next_functions:
            if nxt is not None and nxt not in visited:
                stack.append(nxt)

    # Parameters', buffers', leaves' and the roots' own storage are not "saved": weights exist anyway,
    # and the roots are counted above.
    kept = [s for key, s in saved.items() if key not in weights and key not in leaf_storages and key not in roots]
    memo: dict[Any, int] = {}
    cat_chain = max((_chain_length(n, memo) for n in cat_nodes), default=0)
    cache_chain = max((_chain_length(t.grad_fn, memo) for t in cache if t.grad_fn is not None), default=0)
    return GraphWalk(cache=cache, other=other, cache_bytes=cache_bytes, other_bytes=other_bytes, nodes=len(visited),
                     node_counts=node_counts, saved=kept, leaves=list(leaves.values()), names=names,
                     parameters_requiring_grad=params_rg, parameters_total=params_total, cat_chain=cat_chain,
                     cache_chain=cache_chain)


# --------------------------------------------------------------------------------------------- report
@dataclass
class RetentionReport:
    """What the autograd graph behind a loop's state keeps alive. Bytes are storage bytes."""

    saved: pd.DataFrame  # one row per saved storage: bytes, op, attr, site, step, shape, dtype, device
    graph_nodes: int
    node_counts: dict[str, int]
    leaves: pd.DataFrame  # leaf tensors in the graph that require grad: name, shape, numel
    parameters_requiring_grad: list[str]  # of the model passed to explain(), by name
    parameters_total: int
    cat_chain: int  # longest run of consecutive CatBackward nodes: cache updates linked together
    tagged_steps: int | None  # distinct decode steps among the saved tensors (when tagged)
    root_bytes: int  # what the given objects hold themselves
    roots: int
    site_source: str  # how sites were found: "tracer", "tags", or "none"

    @property
    def saved_bytes(self) -> int:
        return int(self.saved["bytes"].sum()) if len(self.saved) else 0

    @property
    def steps_chained(self) -> int:
        """Decode steps whose graphs are linked: from the step tags when present, else the cache's cat chain."""
        if self.tagged_steps:
            return self.tagged_steps
        return self.cat_chain + 1 if self.cat_chain else (1 if self.graph_nodes else 0)

    @property
    def retains(self) -> bool:
        return self.graph_nodes > 0

    def _group(self, key: str) -> pd.DataFrame:
        if not len(self.saved):
            return pd.DataFrame(columns=[key, "bytes", "tensors", "share"])
        df = self.saved.groupby(key, dropna=False).agg(bytes=("bytes", "sum"), tensors=("bytes", "size"))
        df = df.sort_values("bytes", ascending=False).reset_index()
        df["share"] = df["bytes"] / df["bytes"].sum()
        return df

    def by_op(self) -> pd.DataFrame:
        """Saved bytes by the backward node that saved them (``BmmBackward0``, ``SoftmaxBackward0`` ...)."""
        return self._group("op")

    def by_site(self) -> pd.DataFrame:
        """Saved bytes by site: where the storage was allocated (tracer or node tags), else where it was saved."""
        return self._group("site")

    def by_step(self) -> pd.DataFrame:
        """Saved bytes by decode step (needs :class:`SavedTensorTags` or a tracer)."""
        return self._group("step").sort_values("step", ignore_index=True)

    def summary(self) -> str:
        """One paragraph naming the cause (or saying that nothing is retained)."""
        held = f"the given objects hold {self.root_bytes / MiB:.2f} MiB themselves"
        if not self.retains:
            text = (f"Nothing retained: no autograd graph hangs off the {self.roots} tensors given "
                    f"(0 graph nodes, 0 saved tensors); {held}.")
            if self.parameters_requiring_grad:
                text += (f" Note: {len(self.parameters_requiring_grad)} parameters still require grad — harmless "
                         "here, but the same loop outside no_grad/inference_mode would record a graph.")
            return text
        if self.parameters_requiring_grad:
            names = self.parameters_requiring_grad
            shown = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
            cause = (f"{len(names)} of {self.parameters_total} parameters require grad ({shown}), so every "
                     f"forward pass records an autograd graph")
        elif len(self.leaves):
            cause = (f"{len(self.leaves)} leaf tensors that require grad feed the computation, so every "
                     f"forward pass records an autograd graph")
        else:
            cause = "grad mode recorded an autograd graph"
        if self.cat_chain:
            chain = (f"the cache's grad_fn chains {self.steps_chained} decode steps "
                     f"({self.cat_chain} CatBackward0 links)")
        else:
            chain = f"the graph spans {self.steps_chained} decode step(s)"
        text = (f"Autograd is keeping memory alive: {cause}; {chain} across {self.graph_nodes:,} graph "
                f"nodes, which hold {self.saved_bytes / MiB:.1f} MiB of saved tensors "
                f"({len(self.saved):,} storages, not counting parameters); {held}.")
        if self.site_source != "none":
            sites = self.by_site().head(3)
            parts = [f"{row.share:.0%} in {row.site}" for row in sites.itertuples()]
            text += f" By site: {', '.join(parts)}."
        ops = self.by_op().head(3)
        if len(ops):
            text += " Saved by: " + ", ".join(f"{row.op} {row.share:.0%}" for row in ops.itertuples()) + "."
        text += (" Fix: load the weights frozen (requires_grad_(False), kvlab's 'inference' loader) or decode "
                 "under torch.inference_mode(); detaching the cache alone still records each step's graph.")
        return text

    def __str__(self) -> str:
        return self.summary()


# Backward nodes of ops whose output shares its input's storage: a saved tensor's storage was made by
# the first node below these (e.g. repeat_kv's clone under the attention matmul's view and expand).
_VIEW_NODES = frozenset(
    f"{name}Backward{i}" for i in range(3) for name in (
        "View", "UnsafeView", "Expand", "Transpose", "T", "Permute", "Reshape", "ReshapeAlias", "Unsqueeze",
        "Squeeze", "Slice", "Select", "AsStrided", "Alias", "Split", "SplitWithSizes", "Unbind", "Diagonal",
        "Narrow", "Unfold", "Detach", "Chunk", "Indices", "Values", "Real", "Imag", "ViewAsReal", "ViewAsComplex"))


def _producer(node: Any) -> Any:
    """The node that allocated the storage behind ``node``'s output, skipping view-like nodes."""
    for _ in range(64):
        if node is None or type(node).__name__ not in _VIEW_NODES:
            return node
        nxt = node.next_functions
        node = nxt[0][0] if nxt else None
    return node


def explain(*roots: Any, model: nn.Module | None = None, tags: SavedTensorTags | None = None,
            tracer: "memtrace.MemoryTracer | None" = None) -> RetentionReport:
    """Explain what the autograd graph reachable from ``roots`` keeps alive.

    ``roots``: whatever the loop holds on to — a kvlab cache or transformers ``DynamicCache``, the last
    logits, a ``Generation``, any tensors or objects holding them. ``model``: names the parameters that
    require grad (matched by identity), pointing at the loader. ``tags``: a :class:`SavedTensorTags`
    that ran during generation; ``tracer``: a stopped :class:`~kvlab.memory.trace.MemoryTracer` that ran
    during generation. Either gives each saved storage a site (the tracer: where it was allocated);
    without them sites are ``None`` and the walk still counts nodes, steps and bytes by op.
    """
    walk = walk_graph(*roots, model=model)
    site_of = tracer.site_of() if tracer is not None else {}
    rows = []
    site_source = "tracer" if tracer is not None else ("tags" if tags is not None else "none")
    for saved in walk.saved:
        ptr, base = saved.ptr, saved.tensor
        site = step = None
        if tracer is not None and ptr in site_of:
            site, step = site_of[ptr]
        elif tags is not None:
            producer = _producer(base.grad_fn)
            if producer is not None:
                site, step = tags.node_origin(producer)
            if site is None and ptr in tags.saved:
                site, step_saved = tags.saved[ptr]
                step = step if step is not None else step_saved
            elif step is None and ptr in tags.saved:
                step = tags.saved[ptr][1]
        rows.append(dict(ptr=ptr, bytes=saved.nbytes, op=saved.op, attr=saved.attr,
                         site=site if site is not None else "<untagged>", step=step, shape=tuple(base.shape),
                         dtype=str(base.dtype).removeprefix("torch."), device=str(base.device)))
    saved_df = pd.DataFrame(rows, columns=["ptr", "bytes", "op", "attr", "site", "step", "shape", "dtype", "device"])
    saved_df["step"] = saved_df["step"].astype("Int64")  # unknown for untagged tensors
    leaf_rows = [dict(name=walk.names.get(id(t), f"<tensor {tuple(t.shape)}>"), shape=tuple(t.shape), numel=t.numel())
                 for t in walk.leaves if t.requires_grad]
    leaves_df = pd.DataFrame(leaf_rows, columns=["name", "shape", "numel"])
    tagged_steps = int(saved_df["step"].nunique()) if site_source != "none" and len(saved_df) else None
    return RetentionReport(saved=saved_df, graph_nodes=walk.nodes, node_counts=walk.node_counts, leaves=leaves_df,
                           parameters_requiring_grad=walk.parameters_requiring_grad,
                           parameters_total=walk.parameters_total, cat_chain=walk.cat_chain,
                           tagged_steps=tagged_steps, root_bytes=walk.cache_bytes + walk.other_bytes,
                           roots=len(walk.cache) + len(walk.other), site_source=site_source)
