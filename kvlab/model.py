"""A Mistral-style decoder, small enough to read in one pass, with transformers' tensor names.

Notable choices:
- Module tree and parameter names equal transformers' ``MistralForCausalLM`` (``model.layers.0.self_attn
  .q_proj.weight`` ...), so HF checkpoints load without a key map.
- Attention materialises ``repeat_kv`` explicitly, as Candle's and mistral.rs's Mistral did: those
  copies are where the incident's heap traces pointed. A cache may ask for grouped attention instead
  (``cache.grouped``, the ``gqa`` cache): one fused ``scaled_dot_product_attention`` call over the KV
  heads as stored, which never builds the copies.
- The KV cache is a separate object passed to ``forward``; attention masks are built from the
  absolute positions the cache reports, so static, rotating and paged caches share one code path.
- Regions are labelled with ``torch.profiler.record_function`` so profilers and memory tools can attribute
  allocations to ``repeat_kv``, the cache update, attention, the MLP and ``lm_head``; :func:`region`
  opens them only while something can observe them (see there why).
- The model never touches grad mode: whether a decode loop records a graph is decided by how the
  weights were loaded (see :mod:`kvlab.loaders`), exactly as in the incident.

Shape legend: B batch, T new tokens, S cached positions, H query heads, Hkv KV heads, D head dim,
C hidden size, V vocab.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.profiler import record_function

from .config import MistralConfig

if TYPE_CHECKING:
    from .caches import KVCache


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        # Normalise in float32 and scale in the input dtype, as transformers does (bit-for-bit parity).
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)


class Rotary(nn.Module):
    """Rotary position embedding in the rotate-half layout that HF checkpoints are permuted for."""

    def __init__(self, head_dim: int, theta: float) -> None:
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        freqs = positions[..., None].float() * self.inv_freq  # (B, T, D/2)
        emb = torch.cat((freqs, freqs), dim=-1)  # (B, T, D)
        return emb.cos().to(dtype)[:, None], emb.sin().to(dtype)[:, None]  # (B, 1, T, D)


_NO_REGION = contextlib.nullcontext()  # stateless, so one instance serves every unobserved region


def region(name: str) -> contextlib.AbstractContextManager:
    """``torch.profiler.record_function(name)`` while something can observe it, else a no-op context.

    The observers of a region are a profiler (its enter/exit are recorded) and a dispatch mode (which
    sees them as the ops ``profiler::_record_function_enter_new`` / ``_exit``, as kvlab's memory tools
    do); under ``torch.compile`` the real one is kept too. With neither, opening a region does nothing
    but cost time, and a tiny-preset decode step opens 23 to 27 of them: measured on the CPU, they were
    about 30% of its time (roughly 17 us each inside the model, 4.5 us in a tight loop). The checks cost
    under 0.1 us each.
    """
    if (torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack()
            or torch._C._autograd._profiler_enabled()):
        return record_function(name)
    return _NO_REGION


def rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    return x * cos + rotate_half(x) * sin


def repeat_kv(hidden_states: Tensor, n_rep: int) -> Tensor:
    """Copy each KV head ``n_rep`` times so K/V line up with the query heads.

    Equal to ``torch.repeat_interleave(hidden_states, n_rep, dim=1)``: (B, Hkv, S, D) -> (B, Hkv*n_rep, S, D).
    With several KV heads and n_rep > 1 the result is a real copy, n_rep times the cache's size
    (``reshape`` of an expanded view cannot stay a view); under autograd the attention matmuls save it
    for backward. Two shapes copy nothing: ``n_rep == 1`` (multi-head attention) returns the input
    itself, as Candle's ``repeat_kv`` does, and a single KV head (multi-query attention) gives a
    stride-0 view of it, where Candle's, built on ``cat``, copies whenever ``n_rep > 1``.
    """
    if n_rep == 1:
        return hidden_states
    b, hkv, s, d = hidden_states.shape
    expanded = hidden_states[:, :, None, :, :].expand(b, hkv, n_rep, s, d)
    return expanded.reshape(b, hkv * n_rep, s, d)


def attention_mask(q_pos: Tensor, k_pos: Tensor, window: int | None) -> Tensor:
    """Which keys each query may see: causal, inside the sliding window, and not an empty slot.

    ``q_pos`` (B, T) and ``k_pos`` (B, S) are absolute positions; a key position of -1 marks an
    empty cache slot. Returns a bool mask (B, 1, T, S).
    """
    q = q_pos[:, :, None]
    k = k_pos[:, None, :]
    allowed = (k >= 0) & (k <= q)
    if window is not None:
        allowed &= q - k < window
    return allowed[:, None]


class Attention(nn.Module):
    def __init__(self, config: MistralConfig, layer_idx: int) -> None:
        super().__init__()
        c, h, hkv, d = config.hidden_size, config.num_attention_heads, config.num_key_value_heads, config.head_dim
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads, self.head_dim = h, hkv, d
        self.num_key_value_groups = config.num_key_value_groups
        self.sliding_window = config.sliding_window
        self.scale = d ** -0.5
        self.q_proj = nn.Linear(c, h * d, bias=False)
        self.k_proj = nn.Linear(c, hkv * d, bias=False)
        self.v_proj = nn.Linear(c, hkv * d, bias=False)
        self.o_proj = nn.Linear(h * d, c, bias=False)

    def forward(self, x: Tensor, positions: Tensor, rope: tuple[Tensor, Tensor], cache: KVCache | None) -> Tensor:
        b, t, _ = x.shape
        query_states = self.q_proj(x).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        key_states = self.k_proj(x).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, T, D)
        value_states = self.v_proj(x).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        cos, sin = rope
        query_states = apply_rotary(query_states, cos, sin)
        key_states = apply_rotary(key_states, cos, sin)

        if cache is None:
            key_positions = positions
        else:
            with region("cache"):
                key_states, value_states, key_positions = cache.update(
                    self.layer_idx, key_states, value_states, positions)  # (B, Hkv, S, D), (B, S)
        mask = attention_mask(positions, key_positions, self.sliding_window)  # (B, 1, T, S)

        if cache is not None and cache.grouped:
            out = self._grouped_attention(query_states, key_states, value_states, mask)
        else:
            with region("repeat_kv"):
                key_states = repeat_kv(key_states, self.num_key_value_groups)  # (B, H, S, D)
                value_states = repeat_kv(value_states, self.num_key_value_groups)
            scores = torch.matmul(query_states, key_states.transpose(2, 3)) * self.scale  # (B, H, T, S)
            scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
            probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(query_states.dtype)
            out = torch.matmul(probs, value_states)  # (B, H, T, D)
        out = out.transpose(1, 2).reshape(b, t, self.num_heads * self.head_dim)
        return self.o_proj(out)

    def _grouped_attention(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
        """Attention in which each KV head serves its query group directly: no repeat_kv copies.

        Both branches are one fused ``scaled_dot_product_attention`` call that reads the cache's Hkv heads
        as they are. Decoding one token, the g = H / Hkv query heads of a group become g query rows of
        their KV head, (B, Hkv, g, D) against (B, Hkv, S, D): the fastest layout on the CPU (as in
        transformers' SDPA path), and one no backend needs to copy. Longer inputs (a prefill) use SDPA's
        ``enable_gqa``, which the CPU's kernel serves without copies (a backend without GQA support
        would repeat K/V internally, for the prefill only).
        """
        b, h, t, d = q.shape
        if t == 1:
            rows = q.reshape(b, self.num_kv_heads, self.num_key_value_groups, d)  # (B, Hkv, g, D)
            out = F.scaled_dot_product_attention(rows, k, v, attn_mask=mask, scale=self.scale)  # mask (B, 1, 1, S)
            return out.reshape(b, h, 1, d)  # (B, H, 1, D); the output of SDPA need not be contiguous
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale, enable_gqa=True)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: MistralConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, config: MistralConfig, layer_idx: int) -> None:
        super().__init__()
        self.self_attn = Attention(config, layer_idx)
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x: Tensor, positions: Tensor, rope: tuple[Tensor, Tensor], cache: KVCache | None) -> Tensor:
        with region("norm"):
            h = self.input_layernorm(x)
        with region("attention"):
            x = x + self.self_attn(h, positions, rope, cache)
        with region("norm"):
            h = self.post_attention_layernorm(x)
        with region("mlp"):
            return x + self.mlp(h)


class MistralModel(nn.Module):
    def __init__(self, config: MistralConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = Rotary(config.head_dim, config.rope_theta)


class MistralForCausalLM(nn.Module):
    """The decoder plus its language-model head; ``forward`` returns logits (B, T, V)."""

    def __init__(self, config: MistralConfig) -> None:
        super().__init__()
        self.config = config
        self.model = MistralModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids: Tensor, positions: Tensor | None = None, cache: KVCache | None = None,
                last_only: bool = False) -> Tensor:
        """Logits for ``input_ids`` (B, T) at absolute ``positions`` (B, T).

        Positions default to continuing after what ``cache`` holds (0 without a cache). ``last_only``
        computes logits for the final position only, which is all greedy decoding needs.
        """
        if positions is None:
            start = cache.seq_len if cache is not None else 0
            positions = torch.arange(start, start + input_ids.shape[1], device=input_ids.device)
            positions = positions.expand(input_ids.shape[0], -1)
        with region("embed"):
            x = self.model.embed_tokens(input_ids)  # (B, T, C)
        rope = self.model.rotary_emb(positions, x.dtype)
        for layer in self.model.layers:
            x = layer(x, positions, rope, cache)
        if last_only:
            x = x[:, -1:]
        with region("norm"):
            x = self.model.norm(x)
        with region("lm_head"):
            return self.lm_head(x)  # (B, T, V)
