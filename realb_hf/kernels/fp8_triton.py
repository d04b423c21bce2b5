"""Triton kernels for the fp8 expert MLP on CUDA: one memory pass per step instead of three or four.

- `gather_quant_rows`: pick rows of the token matrix (the dispatch permutation) and quantize them rowwise
  to e4m3 in the same pass, so the bf16 gather copy never exists. With no index it is the bf16 -> fp8
  weight conversion of the on_the_fly mode (one read, one write: memory-bandwidth bound).
- `swiglu_quant_rows`: SwiGLU of a (S, 2I) gate|up matrix fused with the rowwise quantization of its
  (S, I) output, computed in fp32 (no bf16 rounding between the two).

Both produce exactly what `realb_hf.formats.fp8.quantize_rowwise` defines: scale = max(amax, 1e-12) * (1/448),
data = clamp(x / scale) in e4m3 with round-to-nearest-even (IEEE division, so CPU and GPU agree bit for bit
on the gather; the SwiGLU output differs from the eager path only by the bf16 rounding it skips).
Rows holding NaN are not guaranteed to propagate it (Triton's max drops NaN); the experts module sends
rows with non-finite inputs to the bf16 path before they get here.
"""

from __future__ import annotations

import torch

from ..formats.fp8 import AMAX_EPS, FP8_MAX, INV_FP8_MAX

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the reference path in formats/fp8.py is used instead
    triton = None
    tl = None



def available(device: torch.device) -> bool:
    """Triton kernels need a CUDA device and the triton package."""
    return triton is not None and device.type == "cuda"


if triton is not None:
    _MAX = tl.constexpr(FP8_MAX)
    _INV_MAX = tl.constexpr(INV_FP8_MAX)
    _EPS = tl.constexpr(AMAX_EPS)

    @triton.jit
    def _quant_rows_kernel(
        src_ptr,
        idx_ptr,
        out_ptr,
        scale_ptr,
        K,
        src_stride,
        out_stride,
        HAS_IDX: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        src_row = tl.load(idx_ptr + row).to(tl.int64) if HAS_IDX else row
        cols = tl.arange(0, BLOCK)
        mask = cols < K
        x = tl.load(src_ptr + src_row * src_stride + cols, mask=mask, other=0.0).to(tl.float32)
        amax = tl.max(tl.abs(x), axis=0)
        scale = tl.maximum(amax, _EPS) * _INV_MAX
        q = tl.clamp(tl.div_rn(x, scale), -_MAX, _MAX)
        tl.store(out_ptr + row * out_stride + cols, q.to(tl.float8e4nv), mask=mask)
        tl.store(scale_ptr + row, scale)

    @triton.jit
    def _swiglu_quant_kernel(h_ptr, out_ptr, scale_ptr, inter, h_stride, out_stride, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = cols < inter
        gate = tl.load(h_ptr + row * h_stride + cols, mask=mask, other=0.0).to(tl.float32)
        up = tl.load(h_ptr + row * h_stride + inter + cols, mask=mask, other=0.0).to(tl.float32)
        act = gate * tl.sigmoid(gate) * up
        amax = tl.max(tl.abs(act), axis=0)
        scale = tl.maximum(amax, _EPS) * _INV_MAX
        q = tl.clamp(tl.div_rn(act, scale), -_MAX, _MAX)
        tl.store(out_ptr + row * out_stride + cols, q.to(tl.float8e4nv), mask=mask)
        tl.store(scale_ptr + row, scale)


def _launch_meta(k: int) -> tuple[int, int]:
    block = triton.next_power_of_2(k)
    return block, min(16, max(1, block // 256))


def gather_quant_rows(src: torch.Tensor, index: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`src[index]` (or all of `src`, any leading dims) quantized rowwise: (rows, K) e4m3 and (rows,) fp32."""
    k = src.shape[-1]
    flat = src.reshape(-1, k)
    if flat.stride(-1) != 1:
        flat = flat.contiguous()
    rows = index.numel() if index is not None else flat.shape[0]
    out = torch.empty(rows, k, dtype=torch.float8_e4m3fn, device=src.device)
    scale = torch.empty(rows, dtype=torch.float32, device=src.device)
    if rows:
        block, warps = _launch_meta(k)
        idx = index if index is not None else scale  # unused when HAS_IDX is False
        _quant_rows_kernel[(rows,)](
            flat, idx, out, scale, k, flat.stride(0), out.stride(0), HAS_IDX=index is not None, BLOCK=block,
            num_warps=warps,
        )
    if index is None:
        return out.view(src.shape), scale.view(src.shape[:-1])
    return out, scale


def swiglu_quant_rows(h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(S, 2I) concatenated gate|up -> SwiGLU output quantized rowwise: (S, I) e4m3 and (S,) fp32."""
    rows, two_i = h.shape
    inter = two_i // 2
    if h.stride(-1) != 1:
        h = h.contiguous()
    out = torch.empty(rows, inter, dtype=torch.float8_e4m3fn, device=h.device)
    scale = torch.empty(rows, dtype=torch.float32, device=h.device)
    if rows:
        block, warps = _launch_meta(inter)
        _swiglu_quant_kernel[(rows,)](h, out, scale, inter, h.stride(0), out.stride(0), BLOCK=block, num_warps=warps)
    return out, scale
