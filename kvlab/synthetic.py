"""Seeded random weights, and checkpoints built from them, so nothing large ever ships with kvlab.

The same seed gives the same weights, so a notebook, a test and a benchmark on another machine build
the same checkpoint instead of downloading one.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

from .checkpoint import expected_tensors, inspect_checkpoint
from .checkpoint_write import save_checkpoint
from .config import MistralConfig, preset
from .errors import CheckpointError


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
