"""Weight-only int8 quantization with one scale per output channel.

Integer tensors cannot require grad, so a model whose matrices are int8 records no autograd graph for
them: the PyTorch counterpart of "quantized models don't leak" in the incident.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def quantize_int8(w: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetric absmax quantization along the last axis: ``w ≈ q * scale[..., None]``."""
    scale = w.detach().abs().amax(dim=-1).float().clamp(min=1e-12) / 127.0
    q = torch.round(w.detach().float() / scale[..., None]).clamp(-127, 127).to(torch.int8)
    return q, scale


class Int8Linear(nn.Module):
    """A bias-free linear layer holding int8 weights (out, in) and float32 scales (out,)."""

    def __init__(self, weight: Tensor, scale: Tensor) -> None:
        super().__init__()
        self.register_buffer("weight", weight)
        self.register_buffer("scale", scale)

    @classmethod
    def from_float(cls, weight: Tensor) -> "Int8Linear":
        return cls(*quantize_int8(weight))

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    def forward(self, x: Tensor) -> Tensor:
        # Dequantize on the fly: a transient float copy per call, never kept.
        return F.linear(x, self.weight.to(x.dtype)) * self.scale.to(x.dtype)


def quantize_linears(model: nn.Module) -> nn.Module:
    """Replace every ``nn.Linear`` in ``model`` by an :class:`Int8Linear`, in place."""
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.Linear):
                if child.bias is not None:
                    raise ValueError(f"{name}.{child_name}: int8 quantization here supports bias-free layers only")
                setattr(module, child_name, Int8Linear.from_float(child.weight))
    return model
