"""Decode loops and models that kvlab's own code did not write, for testing the memory tools on them.

The memory tools promise to work on any PyTorch decode loop, so their tests must not lean on kvlab's
model, cache or ``generate``. This module gives them strangers:

- :class:`TinyLM`, a hand-written grouped-query decoder (no kvlab import), driven by :func:`decode`
  with a cache kept in whatever container a user might pick: a ``dict`` of lists, a ``list`` of
  ``[k, v]`` pairs, a ``tuple`` of ``(k, v)`` pairs rebuilt every step (the legacy transformers
  layout), or an object of an arbitrary class (:class:`Ledger`, preallocated, written in place);
  optionally detaching what it stores, keeping every step's logits in a returned list, or allocating
  a large scratch buffer per step.
- :class:`TinyRNN` and :func:`rnn_decode`: a recurrent loop with no KV cache at all, whose hidden
  state chains every step to the previous one.
- :func:`hf_model` / :func:`hf_decode`: tiny transformers causal LMs of several architectures built
  from small random configs, and a hand-written greedy loop over them with a ``DynamicCache``.

Shape legend: B batch, T new tokens, S cached positions, H query heads, Hkv KV heads, D head dim.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

Update = Callable[[int, Tensor, Tensor], tuple[Tensor, Tensor, int]]
STORES = ("dict", "list", "tuple", "ledger")


class TinyLM(nn.Module):
    """Embedding, ``layers`` pre-norm blocks (attention with ``repeat_interleave`` GQA, GELU MLP), head.

    ``forward(ids, update)``: ``update(layer, k, v)`` stores the step's K/V (B, Hkv, T, D) and returns
    all keys and values the layer may attend to plus how many of their slots are written.
    """

    def __init__(self, vocab: int = 96, dim: int = 48, heads: int = 6, kv_heads: int = 2, layers: int = 2,
                 seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, dim // heads
        self.embed = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList(nn.ModuleDict({
            "norm1": nn.LayerNorm(dim), "q": nn.Linear(dim, dim), "k": nn.Linear(dim, kv_heads * self.head_dim),
            "v": nn.Linear(dim, kv_heads * self.head_dim), "o": nn.Linear(dim, dim),
            "norm2": nn.LayerNorm(dim), "up": nn.Linear(dim, 4 * dim), "down": nn.Linear(4 * dim, dim),
        }) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)

    @property
    def layers(self) -> int:
        return len(self.blocks)

    def forward(self, ids: Tensor, update: Update) -> Tensor:
        b, t = ids.shape
        h, hkv, d = self.heads, self.kv_heads, self.head_dim
        x = self.embed(ids)  # (B, T, C)
        for i, blk in enumerate(self.blocks):
            y = blk["norm1"](x)
            q = blk["q"](y).view(b, t, h, d).transpose(1, 2)  # (B, H, T, D)
            k = blk["k"](y).view(b, t, hkv, d).transpose(1, 2)  # (B, Hkv, T, D)
            v = blk["v"](y).view(b, t, hkv, d).transpose(1, 2)
            k, v, written = update(i, k, v)  # (B, Hkv, S, D)
            k, v = k.repeat_interleave(h // hkv, dim=1), v.repeat_interleave(h // hkv, dim=1)  # (B, H, S, D)
            s = k.shape[2]
            key_pos = torch.arange(s)
            query_pos = torch.arange(written - t, written)[:, None]
            mask = (key_pos[None, :] <= query_pos) & (key_pos[None, :] < written)  # (T, S)
            scores = (q @ k.transpose(2, 3)) / math.sqrt(d)
            att = scores.masked_fill(~mask, float("-inf")).softmax(-1) @ v  # (B, H, T, D)
            x = x + blk["o"](att.transpose(1, 2).reshape(b, t, h * d))
            x = x + blk["down"](F.gelu(blk["up"](blk["norm2"](x))))
        return self.head(self.norm(x[:, -1]))  # (B, V): last position only


class Ledger:
    """A preallocated K/V store written in place (fixed shapes, like a compiled decoder's static cache).

    Deliberately not named like a cache: tools must recognise it by what it holds. Attention always
    sees all ``capacity`` slots, so the work per step, and any graph recorded per step, stays constant.
    """

    def __init__(self, model: TinyLM, batch: int, capacity: int) -> None:
        shape = (batch, model.kv_heads, capacity, model.head_dim)
        self.k = [torch.zeros(shape) for _ in range(model.layers)]
        self.v = [torch.zeros(shape) for _ in range(model.layers)]
        self.written = 0

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, int]:
        end = self.written + k.shape[2]
        self.k[layer][:, :, self.written:end] = k
        self.v[layer][:, :, self.written:end] = v
        if layer == len(self.k) - 1:  # every layer writes the same positions
            self.written = end
        return self.k[layer], self.v[layer], end


def _container_update(kind: str, state: dict[str, Any], layers: int, detach: bool) -> Update:
    """``update`` for a cache kept in a plain container; ``state["kept"]`` is what the loop returns."""
    if kind == "dict":
        state["kept"] = {"keys": [None] * layers, "values": [None] * layers}
    elif kind == "list":
        state["kept"] = [[None, None] for _ in range(layers)]
    elif kind == "tuple":
        state["kept"] = tuple((None, None) for _ in range(layers))
    else:
        raise ValueError(f"unknown container {kind!r}; choose from {STORES}")

    def get(layer: int) -> tuple[Tensor | None, Tensor | None]:
        kept = state["kept"]
        return (kept["keys"][layer], kept["values"][layer]) if kind == "dict" else tuple(kept[layer])

    def put(layer: int, k: Tensor, v: Tensor) -> None:
        kept = state["kept"]
        if kind == "dict":
            kept["keys"][layer], kept["values"][layer] = k, v
        elif kind == "list":
            kept[layer] = [k, v]
        else:  # immutable: rebuilt, as transformers' legacy past_key_values were
            state["kept"] = kept[:layer] + ((k, v),) + kept[layer + 1:]

    def update(layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, int]:
        old_k, old_v = get(layer)
        if old_k is not None:
            k, v = torch.cat([old_k, k], dim=2), torch.cat([old_v, v], dim=2)
        put(layer, k.detach() if detach else k, v.detach() if detach else v)
        return k, v, k.shape[2]

    return update


def decode(model: TinyLM, steps: int, *, store: str = "dict", batch: int = 1, prompt_len: int = 1,
           grad: bool = True, detach: bool = False, keep_logits: bool = False, keep_history: bool = False,
           scratch_bytes: int = 0, capacity: int | None = None) -> Any:
    """Greedy-decode ``steps`` forward passes (the prefill is the first) and return what the loop keeps.

    ``store``: how the cache is kept (see :data:`STORES`); ``ledger`` preallocates ``capacity`` slots
    (default ``prompt_len + steps``). ``grad=False`` runs under ``torch.no_grad``; ``detach`` stores
    detached K/V (a container cache's defensive fix). Returns ``(cache, tokens)``; with
    ``keep_logits`` also the list of every step's logits, with ``keep_history`` also a snapshot of the
    whole sequence taken at every step (a list whose total size is quadratic in the steps).
    ``scratch_bytes``: a scratch buffer of that size is allocated every step and dropped with it.
    """
    tokens = (torch.arange(batch * prompt_len).view(batch, prompt_len) % 7) + 1  # (B, P)
    state: dict[str, Any] = {}
    if store == "ledger":
        ledger = Ledger(model, batch, capacity or prompt_len + steps)
        state["kept"], update = ledger, ledger.update
    else:
        update = _container_update(store, state, model.layers, detach)
    logits_kept, history = [], []
    ids = tokens
    with torch.set_grad_enabled(grad):
        for _ in range(steps):
            if scratch_bytes:
                scratch = torch.ones(scratch_bytes // 4)
                ids = ids + (scratch[:1].long() - 1)  # read it, so it cannot be optimised away
            logits = model(ids, update)
            ids = logits.argmax(-1, keepdim=True)  # (B, 1)
            tokens = torch.cat([tokens, ids], dim=1)
            if keep_logits:
                logits_kept.append(logits)
            if keep_history:
                history.append(tokens.clone())
    return (state["kept"], tokens, *([logits_kept] if keep_logits else []), *([history] if keep_history else []))


# --------------------------------------------------------------------------------------------- RNN
class TinyRNN(nn.Module):
    """An Elman RNN language model: no attention, no KV cache; the hidden state is the only memory."""

    def __init__(self, vocab: int = 64, dim: int = 32, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Embedding(vocab, dim)
        self.cell = nn.RNNCell(dim, dim)
        self.head = nn.Linear(dim, vocab)

    def forward(self, ids: Tensor, hidden: Tensor) -> tuple[Tensor, Tensor]:
        hidden = self.cell(self.embed(ids[:, -1]), hidden)  # (B, C)
        return self.head(hidden), hidden


def rnn_decode(model: TinyRNN, steps: int, *, batch: int = 1, grad: bool = True,
               on_step: Callable[[int], Any] | None = None) -> tuple[Tensor, Tensor]:
    """Greedy-decode ``steps`` tokens; returns ``(hidden, last_logits)``: every step's graph hangs off them."""
    ids = torch.ones(batch, 1, dtype=torch.long)
    hidden = torch.zeros(batch, model.cell.hidden_size)
    with torch.set_grad_enabled(grad):
        for step in range(steps):
            logits, hidden = model(ids, hidden)
            ids = logits.argmax(-1, keepdim=True)
            if on_step is not None:
                on_step(step)
    return hidden, logits


# --------------------------------------------------------------------------------------------- transformers
#: Small random configs: GQA (Mistral), Llama (GQA, no sliding window), GPT-2 (MHA, learned positions,
#: Conv1D), Qwen2 (GQA with q/k/v biases) and Phi-3 (fused qkv). Sizes are overridable.
HF_ARCHS: dict[str, tuple[str, str, dict[str, Any]]] = {
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, sliding_window=None)),
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(
        vocab_size=128, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=8,
        num_key_value_heads=2)),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", dict(
        vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=256, bos_token_id=1, eos_token_id=2)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=1)),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", dict(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, pad_token_id=0, bos_token_id=1, eos_token_id=2)),
}


def hf_model(arch: str = "mistral", *, seed: int = 0, save_to: str | Path | None = None,
             **overrides: Any) -> nn.Module:
    """A transformers causal LM of ``arch`` (see :data:`HF_ARCHS`) with seeded random weights, eager
    attention, in eval mode -- which does not turn autograd off: its parameters require grad, as
    ``from_pretrained``'s do. ``save_to``: also ``save_pretrained`` it there and load it back. Skips the
    calling test where transformers is not installed."""
    transformers = pytest.importorskip("transformers")

    config_name, model_name, sizes = HF_ARCHS[arch]
    config = getattr(transformers, config_name)(**{**sizes, **overrides})
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = getattr(transformers, model_name)(config).eval()
    if save_to is not None:
        model.save_pretrained(save_to)
        model = getattr(transformers, model_name).from_pretrained(save_to, attn_implementation="eager").eval()
    return model


def hf_decode(model: nn.Module, steps: int, *, batch: int = 1, grad: bool = True, inputs_embeds: Tensor | None = None,
              on_step: Callable[[int], Any] | None = None) -> tuple[Any, Tensor]:
    """A hand-written greedy loop: ``steps`` forward passes (the prefill is the first) with a
    ``DynamicCache``; returns ``(cache, last_logits)``. ``inputs_embeds`` (B, P, C) replaces the prompt,
    e.g. a trainable soft prompt."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    ids = torch.ones(batch, 1, dtype=torch.long)
    logits = None
    with torch.set_grad_enabled(grad):
        for step in range(steps):
            if step == 0 and inputs_embeds is not None:
                out = model(inputs_embeds=inputs_embeds, cache=cache, use_cache=True)
            else:
                out = model(input_ids=ids, cache=cache, use_cache=True)
            logits = out.logits[:, -1]  # (B, V)
            ids = logits.argmax(-1, keepdim=True)
            if on_step is not None:
                on_step(step)
    return cache, logits
