"""Shared by the checkpoint tests: a configuration small enough that every case can write a whole
checkpoint, ways to write a broken checkpoint and to take a safetensors file apart, a pickle that would
run code if anything ever unpickled it, and the two checks the tests make over and over: loading gives
back exactly the tensors saved, or it fails with a CheckpointError whose message names the fault."""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from kvlab.checkpoint import CONFIG_NAME, SINGLE_NAME, load_state_dict
from kvlab.checkpoint_write import save_checkpoint
from kvlab.config import MistralConfig
from kvlab.errors import CheckpointError
from kvlab.synthetic import random_state_dict

# A few KB, so that every bad-input and fuzz case can afford to write a whole checkpoint.
MINI = MistralConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=8, sliding_window=None,
                     max_position_embeddings=128, torch_dtype="float32")


def write(directory: Path, config: MistralConfig = MINI, seed: int = 0, **kwargs) -> Path:
    return save_checkpoint(random_state_dict(config, seed), config, directory, **kwargs)


def write_raw(directory: Path, config: MistralConfig, tensors: dict[str, torch.Tensor]) -> Path:
    """A checkpoint written without save_checkpoint's validation, to build bad ones."""
    directory.mkdir(parents=True, exist_ok=True)
    config.save(directory / CONFIG_NAME)
    tensors = {name: t.clone() for name, t in tensors.items()}  # safetensors refuses shared storage
    save_file(tensors, directory / SINGLE_NAME, metadata={"format": "pt"})
    return directory


def split(blob: bytes) -> tuple[bytes, bytes]:
    """A safetensors file's header bytes and data bytes."""
    n = int.from_bytes(blob[:8], "little")
    return blob[8:8 + n], blob[8 + n:]


def pack(header: bytes | dict, data: bytes) -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return len(raw).to_bytes(8, "little") + raw + data


def refused(directory: Path, *fragments: str) -> str:
    """Loading fails with a CheckpointError whose message holds every fragment."""
    with pytest.raises(CheckpointError) as info:
        load_state_dict(directory)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    return message


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert list(a) == list(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name


def pickle_payload(marker: Path) -> bytes:
    """Protocol-2 pickle bytes that, if ever unpickled, would call exec() and create ``marker``."""
    code = f"open({str(marker)!r}, 'w').write('unpickled')".encode()
    return b"\x80\x02cbuiltins\nexec\n(X" + len(code).to_bytes(4, "little") + code + b"tR."


def _zip_with(payload: bytes) -> bytes:
    """What torch.save writes: a zip archive holding a pickle."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("archive/data.pkl", payload)
    return buffer.getvalue()
