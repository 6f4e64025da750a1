"""Four ways to load the same checkpoint, mirroring the incident's suspects and its fix.

- ``trainable``: every weight becomes a trainable parameter, as mistral.rs did before its fix (and as
  any ``nn.Module`` does by default). Decoding outside ``no_grad`` then records a graph every step.
- ``threaded``: the subject of the first, wrong fix attempt — one loading thread per shard. Threads
  change nothing about autograd, so this still leaks.
- ``inference``: frozen weights (``requires_grad=False``), as upstream Candle loaded plain tensors.
  The fix.
- ``int8``: weight-only int8 matrices with per-output-channel scales, other weights frozen: the
  "quantized models are fine" control. :func:`load_model` and :func:`random_model` quantize one
  matrix at a time and drop its float copy at once, so float and int8 copies of the weights never
  coexist beyond one matrix.

Every loader validates the whole checkpoint (headers, names, shapes, dtypes) and reads every tensor
before building the model, so a bad checkpoint raises :class:`~kvlab.errors.CheckpointError` and no
half-loaded model is ever returned.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from torch import Tensor, nn

from .checkpoint import check_tied_copy, inspect_checkpoint, read_shard
from .config import MistralConfig, preset
from .model import MistralForCausalLM, Rotary
from .quant import quantize_linears, quantize_state
from .synthetic import random_state_dict

#: Every loader by name: the one list of them.
LOADERS = ("trainable", "threaded", "inference", "int8")
#: The loaders whose weights require grad, so that a decode loop outside ``no_grad`` records a graph.
TRAINABLE_LOADERS = ("trainable", "threaded")


def check_loader(loader: str) -> None:
    """Raise ``ValueError`` naming the choices unless ``loader`` is one of :data:`LOADERS`."""
    if loader not in LOADERS:
        raise ValueError(f"unknown loader {loader!r}; choose from {LOADERS}")


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


def build_model(config: MistralConfig, tensors: dict[str, Tensor], trainable: bool,
                int8: bool = False) -> MistralForCausalLM:
    """Assemble a model around already-read tensors without allocating weights twice.

    With ``int8`` the linears hold int8 copies, made one matrix at a time inside ``tensors`` (which is
    consumed: each float matrix leaves it as its int8 copy enters).
    """
    state = tensors if int8 else dict(tensors)
    if config.tie_word_embeddings:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    with torch.device("meta"):
        model = MistralForCausalLM(config)
    if int8:
        quantize_state(state, [f"{name}.weight" for name, m in model.named_modules() if isinstance(m, nn.Linear)])
        quantize_linears(model)  # int8 placeholders on the meta device, filled by load_state_dict below
    model.load_state_dict(state, strict=True, assign=True)
    if config.tie_word_embeddings and not int8:
        model.lm_head.weight = model.model.embed_tokens.weight
    device = state["model.embed_tokens.weight"].device
    model.model.rotary_emb = Rotary(config.head_dim, config.rope_theta).to(device)  # non-persistent buffer
    model.requires_grad_(trainable)
    return model.eval()


def model_for_loader(config: MistralConfig, tensors: dict[str, Tensor], loader: str, *,
                     consume: bool = False) -> MistralForCausalLM:
    """The model ``loader`` returns, assembled around already-read tensors (their storage, no copy):
    trainable parameters for ``trainable`` and ``threaded``, frozen ones for ``inference``, and for
    ``int8`` frozen weights with int8 copies of the linears. ``consume=True`` lets ``int8`` replace
    the float matrices inside ``tensors`` one at a time (for a caller that owns the dict); otherwise
    ``tensors`` is left as it was, and its float matrices live as long as the caller keeps them."""
    check_loader(loader)
    int8 = loader == "int8"
    return build_model(config, tensors if consume or not int8 else dict(tensors),
                       trainable=loader in TRAINABLE_LOADERS, int8=int8)


def load_model(directory: str | Path, loader: str = "inference", device: torch.device | str = "cpu",
               dtype: torch.dtype | None = None) -> MistralForCausalLM:
    """Load an HF-layout checkpoint directory (``config.json`` + safetensors) with the named loader.

    ``eval()`` is applied in every case: it changes dropout and the like, *not* autograd — one of the
    lessons of the incident.
    """
    check_loader(loader)
    config, tensors = read_tensors(directory, threaded=loader == "threaded", device=device)
    if dtype is not None and dtype != config.dtype:
        tensors = {name: t.to(dtype) for name, t in tensors.items()}
        config = config.replace(torch_dtype=str(dtype).removeprefix("torch."))
    return model_for_loader(config, tensors, loader, consume=True)


def random_model(config: MistralConfig | str = "tiny", loader: str = "inference", seed: int = 0,
                 device: torch.device | str = "cpu") -> MistralForCausalLM:
    """A model with seeded random weights, set up as ``loader`` would return it, without touching disk.

    Tests and quick experiments use this; the notebooks go through a real checkpoint and
    :func:`load_model`, which gives the same weights for the same seed (drawn on the CPU, then moved
    to ``device``).
    """
    check_loader(loader)
    config = preset(config) if isinstance(config, str) else config
    tensors = {name: t.to(device) for name, t in random_state_dict(config, seed).items()}
    return model_for_loader(config, tensors, loader, consume=True)
