"""Writing checkpoints in the Hugging Face layout: byte-identical output, all or nothing.

What :mod:`kvlab.checkpoint` reads, this writes: ``config.json`` plus one ``model.safetensors`` or
shards listed in ``model.safetensors.index.json``, tensors in sorted order with transformers'
metadata, so identical inputs give identical bytes. A checkpoint appears in one rename: the files are
written to a hidden sibling directory first, so a crash or a full disk leaves no half checkpoint.
"""

from __future__ import annotations

import json
import secrets
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from .checkpoint import CONFIG_NAME, INDEX_NAME, SINGLE_NAME, expected_tensors
from .checkpoint_files import few_names
from .config import MistralConfig
from .errors import CheckpointError

_METADATA = {"format": "pt"}  # what transformers writes; fixed, so output is byte-identical


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
    tmp = directory.parent / f".{directory.name}.tmp-{secrets.token_hex(4)}"
    try:
        directory.parent.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
    except OSError as exc:  # a parent that is a file, a read-only or virtual filesystem (/proc) ...
        raise CheckpointError(f"{directory}: cannot create a directory there ({exc.strerror or exc})") from None
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
        raise CheckpointError(f"{target}: state dict does not match the config: missing {few_names(missing)}, "
                              f"unexpected {few_names(extra)}")
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
        raise CheckpointError(f"{directory}: already exists; replacing it needs overwrite=True "
                              "(--overwrite on the command line)")


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

