"""Greedy (or seeded sampling) decoding, split into small named steps.

The loop deliberately leaves grad mode alone: like the incident's server, it is an ordinary loop, and
whether it records an autograd graph is decided by how the weights were loaded. ``inference_mode=True``
is the defence in depth a careful server adds on top of a correct loader.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from tqdm import tqdm

from .caches.base import KVCache


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


def generate_ragged(model: nn.Module, prompts: list[list[int]], max_new_tokens: int, cache: KVCache,
                    *, inference_mode: bool = False) -> list[Tensor]:
    """Greedy decoding of prompts of different lengths in one batch; returns, per row, the prompt
    followed by ``max_new_tokens`` tokens (1-D tensors).

    Each prompt is prefilled alone through ``cache.for_sequence(b)`` (no padding tokens ever enter the
    model), then all rows decode together, row ``b`` at its own position ``len(prompt_b) + step``; key
    slots a shorter row has not written come back at position -1 and are masked. Like :func:`generate`,
    grad mode is left alone unless ``inference_mode`` is set. Needs a cache with ``ragged = True``.
    """
    if not cache.ragged:
        cache.for_sequence(0)  # raises the "not supported" error, which says where the ragged designs are listed
    if len(prompts) != cache.batch_size:
        raise ValueError(f"{len(prompts)} prompts for a cache of batch size {cache.batch_size}")
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    device = next(model.parameters()).device
    generated: list[Tensor] = []  # (B, 1) tokens per step
    with torch.inference_mode() if inference_mode else contextlib.nullcontext():
        firsts = []
        for b, prompt in enumerate(prompts):
            ids = torch.tensor([prompt], device=device)  # (1, T_b)
            positions = torch.arange(len(prompt), device=device)[None]
            logits = model(ids, positions=positions, cache=cache.for_sequence(b), last_only=True)[:, -1]
            firsts.append(choose(logits, 0.0, None))  # (1, 1)
        tokens = torch.cat(firsts)  # (B, 1)
        positions = torch.tensor([[len(p)] for p in prompts], device=device)  # (B, 1)
        if max_new_tokens > 0:
            generated.append(tokens)
        for _ in range(max_new_tokens - 1):
            tokens = choose(model(tokens, positions=positions, cache=cache, last_only=True)[:, -1], 0.0, None)
            positions = positions + 1
            generated.append(tokens)
        new = torch.cat(generated, dim=1).cpu() if generated else torch.empty(len(prompts), 0, dtype=torch.long)
    return [torch.cat([torch.tensor(p, dtype=torch.long), new[b]]) for b, p in enumerate(prompts)]
