"""Fused projections for batch-1 decoding, built in place from a loaded model without keeping two copies.

:func:`fuse_model` rewrites a :class:`kvlab.model.MistralForCausalLM` (float or ``int8`` loader) so that
each decoder layer makes four weight reads instead of seven, and nothing between them:

- ``qkv``: ``[q_proj; k_proj; v_proj]`` as one matrix, with ``input_layernorm`` in the kernel's prologue;
- ``o_proj``: the output projection with the residual add in its epilogue;
- ``gate_up``: ``[gate_proj; up_proj]`` as one matrix, with ``post_attention_layernorm`` in front and
  ``silu(gate) * up`` behind;
- ``down``: the down projection with the residual add;
- and ``lm_head`` with the final norm in front.

Each product runs :func:`kvlab.kernels.fused_linear`. Attention is the model's own
``Attention.forward``: its ``q_proj``/``k_proj``/``v_proj`` become column slices of the fused output
and its ``o_proj`` an identity, so whatever the model's attention does (grouped or ``repeat_kv``,
masks, the cache protocol) stays the model's -- except in the compiled one-token step of the fast path,
where :mod:`kvlab.decode_attention`'s kernel does rotary, the cache write and attention in one launch
(``attention_kernel=False`` keeps the model's attention there too). int8 matrices are concatenated as int8 with their
per-row scales, which is exactly the quantization of the concatenated float matrix, and stored in the
kernel's layout (:func:`kvlab.kernels.pack_int8`: the same bytes, reordered and offset).

Memory: fusion concatenates one layer at a time and drops that layer's separate matrices before the
next, so the model never holds both layouts for more than one layer (a caller that still holds the
original tensors, e.g. a shared state dict, keeps them alive itself). The fused model computes the same
function as before, up to the order of fp32 sums, and still runs every prompt length: rows other than
one take the PyTorch reference path. Parameter names change (``...qkv.weight``), so save checkpoints
before fusing.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .decode_attention import kernel_applies
from .kernels import fused_linear, pack_int8
from .model import DecoderLayer, MistralForCausalLM, RMSNorm, region
from .quant import Int8Linear


class FusedLinear(nn.Module):
    """Several bias-free linears that read the same input, as one matrix, with optional RMSNorm in
    front and SwiGLU (``glu``) behind; ``forward(x, residual)`` adds ``residual`` to the result.
    An int8 matrix is kept packed (int32 words, :func:`kvlab.kernels.pack_int8`)."""

    def __init__(self, weight: Tensor, scale: Tensor | None = None, norm: RMSNorm | None = None,
                 glu: bool = False) -> None:
        super().__init__()
        if weight.dtype == torch.int8:
            self.register_buffer("weight", pack_int8(weight))
        elif isinstance(weight, nn.Parameter):  # one linear's own (possibly tied) parameter
            self.weight = weight
        else:
            self.weight = nn.Parameter(weight, requires_grad=weight.requires_grad)
        self.register_buffer("scale", scale)
        self.norm = norm
        self.glu = glu

    @classmethod
    @torch.no_grad()
    def from_linears(cls, linears: list[nn.Module], norm: RMSNorm | None = None, glu: bool = False) -> FusedLinear:
        """Stack the rows of ``linears`` (all ``nn.Linear`` or all :class:`Int8Linear`); a single float
        linear keeps its own tensors (no copy)."""
        if all(isinstance(m, Int8Linear) for m in linears):
            weight = torch.cat([m.weight for m in linears]) if len(linears) > 1 else linears[0].weight
            scale = torch.cat([m.scale for m in linears]) if len(linears) > 1 else linears[0].scale
            return cls(weight, scale, norm, glu)
        if not all(isinstance(m, nn.Linear) and m.bias is None for m in linears):
            raise TypeError(f"can fuse bias-free nn.Linear or Int8Linear layers of one kind, got "
                            f"{[type(m).__name__ for m in linears]}")
        if len(linears) == 1:
            return cls(linears[0].weight, None, norm, glu)
        weight = torch.cat([m.weight for m in linears])
        weight.requires_grad_(linears[0].weight.requires_grad)
        return cls(weight, None, norm, glu)

    @property
    def out_features(self) -> int:
        return self.weight.shape[0] // 2 if self.glu else self.weight.shape[0]

    def forward(self, x: Tensor, residual: Tensor | None = None) -> Tensor:
        norm = self.norm
        return fused_linear(x, self.weight, self.scale, None if norm is None else norm.weight,
                            1e-5 if norm is None else norm.eps, residual, self.glu)


class Columns(nn.Module):
    """Stands in for a projection whose output a fused matrix already computed: columns ``start:stop``."""

    def __init__(self, start: int, stop: int) -> None:
        super().__init__()
        self.start, self.stop = start, stop

    def forward(self, x: Tensor) -> Tensor:
        return x[..., self.start:self.stop]


class FusedDecoderLayer(nn.Module):
    """A :class:`kvlab.model.DecoderLayer` over fused projections; same call signature, same function."""

    def __init__(self, layer: DecoderLayer, attention_kernel: bool = True) -> None:
        super().__init__()
        self.attention_kernel = attention_kernel
        attn, mlp = layer.self_attn, layer.mlp
        self.qkv = FusedLinear.from_linears([attn.q_proj, attn.k_proj, attn.v_proj], norm=layer.input_layernorm)
        q, kv = attn.num_heads * attn.head_dim, attn.num_kv_heads * attn.head_dim
        attn.q_proj, attn.k_proj, attn.v_proj = Columns(0, q), Columns(q, q + kv), Columns(q + kv, q + 2 * kv)
        self.o_proj = FusedLinear.from_linears([attn.o_proj])
        attn.o_proj = nn.Identity()
        self.self_attn = attn
        self.gate_up = FusedLinear.from_linears([mlp.gate_proj, mlp.up_proj], norm=layer.post_attention_layernorm,
                                                glu=True)
        self.down = FusedLinear.from_linears([mlp.down_proj])

    def forward(self, x: Tensor, positions: Tensor, rope: tuple[Tensor, Tensor], cache) -> Tensor:
        with region("attention"):
            qkv, attn = self.qkv(x), self.self_attn
            if self.attention_kernel and kernel_applies(qkv, cache):
                out = cache.attend(attn.layer_idx, qkv, positions, rope, attn.num_heads, attn.sliding_window,
                                   attn.scale)
            else:
                out = attn(qkv, positions, rope, cache)
            x = self.o_proj(out, residual=x)
        with region("mlp"):
            return self.down(self.gate_up(x), residual=x)


def is_fused(model: MistralForCausalLM) -> bool:
    return isinstance(model.lm_head, FusedLinear)


@torch.no_grad()
def fuse_model(model: MistralForCausalLM, attention_kernel: bool = True) -> MistralForCausalLM:
    """Rewrite ``model`` in place as described in the module docstring; a fused model is returned as is
    (with ``attention_kernel`` set on its layers)."""
    if is_fused(model):
        for layer in model.model.layers:
            layer.attention_kernel = attention_kernel
        return model
    layers = model.model.layers
    for i in range(len(layers)):
        layers[i] = FusedDecoderLayer(layers[i], attention_kernel)  # the old layer, and its separate matrices, go here
    model.lm_head = FusedLinear.from_linears([model.lm_head], norm=model.model.norm)
    model.model.norm = nn.Identity()
    return model
