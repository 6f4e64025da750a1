"""``kvlab diagnose --hf DIR``: a Hugging Face checkpoint driven the way a server that forgot ``no_grad`` drives it.

The model is loaded with ``AutoModelForCausalLM.from_pretrained(DIR)``, exactly as a user would:
its parameters come back requiring grad (PyTorch's default) and in eval mode. The loop is the plainest
greedy decoder: forward, argmax, feed the token back, with the cache object the model itself creates
on the first call (``DynamicCache`` and its layer classes: sliding-window layers for Mistral or Gemma,
whatever the architecture uses). Grad mode is left on, as in an ordinary Python loop; the diagnosis
then checks the same loop under ``inference_mode`` and with the weights frozen.

transformers is imported only here, only when ``--hf`` is used (``pip install 'kvlab[hf]'``).
Only safetensors weights are read: a checkpoint with only pickled ``.bin`` files is refused, never unpickled.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kvlab.study.hf import cache_keyword

from .target import BadTarget, Target, _one_line

__all__ = ["load_hf", "hf_target", "greedy_loop"]


def _check_directory(directory: Path) -> None:
    """The failures a user hits most, named before transformers is asked (its messages run to pages)."""
    if not directory.exists():
        raise BadTarget(f"{directory}: no such checkpoint directory")
    if not directory.is_dir():
        raise BadTarget(f"{directory}: not a directory (--hf takes a checkpoint directory with config.json)")
    config = directory / "config.json"
    if not config.is_file():
        raise BadTarget(f"{directory}: no config.json, so not a Hugging Face checkpoint directory")
    try:
        json.loads(config.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadTarget(f"{config}: corrupt config.json ({exc})") from None
    if not any(directory.glob("*.safetensors")):
        pickled = sorted(p.name for p in directory.glob("*.bin"))
        hint = f" (found {', '.join(pickled)}: pickled weights are never loaded)" if pickled else ""
        raise BadTarget(f"{directory}: no .safetensors weights{hint}")


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[Any]:
    """transformers, with its logger at errors only for the duration (restored after) and no network."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import transformers
    except ImportError:
        raise BadTarget("--hf needs transformers, which is not installed: pip install 'kvlab[hf]'") from None
    level = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    bars = transformers.utils.logging.is_progress_bar_enabled()
    transformers.utils.logging.disable_progress_bar()
    try:
        yield transformers
    finally:
        transformers.logging.set_verbosity(level)
        if bars:
            transformers.utils.logging.enable_progress_bar()


def load_hf(directory: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """``AutoModelForCausalLM.from_pretrained(directory)`` moved to ``device``; :class:`BadTarget` if it cannot load."""
    directory = Path(directory)
    _check_directory(directory)
    with _quiet_transformers() as transformers:
        try:
            model = transformers.AutoModelForCausalLM.from_pretrained(directory, use_safetensors=True)
        except Exception as exc:  # corrupt weights, an unknown model_type, shapes that do not match ...
            raise BadTarget(f"{directory}: transformers cannot load it: {_one_line(exc)}") from None
    return model.to(device)


def greedy_loop(model: nn.Module, prompt: list[int] | None = None) -> Any:
    """``run(steps) -> cache``: greedy decoding of ``steps`` forward passes (the prompt, then one token
    each) in grad mode, with the cache object the model makes itself. The cache is what a server keeps
    per conversation, so it is what the loop returns."""
    keyword = cache_keyword(model)
    config = getattr(model, "config", None)
    start = getattr(config, "bos_token_id", None)
    start = start if isinstance(start, int) and 0 <= start < getattr(config, "vocab_size", 1) else 0
    first = prompt if prompt is not None else [start]

    def run(steps: int, device: str | torch.device | None = None) -> Any:
        device = next(model.parameters()).device if device is None else torch.device(device)
        ids = torch.tensor([first], device=device)  # (B, T)
        cache = None
        for _ in range(steps):  # no torch.no_grad(): the mistake being diagnosed
            out = model(input_ids=ids, **{keyword: cache}, use_cache=True)
            cache = out.cache if "cache" in out else out.past_key_values
            ids = out.logits[:, -1:].argmax(dim=-1)  # (B, 1)
        return cache

    return run


def hf_target(directory: str | Path, device: str | torch.device = "cpu") -> Target:
    """A :class:`~kvlab.diagnose.target.Target` for ``--hf DIR``: the loaded model and its greedy loop."""
    model = load_hf(directory, device)
    return Target(run=greedy_loop(model), name=str(directory), modules={"model": model}, config=model.config,
                  kind="hf", takes_device=True)
