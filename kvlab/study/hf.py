"""transformers' ``MistralForCausalLM`` beside kvlab's: the same weights, the same greedy loop.

The side-by-side runs (notebook 3's "same bug in transformers", the GPU suites' speed and leak runs,
the cache benchmark) need three things from transformers, all here:

- :func:`hf_model`: its model holding kvlab's weight tensors (shared storage, no copy; kvlab's
  parameter names are HF's), in the attention implementation asked for;
- :func:`new_cache`: its ``DynamicCache`` or ``StaticCache``, across the versions whose constructor
  arguments differ;
- :func:`greedy`: the loop a server writes around its forward (prefill, argmax, feed back, one token
  per step, logits of the last position only), calling ``on_step`` with kvlab's
  :class:`~kvlab.generate.Step` and returning a :class:`~kvlab.generate.Generation`, so that the
  probes of :mod:`kvlab.study.probes` measure both libraries alike.

transformers is an optional extra: it is imported inside these functions only, never by ``import kvlab``.
"""

from __future__ import annotations

import importlib.util
import inspect
import os
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from kvlab.config import MistralConfig
from kvlab.generate import Generation, Step

__all__ = ["HF_CACHES", "hf_available", "is_transformers", "hf_model", "new_cache", "cache_bytes", "cache_keyword",
           "greedy"]

#: transformers' cache classes the side-by-side runs use.
HF_CACHES = ("DynamicCache", "StaticCache")


def hf_available() -> bool:
    """Whether transformers (kvlab's ``hf`` extra) is installed."""
    return importlib.util.find_spec("transformers") is not None


def is_transformers(obj: object) -> bool:
    """Whether ``obj`` (a model or a cache) comes from transformers: its loop is :func:`greedy`, not
    kvlab's ``generate``."""
    return type(obj).__module__.startswith("transformers.")


def hf_model(config: MistralConfig, weights: dict[str, Tensor], device: str | torch.device = "cpu",
             attn: str = "eager") -> nn.Module:
    """transformers' ``MistralForCausalLM`` holding the same weight tensors (storage shared, no copy).

    Built on ``device`` in the weights' dtype, in eval mode. Its parameters keep transformers' default
    ``requires_grad=True``, as ``from_pretrained`` returns them.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers

    fields = {k: v for k, v in config.to_dict().items() if k not in ("torch_dtype", "architectures")}
    hf_config = transformers.MistralConfig(**fields, attn_implementation=attn)
    default = torch.get_default_dtype()
    torch.set_default_dtype(next(iter(weights.values())).dtype)
    try:
        with torch.device(device):
            model = transformers.MistralForCausalLM(hf_config)
    finally:
        torch.set_default_dtype(default)
    state = {k: v.detach() for k, v in weights.items()}
    if config.tie_word_embeddings:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    missing = [m for m in missing if not m.endswith("inv_freq")]
    if missing or unexpected:
        raise RuntimeError(f"transformers state dict mismatch: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model.eval()


def new_cache(model: nn.Module, kind: str, max_len: int) -> Any:
    """A fresh ``DynamicCache`` or ``StaticCache`` (of ``max_len`` positions) for ``model``."""
    import transformers

    if kind not in HF_CACHES:
        raise ValueError(f"unknown transformers cache {kind!r}; choose from {HF_CACHES}")
    if kind == "DynamicCache":
        try:
            return transformers.DynamicCache(config=model.config)
        except TypeError:  # older transformers: no config argument
            return transformers.DynamicCache()
    weight = model.lm_head.weight
    try:
        return transformers.StaticCache(config=model.config, max_cache_len=max_len)
    except TypeError:  # older transformers: sized and placed explicitly
        return transformers.StaticCache(config=model.config, max_batch_size=1, max_cache_len=max_len,
                                        device=weight.device, dtype=weight.dtype)


def cache_bytes(cache: Any) -> int:
    """Bytes of a transformers cache's key and value tensors (each storage once)."""
    if cache is None:
        return 0
    storages: dict[int, int] = {}
    for layer in getattr(cache, "layers", []):
        for name in ("keys", "values"):
            t = getattr(layer, name, None)
            if isinstance(t, Tensor) and t.numel():
                storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(storages.values())


def cache_keyword(model: nn.Module) -> str:
    """The forward argument that takes the cache: ``cache`` in recent transformers, ``past_key_values`` before."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params and "past_key_values" not in params else "past_key_values"


def _forward_kwargs(model: nn.Module) -> tuple[str, bool]:
    """The cache argument's name and whether the model takes ``cache_position``."""
    return cache_keyword(model), "cache_position" in inspect.signature(model.model.forward).parameters


def greedy(model: nn.Module, prompt: Tensor, max_new_tokens: int, cache: Any,
           on_step: Callable[[Step], None] | None = None) -> Generation:
    """Greedy decoding of ``max_new_tokens`` tokens after ``prompt`` (B, T) through transformers' forward.

    Leaves grad mode as it finds it, as an ordinary loop does (the caller decides). Step 0 is the
    prefill, as in kvlab's ``generate``.
    """
    key, with_position = _forward_kwargs(model)
    ids, positions = prompt, torch.arange(prompt.shape[1], device=prompt.device)
    tokens = prompt
    logits = None
    for index in range(max_new_tokens):
        kwargs = {key: cache, "use_cache": True, "position_ids": positions[None], "logits_to_keep": 1}
        if with_position:
            kwargs["cache_position"] = positions
        logits = model(input_ids=ids, **kwargs).logits[:, -1]  # (B, V)
        ids = logits.argmax(dim=-1, keepdim=True)  # (B, 1)
        positions = positions[-1:] + 1
        tokens = torch.cat([tokens, ids], dim=1)
        if on_step is not None:
            on_step(Step(index, ids, logits, cache))
    return Generation(tokens, cache, logits)
