"""Checkpoints in the Hugging Face layout: ``config.json`` plus safetensors weights.

A directory holds ``config.json`` and either ``model.safetensors`` or shards
``model-00001-of-0000N.safetensors`` listed in ``model.safetensors.index.json``, with transformers'
Mistral tensor names, so a kvlab checkpoint opens in transformers and a downloaded one opens here.

Why safetensors only: a ``.bin``/``.pt`` file is a pickle, and unpickling runs whatever code the file
names. kvlab recognises such files by their first bytes and refuses them; nothing here unpickles.

Why headers first: a safetensors file starts with a JSON header saying where each tensor lies.
:func:`inspect_checkpoint` checks every header against ``config.json`` (names, shapes, dtypes, byte
ranges) before any tensor data is read, so a broken or hostile checkpoint fails with a
:class:`CheckpointError` naming the file and tensor, not with a crash, a huge allocation or a
half-loaded model.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import shutil
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .config import MistralConfig, preset
from .errors import CheckpointError, ConfigError

CONFIG_NAME = "config.json"
SINGLE_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
MAX_HEADER_BYTES = 100_000_000  # the limit safetensors itself enforces
_METADATA = {"format": "pt"}  # what transformers writes; fixed, so output is byte-identical
# A non-persistent buffer some exports saved; kvlab recomputes it from rope_theta.
_IGNORED = re.compile(r"model\.layers\.[0-9]+\.self_attn\.rotary_emb\.inv_freq")
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
_PER_LAYER = 9  # weights per decoder layer

DTYPES: dict[str, torch.dtype] = {  # safetensors dtype strings
    "BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "U16": torch.uint16,
    "I32": torch.int32, "U32": torch.uint32, "I64": torch.int64, "U64": torch.uint64,
    "F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor lives and what it is, as read from a header (no data read)."""

    shard: Path
    dtype: torch.dtype
    shape: tuple[int, ...]


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


# ------------------------------------------------------------------------------------------ writing
def save_checkpoint(state_dict: Mapping[str, torch.Tensor], config: MistralConfig,
                    directory: str | Path, max_shard_bytes: int | None = None, *,
                    overwrite: bool = False) -> Path:
    """Write ``config.json`` and safetensors weights, byte-identical for identical inputs.

    Everything is validated before the first byte is written, and the files go to a hidden sibling
    directory renamed into place at the end, so ``directory`` is either absent or complete. Shards are
    cut, in model order, when the tensor bytes exceed ``max_shard_bytes``. An existing non-empty
    ``directory`` is replaced only with ``overwrite=True``.
    """
    directory = Path(directory)
    tensors = _tensors_to_save(state_dict, config, directory)
    groups = _plan_shards(tensors, max_shard_bytes)
    _check_target(directory, overwrite)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = directory.parent / f".{directory.name}.tmp-{secrets.token_hex(4)}"
    tmp.mkdir()
    try:
        files = [SINGLE_NAME] if len(groups) == 1 else [
            f"model-{i:05d}-of-{len(groups):05d}.safetensors" for i in range(1, len(groups) + 1)]
        for file, names in zip(files, groups):
            save_file({name: tensors[name] for name in sorted(names)}, tmp / file, metadata=_METADATA)
        if len(groups) > 1:
            weight_map = {name: file for file, names in zip(files, groups) for name in names}
            total = sum(t.numel() * t.element_size() for t in tensors.values())
            index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
            (tmp / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
        config.save(tmp / CONFIG_NAME)  # last: a directory without config.json is never a checkpoint
        _move_into_place(tmp, directory, overwrite)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # already gone after a successful move
    return directory


def _tensors_to_save(state: Mapping[str, Any], config: MistralConfig, target: Path,
                     ) -> dict[str, torch.Tensor]:
    expected = expected_tensors(config)
    tied_copy = config.tie_word_embeddings and isinstance(state.get("lm_head.weight"), torch.Tensor)
    missing = [name for name in expected if name not in state]
    extra = sorted(set(state) - set(expected) - ({"lm_head.weight"} if tied_copy else set()))
    if missing or extra:
        raise CheckpointError(f"{target}: state dict does not match the config: missing {_few(missing)}, "
                              f"unexpected {_few(extra)}")
    out: dict[str, torch.Tensor] = {}
    for name, shape in expected.items():
        t = state[name]
        if not isinstance(t, torch.Tensor) or t.layout != torch.strided or t.device.type == "meta":
            raise CheckpointError(f"{target}: tensor {name!r} is not a dense tensor with data")
        if tuple(t.shape) != shape or t.dtype != config.dtype:
            raise CheckpointError(f"{target}: tensor {name!r} is {t.dtype} {tuple(t.shape)}, "
                                  f"expected {config.dtype} {shape}")
        out[name] = t.detach().to("cpu").contiguous()
    copy, embed = state.get("lm_head.weight") if tied_copy else None, out["model.embed_tokens.weight"]
    if copy is not None and (copy.dtype != embed.dtype or not torch.equal(copy.cpu(), embed)):
        raise CheckpointError(f"{target}: tensor 'lm_head.weight' differs from 'model.embed_tokens.weight' "
                              "although tie_word_embeddings is true")
    return out


def _plan_shards(tensors: dict[str, torch.Tensor], max_bytes: int | None) -> list[list[str]]:
    sizes = {name: t.numel() * t.element_size() for name, t in tensors.items()}
    if max_bytes is None or sum(sizes.values()) <= max_bytes:
        return [list(tensors)]
    if max_bytes <= 0:
        raise CheckpointError(f"max_shard_bytes must be positive, got {max_bytes}")
    groups: list[list[str]] = [[]]
    used = 0
    for name, size in sizes.items():
        if groups[-1] and used + size > max_bytes:  # a tensor larger than the limit gets a shard alone
            groups.append([])
            used = 0
        groups[-1].append(name)
        used += size
    return groups


def _check_target(directory: Path, overwrite: bool) -> None:
    if directory.is_symlink() or (directory.exists() and not directory.is_dir()):
        raise CheckpointError(f"{directory}: exists and is not a directory; refusing to replace it")
    if directory.is_dir() and not overwrite and any(directory.iterdir()):
        raise CheckpointError(f"{directory}: already exists; pass overwrite=True to replace it")


def _move_into_place(tmp: Path, directory: Path, overwrite: bool) -> None:
    _check_target(directory, overwrite)
    old = None
    if directory.exists():  # empty, or to be overwritten
        old = directory.parent / f".{directory.name}.old-{secrets.token_hex(4)}"
        directory.rename(old)
    try:
        tmp.rename(directory)
    except OSError as exc:  # e.g. another process built the same checkpoint meanwhile
        if old is not None:
            old.rename(directory)
        raise CheckpointError(f"{directory}: cannot move the new checkpoint into place ({exc})") from None
    if old is not None:
        shutil.rmtree(old)


# ------------------------------------------------------------------------------------------ reading
def inspect_checkpoint(directory: str | Path) -> CheckpointInfo:
    """Validate ``config.json``, the index and every safetensors header; read no tensor data."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: not a checkpoint directory (missing, or not a directory)")
    config = _load_config(directory / CONFIG_NAME)
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
        for name, entry in _read_header(shard).items():
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
        raise CheckpointError(f"{directory}: missing tensor(s) {_few(missing)} "
                              f"in {[s.name for s in shards]}")
    return CheckpointInfo(directory, config, shards, {name: tensors[name] for name in expected}, extras)


def read_shard(path: str | Path, names: Iterable[str] | None = None,
               device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Read ``names`` (default: all) from one safetensors file, memory-mapped by safetensors.

    Meant for files :func:`inspect_checkpoint` validated; any failure still becomes a CheckpointError.
    """
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            available = set(f.keys())
            wanted = sorted(available) if names is None else list(names)
            absent = [name for name in wanted if name not in available]
            if absent:
                raise CheckpointError(f"{path}: no tensor(s) {_few(absent)}")
            return {name: f.get_tensor(name) for name in wanted}
    except CheckpointError:
        raise
    except (SafetensorError, OSError, RuntimeError, ValueError, TypeError) as exc:
        raise CheckpointError(f"{path}: cannot read safetensors data ({exc})") from None


def check_tied_copy(info: CheckpointInfo, embed_tokens: torch.Tensor) -> None:
    """Accept a stored ``lm_head.weight`` under tied embeddings only if it equals the embedding."""
    entry = info.extras.get("lm_head.weight")
    if entry is None:
        return
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


def _load_config(path: Path) -> MistralConfig:
    if not path.is_file():
        raise ConfigError(f"{path}: missing; a checkpoint directory needs config.json next to its weights")
    data = _read_json(path, "config.json", ConfigError)
    try:
        return MistralConfig.from_dict(data, source=str(path))
    except CheckpointError:
        raise
    except (TypeError, ValueError) as exc:  # e.g. a list where a string belongs
        nested = sorted(k for k, v in data.items() if isinstance(v, (list, dict)))
        raise ConfigError(f"{path}: invalid config ({exc}); non-scalar field(s) {nested}") from None


def _read_index(path: Path) -> dict[str, str]:
    data = _read_json(path, "index")
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not isinstance(data.get("metadata", {}), dict):
        raise CheckpointError(f"{path}: expected an object with a 'weight_map' object "
                              "(and optional 'metadata')")
    for name, shard in weight_map.items():
        if not isinstance(shard, str) or not shard.endswith(".safetensors") or shard != Path(shard).name:
            raise CheckpointError(f"{path}: weight_map entry {name!r} -> {shard!r} is not a .safetensors "
                                  "file in this directory (pickle-based shards are never loaded)")
    return weight_map


def _read_header(path: Path) -> dict[str, TensorEntry]:
    """Check one safetensors header as strictly as safetensors does, reading only the header."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(9)
            length = int.from_bytes(head[:8], "little")
            fits = length <= min(size - 8, MAX_HEADER_BYTES)
            looks_safe = len(head) == 9 and fits and head[8] in b"{ \t\r\n"
            is_zip = head.startswith(b"PK\x03\x04")
            is_pickle = len(head) > 1 and head[0] == 0x80 and 2 <= head[1] <= 5  # PROTO opcode
            if (is_zip or is_pickle) and not looks_safe:
                raise CheckpointError(f"{path}: is a pickle or zip (torch.save) file, not safetensors; "
                                      "kvlab never unpickles weights (that can run arbitrary code): "
                                      "convert it to safetensors")
            if size < 8 or not fits:
                raise CheckpointError(f"{path}: header length {length} does not fit the file ({size} bytes) "
                                      f"and the {MAX_HEADER_BYTES}-byte limit")
            f.seek(8)
            raw = f.read(length)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: safetensors file missing") from None
    except (OSError, ValueError) as exc:  # ValueError: a NUL or lone surrogate in an index's file name
        raise CheckpointError(f"{path}: cannot read ({exc})") from None
    header = _parse_json(path, raw, "header")
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: header is not a JSON object")
    meta = header.pop("__metadata__", {})
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise CheckpointError(f"{path}: field '__metadata__' must map strings to strings")
    data_len = size - 8 - length
    entries: dict[str, TensorEntry] = {}
    spans: list[tuple[int, int, str]] = []
    for name, desc in header.items():
        where = f"{path}: tensor {name!r}"
        if not isinstance(desc, dict) or set(desc) != {"dtype", "shape", "data_offsets"}:
            raise CheckpointError(f"{where}: entry must have exactly 'dtype', 'shape' and 'data_offsets'")
        dtype = DTYPES.get(desc["dtype"]) if isinstance(desc["dtype"], str) else None
        shape, offsets = desc["shape"], desc["data_offsets"]
        if dtype is None:
            raise CheckpointError(f"{where}: unknown dtype {desc['dtype']!r}")
        if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
            raise CheckpointError(f"{where}: field 'shape' must be a list of non-negative integers")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)
                and 0 <= offsets[0] <= offsets[1] <= data_len):
            raise CheckpointError(f"{where}: data_offsets {offsets!r} are not within the "
                                  f"{data_len}-byte data region")
        if _numel(shape, data_len) * dtype.itemsize != offsets[1] - offsets[0]:
            raise CheckpointError(f"{where}: shape {shape} of {desc['dtype']} does not fill "
                                  f"data_offsets {offsets} ({offsets[1] - offsets[0]} bytes)")
        entries[name] = TensorEntry(path, dtype, tuple(shape))
        spans.append((offsets[0], offsets[1], name))
    end, previous = 0, None
    for begin, stop, name in sorted(spans):  # safetensors requires tensors to tile the data exactly
        if begin != end:
            problem = f"overlaps tensor {previous!r}" if begin < end else f"leaves a {begin - end}-byte gap"
            raise CheckpointError(f"{path}: tensor {name!r} {problem} (data_offsets start at {begin})")
        end, previous = stop, name
    if end != data_len:
        raise CheckpointError(f"{path}: {data_len - end} bytes after the last tensor are not covered "
                              "by the header")
    return entries


def _read_json(path: Path, what: str, error: type[CheckpointError] = CheckpointError) -> Any:
    try:
        if path.stat().st_size > MAX_HEADER_BYTES:
            raise error(f"{path}: {what} is larger than {MAX_HEADER_BYTES} bytes")
        return _parse_json(path, path.read_bytes(), what, error)
    except OSError as exc:
        raise error(f"{path}: cannot read {what} ({exc})") from None


def _parse_json(path: Path, raw: bytes, what: str, error: type[CheckpointError] = CheckpointError) -> Any:
    """Strict JSON: UTF-8 without lone surrogates, no duplicate keys, no NaN/Infinity."""
    def no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in pairs:
            if key in out:
                raise ValueError(f"duplicate key {key!r}")
            out[key] = value
        return out

    def no_constant(token: str) -> Any:
        raise ValueError(f"{token} is not allowed")

    try:
        value = json.loads(raw.decode(), object_pairs_hook=no_duplicates, parse_constant=no_constant)
        json.dumps(value, ensure_ascii=False).encode("utf-8")  # fails on an escaped lone surrogate
        return value
    except (ValueError, RecursionError) as exc:  # UnicodeError and JSONDecodeError are ValueErrors
        raise error(f"{path}: {what} is not valid UTF-8 JSON ({exc})") from None


def _numel(shape: list[int], limit: int) -> int:
    """Element count, stopping once past ``limit``, so a hostile shape never builds a huge number."""
    numel = 0 if 0 in shape else 1
    for dim in shape:
        if numel > limit:
            break
        numel *= dim
    return numel


def _few(names: list[str], limit: int = 5) -> str:
    return repr(names) if len(names) <= limit else f"{names[:limit]!r} and {len(names) - limit} more"


# ------------------------------------------------------------------------------------------ test data
def random_state_dict(config: MistralConfig, seed: int = 0, *, device: torch.device | str | None = None,
                      dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Seeded random weights, drawn in model order, scaled so activations keep unit size.

    Matrices are N(0, 1/fan_in), embeddings N(0, 1) and norms ones: with the usual N(0, 0.02) a random
    decoder collapses onto one repeated token, and token-equality checks between caches would prove little.

    ``dtype`` defaults to the config's. ``device`` (default CPU) is where the values are drawn, by a
    generator of that device: a GPU model (the 7B preset's 14.5 GB) never passes through host memory.
    The same seed therefore gives different values on CPU and on CUDA; on CPU they are the ones every
    kvlab checkpoint was built from.
    """
    device = torch.device("cpu" if device is None else device)
    dtype = dtype or config.dtype
    generator = torch.Generator(device=device).manual_seed(seed)
    state = {}
    for name, shape in expected_tensors(config).items():
        if len(shape) == 1:
            state[name] = torch.ones(shape, dtype=dtype, device=device)
            continue
        std = 1.0 if name == "model.embed_tokens.weight" else shape[1] ** -0.5
        # drawn in float32, so the draws do not depend on the storage dtype
        state[name] = torch.empty(shape, device=device).normal_(0.0, std, generator=generator).to(dtype)
    return state


def default_checkpoint_root() -> Path:
    """``$KVLAB_DATA/checkpoints``, else ``data/checkpoints`` of a source checkout, else a user cache."""
    if os.environ.get("KVLAB_DATA"):
        return Path(os.environ["KVLAB_DATA"]).expanduser() / "checkpoints"
    repo = Path(__file__).resolve().parent.parent
    if (repo / "pyproject.toml").is_file():
        return repo / "data" / "checkpoints"
    return Path.home() / ".cache" / "kvlab" / "checkpoints"


def build_checkpoint(name_or_config: str | MistralConfig = "tiny", root: str | Path | None = None,
                     seed: int = 0, max_shard_bytes: int | None = None, overwrite: bool = False) -> Path:
    """A random-weight checkpoint at ``root/<name>-seed<seed>``, written only if not already complete.

    Deterministic, so notebooks and tests rebuild it wherever they run instead of shipping weights.
    A config that is no preset is named by a hash of its ``config.json`` content.
    """
    if isinstance(name_or_config, str):
        config, label = preset(name_or_config), name_or_config
    else:
        config = name_or_config
        digest = hashlib.sha256(json.dumps(config.to_dict(), sort_keys=True).encode()).hexdigest()
        label = f"config-{digest[:12]}"
    label += f"-seed{seed}" + (f"-shard{max_shard_bytes}" if max_shard_bytes is not None else "")
    directory = Path(root if root is not None else default_checkpoint_root()) / label
    if not overwrite and _is_complete(directory, config):
        return directory
    state = random_state_dict(config, seed)
    replace = overwrite or directory.exists()  # a broken leftover is replaced
    try:
        return save_checkpoint(state, config, directory, max_shard_bytes, overwrite=replace)
    except CheckpointError:
        if _is_complete(directory, config):  # another process finished the same build first
            return directory
        raise


def _is_complete(directory: Path, config: MistralConfig) -> bool:
    try:
        return inspect_checkpoint(directory).config == config
    except CheckpointError:
        return False
