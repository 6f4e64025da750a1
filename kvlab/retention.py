"""Why memory stays alive: walk the autograd graph hanging off what a decode loop keeps.

Allocation-site tools (heap profilers, :mod:`kvlab.memtrace`, CUDA snapshots) point at ``repeat_kv``
and ``cat``: where the memory was *allocated*. The reason it is still alive is elsewhere. If any weight
requires grad, every op records a backward node that holds on to the tensors it will need (its
``SavedVariable``\\ s), and because each step's KV cache is ``cat(previous_cache, new)``, the cache's
``grad_fn`` reaches back through every earlier step. :func:`explain` follows ``grad_fn`` and
``next_functions`` from whatever the loop keeps (the cache, the last logits, any object holding
tensors), unpacks each node's ``_saved_*`` tensors, de-duplicates them by storage, and names the cause:
which parameters require grad, how many decode steps the graph chains together, and how many bytes
of saved tensors that pins, by op and by site.

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

from . import memtrace
from .memtrace import MiB, TracerError, caller_site
from .sites import add_listener, current_site, remove_listener, site_path

__all__ = ["explain", "RetentionReport", "SavedTensorTags", "tag_saved_tensors", "collect_tensors"]

memtrace.TOOL_FILES.add(__file__)

try:  # the number the next autograd node will get; lets a node be matched to the site that created it
    _next_sequence_nr = torch._C._autograd._get_sequence_nr
except AttributeError:  # pragma: no cover - older PyTorch
    _next_sequence_nr = None


# --------------------------------------------------------------------------------------------- tagging
class SavedTensorTags:
    """Context manager tagging each tensor autograd saves with its site and decode step.

    Installs ``torch.autograd.graph.saved_tensors_hooks`` whose pack hook records, per storage, the
    site open when the tensor was saved (kvlab's :func:`~kvlab.sites.site` name, else the calling
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
def collect_tensors(*objects: Any, max_depth: int = 5) -> list[Tensor]:
    """Every tensor reachable from ``objects``: tensors, containers, dataclasses (kvlab's ``Generation``),
    kvlab caches (``.tensors()``) and plain objects' attributes (transformers' ``DynamicCache``).
    Modules are not searched: their parameters are what the report names, not what the loop keeps."""
    found: dict[int, Tensor] = {}
    seen: set[int] = set()

    def visit(obj: Any, depth: int) -> None:
        if isinstance(obj, Tensor):
            found.setdefault(id(obj), obj)
            return
        if obj is None or isinstance(obj, (str, bytes, int, float, bool, nn.Module, torch.dtype,
                                           torch.device, torch.Generator, type)) or depth > max_depth:
            return
        if id(obj) in seen:
            return
        seen.add(id(obj))
        tensors = getattr(obj, "tensors", None)
        if callable(tensors) and not isinstance(obj, (dict, list, tuple)):
            try:
                for t in tensors():
                    visit(t, depth + 1)
            except TypeError:
                pass
        if isinstance(obj, dict):
            items: Iterable[Any] = obj.values()
        elif isinstance(obj, (list, tuple, set, frozenset)):
            items = obj
        elif is_dataclass(obj):
            items = [getattr(obj, f.name, None) for f in fields(obj)]
        elif hasattr(obj, "__dict__"):
            items = list(vars(obj).values())
        else:
            return
        for item in items:
            visit(item, depth + 1)

    for obj in objects:
        visit(obj, 0)
    return list(found.values())


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


def _saved_attrs(cls: type, node: Any, cache: dict[type, tuple[str, ...]]) -> tuple[str, ...]:
    attrs = cache.get(cls)
    if attrs is None:
        attrs = tuple(a for a in dir(node) if a.startswith("_saved_"))
        if hasattr(node, "saved_tensors") and "saved_tensors" not in attrs:  # custom autograd.Function
            attrs = attrs + ("saved_tensors",)
        cache[cls] = attrs
    return attrs


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


def _storage(t: Tensor) -> tuple[int, int] | None:
    try:
        st = t.untyped_storage()
    except (RuntimeError, NotImplementedError):
        return None
    return st.data_ptr(), st.nbytes()


def explain(*roots: Any, model: nn.Module | None = None, tags: SavedTensorTags | None = None,
            tracer: "memtrace.MemoryTracer | None" = None) -> RetentionReport:
    """Explain what the autograd graph reachable from ``roots`` keeps alive.

    ``roots``: whatever the loop holds on to — a kvlab cache or transformers ``DynamicCache``, the last
    logits, a ``Generation``, any tensors or objects holding them. ``model``: names the parameters that
    require grad (matched by identity), pointing at the loader. ``tags``: a :class:`SavedTensorTags`
    that ran during generation; ``tracer``: a stopped :class:`~kvlab.memtrace.MemoryTracer` that ran
    during generation. Either gives each saved storage a site (the tracer: where it was allocated);
    without them sites are ``None`` and the walk still counts nodes, steps and bytes by op.
    """
    root_tensors = collect_tensors(*roots)
    param_names: dict[int, str] = {}
    param_ptrs: set[int] = set()
    params_rg: list[str] = []
    params_total = 0
    if model is not None:
        for name, p in model.named_parameters(remove_duplicate=False):
            param_names.setdefault(id(p), name)
            info = _storage(p)
            if info:
                param_ptrs.add(info[0])
        seen_params: set[int] = set()
        for name, p in model.named_parameters():
            params_total += 1
            if p.requires_grad and id(p) not in seen_params:
                params_rg.append(name)
                seen_params.add(id(p))
    root_ptrs: dict[int, int] = {}
    for t in root_tensors:
        info = _storage(t)
        if info and info[0]:
            root_ptrs[info[0]] = info[1]

    site_of = tracer.site_of() if tracer is not None else {}
    attr_cache: dict[type, tuple[str, ...]] = {}
    visited: set[Any] = set()
    stack = [t.grad_fn for t in root_tensors if t.grad_fn is not None]
    node_counts: dict[str, int] = {}
    saved: dict[int, dict[str, Any]] = {}
    leaves: dict[int, Tensor] = {}
    cat_depth: dict[Any, int] = {}
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
                    param_ptrs.add(info[0])
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
                if info is None or not info[0] or info[0] in saved:
                    continue
                ptr, nbytes = info
                base = t._base if t._base is not None else t
                saved[ptr] = dict(ptr=ptr, bytes=nbytes, op=op, attr=attr.removeprefix("_saved_"),
                                  shape=tuple(base.shape), dtype=str(base.dtype).removeprefix("torch."),
                                  device=str(base.device), producer=_producer(base.grad_fn))
        for nxt, _ in node.next_functions:
            if nxt is not None and nxt not in visited:
                stack.append(nxt)

    # Longest chain of CatBackward nodes linked through their inputs: one link per cache update.
    cat_set = set(cat_nodes)

    def depth(node: Any) -> int:
        # iterative to survive thousands of steps without recursion limits
        todo = [node]
        while todo:
            n = todo[-1]
            if n in cat_depth:
                todo.pop()
                continue
            prev = [m for m, _ in n.next_functions if m in cat_set]
            missing = [m for m in prev if m not in cat_depth]
            if missing:
                todo.extend(missing)
                continue
            cat_depth[n] = 1 + max((cat_depth[m] for m in prev), default=0)
            todo.pop()
        return cat_depth[node]

    cat_chain = max((depth(n) for n in cat_nodes), default=0)

    # Exclude parameters' own storage (and the roots', which the loop holds anyway) from "saved".
    rows = []
    site_source = "tracer" if tracer is not None else ("tags" if tags is not None else "none")
    for ptr, row in saved.items():
        if ptr in param_ptrs or ptr in root_ptrs:
            continue
        producer = row.pop("producer")
        site = step = None
        if tracer is not None and ptr in site_of:
            site, step = site_of[ptr]
        elif tags is not None:
            if producer is not None:
                site, step = tags.node_origin(producer)
            if site is None and ptr in tags.saved:
                site, step_saved = tags.saved[ptr]
                step = step if step is not None else step_saved
            elif step is None and ptr in tags.saved:
                step = tags.saved[ptr][1]
        row.update(site=site if site is not None else "<untagged>", step=step)
        rows.append(row)
    saved_df = pd.DataFrame(rows, columns=["ptr", "bytes", "op", "attr", "site", "step", "shape", "dtype", "device"])
    saved_df["step"] = saved_df["step"].astype("Int64")  # unknown for untagged tensors
    leaf_rows = [dict(name=param_names.get(id(t), f"<tensor {tuple(t.shape)}>"), shape=tuple(t.shape), numel=t.numel())
                 for t in leaves.values() if t.requires_grad]
    leaves_df = pd.DataFrame(leaf_rows, columns=["name", "shape", "numel"])
    tagged_steps = int(saved_df["step"].nunique()) if site_source != "none" and len(saved_df) else None
    return RetentionReport(saved=saved_df, graph_nodes=len(visited), node_counts=node_counts, leaves=leaves_df,
                           parameters_requiring_grad=params_rg, parameters_total=params_total,
                           cat_chain=cat_chain, tagged_steps=tagged_steps, root_bytes=sum(root_ptrs.values()),
                           roots=len(root_tensors), site_source=site_source)
