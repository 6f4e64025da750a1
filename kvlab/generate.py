"""Greedy (or seeded sampling) decoding, split into small named steps.

The loop deliberately leaves grad mode alone: like the incident's server, it is an ordinary loop, and
whether it records an autograd graph is decided by how the weights were loaded. ``inference_mode=True``
is the defence in depth a careful server adds on top of a correct loader.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor, nn
from tqdm import tqdm

from .caches import KVCache


@dataclass
class Step:
    """What a per-step callback sees; ``index`` 0 is the prefill."""

    index: int
    tokens: Tensor  # (B, 1) tokens chosen at this step
    logits: Tensor  # (B, V) logits they were chosen from
    cache: KVCache | None


@dataclass
class Generation:
    tokens: Tensor  # (B, T_prompt + new) prompt followed by generated tokens
    cache: KVCache | None
    logits: Tensor  # (B, V) logits of the last step; keeps that step's graph alive if one was recorded


def choose(logits: Tensor, temperature: float, generator: torch.Generator | None) -> Tensor:
    """Next token (B, 1) from last-position logits (B, V)."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    probs = torch.softmax(logits.detach().float() / temperature, dim=-1)
    return torch.multinomial(probs, 1, generator=generator)


def prefill(model: nn.Module, prompt: Tensor, cache: KVCache | None) -> Tensor:
    return model(prompt, cache=cache, last_only=True)[:, -1]


def decode_one_token(model: nn.Module, tokens: Tensor, cache: KVCache | None) -> Tensor:
    """Logits for the next position; without a cache the whole sequence is recomputed."""
    if cache is None:
        return model(tokens, last_only=True)[:, -1]
    return model(tokens[:, -1:], cache=cache, last_only=True)[:, -1]


def generate(model: nn.Module, prompt: Tensor, max_new_tokens: int, cache: KVCache | None = None,
             *, on_step: Callable[[Step], None] | None = None, seed: int = 0, temperature: float = 0.0,
             inference_mode: bool = False, progress: bool = False) -> Generation:
    """Decode ``max_new_tokens`` tokens after ``prompt`` (B, T).

    ``cache=None`` recomputes the full sequence every step (the incident's ``--no-kv-cache``).
    ``on_step`` is called after the prefill and after every decode step, e.g. for memory probes.
    """
    if prompt.dim() != 2 or prompt.shape[1] == 0:
        raise ValueError(f"prompt must be a non-empty (batch, tokens) tensor, got shape {tuple(prompt.shape)}")
    generator = torch.Generator(device=prompt.device).manual_seed(seed) if temperature else None
    tokens = prompt
    mode = torch.inference_mode() if inference_mode else contextlib.nullcontext()
    with mode:
        logits = prefill(model, prompt, cache)
        for index in tqdm(range(max_new_tokens), disable=not progress, desc="decode", unit="tok"):
            if index:
                logits = decode_one_token(model, tokens, cache)
            next_tokens = choose(logits, temperature, generator)
            tokens = torch.cat([tokens, next_tokens], dim=1)
            if on_step is not None:
                on_step(Step(index, next_tokens, logits, cache))
    return Generation(tokens, cache, logits)
