"""Check a loaded model for what would break inference memory, before the first token is decoded.

The incident's cause sat in the loader: weights came out as trainable variables, and nothing looked
at them until memory ran out in the decode loop. :func:`validate_model` looks at any ``nn.Module``
right after loading and lists, one row per finding, what an inference server should never see:

- ``requires_grad``: a parameter or buffer that requires grad. Any forward outside ``no_grad`` /
  ``inference_mode`` then records an autograd graph, and a KV cache keeps every step's graph alive.
- ``meta``: a tensor still on the ``meta`` device, i.e. never loaded.
- ``dtype`` / ``mixed_dtype``: parameters not in the expected dtype, or in several floating dtypes (a
  float32 straggler in a bfloat16 model doubles its bytes and upcasts whatever it touches).
- ``device`` / ``mixed_device``: tensors not on the expected device, or spread over several.
- ``tie_broken``: the config declares tied embeddings but the two weights are separate copies.
- ``copied_tie``: two weights are equal in value yet stored twice — typically a tie that a loader
  silently turned into a copy (memory wasted, and the two drift apart if either is ever updated).
- ``shared_storage``: two different tensors share memory without a declared tie, so an in-place
  update of one silently changes the other. Weights that are disjoint slices of one flat buffer (a
  loader that reads one blob and slices it) share a storage but no memory, and are fine.
- ``non_contiguous``: a weight that is a strided view (every matmul may copy it, and it can pin a
  larger storage than its own size).

Parameter dtypes are checked, buffers' are not: buffers legitimately stay float32 (quantization
scales, rotary tables). Non-persistent buffers are not weights and are only checked for grad, meta
and device.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
import torch
from torch import Tensor, nn

from .overlap import share_memory, storage_key
from .units import fmt_bytes

__all__ = ["ModelValidationError", "ValidationReport", "validate_model", "as_dtype", "SEVERITIES"]

#: ``error``: breaks inference memory or correctness; ``warning``: wastes memory or invites a bug;
#: ``info``: worth knowing, never fails a check.
SEVERITIES = ("error", "warning", "info")
COLUMNS = ["parameter", "check", "severity", "detail"]


class ModelValidationError(ValueError):
    """A model failed :func:`validate_model` with ``strict=True``; ``.report`` has the rows."""

    def __init__(self, report: ValidationReport) -> None:
        self.report = report
        super().__init__(f"{report.verdict}\n{report.describe()}")


@dataclass
class ValidationReport:
    """Findings (one row each: parameter, check, severity, detail) and a one-line verdict."""

    subject: str
    findings: pd.DataFrame
    checked: int  # tensors looked at
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        """No ``error`` finding: nothing that breaks inference memory."""
        return not (self.findings["severity"] == "error").any()

    @property
    def clean(self) -> bool:
        """No ``error`` and no ``warning``: what ``strict=True`` demands."""
        return not self.findings["severity"].isin(["error", "warning"]).any()

    @property
    def verdict(self) -> str:
        bad = self.findings[self.findings["severity"] != "info"]
        if bad.empty:
            return f"OK: {self.subject}: {self.checked} tensors checked, nothing that would break inference memory"
        status = "FAIL" if not self.passed else "WARN"
        counts = Counter(zip(bad["check"], bad["severity"]))
        parts = ", ".join(f"{n} {check} ({severity})" for (check, severity), n in counts.most_common())
        return f"{status}: {self.subject}: {parts} among {self.checked} tensors checked"

    def describe(self, limit: int = 12) -> str:
        """Up to ``limit`` findings, one line each, errors first: for logs and exception messages."""
        if self.findings.empty:
            return self.verdict
        order = self.findings["severity"].map({s: i for i, s in enumerate(SEVERITIES)})
        rows = self.findings.assign(_o=order).sort_values("_o", kind="stable").drop(columns="_o")
        lines = [f"  [{r.severity}] {r.check}: {r.parameter}: {r.detail}" for r in rows.head(limit).itertuples()]
        if len(rows) > limit:
            lines.append(f"  ... and {len(rows) - limit} more findings (see report.findings)")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.verdict + ("\n" + self.describe() if not self.findings.empty else "")

    def raise_if_failed(self, strict: bool = True) -> ValidationReport:
        """Raise :class:`ModelValidationError` on any error (and, if ``strict``, any warning)."""
        if not (self.clean if strict else self.passed):
            raise ModelValidationError(self)
        return self


@dataclass
class _Entry:
    """One tensor object of a module, under all the names it is reachable by."""

    names: list[str]
    tensor: Tensor
    kind: str  # "parameter", "buffer" or "buffer (non-persistent)"

    @property
    def name(self) -> str:
        return self.names[0]


def _entries(model: nn.Module) -> list[_Entry]:
    by_id: dict[int, _Entry] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(p), _Entry([], p, "parameter")).names.append(name)
    for module_name, module in model.named_modules(remove_duplicate=False):
        non_persistent = getattr(module, "_non_persistent_buffers_set", set())
        for local, b in module._buffers.items():
            if b is None:
                continue
            kind = "buffer (non-persistent)" if local in non_persistent else "buffer"
            full = f"{module_name}.{local}" if module_name else local
            entry = by_id.setdefault(id(b), _Entry([], b, kind))
            if full not in entry.names:
                entry.names.append(full)
    return list(by_id.values())


def _config_of(model: nn.Module) -> Any:
    return getattr(model, "config", None)


def _embedding_pair(model: nn.Module, names: dict[int, str]) -> tuple[str, str] | None:
    """Names of the input- and output-embedding weights, if the model has both."""
    get_in, get_out = getattr(model, "get_input_embeddings", None), getattr(model, "get_output_embeddings", None)
    if callable(get_in) and callable(get_out):
        try:
            emb_in, emb_out = get_in(), get_out()
        except (NotImplementedError, AttributeError):
            emb_in = emb_out = None
        w_in, w_out = getattr(emb_in, "weight", None), getattr(emb_out, "weight", None)
        if isinstance(w_in, Tensor) and isinstance(w_out, Tensor) and id(w_in) in names and id(w_out) in names:
            return names[id(w_in)], names[id(w_out)]
    flat = set(dict(model.named_parameters(remove_duplicate=False)))
    for emb_in_name, emb_out_name in (("model.embed_tokens.weight", "lm_head.weight"),
                                      ("embed_tokens.weight", "lm_head.weight"),
                                      ("transformer.wte.weight", "lm_head.weight")):
        if emb_in_name in flat and emb_out_name in flat:
            return emb_in_name, emb_out_name
    return None


def _declared_ties(model: nn.Module, entries: list[_Entry], extra: Iterable[tuple[str, str]]) -> tuple[
        set[frozenset[str]], tuple[str, str] | None, bool | None]:
    """Pairs of names meant to share one tensor, the embedding pair, and what the config says."""
    first_name = {id(e.tensor): e.name for e in entries}
    alias = {name: e.name for e in entries for name in e.names}
    ties = {frozenset((alias.get(a, a), alias.get(b, b))) for a, b in extra}
    config = _config_of(model)
    says_tied = getattr(config, "tie_word_embeddings", None) if config is not None else None
    says_tied = says_tied if isinstance(says_tied, bool) else None
    pair = _embedding_pair(model, first_name)
    if pair is not None:
        pair = (alias.get(pair[0], pair[0]), alias.get(pair[1], pair[1]))
        if says_tied:
            ties.add(frozenset(pair))
    return ties, pair, says_tied


def _fingerprint(t: Tensor) -> tuple[Any, ...]:
    """Shape, dtype and ~64 evenly spaced values: cheap enough for every weight of a 7B model."""
    flat = t.detach().reshape(-1)
    step = max(1, flat.numel() // 64)
    sample = flat[::step][:64].float().cpu()
    return tuple(t.shape), t.dtype, str(t.device), tuple(sample.tolist())


def as_dtype(value: torch.dtype | str | None) -> torch.dtype | None:
    """``"bfloat16"`` / ``"torch.bfloat16"`` / a dtype -> the dtype; anything else is a ValueError."""
    if value is None or isinstance(value, torch.dtype):
        return value
    dtype = getattr(torch, str(value).removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"{value!r} is not a torch dtype (e.g. 'bfloat16', 'float32')")
    return dtype


def validate_model(model: nn.Module, expected_dtype: torch.dtype | str | None = None,
                   expected_device: torch.device | str | None = None, strict: bool = False, *,
                   ties: Iterable[tuple[str, str]] = ()) -> ValidationReport:
    """Inspect every parameter and buffer of ``model``; one finding per problem (see the module doc).
    Tensors kept as plain attributes (registered as neither) are not seen.

    ``ties`` declares extra pairs of names that are meant to share storage; tied embeddings are taken
    from ``model.config.tie_word_embeddings`` when the model has a config. ``strict=True`` raises
    :class:`ModelValidationError` on any error or warning.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"validate_model expects a torch.nn.Module, got {type(model).__name__}")
    expected_dtype = as_dtype(expected_dtype)
    want_device = torch.device(expected_device) if expected_device is not None else None
    entries = _entries(model)
    rows: list[tuple[str, str, str, str]] = []

    def add(entry_or_name: _Entry | str, check: str, severity: str, detail: str) -> None:
        name = entry_or_name.name if isinstance(entry_or_name, _Entry) else entry_or_name
        rows.append((name, check, severity, detail))

    # -- grad, meta, device: every tensor, buffers included
    for e in entries:
        also = f" (also named {', '.join(e.names[1:])})" if len(e.names) > 1 else ""
        if e.tensor.requires_grad:
            add(e, "requires_grad", "error",
                f"{e.kind} requires grad{also}: a forward outside no_grad/inference_mode records an autograd "
                "graph, and a KV cache built from it keeps every decode step's graph alive")
        if e.tensor.device.type == "meta":
            add(e, "meta", "error", f"{e.kind} is on the meta device{also}: it was never loaded with data")
    live = [e for e in entries if e.tensor.device.type != "meta"]
    if want_device is not None:
        for e in live:
            d = e.tensor.device
            if d.type != want_device.type or (want_device.index is not None and d.index != want_device.index):
                add(e, "device", "error", f"{e.kind} is on {d}, expected {want_device}")
    else:
        devices = Counter(str(e.tensor.device) for e in live)
        if len(devices) > 1:
            main = max(devices, key=lambda d: sum(e.tensor.nbytes for e in live if str(e.tensor.device) == d))
            for e in live:
                if str(e.tensor.device) != main:
                    add(e, "mixed_device", "warning", f"{e.kind} is on {e.tensor.device}, most weights on {main}: "
                        "each use moves data between devices")

    # -- dtype: parameters only (buffers legitimately keep float32 scales and tables)
    params = [e for e in entries if e.kind == "parameter" and e.tensor.is_floating_point()]
    if expected_dtype is not None:
        for e in params:
            if e.tensor.dtype != expected_dtype:
                add(e, "dtype", "error", f"parameter is {e.tensor.dtype}, expected {expected_dtype} "
                    f"({fmt_bytes(e.tensor.nbytes)} as stored)")
    else:
        by_dtype: dict[torch.dtype, int] = defaultdict(int)
        for e in params:
            by_dtype[e.tensor.dtype] += e.tensor.numel()
        if len(by_dtype) > 1:
            main_dtype = max(by_dtype, key=by_dtype.get)
            for e in params:
                if e.tensor.dtype != main_dtype:
                    add(e, "mixed_dtype", "warning", f"parameter is {e.tensor.dtype} while most parameters are "
                        f"{main_dtype}: the odd one out changes bytes and upcasts what it touches")

    # -- contiguity: weights only
    weights = [e for e in live if e.kind != "buffer (non-persistent)"]
    for e in weights:
        t = e.tensor
        if t.numel() > 1 and not t.is_contiguous():
            storage = t.untyped_storage().nbytes()
            pinned = (f"; it pins a {fmt_bytes(storage)} storage for {fmt_bytes(t.nbytes)} of data"
                      if storage > t.nbytes else "")
            add(e, "non_contiguous", "warning", f"{e.kind} of shape {tuple(t.shape)} with strides {t.stride()} "
                f"is a strided view: kernels may copy it on every call{pinned}")

    # -- ties and shared storage
    declared, pair, says_tied = _declared_ties(model, entries, ties)
    by_name = {e.name: e for e in entries}
    if pair is not None and says_tied:
        a, b = (by_name.get(n) for n in pair)
        if a is not None and b is not None and a is not b:
            if not share_memory(a.tensor, b.tensor):
                add(b, "tie_broken", "error", f"config declares tie_word_embeddings but {b.name} is a separate "
                    f"copy of {a.name}: {fmt_bytes(b.tensor.nbytes)} duplicated, and the two can drift apart")
    if pair is not None and says_tied is False:
        e = by_name.get(pair[0])
        if e is not None and pair[1] in e.names:
            add(e, "shared_storage", "warning", f"{pair[0]} and {pair[1]} are one tensor although the config says "
                "tie_word_embeddings is false: saving and reloading will not reproduce this model")
    groups: dict[tuple[str, int], list[_Entry]] = defaultdict(list)
    for e in weights:
        key = storage_key(e.tensor)
        if key is not None:
            groups[key].append(e)
    for group in groups.values():
        if len(group) < 2:
            continue
        names = [e.name for e in group]
        undeclared = [(x, y) for i, x in enumerate(names) for y in names[i + 1:] if frozenset((x, y)) not in declared
                      and share_memory(by_name[x].tensor, by_name[y].tensor)]
        flagged: set[str] = set()
        for x, y in undeclared:
            if y not in flagged:
                flagged.add(y)
                add(by_name[y], "shared_storage", "warning", f"shares memory with {x} without a declared tie: "
                    "an in-place update of one changes the other")

    # -- values stored twice (a tie silently turned into a copy)
    candidates: dict[tuple[Any, ...], list[_Entry]] = defaultdict(list)
    for e in weights:
        if e.tensor.is_floating_point() and e.tensor.numel() > 1:
            candidates[_fingerprint(e.tensor)].append(e)
    reported: set[int] = set()
    for group in candidates.values():
        if len(group) < 2:
            continue
        for i, x in enumerate(group):
            for y in group[i + 1:]:
                if id(y) in reported or share_memory(x.tensor, y.tensor):
                    continue
                tx, ty = x.tensor.detach(), y.tensor.detach()
                if not torch.equal(tx, ty) or bool(tx.min() == tx.max()):  # constant tensors prove nothing
                    continue
                reported.add(id(y))
                is_embedding_pair = pair is not None and {x.name, y.name} == set(pair)
                if is_embedding_pair and says_tied:
                    continue  # already reported as tie_broken
                what = ("the input and output embeddings hold" if is_embedding_pair
                        else f"{y.name} equals {x.name} and holds")
                add(y, "copied_tie", "warning", f"{what} the same values in two storages: a tie silently turned "
                    f"into a copy ({fmt_bytes(ty.nbytes)} duplicated); tie them or confirm they are meant to differ")

    report = ValidationReport(type(model).__name__, pd.DataFrame(rows, columns=COLUMNS), len(entries),
                              {"parameters": sum(e.kind == "parameter" for e in entries),
                               "buffers": sum(e.kind != "parameter" for e in entries),
                               "bytes": sum(e.tensor.nbytes for e in live)})
    if strict:
        report.raise_if_failed(strict=True)
    return report
