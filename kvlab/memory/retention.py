"""Why memory stays alive: explain the autograd graph hanging off what a decode loop keeps.

Allocation-site tools (heap profilers, :mod:`kvlab.memory.trace`, CUDA snapshots) point at ``repeat_kv``
and ``cat``: where the memory was *allocated*. The reason it is still alive is elsewhere. If anything
that feeds the computation requires grad -- a weight, or an input such as a soft prompt -- every op
records a backward node that holds on to the tensors it will need, and because each step's KV cache is
computed from the previous one, the cache's ``grad_fn`` reaches back through every earlier step.
:func:`explain` reads the one graph walk (:func:`kvlab.memory.graph.walk_graph`) and names the cause:
which leaves require grad (parameters or inputs), how many decode steps the graph spans, and how many
bytes of saved tensors that pins, by op and by site; its advice follows the cause it found.

:class:`SavedTensorTags` (optional, used around generation) tags every tensor autograd saves with the
region and decode step it was saved in, and records which region created each graph node, so the report
can say "allocated in repeat_kv" rather than only "saved by BmmBackward0".
"""

from __future__ import annotations

import bisect
import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pandas as pd
import torch
from torch import Tensor, nn

from .dispatch import DispatchHook
from .graph import GraphWalk, walk_graph
from .regions import Attribution, ModuleNames
from .trace import MemoryTracer, TracerError
from .units import MiB, step_index

__all__ = ["explain", "explain_walk", "RetentionReport", "SavedTensorTags", "tag_saved_tensors", "advice"]

try:  # the number the next autograd node will get; lets a node be matched to the region that created it
    _next_sequence_nr = torch._C._autograd._get_sequence_nr
except AttributeError:  # pragma: no cover - older PyTorch
    _next_sequence_nr = None


# --------------------------------------------------------------------------------------------- tagging
class SavedTensorTags:
    """Context manager tagging each tensor autograd saves with its region and decode step.

    Installs ``torch.autograd.graph.saved_tensors_hooks`` whose pack hook records, per storage, the
    region open when the tensor was saved (the innermost ``torch.profiler.record_function``, else the
    named module of ``model`` or the calling Python line, as :mod:`kvlab.memory.regions` decides) and the
    decode step. It also logs autograd's node sequence number at every region boundary, so a saved
    tensor can be charged to the region that *produced* it (``repeat_kv``) rather than the one that
    saved it (the attention matmul). Pass :meth:`mark_step` as the loop's ``on_step``.

    The pack hook hands autograd a detached alias (same storage, no ``grad_fn``), never the tensor
    itself: autograd saves an op's *output* without a strong reference to its own node, and returning
    the output would close a cycle (node -> saved output -> node) that the garbage collector cannot
    see, keeping the graph alive after the loop is gone. So memory behaves exactly as without tagging.
    Only one may be active at a time, and it tags only the thread that entered it (both hooks are per thread).
    """

    _active: SavedTensorTags | None = None

    def __init__(self, model: nn.Module | None = None) -> None:
        self.saved: dict[int, tuple[str, int]] = {}  # storage address -> (region saved in, step)
        self._region_seq: list[int] = []  # node sequence numbers at which the innermost region changed
        self._region_names: list[str | None] = []
        self._step_seq: list[int] = []  # node sequence numbers at which each step started
        self._step_ids: list[int] = []
        self.step = 0  # the step being computed
        self._attribution = Attribution(ModuleNames([model]) if model is not None else None)
        self._hook = DispatchHook(self._attribution)  # tracks record_function regions only
        self._hooks: Any = None
        self.running = False

    # -------------------------------------------------------------- lifecycle
    def __enter__(self) -> SavedTensorTags:
        if SavedTensorTags._active is not None:
            raise TracerError("saved-tensor tagging is already active; only the innermost saved_tensors_hooks "
                              "would run, so nested taggers cannot both see every saved tensor")
        self._attribution.listeners.append(self._on_region)
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, _unpack)
        self._hooks.__enter__()
        try:
            self._hook.__enter__()
        except BaseException:
            self._hooks.__exit__(None, None, None)
            raise
        SavedTensorTags._active = self
        self.running = True
        self._log_step(0)
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self._hook.__exit__(None, None, None)
        finally:
            try:
                self._hooks.__exit__(None, None, None)
            finally:
                self._attribution.listeners.remove(self._on_region)
                SavedTensorTags._active = None
                self.running = False

    # -------------------------------------------------------------- hooks
    def _pack(self, t: Tensor) -> Tensor:
        with contextlib.suppress(RuntimeError, NotImplementedError):  # storage-less tensors have no address
            self.saved[t.untyped_storage().data_ptr()] = (self._attribution.label(), self.step)
        return t.detach()  # an alias without grad_fn: see the class docstring

    def _on_region(self, name: str, entering: bool) -> None:
        if _next_sequence_nr is None:
            return
        regions = self._attribution.regions  # called before the region is pushed (enter) or popped (exit)
        inner = name if entering else (regions[-2] if len(regions) >= 2 else None)
        self._region_seq.append(_next_sequence_nr())
        self._region_names.append(inner)

    def _log_step(self, step: int) -> None:
        if _next_sequence_nr is not None:
            self._step_seq.append(_next_sequence_nr())
            self._step_ids.append(step)

    def mark_step(self, step: Any = None) -> None:
        """Close a decode step (an object with ``.index`` such as kvlab's ``Step``, an int, or ``None`` to count up)."""
        index = step_index(step, self.step - 1 if self.step else None)
        self.step = index + 1
        self._log_step(self.step)

    __call__ = mark_step

    # -------------------------------------------------------------- lookups
    def node_origin(self, node: Any) -> tuple[str | None, int | None]:
        """(region, step) in which autograd ``node`` was created, from its sequence number; ``None`` if unknown."""
        try:
            seq = node._sequence_nr()
        except (AttributeError, RuntimeError):
            return None, None
        region = step = None
        i = bisect.bisect_right(self._region_seq, seq) - 1
        if i >= 0:
            region = self._region_names[i]
        j = bisect.bisect_right(self._step_seq, seq) - 1
        if j >= 0:
            step = self._step_ids[j]
        return region, step


def _unpack(t: Tensor) -> Tensor:
    return t


@contextlib.contextmanager
def tag_saved_tensors(model: nn.Module | None = None) -> Iterator[SavedTensorTags]:
    """``with tag_saved_tensors() as tags: generate(..., on_step=tags.mark_step)``."""
    with SavedTensorTags(model) as tags:
        yield tags


# --------------------------------------------------------------------------------------------- cause
def _shown(names: list[str], limit: int = 3) -> str:
    return ", ".join(names[:limit]) + (", ..." if len(names) > limit else "")


def advice(walk: GraphWalk) -> tuple[str, str]:
    """(cause, fix) for a walk that found a graph, following what requires grad: weights call for loading
    them frozen; an input (a soft prompt) calls for detaching it -- freezing frozen weights changes
    nothing. Either way ``torch.inference_mode()`` around the loop records no graph at all."""
    leaves = [t for t in walk.leaves if t.requires_grad]
    params = [walk.leaf_name(t) for t in leaves if walk.is_parameter(t)]
    inputs = [walk.leaf_name(t) for t in leaves if not walk.is_parameter(t)]
    causes, fixes = [], []
    if params:
        n = len(walk.parameters_requiring_grad) or len(params)
        of = f" of {walk.parameters_total}" if walk.parameters_total else ""
        causes.append(f"{n}{of} parameters require grad ({_shown(walk.parameters_requiring_grad or params)})")
        cache = bool(walk.graph_cache_tensors)
        fixes.append("load the weights frozen (model.requires_grad_(False)) or decode under torch.inference_mode()"
                     + ("; detaching the cache alone still records each step's graph" if cache else ""))
    if inputs:
        causes.append(f"{len(inputs)} input tensor(s) that are not parameters of the model require grad "
                      f"({_shown(inputs)})")
        weights = "" if params else " (the weights are frozen: they are not the cause)"
        fixes.append(f"detach those inputs (x.detach(), or requires_grad_(False)) before decoding, or decode under "
                     f"torch.inference_mode(){weights}")
    if not causes:
        return "grad mode recorded an autograd graph", "decode under torch.inference_mode()"
    return " and ".join(causes) + ", so every forward pass records an autograd graph", "; ".join(fixes)


# --------------------------------------------------------------------------------------------- report
@dataclass
class RetentionReport:
    """What the autograd graph behind a loop's state keeps alive. Bytes are storage bytes."""

    saved: pd.DataFrame  # one row per saved storage: bytes, op, attr, site, step, shape, dtype, device
    graph_nodes: int
    node_counts: dict[str, int]
    leaves: pd.DataFrame  # leaf tensors in the graph that require grad: name, kind, shape, numel, uses
    parameters_requiring_grad: list[str]  # of the model passed to explain(), by name
    parameters_total: int
    cat_chain: int  # longest run of consecutive CatBackward nodes: cache updates linked together
    state_chain: int  # forward passes linked through one state tensor's updates (cat or in-place)
    forward_passes: int  # forward passes whose graphs the walk found (from leaf uses and the state chain)
    tagged_steps: int | None  # distinct decode steps among the saved tensors (when tagged)
    root_bytes: int  # what the given objects hold themselves
    roots: int
    site_source: str  # how sites were found: "tracer", "tags", or "none"
    cause: str = ""
    fix: str = ""

    @property
    def saved_bytes(self) -> int:
        return int(self.saved["bytes"].sum()) if len(self.saved) else 0

    @property
    def steps_chained(self) -> int:
        """Decode steps whose graphs are kept: from the step tags when present, else from the graph's shape."""
        return self.tagged_steps or self.forward_passes

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
        steps = self.steps_chained
        span = f"the graph spans {steps} decode step{'s' if steps != 1 else ''}"
        if self.state_chain > 1:
            links = f" ({self.cat_chain} CatBackward0 links)" if self.cat_chain else ""
            span += f", {self.state_chain} of them chained through the cache's updates{links}"
        text = (f"Autograd is keeping memory alive: {self.cause}; {span}; {self.graph_nodes:,} graph nodes hold "
                f"{self.saved_bytes / MiB:.1f} MiB of saved tensors ({len(self.saved):,} storages, not counting "
                f"parameters); {held}.")
        if self.site_source != "none":
            sites = self.by_site().head(3).itertuples()
            text += " By site: " + ", ".join(f"{r.share:.0%} in {r.site}" for r in sites) + "."
        if len(self.saved):
            text += " Saved by: " + ", ".join(f"{r.op} {r.share:.0%}" for r in self.by_op().head(3).itertuples()) + "."
        return text + f" Fix: {self.fix}."

    __str__ = summary


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


def _site_and_step(ptr: int, base: Tensor, tags: SavedTensorTags | None,
                   site_of: dict[int, tuple[str, int]]) -> tuple[str | None, int | None]:
    """Where a saved storage was allocated: the tracer's record, else the tags' node origin, else the
    region it was saved in."""
    if ptr in site_of:
        return site_of[ptr]
    if tags is None:
        return None, None
    site, step = tags.node_origin(_producer(base.grad_fn))  # (None, None) for a node-less tensor
    if ptr in tags.saved:
        saved_site, saved_step = tags.saved[ptr]
        site = site if site is not None else saved_site
        step = step if step is not None else saved_step
    return site, step


def explain(*roots: Any, model: nn.Module | None = None, tags: SavedTensorTags | None = None,
            tracer: MemoryTracer | None = None) -> RetentionReport:
    """Explain what the autograd graph reachable from ``roots`` keeps alive.

    ``roots``: whatever the loop holds on to — a cache of any class or container, the last logits, a
    result object, any tensors or objects holding them. ``model``: names the parameters (matched by
    identity), so that a leaf requiring grad is told apart as a weight or an input. ``tags``: a
    :class:`SavedTensorTags` that ran during generation; ``tracer``: a stopped
    :class:`~kvlab.memory.trace.MemoryTracer` that ran during generation. Either gives each saved storage
    a site (the tracer: where it was allocated); without them sites are ``None`` and the walk still
    counts nodes, steps and bytes by op. Bytes are tensor storages reachable from ``roots``; the graph
    nodes' own memory and tensors held elsewhere (not reachable from ``roots``) are not counted.
    """
    return explain_walk(walk_graph(*roots, model=model), tags=tags, tracer=tracer)


def explain_walk(walk: GraphWalk, *, tags: SavedTensorTags | None = None,
                 tracer: MemoryTracer | None = None) -> RetentionReport:
    """:func:`explain` for a graph already walked: a leak check explains the walk it measured."""
    site_of = tracer.site_of() if tracer is not None else {}
    site_source = "tracer" if tracer is not None else ("tags" if tags is not None else "none")
    rows = []
    for saved in walk.saved:
        base = saved.tensor
        site, step = _site_and_step(saved.ptr, base, tags, site_of)
        rows.append(dict(ptr=saved.ptr, bytes=saved.nbytes, op=saved.op, attr=saved.attr,
                         site=site if site is not None else "<untagged>", step=step, shape=tuple(base.shape),
                         dtype=str(base.dtype).removeprefix("torch."), device=str(base.device)))
    saved_df = pd.DataFrame(rows, columns=["ptr", "bytes", "op", "attr", "site", "step", "shape", "dtype", "device"])
    saved_df["step"] = saved_df["step"].astype("Int64")  # unknown for untagged tensors
    leaf_rows = [dict(name=walk.leaf_name(t), kind="parameter" if walk.is_parameter(t) else "input",
                      shape=tuple(t.shape), numel=t.numel(), uses=uses)
                 for t, uses in zip(walk.leaves, walk.leaf_uses) if t.requires_grad]
    leaves_df = pd.DataFrame(leaf_rows, columns=["name", "kind", "shape", "numel", "uses"])
    tagged_steps = int(saved_df["step"].nunique()) if site_source != "none" and len(saved_df) else None
    cause, fix = advice(walk) if walk.nodes else ("", "")
    return RetentionReport(saved=saved_df, graph_nodes=walk.nodes, node_counts=walk.node_counts, leaves=leaves_df,
                           parameters_requiring_grad=walk.parameters_requiring_grad,
                           parameters_total=walk.parameters_total, cat_chain=walk.cat_chain,
                           state_chain=walk.state_chain, forward_passes=walk.forward_passes,
                           tagged_steps=tagged_steps, root_bytes=walk.state_bytes,
                           roots=len(walk.cache) + len(walk.other), site_source=site_source, cause=cause, fix=fix)
