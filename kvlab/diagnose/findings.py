"""The diagnosis in words: what the loop returns, part by part, why it keeps memory, and what the fix leaves.

Sentences are built from measured values only, so a report reads the same way for any loop, and each
claim can be checked against the tables it came from.
"""

from __future__ import annotations

from typing import Any

import pandas as pd
from torch import Tensor, nn

from kvlab.memory.leakguard import LeakReport, measure_retained
from kvlab.memory.retention import RetentionReport
from kvlab.memory.units import fmt_bytes

__all__ = ["describe_parts", "with_growth", "leaves_in_model_order", "leak_causes", "headline",
           "summarize_fix", "PART_COLUMNS"]

PART_COLUMNS = ["part", "kind", "cache_bytes", "saved_bytes", "other_bytes", "total_bytes", "graph_nodes"]
_MAX_PARTS = 8  # a container with more items than this is one part (a list of every step's logits ...)
_GROWING_SHARE = 0.10  # a non-cache part is named as a cause when it makes this share of the growth


def _kind(obj: Any) -> str:
    """``"list of 32 tensors (1, 96) float32"``, ``"DynamicCache"``, ``"tensor (1, 33) int64"``."""
    if isinstance(obj, Tensor):
        return f"tensor {tuple(obj.shape)} {str(obj.dtype).removeprefix('torch.')}"
    if isinstance(obj, (list, tuple)):
        if obj and all(isinstance(x, Tensor) for x in obj):
            shapes = {tuple(x.shape) for x in obj}
            dtypes = {str(x.dtype).removeprefix("torch.") for x in obj}
            same = f" {shapes.pop()}" if len(shapes) == 1 else ""
            dtype = f" {dtypes.pop()}" if len(dtypes) == 1 else ""
            return f"{type(obj).__name__} of {len(obj)} tensors{same}{dtype}"
        return f"{type(obj).__name__} of {len(obj)} items"
    if isinstance(obj, dict):
        return f"dict of {len(obj)} items"
    return type(obj).__name__


def _split(kept: Any) -> list[tuple[str, Any]]:
    """The top-level parts of what a loop returns: items of a tuple, list or dict, fields of an object
    with few attributes; one part when it is a single object or a homogeneous list of tensors."""
    if isinstance(kept, dict) and 1 < len(kept) <= _MAX_PARTS:
        return [(f"kept[{k!r}]", v) for k, v in kept.items()]
    if isinstance(kept, (list, tuple)) and 1 < len(kept) <= _MAX_PARTS and not all(isinstance(x, Tensor) for x in kept):
        return [(f"kept[{i}]", v) for i, v in enumerate(kept)]
    return [("kept", kept)]


def describe_parts(kept: Any, model: nn.Module | None) -> pd.DataFrame:
    """One row per part of ``kept``, each measured alone by :func:`~kvlab.memory.leakguard.measure_retained`
    (so a saved tensor that two parts' graphs share is counted in both)."""
    rows = []
    for name, part in _split(kept):
        r = measure_retained(part, model)
        rows.append({"part": name, "kind": _kind(part), "cache_bytes": r.cache_bytes, "saved_bytes": r.saved_bytes,
                     "other_bytes": r.other_bytes, "total_bytes": r.total_bytes, "graph_nodes": r.graph_nodes})
    return pd.DataFrame(rows, columns=PART_COLUMNS)


def with_growth(parts: pd.DataFrame, before: pd.DataFrame) -> pd.DataFrame:
    """``parts`` (after 2N tokens) with ``total_half_bytes`` (the same part after N) and ``growth_bytes``."""
    half = before[["part", "total_bytes"]].rename(columns={"total_bytes": "total_half_bytes"})
    out = parts.merge(half, on="part", how="left")
    out["growth_bytes"] = out["total_bytes"] - out["total_half_bytes"].fillna(0)
    return out


def leaves_in_model_order(retention: RetentionReport) -> pd.DataFrame:
    """The tensors requiring grad that the graph reaches, parameters in the model's order (embeddings first)."""
    order = {name: i for i, name in enumerate(retention.parameters_requiring_grad)}
    return retention.leaves.sort_values("name", key=lambda names: names.map(lambda n: order.get(n, len(order))),
                                        kind="stable", ignore_index=True)


def _names(names: list[str], shown: int = 3) -> str:
    return ", ".join(names[:shown]) + (f", ... ({len(names)} in all)" if len(names) > shown else "")


def _holders(parts: pd.DataFrame) -> str:
    """Which parts of what the loop returns carry the graph, and whether the cache is among them."""
    holding = parts[parts["graph_nodes"] > 0]
    if len(parts) == 1 or holding.empty:
        return "what the loop returns carries"
    named = " and ".join(f"{row.part} ({row.kind})" for row in holding.itertuples())
    clean_cache = ((parts["cache_bytes"] > 0) & (parts["graph_nodes"] == 0)).any()
    return f"{named} {'carry' if len(holding) > 1 else 'carries'}" + (
        ", not the cache, which carries none:" if clean_cache and not (holding["cache_bytes"] > 0).any() else "")


def leak_causes(guard: LeakReport, retention: RetentionReport, parts: pd.DataFrame,
                modules: dict[str, nn.Module]) -> list[str]:
    """Why a leaking loop keeps memory, one sentence per cause, each opening with a short label before ``:``."""
    causes: list[str] = []
    r, steps = guard.at_2n, 2 * guard.steps
    if r.has_graph:
        leaves = retention.leaves["name"].tolist() if len(retention.leaves) else []
        order = {name: i for i, name in enumerate(retention.parameters_requiring_grad)}  # model order
        params = sorted((n for n in leaves if not n.startswith("<")), key=lambda n: (order.get(n, len(order)), n))
        others = [name for name in leaves if name.startswith("<")]
        if params:
            of = f"{len(retention.parameters_requiring_grad)} of {retention.parameters_total}" if order else "the"
            causes.append(f"parameters requiring grad: {of} parameters of the model require grad, and the kept "
                          f"graph reaches {len(params)} of them ({_names(params)}): every forward pass in grad "
                          "mode records a graph")
        if others:
            what = "other tensors" if params else "tensors"
            causes.append(f"{what} requiring grad: {len(others)} tensors that are not parameters of "
                          f"{_names(list(modules)) or 'the modules found'} require grad and feed the graph "
                          f"({_names(others)})")
        ops = retention.by_op().head(3)
        largest = ", ".join(f"{row.op} {fmt_bytes(row.bytes)}" for row in ops.itertuples())
        share = r.saved_bytes / r.total_bytes if r.total_bytes else 0.0
        causes.append(f"an autograd graph kept alive: {_holders(parts)} a graph of {r.graph_nodes:,} nodes "
                      f"chaining {retention.steps_chained} decode steps; its saved tensors hold "
                      f"{fmt_bytes(r.saved_bytes)}, {share:.0%} of the {fmt_bytes(r.total_bytes)} kept after "
                      f"{steps} tokens (largest by op: {largest})")
    growth = max(guard.growth, 1)
    outside = parts[(parts["cache_bytes"] == 0) & (parts["growth_bytes"] > _GROWING_SHARE * growth)]
    for row in outside.itertuples():
        causes.append(f"{row.part} growing outside the cache: {row.part}, a {row.kind}, is not part of the KV "
                      f"cache and grew by {fmt_bytes(row.growth_bytes)} from {guard.steps} to {steps} tokens "
                      f"({fmt_bytes(row.growth_bytes / guard.steps)} per token): the loop keeps every step's output")
    return causes or [f"growth beyond the cache: {reason}" for reason in guard.reasons]


def headline(guard: LeakReport, growth: dict[str, Any], causes: list[str]) -> str:
    """The verdict in one sentence, with the bytes kept at N and 2N tokens and the fitted growth law."""
    at_n, at_2n, n = guard.at_n, guard.at_2n, guard.steps
    if not guard.leak:
        return (f"No leak: the loop keeps {fmt_bytes(at_2n.total_bytes)} after {2 * n} tokens, "
                f"{fmt_bytes(at_2n.cache_bytes)} of it in cache tensors (kept ∝ tokens^{growth['slope']:.2f}).")
    labels = [c.split(":", 1)[0] for c in causes]
    return (f"LEAK: the loop keeps {fmt_bytes(at_2n.total_bytes)} after {2 * n} tokens ({fmt_bytes(at_n.total_bytes)} "
            f"after {n}, kept ∝ tokens^{growth['slope']:.2f}) while its KV cache is {fmt_bytes(at_2n.cache_bytes)}. "
            f"Cause: {'; '.join(labels)}.")


def summarize_fix(fix: pd.DataFrame, parts: pd.DataFrame, modules: dict[str, nn.Module]) -> str:
    """What each variant of the fix keeps, and whether what remains is the cache (else, what else)."""
    lines = []
    for row in fix.itertuples():
        lines.append(f"With {row.how}, the loop keeps {fmt_bytes(row.total_bytes)} after {row.tokens} tokens: "
                     f"{fmt_bytes(row.cache_bytes)} in cache tensors, {fmt_bytes(row.saved_bytes)} saved for "
                     f"backward, {fmt_bytes(row.beyond_cache_bytes - row.saved_bytes)} in other tensors; "
                     f"leak guard: {row.verdict}.")
    if not modules:
        lines.append("No torch.nn.Module was found in the loop's closure or module, so the frozen variant "
                     "was not run: freeze the weights where the loop loads them.")
    if len(fix) and (fix["beyond_cache_bytes"] == 0).all():
        lines.append("What remains is the cache: every byte the fixed loop keeps is in its cache tensors.")
    elif len(fix) and (fix["saved_bytes"] == 0).all():
        others = parts[(parts["cache_bytes"] == 0) & (parts["other_bytes"] > 0)]
        named = ", ".join(f"{r.part} ({r.kind}, {fmt_bytes(r.other_bytes)})" for r in others.itertuples())
        lines.append("No autograd graph remains. Beyond its cache the fixed loop keeps what it returns besides: "
                     f"{named or 'other tensors'}; no grad setting changes that.")
    return "\n".join(lines)
