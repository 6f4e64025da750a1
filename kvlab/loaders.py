"""Four ways to load the same checkpoint, mirroring the incident's suspects and its fix.

- ``trainable``: every weight becomes a trainable parameter, as mistral.rs did before its fix (and as
  any ``nn.Module`` does by default). Decoding outside ``no_grad`` then records a graph every step.
- ``threaded``: the subject of the first, wrong fix attempt — one loading thread per shard. Threads
  change nothing about autograd, so this still leaks.
- ``inference``: frozen weights (``requires_grad=False``), as upstream Candle loaded plain tensors.
  The fix.
- ``int8``: weight-only int8 matrices with per-output-channel scales, other weights frozen: the
  "quantized models are fine" control.

Every loader validates the whole checkpoint (headers, names, shapes, dtypes) and reads every tensor
before building the model, so a bad checkpoint raises :class:`~kvlab.errors.CheckpointError` and no
half-loaded model is ever returned.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from torch import Tensor

from .checkpoint import check_tied_copy, inspect_checkpoint, random_state_dict, read_shard
from .config import MistralConfig, preset
from .model import MistralForCausalLM, Rotary
from .quant import quantize_linears

LOADERS = ("trainable", "threaded", "inference", "int8")


def read_tensors(directory: str | Path, threaded: bool = False,
                 device: torch.device | str = "cpu") -> tuple[MistralConfig, dict[str, Tensor]]:
    """Validate a checkpoint and read all its tensors (one thread per shard if ``threaded``)."""
    info = inspect_checkpoint(directory)
    groups = list(info.by_shard().items())

    def read(group: tuple[Path, list[str]]) -> dict[str, Tensor]:
        return read_shard(group[0], group[1], device=device)

    if threaded:
        with ThreadPoolExecutor(max_workers=len(groups), thread_name_prefix="kvlab-shard") as pool:
            parts = list(pool.map(read, groups))
    else:
        parts = [read(group) for group in groups]
    tensors: dict[str, Tensor] = {}
    for part in parts:
        tensors.update(part)
    check_tied_copy(info, tensors["model.embed_tokens.weight"])
    return info.config, tensors


def build_model(config: MistralConfig, tensors: dict[str, Tensor], trainable: bool) -> MistralForCausalLM:
    """Assemble a model around already-read tensors without allocating weights twice."""
    state = dict(tensors)
    if config.tie_word_embeddings:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    with torch.device("meta"):
        model = MistralForCausalLM(config)
    model.load_state_dict(state, strict=True, assign=True)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    device = state["model.embed_tokens.weight"].device
    model.model.rotary_emb = Rotary(config.head_dim, config.rope_theta).to(device)  # non-persistent buffer
    model.requires_grad_(trainable)
    return model.eval()


def model_for_loader(config: MistralConfig, tensors: dict[str, Tensor], loader: str) -> MistralForCausalLM:
    """The model ``loader`` returns, assembled around already-read tensors (their storage, no copy):
    trainable parameters for ``trainable`` and ``threaded``, frozen ones for ``inference``, and for
    ``int8`` frozen weights whose linears are then replaced by int8 copies."""
    if loader not in LOADERS:
        raise ValueError(f"unknown loader {loader!r}; choose from {LOADERS}")
    model = build_model(config, tensors, trainable=loader in ("trainable", "threaded"))
    return quantize_linears(model) if loader == "int8" else model


def load_model(directory: str | Path, loader: str = "inference", device: torch.device | str = "cpu",
               dtype: torch.dtype | None = None) -> MistralForCausalLM:
    """Load an HF-layout checkpoint directory (``config.json`` + safetensors) with the named loader.

    ``eval()`` is applied in every case: it changes dropout and the like, *not* autograd — one of the
    lessons of the incident.
    """
    if loader not in LOADERS:
        raise ValueError(f"unknown loader {loader!r}; choose from {LOADERS}")
    config, tensors = read_tensors(directory, threaded=loader == "threaded", device=device)
    if dtype is not None and dtype != config.dtype:
        tensors = {name: t.to(dtype) for name, t in tensors.items()}
        config = config.replace(torch_dtype=str(dtype).removeprefix("torch."))
    return model_for_loader(config, tensors, loader)


def random_model(config: MistralConfig | str = "tiny", loader: str = "inference", seed: int = 0,
                 device: torch.device | str = "cpu") -> MistralForCausalLM:
    """A model with seeded random weights, set up as ``loader`` would return it, without touching disk.

    Tests and quick experiments use this; the notebooks go through a real checkpoint and
    :func:`load_model`, which gives the same weights for the same seed (drawn on the CPU, then moved
    to ``device``).
    """
    if loader not in LOADERS:
        raise ValueError(f"unknown loader {loader!r}; choose from {LOADERS}")
    config = preset(config) if isinstance(config, str) else config
    tensors = {name: t.to(device) for name, t in random_state_dict(config, seed).items()}
    return model_for_loader(config, tensors, loader)
