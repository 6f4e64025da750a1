"""Weight-only int8 quantization with one scale per output channel.

Integer tensors cannot require grad, so a model whose matrices are int8 records no autograd graph for
them: the PyTorch counterpart of "quantized models don't leak" in the incident.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .kernels import fused_linear


def quantize_int8(x: Tensor, *, keepdim: bool = False, differentiable: bool = False) -> tuple[Tensor, Tensor]:
    """Symmetric absmax int8 quantization along the last axis: ``x ≈ q * scale``.

    Returns ``q`` (int8, the shape of ``x``) and one float32 ``scale`` per row of the last axis: shape
    ``x.shape[:-1]``, or ``x.shape[:-1] + (1,)`` with ``keepdim``. An all-zero row gets scale 1.

    The two users differ in one respect, chosen here explicitly:

    - weights (:class:`Int8Linear`, one scale per output channel): ``differentiable=False`` quantizes
      ``x.detach()``, so the int8 copy has no tie to the float parameter;
    - the KV cache (:class:`kvlab.caches.Int8Cache`, one scale per token and KV head, ``keepdim=True``):
      ``differentiable=True`` keeps the scale on the autograd graph, so under trainable weights the
      cache's scales carry every step's graph like any other cache (the int8 data cannot).
    """
    if not differentiable:
        x = x.detach()
    scale = x.float().abs().amax(dim=-1, keepdim=True) / 127.0
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero row: any scale works
    q = torch.round(x.float() / scale).clamp(-127, 127).to(torch.int8)
    return q, scale if keepdim else scale.squeeze(-1)


def dequantize_int8(q: Tensor, scale: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """``q * scale`` in ``dtype``; ``scale`` as :func:`quantize_int8` returned it with ``keepdim=True``
    (broadcast over the last axis)."""
    return (q.float() * scale).to(dtype)


class Int8Linear(nn.Module):
    """A bias-free linear layer holding int8 weights (out, in) and float32 scales (out,)."""

    def __init__(self, weight: Tensor, scale: Tensor) -> None:
        super().__init__()
        self.register_buffer("weight", weight)
        self.register_buffer("scale", scale)

    @classmethod
    def from_float(cls, weight: Tensor) -> Int8Linear:
        return cls(*quantize_int8(weight))

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    def forward(self, x: Tensor) -> Tensor:
        # One row on CUDA: a fused kernel reads the int8 weights directly. Otherwise dequantize on the
        # fly (a transient float copy per call, never kept): ``F.linear(x, W.to(x.dtype)) * scale``.
        return fused_linear(x, self.weight, self.scale)


def quantize_state(state: dict[str, Tensor], names: list[str]) -> None:
    """Replace each float matrix ``state[name]`` by its int8 copy and add ``<module>.scale``, in place.

    One matrix at a time, and each float matrix leaves ``state`` as its int8 copy enters: when ``state``
    holds the only reference, float and int8 copies of the weights coexist for one matrix at most.
    """
    for name in names:
        q, scale = quantize_int8(state.pop(name))
        state[name] = q
        state[name.removesuffix("weight") + "scale"] = scale


def quantize_linears(model: nn.Module) -> nn.Module:
    """Replace every ``nn.Linear`` in ``model`` by an :class:`Int8Linear`, in place."""
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.Linear):
                if child.bias is not None:
                    raise ValueError(f"{name}.{child_name}: int8 quantization here supports bias-free layers only")
                setattr(module, child_name, Int8Linear.from_float(child.weight))
    return model
