"""Weighted top-k combine: `out[t] = sum_k w[t, k] * y[pos[t, k]]` in one pass.

The experts' rows come out sorted by (precision, expert); every token must gather its top-k rows back,
weight them and add them up. Done with torch ops that is a scatter (or gather) of the whole (S, H) matrix,
a multiply and a reduction: three passes over S x H. On CUDA one Triton program per token reads its k
rows once. Slots whose position is < 0 (other EP ranks' experts) contribute 0. The rows may live in two
matrices (`y_low`: a second precision group); positions then index their concatenation, without it ever
being built.

Rounding follows transformers' stock combine (`(rows * weights).sum(dim=1)`): each product is rounded to
the promoted dtype of rows and weights (bf16 when both are bf16), the sum accumulates in fp32 and is rounded
once, so a ReaLB layer combines exactly like the stock layer and like transformers' EP combine.
"""

from __future__ import annotations

import torch

from .library import define_op

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None
    tl = None
else:
    from torch.library import wrap_triton


def weighted_combine_reference(
    y: torch.Tensor, pos: torch.Tensor, weights: torch.Tensor, y_low: torch.Tensor | None = None
) -> torch.Tensor:
    """Pure torch: `y (S, H)`, `pos (T, k)` int64 row of each slot in y (or -1), `weights (T, k)` -> (T, H).

    With `y_low (S2, H)`, positions S..S+S2-1 are its rows."""
    if y_low is not None:
        y = torch.cat([y, y_low])
    valid = (pos >= 0).unsqueeze(-1)
    weighted = y[pos.clamp(min=0)] * weights.unsqueeze(-1)  # (T, k, H), as transformers weights its rows
    return weighted.masked_fill(~valid, 0).sum(dim=1)


if triton is not None:

    @triton.jit
    def _combine_kernel(
        y_ptr,
        y_low_ptr,
        pos_ptr,
        w_ptr,
        out_ptr,
        H,
        split,
        y_stride,
        y_low_stride,
        out_stride,
        TOP_K: tl.constexpr,
        BLOCK: tl.constexpr,
        PRODUCT_DTYPE: tl.constexpr,
    ):
        token = tl.program_id(0).to(tl.int64)
        chunk = tl.program_id(1)
        cols = chunk * BLOCK + tl.arange(0, BLOCK)
        mask = cols < H
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for k in tl.static_range(TOP_K):
            p = tl.load(pos_ptr + token * TOP_K + k)
            w = tl.load(w_ptr + token * TOP_K + k).to(tl.float32)
            row = tl.load(y_ptr + tl.maximum(p, 0) * y_stride + cols, mask=mask & (p >= 0) & (p < split), other=0.0)
            low = tl.maximum(p - split, 0)
            row += tl.load(y_low_ptr + low * y_low_stride + cols, mask=mask & (p >= split), other=0.0)
            acc += (row.to(tl.float32) * w).to(PRODUCT_DTYPE).to(tl.float32)
        tl.store(out_ptr + token * out_stride + cols, acc.to(out_ptr.dtype.element_ty), mask=mask)


_TL_DTYPES = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32} if tl else {}


def _combine_fake(y, pos, weights, y_low):
    return y.new_empty((pos.shape[0], y.shape[-1]), dtype=torch.promote_types(y.dtype, weights.dtype))


def _combine_cuda(y, pos, weights, y_low, kernel=None):
    """`kernel`: the launcher (`wrap_triton` of `_combine_kernel` when traced)."""
    split = y.shape[0] if y_low is not None else torch.iinfo(torch.int64).max
    low = y_low if y_low is not None else y
    num_tokens, top_k = pos.shape
    hidden = y.shape[-1]
    product = torch.promote_types(y.dtype, weights.dtype)
    out = torch.empty(num_tokens, hidden, dtype=product, device=y.device)
    if num_tokens:
        block = min(1024, triton.next_power_of_2(hidden))
        grid = (num_tokens, triton.cdiv(hidden, block))
        (kernel or _combine_kernel)[grid](
            y, low, pos.contiguous(), weights.contiguous(), out,
            hidden, split, y.stride(0), low.stride(0), out.stride(0),
            TOP_K=top_k, BLOCK=block, PRODUCT_DTYPE=_TL_DTYPES[product], num_warps=4,
        )
    return out


def _combine_traceable(
    y: torch.Tensor, pos: torch.Tensor, weights: torch.Tensor, y_low: torch.Tensor | None
) -> torch.Tensor:
    return _combine_cuda(y, pos, weights, y_low, wrap_triton(_combine_kernel))


_COMBINE = define_op(
    "weighted_combine",
    "(Tensor y, Tensor pos, Tensor weights, Tensor? y_low) -> Tensor",
    reference=weighted_combine_reference,
    fake=_combine_fake,
    cuda=_combine_cuda if triton is not None else None,
    traceable=_combine_traceable if triton is not None else None,
)


def weighted_combine(
    y: torch.Tensor, pos: torch.Tensor, weights: torch.Tensor, y_low: torch.Tensor | None = None
) -> torch.Tensor:
    """`weighted_combine_reference`, as one Triton kernel on CUDA. Elsewhere the reference itself, not the
    operator: it stays differentiable under torch.compile too."""
    if y.device.type != "cuda":
        return weighted_combine_reference(y, pos, weights, y_low)
    return _COMBINE(y, pos, weights, y_low)
