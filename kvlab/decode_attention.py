"""One kernel for a decode step's attention: rotary, the cache write and grouped attention, fused.

Why: after :mod:`kvlab.fused` has folded norms, SwiGLU and residual adds into the weight reads, what is
left between a layer's projections is attention, and at batch 1 it is not arithmetic but a string of
small kernels -- rotary on q and k, two cache writes, the mask, the attention call, a reshape -- each
costing a few microseconds of launch and ramp-up inside the CUDA graph, 32 times per token at the 7B
shape. Here it is one launch, one program per query head:

- rotary embedding of the program's query head and of its KV head's new key, rounded where the eager
  model rounds (each product and their sum in the activation dtype);
- the new key and value written into the static cache at the step's position (by the group's first
  query head only; every head of the group computes the same values);
- attention of the query over the cached keys ``lo..pos-1`` and the new key, with an online softmax in
  fp32. The new key and value come from registers, not from memory, so no program waits on another's
  write. ``lo`` is the sliding window's first visible position (0 without a window); slots beyond
  ``pos`` are never read, where the eager path reads every slot and masks the empty ones.

On an H200 at the Mistral-7B shape it took the bf16 fast path from 219.5 to 229.5 tok/s reading 64
slots per step, and to 237 with up to 256 (:func:`launch`; ``data/gpu/h200-fast-before``).

It serves the compiled fast path (:class:`kvlab.fused.FusedDecoderLayer` under ``torch.compile``) for
one new token per row, with every row at the same position (the ``uniform_positions`` static cache):
then slot ``j`` holds position ``j``. Everything else -- prompts, the CPU, eager code, ragged rows --
goes through the model's own :meth:`kvlab.model.Attention.forward`. The kernel differs from that path
only in the order of fp32 sums and in keeping softmax weights in fp32.

Shape legend: B batch, H query heads, Hkv KV heads, D head dim, S cache slots.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .kernels import gdc_launch_dependents, gdc_wait, pdl_available

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs never call the kernel
    triton = None


if triton is not None:
    @triton.jit
    def _rotary(x, x_partner, cos, sin, sign):
        """``x * cos + rotate_half(x) * sin`` with the eager model's roundings (x's dtype)."""
        dtype = x.dtype
        a = (x.to(tl.float32) * cos).to(dtype)
        b = (x_partner.to(tl.float32) * sin).to(dtype).to(tl.float32) * sign
        return (a.to(tl.float32) + b).to(dtype)

    @triton.jit
    def _decode_attention_kernel(qkv_ptr, cos_ptr, sin_ptr, k_ptr, v_ptr, pos_ptr, out_ptr, S, window, scale,
                                 H: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, BLOCK_S: tl.constexpr,
                                 WINDOW: tl.constexpr, PDL: tl.constexpr):
        if PDL:  # programmatic dependent launch, as in kvlab.kernels: nothing is read or written before the wait
            gdc_launch_dependents()
            gdc_wait()
        b = tl.program_id(0) // H
        h = tl.program_id(0) % H
        kvh = h // (H // HKV)
        pos = tl.load(pos_ptr + b).to(tl.int32)  # positions are (B, 1): this row's one new token
        d = tl.arange(0, D)
        partner = (d + D // 2) % D  # rotate_half: (-x2, x1)
        sign = tl.where(d < D // 2, -1.0, 1.0)
        cos = tl.load(cos_ptr + b * D + d).to(tl.float32)
        sin = tl.load(sin_ptr + b * D + d).to(tl.float32)
        row = qkv_ptr + b * (H + 2 * HKV) * D
        q = _rotary(tl.load(row + h * D + d), tl.load(row + h * D + partner), cos, sin, sign).to(tl.float32)
        k_at = row + (H + kvh) * D
        k_new = _rotary(tl.load(k_at + d), tl.load(k_at + partner), cos, sin, sign)
        v_new = tl.load(row + (H + HKV + kvh) * D + d)
        cache = (b * HKV + kvh).to(tl.int64) * S * D  # (B, Hkv, S, D), contiguous
        if h % (H // HKV) == 0:
            tl.store(k_ptr + cache + pos * D + d, k_new)
            tl.store(v_ptr + cache + pos * D + d, v_new)
        # Online softmax, seeded with the new token (always visible), then the cached slots lo..pos-1.
        m = tl.sum(q * k_new.to(tl.float32), axis=0) * scale
        total = tl.full([], 1.0, tl.float32)
        acc = v_new.to(tl.float32)
        lo = 0
        if WINDOW:
            lo = tl.maximum(pos - window + 1, 0)
        for s0 in range(lo, pos, BLOCK_S):
            s = s0 + tl.arange(0, BLOCK_S)
            ok = s < pos
            offsets = cache + s[:, None].to(tl.int64) * D + d[None, :]
            keys = tl.load(k_ptr + offsets, mask=ok[:, None], other=0.0).to(tl.float32)
            scores = tl.where(ok, tl.sum(keys * q[None, :], axis=1) * scale, float("-inf"))
            m_new = tl.maximum(m, tl.max(scores, axis=0))
            p = tl.exp(scores - m_new)
            alpha = tl.exp(m - m_new)
            values = tl.load(v_ptr + offsets, mask=ok[:, None], other=0.0).to(tl.float32)
            acc = acc * alpha + tl.sum(p[:, None] * values, axis=0)
            total = total * alpha + tl.sum(p, axis=0)
            m = m_new
        tl.store(out_ptr + (b * H + h) * D + d, (acc / total).to(out_ptr.dtype.element_ty))


@torch.library.custom_op("kvlab::decode_attention", mutates_args=("keys", "values"))
def decode_attention(qkv: Tensor, cos: Tensor, sin: Tensor, keys: Tensor, values: Tensor, positions: Tensor,
                     num_heads: int, window: int, scale: float) -> Tensor:
    """Attention output (B, 1, H * D) for one new token per row; writes its K/V into ``keys``/``values``.

    ``qkv`` (B, 1, (H + 2 Hkv) D) is the fused projection's output; ``cos``/``sin`` (B, 1, 1, D) the
    rotary tables at ``positions`` (B, 1); ``keys``/``values`` one layer's (B, Hkv, S, D) cache
    buffers; ``window`` the sliding window (0: none).
    """
    b, hkv, s, d = keys.shape
    out = qkv.new_empty((b, 1, num_heads * d))
    pdl = pdl_available(qkv.device)
    _decode_attention_kernel[(b * num_heads,)](
        qkv, cos.contiguous(), sin.contiguous(), keys, values, positions, out, s, max(window, 1), scale,
        H=num_heads, HKV=hkv, D=d, WINDOW=window > 0, PDL=pdl, launch_pdl=pdl, **launch(s))
    return out


def launch(slots: int) -> dict[str, int]:
    """Slots per step and warps: up to 256 slots in one step, so a short cache is read in one round of
    loads. On an H200 at the Mistral-7B shape (208 slots, 200 filled) one call took 7.0 us with 256
    slots and 8 warps, 7.8 with 128 and 8, 9.1 with 128 and 4, 12.5 with 64 and 4 (CUDA graph replay)."""
    block = min(256, max(16, triton.next_power_of_2(slots)))
    return {"BLOCK_S": block, "num_warps": 8 if block >= 128 else 4}


@decode_attention.register_fake
def _(qkv: Tensor, cos: Tensor, sin: Tensor, keys: Tensor, values: Tensor, positions: Tensor,
      num_heads: int, window: int, scale: float) -> Tensor:
    return qkv.new_empty((keys.shape[0], 1, num_heads * keys.shape[3]))


def kernel_applies(qkv: Tensor, cache: object) -> bool:
    """Whether the kernel can serve this step of ``cache``: one new token per row, on CUDA with Triton,
    a power-of-two head dim, into a static cache written at uniform positions (slot = position), under
    ``torch.compile`` and without autograd (see the module docstring)."""
    if triton is None or not qkv.is_cuda or qkv.shape[1] != 1 or torch.is_grad_enabled():
        return False
    if not (getattr(cache, "uniform_positions", False) and hasattr(cache, "attend")
            and torch.compiler.is_compiling()):
        return False
    head_dim = cache.head_dim
    return head_dim & (head_dim - 1) == 0 and qkv.dtype == cache.dtype
