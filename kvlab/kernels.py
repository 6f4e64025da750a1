"""A fused matrix-vector kernel for batch-1 decoding: RMSNorm, x @ W.T (bf16 or int8 W), SwiGLU or residual.

Why a kernel of its own: a batch-1 decode step is a chain of matrix-vector products, each of which
reads its whole weight matrix once and does two flops per weight byte (one for int8), so every one is
bound by memory bandwidth. Two things then decide the speed: how close each product comes to the copy
bandwidth, and how many small kernels sit between them (each costs a few microseconds of launch and
ramp-up even inside a CUDA graph). This kernel addresses both:

- int8 weights are read as int8, four to a 32-bit word, and turned into floats in registers by bit
  pattern (one byte per weight instead of the two that "dequantize, then matmul" writes and reads
  back), with the per-output-channel scale applied to the fp32 sum. A fused model stores them in the
  kernel's own layout (:func:`pack_int8`): each byte offset by 128, so one byte-permute instruction
  puts it under a float's exponent, and the four bytes of a word taken from four quarters of the row,
  so the inputs they multiply are four contiguous runs instead of a stride-4 gather;
- the block sizes are timed per shape (autotuning) with plain, unpipelined loads, and on Hopper and
  newer GPUs each launch is a programmatic dependent launch: the next kernel in the CUDA graph is
  scheduled while this one's last programs still run, and waits (``griddepcontrol.wait``) before its
  first read of anything a previous kernel wrote. Together with the packed layout this took the int8
  decode path on an H200 at the Mistral-7B shape from 315 to 403 tok/s and bf16 from 237 to 250
  (``data/gpu/h200-fast-before`` and ``data/gpu/h200-fast``); the packed kernel reads 2.5-3.7 TB/s of
  weights where plain int8 rows give 1.8-3.2;
- the RMSNorm that feeds a projection is computed in the kernel's prologue (each program re-reads
  the input vector from L2, a few KiB), SwiGLU (``silu(gate) * up`` over a weight stored as
  ``[gate; up]``) and the residual add in its epilogue, so norms, activations and adds launch nothing.

Every intermediate is rounded to the activation dtype exactly where the eager model rounds it (the
normalised input, each projection's output, ``silu``'s output, the residual sum), so the kernel
differs from the eager model only in the order of the fp32 sums.

:func:`fused_linear` is the entry point. It runs the Triton kernel for one input row on CUDA, and
:func:`fused_linear_reference` (plain PyTorch, the same arithmetic) everywhere else: on the CPU, for
prompts (several rows), and where Triton is not installed. The kernel is registered as the custom op
``kvlab::fused_gemv`` so that ``torch.compile(fullgraph=True)`` keeps it as one opaque call inside
the CUDA graph. Block sizes are autotuned per shape and dtype on first use.

Shape legend: K input features, N output features (weight rows; ``2N`` rows with SwiGLU).
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the PyTorch reference is used everywhere
    triton = None
try:  # grid dependency control (programmatic dependent launch): Triton 3.4 and newer
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:
    gdc_launch_dependents = gdc_wait = None

ACTIVATION_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def triton_available() -> bool:
    """True when the fused Triton kernel can run (Triton installed and a CUDA device visible)."""
    return triton is not None and torch.cuda.is_available()


def pdl_available(device: torch.device) -> bool:
    """Whether kernels on ``device`` can use programmatic dependent launch (Hopper, sm_90, and newer)."""
    return gdc_wait is not None and device.type == "cuda" and _capability_major(device.index) >= 9


@functools.cache
def _capability_major(index: int | None) -> int:
    """The device's compute capability, looked up once: every kernel launch asks."""
    return torch.cuda.get_device_capability(index)[0]


def pack_int8(weight: Tensor) -> Tensor:
    """An int8 matrix (rows, K) in the kernel's layout: int32 words (rows, K/4), same bytes.

    Byte ``i`` of word ``j`` holds feature ``i * K/4 + j``, plus 128 (as an unsigned byte). The offset
    makes each byte, placed under the exponent of 2**23 by one byte permute, a float 2**23 + w + 128;
    the quarters make the inputs a block of words multiplies four contiguous runs of ``x``.
    """
    rows, k = weight.shape
    if weight.dtype != torch.int8 or k % 4:
        raise ValueError(f"pack_int8 takes an int8 matrix with a multiple of 4 columns, got {weight.dtype} "
                         f"{tuple(weight.shape)}")
    biased = weight.contiguous().view(torch.uint8) ^ 0x80
    return biased.view(rows, 4, k // 4).transpose(1, 2).contiguous().view(rows, k).view(torch.int32)


def unpack_int8(words: Tensor) -> Tensor:
    """The int8 matrix (rows, K) that :func:`pack_int8` turned into ``words`` (rows, K/4)."""
    rows, kw = words.shape
    quarters = words.contiguous().view(torch.uint8).view(rows, kw, 4).transpose(1, 2).reshape(rows, 4 * kw)
    return (quarters ^ 0x80).view(torch.int8)


def fused_linear_reference(x: Tensor, weight: Tensor, scale: Tensor | None = None, norm_weight: Tensor | None = None,
                           eps: float = 1e-5, residual: Tensor | None = None, glu: bool = False) -> Tensor:
    """``[residual +] act(rmsnorm(x) @ weight.T * scale)`` in plain PyTorch, rounding as the eager model does.

    ``weight`` (N or 2N, K) is in ``x``'s dtype, or int8 with ``scale`` (one per row), or int8 packed
    by :func:`pack_int8` (int32, (N or 2N, K/4)); ``glu`` splits the output in halves ``[gate, up]``
    and returns ``silu(gate) * up``. ``norm_weight`` applies :class:`kvlab.model.RMSNorm`'s arithmetic
    first (float32 normalisation, scale in ``x``'s dtype).
    """
    if weight.dtype == torch.int32:
        weight = unpack_int8(weight)
    if norm_weight is not None:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
        x = norm_weight * h.to(x.dtype)
    y = F.linear(x, weight if weight.dtype == x.dtype else weight.to(x.dtype))
    if scale is not None:
        y = y * scale.to(x.dtype)
    if glu:
        gate, up = y.chunk(2, dim=-1)
        y = F.silu(gate) * up
    return y if residual is None else residual + y


if triton is not None:
    def _configs() -> list:
        # (rows per program, weights per row per step, warps). Loads are plain (num_stages=1, no
        # pipelining through shared memory; with this wider list of tiles, a 7B step's bf16 matrices
        # took 3.61 ms in one CUDA graph on an H200 against 4.00 with two stages and the earlier list,
        # in one scratch run), so the bytes in flight per thread are the tile's share of one step: too
        # few and the kernel waits on memory latency instead of streaming. _prune keeps the tiles worth
        # timing for the weight dtype (int8 tiles hold four times the weights of bf16 ones per byte).
        shapes = [(2, 1024, 4), (4, 512, 4), (4, 1024, 4), (8, 512, 4), (8, 1024, 4), (16, 512, 4),
                  (4, 2048, 8), (8, 1024, 8), (16, 512, 8), (8, 2048, 8), (16, 1024, 8), (32, 512, 8),
                  (2, 4096, 4), (4, 2048, 4), (4, 4096, 4), (8, 2048, 4), (16, 1024, 4), (16, 2048, 8),
                  (32, 1024, 8), (8, 4096, 8), (2, 2048, 4), (2, 2048, 2), (4, 1024, 2), (2, 4096, 8)]
        return [triton.Config({"BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=1) for n, k, w in shapes]

    def _prune(configs: list, named_args: dict, **kwargs) -> list:
        """Tiles that put 16-256 weight bytes per thread in flight each step, with at most 64 fp32
        accumulators per thread (both halves counted under SwiGLU; one per int32 word of int8)."""
        int8 = kwargs.get("INT8")
        size = 1 if int8 else named_args["w_ptr"].element_size()
        halves = 2 if kwargs.get("GLU") else 1
        kept = []
        for c in configs:
            weights = c.kwargs["BLOCK_N"] * c.kwargs["BLOCK_K"] // (32 * c.num_warps)
            accumulators = weights // 4 if int8 else weights
            if 16 <= weights * size <= 256 and accumulators * halves <= 64:
                kept.append(c)
        return kept or configs

    @triton.jit
    def _inputs(x_ptr, norm_ptr, k, k_ok, rstd, NORM: tl.constexpr, out_ty: tl.constexpr):
        """Input features ``k`` in fp32; with NORM, RMS-normalised as the model rounds it (normalise in
        fp32, round, scale by the norm weight in the input dtype)."""
        xk = tl.load(x_ptr + k, mask=k_ok, other=0.0)
        if NORM:
            xk = (xk.to(tl.float32) * rstd).to(out_ty) * tl.load(norm_ptr + k, mask=k_ok, other=0.0)
        return xk.to(tl.float32)

    @triton.jit
    def _int8_words(acc, w, x0, x1, x2, x3, PACKED: tl.constexpr):
        """``acc`` plus the products of the four int8 weights in each int32 word of ``w`` (rows, words)
        with their inputs ``x0``..``x3`` (those of bytes 0..3).

        No conversion instruction: each byte, offset by 128, becomes the low mantissa bits of 2**23, and
        subtracting 2**23 + 128 leaves the weight exactly. Plain int8 bytes take a shift, an and and an
        xor (0x80) each; packed ones (already offset) one byte permute (``prmt``). A plain int8-to-float
        conversion runs at a quarter of the add's rate on this class of GPU and held the kernel near
        2.5 TB/s.
        """
        if PACKED:
            b0, b1, b2, b3 = tl.inline_asm_elementwise(
                "{.reg .b32 e; mov.b32 e, 0x4B000000; prmt.b32 $0, $4, e, 0x7650; prmt.b32 $1, $4, e, 0x7651; "
                "prmt.b32 $2, $4, e, 0x7652; prmt.b32 $3, $4, e, 0x7653;}",
                "=r,=r,=r,=r,r", [w], dtype=(tl.float32, tl.float32, tl.float32, tl.float32), is_pure=True, pack=1)
        else:
            b0 = ((w & 0xFF) ^ 0x4B000080).to(tl.float32, bitcast=True)
            b1 = (((w >> 8) & 0xFF) ^ 0x4B000080).to(tl.float32, bitcast=True)
            b2 = (((w >> 16) & 0xFF) ^ 0x4B000080).to(tl.float32, bitcast=True)
            b3 = (((w >> 24) & 0xFF) ^ 0x4B000080).to(tl.float32, bitcast=True)
        acc += (b0 - 8388736.0) * x0[None, :]
        acc += (b1 - 8388736.0) * x1[None, :]
        acc += (b2 - 8388736.0) * x2[None, :]
        acc += (b3 - 8388736.0) * x3[None, :]
        return acc

    @triton.autotune(configs=_configs(), key=["N", "K", "INT8", "PACKED", "NORM", "GLU", "RESIDUAL", "PDL"],
                     prune_configs_by={"early_config_prune": _prune})
    @triton.jit
    def _fused_gemv_kernel(x_ptr, w_ptr, scale_ptr, norm_ptr, res_ptr, out_ptr, N, K, eps,
                           INT8: tl.constexpr, PACKED: tl.constexpr, NORM: tl.constexpr, GLU: tl.constexpr,
                           RESIDUAL: tl.constexpr, PDL: tl.constexpr, NORM_BLOCK: tl.constexpr,
                           BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        out_ty = out_ptr.dtype.element_ty
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < N
        if PDL:  # let the next kernel be scheduled now; wait for the previous one before reading its output
            gdc_launch_dependents()
            gdc_wait()
        rstd = 0.0
        if NORM:  # mean of squares of the whole input first: each program re-reads it (L2-resident), in
            # one load where it fits (NORM_BLOCK >= K) rather than a loop of dependent steps; on an H200
            # this made no difference measurable beside machine-to-machine spread
            cols = tl.arange(0, NORM_BLOCK)
            squares = tl.zeros([NORM_BLOCK], dtype=tl.float32)
            for k0 in range(0, K, NORM_BLOCK):
                xk = tl.load(x_ptr + k0 + cols, mask=k0 + cols < K, other=0.0).to(tl.float32)
                squares += xk * xk
            rstd = tl.math.rsqrt(tl.sum(squares, axis=0) / K + eps)
        if INT8:  # w_ptr is the int8 matrix as int32 words: word j of a row holds k = 4j .. 4j+3, or
            # packed (pack_int8) k = j, KW + j, 2KW + j, 3KW + j
            KW = K // 4
            w_rows = w_ptr + rows[:, None].to(tl.int64) * KW
            words = tl.arange(0, BLOCK_K // 4)
            acc = tl.zeros([BLOCK_N, BLOCK_K // 4], dtype=tl.float32)
            acc_up = tl.zeros([BLOCK_N, BLOCK_K // 4], dtype=tl.float32)
            for j0 in range(0, KW, BLOCK_K // 4):
                j = j0 + words
                j_ok = j < KW
                if PACKED:
                    x0 = _inputs(x_ptr, norm_ptr, j, j_ok, rstd, NORM, out_ty)
                    x1 = _inputs(x_ptr, norm_ptr, KW + j, j_ok, rstd, NORM, out_ty)
                    x2 = _inputs(x_ptr, norm_ptr, 2 * KW + j, j_ok, rstd, NORM, out_ty)
                    x3 = _inputs(x_ptr, norm_ptr, 3 * KW + j, j_ok, rstd, NORM, out_ty)
                else:
                    x0 = _inputs(x_ptr, norm_ptr, 4 * j, j_ok, rstd, NORM, out_ty)
                    x1 = _inputs(x_ptr, norm_ptr, 4 * j + 1, j_ok, rstd, NORM, out_ty)
                    x2 = _inputs(x_ptr, norm_ptr, 4 * j + 2, j_ok, rstd, NORM, out_ty)
                    x3 = _inputs(x_ptr, norm_ptr, 4 * j + 3, j_ok, rstd, NORM, out_ty)
                mask = row_ok[:, None] & j_ok[None, :]
                acc = _int8_words(acc, tl.load(w_rows + j[None, :], mask=mask, other=0), x0, x1, x2, x3, PACKED)
                if GLU:  # the up half of [gate; up] sits N rows further down
                    up_words = tl.load(w_rows + N * KW + j[None, :], mask=mask, other=0)
                    acc_up = _int8_words(acc_up, up_words, x0, x1, x2, x3, PACKED)
        else:
            w_rows = w_ptr + rows[:, None].to(tl.int64) * K
            cols = tl.arange(0, BLOCK_K)
            acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
            acc_up = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                k = k0 + cols
                k_ok = k < K
                xf = _inputs(x_ptr, norm_ptr, k, k_ok, rstd, NORM, out_ty)[None, :]
                mask = row_ok[:, None] & k_ok[None, :]
                acc += tl.load(w_rows + k[None, :], mask=mask, other=0.0).to(tl.float32) * xf
                if GLU:
                    acc_up += tl.load(w_rows + N * K + k[None, :], mask=mask, other=0.0).to(tl.float32) * xf
        y = tl.sum(acc, axis=1).to(out_ty).to(tl.float32)
        if INT8:
            row_scale = tl.load(scale_ptr + rows, mask=row_ok, other=0.0).to(out_ty).to(tl.float32)
            y = (y * row_scale).to(out_ty).to(tl.float32)
        if GLU:
            up = tl.sum(acc_up, axis=1).to(out_ty).to(tl.float32)
            if INT8:
                up_scale = tl.load(scale_ptr + N + rows, mask=row_ok, other=0.0).to(out_ty).to(tl.float32)
                up = (up * up_scale).to(out_ty).to(tl.float32)
            gate = (y / (1.0 + tl.exp(-y))).to(out_ty).to(tl.float32)  # F.silu rounds its output
            y = (gate * up).to(out_ty).to(tl.float32)
        if RESIDUAL:
            y = y + tl.load(res_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
        tl.store(out_ptr + rows, y.to(out_ty), mask=row_ok)


@torch.library.custom_op("kvlab::fused_gemv", mutates_args=())
def fused_gemv(x: Tensor, weight: Tensor, scale: Optional[Tensor], norm_weight: Optional[Tensor],  # noqa: UP045
               residual: Optional[Tensor], eps: float, glu: bool) -> Tensor:  # noqa: UP045 (custom_op schema)
    """The Triton kernel on one row ``x`` (..., K) with ``x.numel() == K``; see :func:`fused_linear`."""
    rows, k = weight.shape[0], x.shape[-1]
    n = rows // 2 if glu else rows
    out = torch.empty((*x.shape[:-1], n), dtype=x.dtype, device=x.device)
    dummy = out  # never read: the flags switch those loads off
    grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]),)  # noqa: E731
    packed = weight.dtype == torch.int32
    int8 = packed or weight.dtype == torch.int8
    pdl = pdl_available(x.device)
    _fused_gemv_kernel[grid](x, weight.view(torch.int32) if int8 else weight, dummy if scale is None else scale,
                             dummy if norm_weight is None else norm_weight,
                             dummy if residual is None else residual, out, n, k, eps,
                             INT8=int8, PACKED=packed, NORM=norm_weight is not None, GLU=glu,
                             RESIDUAL=residual is not None, PDL=pdl, NORM_BLOCK=min(triton.next_power_of_2(k), 8192),
                             launch_pdl=pdl)
    return out


@fused_gemv.register_fake
def _(x: Tensor, weight: Tensor, scale: Optional[Tensor], norm_weight: Optional[Tensor],  # noqa: UP045
      residual: Optional[Tensor], eps: float, glu: bool) -> Tensor:  # noqa: UP045
    n = weight.shape[0] // 2 if glu else weight.shape[0]
    return x.new_empty((*x.shape[:-1], n))


def tuned_configs() -> dict[str, str]:
    """The block sizes autotuning chose so far, by tuning key (shape, flags, dtypes): for the record."""
    cache = getattr(_fused_gemv_kernel, "cache", {}) if triton is not None else {}
    return {str(key): str(config) for key, config in cache.items()}


def uses_kernel(x: Tensor, weight: Tensor, scale: Tensor | None = None) -> bool:
    """Whether :func:`fused_linear` runs the Triton kernel for these operands (else the reference)."""
    if weight.dtype == torch.int8:  # read as int32 words: whole words per row
        layout_ok = weight.shape[-1] % 4 == 0 and scale is not None
    elif weight.dtype == torch.int32:  # pack_int8's layout
        layout_ok = 4 * weight.shape[-1] == x.shape[-1] and scale is not None
    else:
        layout_ok = weight.dtype == x.dtype
    return (triton is not None and x.is_cuda and x.numel() == x.shape[-1] and x.dtype in ACTIVATION_DTYPES
            and weight.is_contiguous() and layout_ok)


def fused_linear(x: Tensor, weight: Tensor, scale: Tensor | None = None, norm_weight: Tensor | None = None,
                 eps: float = 1e-5, residual: Tensor | None = None, glu: bool = False) -> Tensor:
    """``[residual +] act(rmsnorm(x) @ weight.T * scale)``: the Triton kernel for one row on CUDA,
    :func:`fused_linear_reference` otherwise. Arguments as for the reference."""
    if uses_kernel(x, weight, scale) and not _needs_grad(x, weight, scale, norm_weight, residual):
        return fused_gemv(x.contiguous(), weight, scale, norm_weight,
                          None if residual is None else residual.contiguous(), eps, glu)
    return fused_linear_reference(x, weight, scale, norm_weight, eps, residual, glu)


def _needs_grad(*tensors: Tensor | None) -> bool:
    """The kernel has no backward: anything that would record a graph takes the reference path."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
