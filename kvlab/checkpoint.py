"""Checkpoints in the Hugging Face layout: reading and validating ``config.json`` plus safetensors weights.

A directory holds ``config.json`` and either ``model.safetensors`` or shards
``model-00001-of-0000N.safetensors`` listed in ``model.safetensors.index.json``, with transformers'
Mistral tensor names, so a kvlab checkpoint opens in transformers and a downloaded one opens here.
Writing lives in :mod:`kvlab.checkpoint_write`, seeded random weights in :mod:`kvlab.synthetic`.

Why safetensors only: a ``.bin``/``.pt`` file is a pickle, and unpickling runs whatever code the file
names. kvlab recognises such files by their first bytes and refuses them; nothing here unpickles.

Why headers first: a safetensors file starts with a JSON header saying where each tensor lies.
:func:`inspect_checkpoint` checks every header against ``config.json`` (names, shapes, dtypes, byte
ranges) before any tensor data is read, so a broken or hostile checkpoint fails with a
:class:`CheckpointError` naming the file and tensor, not with a crash, a hang, a huge allocation or a
half-loaded model. :func:`validate_checkpoint` runs exactly the checks loading runs, without loading.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch
from safetensors import SafetensorError, safe_open

from .checkpoint_files import TensorEntry, few_names, numel, open_regular, read_header, read_json
from .config import MistralConfig, dtype_named
from .errors import CheckpointError

CONFIG_NAME = "config.json"
SINGLE_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
# A non-persistent buffer some exports saved; kvlab recomputes it from rope_theta.
_IGNORED = re.compile(r"model\.layers\.[0-9]+\.self_attn\.rotary_emb\.inv_freq")
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
_PER_LAYER = 9  # weights per decoder layer


@dataclass
class CheckpointInfo:
    """A validated checkpoint: what a loader reads, shard by shard.

    ``tensors`` holds exactly the names of :func:`expected_tensors`, in that order. ``extras`` holds
    tolerated names a model does not need: ``rotary_emb.inv_freq`` buffers, and ``lm_head.weight``
    stored although embeddings are tied (:func:`check_tied_copy` confirms it equals the embedding).
    """

    directory: Path
    config: MistralConfig
    shards: list[Path]
    tensors: dict[str, TensorEntry]
    extras: dict[str, TensorEntry] = field(default_factory=dict)

    def by_shard(self) -> dict[Path, list[str]]:
        """The needed names grouped per shard: one :func:`read_shard` call (or thread) each."""
        groups: dict[Path, list[str]] = {shard: [] for shard in self.shards}
        for name, entry in self.tensors.items():
            groups[entry.shard].append(name)
        return {shard: names for shard, names in groups.items() if names}


def expected_tensors(config: MistralConfig) -> dict[str, tuple[int, ...]]:
    """Every weight a Mistral decoder of this config has, HF name -> shape, in model order."""
    hidden, inter, vocab = config.hidden_size, config.intermediate_size, config.vocab_size
    q_width = config.num_attention_heads * config.head_dim
    kv_width = config.num_key_value_heads * config.head_dim
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, hidden)}
    layer = {"self_attn.q_proj": (q_width, hidden), "self_attn.k_proj": (kv_width, hidden),
             "self_attn.v_proj": (kv_width, hidden), "self_attn.o_proj": (hidden, q_width),
             "mlp.gate_proj": (inter, hidden), "mlp.up_proj": (inter, hidden),
             "mlp.down_proj": (hidden, inter),
             "input_layernorm": (hidden,), "post_attention_layernorm": (hidden,)}
    for i in range(config.num_hidden_layers):
        shapes.update({f"model.layers.{i}.{part}.weight": shape for part, shape in layer.items()})
    shapes["model.norm.weight"] = (hidden,)
    if not config.tie_word_embeddings:  # tied: lm_head reuses embed_tokens, and HF omits it
        shapes["lm_head.weight"] = (vocab, hidden)
    return shapes


# ------------------------------------------------------------------------------------------ reading
def inspect_checkpoint(directory: str | Path) -> CheckpointInfo:
    """Validate ``config.json``, the index and every safetensors header; read no tensor data."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: not a checkpoint directory (missing, or not a directory)")
    config = MistralConfig.load(directory / CONFIG_NAME)
    single, index_path = directory / SINGLE_NAME, directory / INDEX_NAME
    weight_map = None
    if single.exists() and index_path.exists():
        raise CheckpointError(f"{directory}: holds both {SINGLE_NAME} and {INDEX_NAME}; keep only one")
    if index_path.exists():
        weight_map = _read_index(index_path)
        shards = [directory / name for name in sorted(set(weight_map.values()))]
    elif single.exists():
        shards = [single]
    else:
        pickles = sorted(p.name for p in directory.iterdir() if p.name.endswith(_PICKLE_SUFFIXES))
        hint = (f"; {pickles} is a pickle-based format kvlab never loads (unpickling can run "
                "arbitrary code): convert it to safetensors") if pickles else ""
        raise CheckpointError(f"{directory}: no {SINGLE_NAME} or {INDEX_NAME}{hint}")

    found: dict[str, TensorEntry] = {}
    for shard in shards:
        for name, entry in read_header(shard).items():
            if name in found:
                raise CheckpointError(f"{shard}: tensor {name!r} is also in {found[name].shard.name}")
            found[name] = entry
    for name, shard_name in (weight_map or {}).items():
        if name not in found or found[name].shard.name != shard_name:
            where = f"it is in {found[name].shard.name}" if name in found else "no shard holds it"
            raise CheckpointError(f"{index_path}: weight_map puts tensor {name!r} in {shard_name}, "
                                  f"but {where}")
    for name, entry in found.items():
        if weight_map is not None and name not in weight_map:
            raise CheckpointError(f"{entry.shard}: tensor {name!r} is not in the weight_map of {INDEX_NAME}")

    if len(found) < _PER_LAYER * config.num_hidden_layers:  # before a hostile layer count makes a huge dict
        raise CheckpointError(f"{directory}: config.json says num_hidden_layers={config.num_hidden_layers}, "
                              f"but the checkpoint holds only {len(found)} tensors")
    expected = expected_tensors(config)
    tensors, extras = {}, {}
    for name, entry in found.items():
        if _IGNORED.fullmatch(name):
            extras[name] = entry
            continue
        shape = expected.get(name)
        if name == "lm_head.weight" and config.tie_word_embeddings:
            shape = expected["model.embed_tokens.weight"]
        if shape is None:
            raise CheckpointError(f"{entry.shard}: unexpected tensor {name!r} (not a weight of this config)")
        if entry.shape != shape:
            raise CheckpointError(f"{entry.shard}: tensor {name!r} has shape {entry.shape}, "
                                  f"but config.json implies {shape}")
        if entry.dtype != config.dtype:
            raise CheckpointError(f"{entry.shard}: tensor {name!r} is {entry.dtype}, "
                                  f"but config.json says torch_dtype {config.torch_dtype}")
        (tensors if name in expected else extras)[name] = entry
    missing = [name for name in expected if name not in tensors]
    if missing:
        raise CheckpointError(f"{directory}: missing tensor(s) {few_names(missing)} "
                              f"in {[s.name for s in shards]}")
    return CheckpointInfo(directory, config, shards, {name: tensors[name] for name in expected}, extras)


def read_shard(path: str | Path, names: Iterable[str] | None = None,
               device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Read ``names`` (default: all) from one safetensors file, memory-mapped by safetensors.

    Meant for files :func:`inspect_checkpoint` validated; any failure still becomes a CheckpointError.
    """
    path = Path(path)
    open_regular(path, "safetensors file").close()  # safetensors would block on a FIFO
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            available = set(f.keys())
            wanted = sorted(available) if names is None else list(names)
            absent = [name for name in wanted if name not in available]
            if absent:
                raise CheckpointError(f"{path}: no tensor(s) {few_names(absent)}")
            return {name: f.get_tensor(name) for name in wanted}
    except CheckpointError:
        raise
    except (SafetensorError, OSError, RuntimeError, ValueError, TypeError) as exc:
        raise CheckpointError(f"{path}: cannot read safetensors data ({exc})") from None


def check_tied_copy(info: CheckpointInfo, embed_tokens: torch.Tensor | None = None) -> None:
    """Accept a stored ``lm_head.weight`` under tied embeddings only if it equals the embedding
    (``embed_tokens`` if already read, else read from its shard)."""
    entry = info.extras.get("lm_head.weight")
    if entry is None:
        return
    if embed_tokens is None:
        embed = info.tensors["model.embed_tokens.weight"]
        embed_tokens = read_shard(embed.shard, ["model.embed_tokens.weight"])["model.embed_tokens.weight"]
    if not torch.equal(read_shard(entry.shard, ["lm_head.weight"])["lm_head.weight"], embed_tokens.cpu()):
        raise CheckpointError(f"{entry.shard}: tensor 'lm_head.weight' differs from "
                              "'model.embed_tokens.weight' although config.json sets tie_word_embeddings")


def load_state_dict(directory: str | Path) -> tuple[MistralConfig, dict[str, torch.Tensor]]:
    """Inspect, then read every shard: the config and all weights, in :func:`expected_tensors` order."""
    info = inspect_checkpoint(directory)
    state: dict[str, torch.Tensor] = {}
    for shard, names in info.by_shard().items():
        state.update(read_shard(shard, names))
    check_tied_copy(info, state["model.embed_tokens.weight"])
    return info.config, {name: state[name] for name in info.tensors}


def _read_index(path: Path) -> dict[str, str]:
    data = read_json(path, "index")
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not isinstance(data.get("metadata", {}), dict):
        raise CheckpointError(f"{path}: expected an object with a 'weight_map' object "
                              "(and optional 'metadata')")
    for name, shard in weight_map.items():
        if not isinstance(shard, str) or not shard.endswith(".safetensors") or shard != Path(shard).name:
            raise CheckpointError(f"{path}: weight_map entry {name!r} -> {shard!r} is not a .safetensors "
                                  "file in this directory (pickle-based shards are never loaded)")
    return weight_map


# ------------------------------------------------------------------------------------------ validating
class Finding(NamedTuple):
    """One thing worth knowing about a checkpoint that loads (same columns as model validation)."""

    parameter: str  # the tensor or file concerned
    check: str
    severity: str  # "error": not what was expected; "warning": loads, but invites a bug; "info"
    detail: str


@dataclass(frozen=True)
class CheckpointReport:
    """What :func:`validate_checkpoint` found: the checkpoint as a loader will see it, and findings."""

    info: CheckpointInfo
    findings: tuple[Finding, ...]

    @property
    def passed(self) -> bool:
        return not any(f.severity == "error" for f in self.findings)

    @property
    def clean(self) -> bool:
        """No error and no warning: what ``--strict`` demands."""
        return not any(f.severity in ("error", "warning") for f in self.findings)

    @property
    def details(self) -> dict[str, Any]:
        config = self.info.config
        return {"shards": len(self.info.shards), "tensors": len(self.info.tensors),
                "bytes": sum(e.dtype.itemsize * numel(e.shape) for e in self.info.tensors.values()),
                "dtype": config.torch_dtype, "layers": config.num_hidden_layers,
                "tie_word_embeddings": config.tie_word_embeddings}

    @property
    def verdict(self) -> str:
        where, n = self.info.directory, len(self.info.tensors) + len(self.info.extras)
        bad = [f for f in self.findings if f.severity != "info"]
        if not bad:
            return f"OK: {where}: {n} tensors checked; loads as is"
        parts = ", ".join(f"{f.check} ({f.severity})" for f in bad)
        return f"{'WARN' if self.passed else 'FAIL'}: {where}: {parts} among {n} tensors checked"

    def describe(self, limit: int = 12) -> str:
        """Up to ``limit`` findings, one line each, errors first."""
        order = sorted(self.findings, key=lambda f: ("error", "warning", "info").index(f.severity))
        lines = [f"  [{f.severity}] {f.check}: {f.parameter}: {f.detail}" for f in order[:limit]]
        if len(order) > limit:
            lines.append(f"  ... and {len(order) - limit} more findings")
        return "\n".join(lines) or self.verdict


def validate_checkpoint(directory: str | Path, expected_dtype: torch.dtype | str | None = None) -> CheckpointReport:
    """Run every check loading runs, without loading: a checkpoint that loading would refuse raises the
    same :class:`CheckpointError` here. That is :func:`inspect_checkpoint` (headers only) plus, when
    ``lm_head.weight`` is stored beside tied embeddings, the comparison of those two tensors -- the only
    tensor data read. A usable checkpoint gives a report of what a loader should know."""
    if isinstance(expected_dtype, str):
        expected_dtype = dtype_named(expected_dtype)
    info = inspect_checkpoint(directory)
    check_tied_copy(info)
    findings = []
    if expected_dtype is not None and info.config.dtype != expected_dtype:
        findings.append(Finding(CONFIG_NAME, "dtype", "error",
                                f"weights are stored as {info.config.dtype}, expected {expected_dtype}"))
    for name, entry in info.extras.items():
        if name == "lm_head.weight":
            findings.append(Finding(name, "tied_copy_stored", "warning", f"{entry.shard.name} stores a copy "
                                    "of the tied embedding: loaders tie it, they do not load a second copy"))
        else:
            findings.append(Finding(name, "ignored_tensor", "info", f"{entry.shard.name}: not a weight of "
                                    "this model; loaders skip it"))
    return CheckpointReport(info, tuple(findings))
