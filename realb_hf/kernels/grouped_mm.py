"""The rowwise-scaled fp8 grouped GEMM where no fp8 tensor cores run it (CPU, GPUs before sm89), as an operator.

Its loop over expert groups reads the group offsets on the host, which a traced graph cannot do; as one opaque
operator it traces like the sm90 `torch._scaled_grouped_mm` it stands in for.
"""

from __future__ import annotations

import torch

from .library import define_op


def scaled_grouped_mm_reference(
    xq: torch.Tensor,
    x_scale: torch.Tensor,
    w_data: torch.Tensor,
    w_scale: torch.Tensor,
    offs: torch.Tensor,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """`xq (S, K)` e4m3 rows grouped by `offs (E,)`, `w_data (E, N, K)` e4m3, scales `x_scale (S,)` and
    `w_scale (E, N)` -> `(S, N)` in `out_dtype`.

    Exact emulation: per group the fp8 operands cast to fp32 (exact) and multiplied in fp32, then the rowwise scales
    applied, multiplied together first (`acc[m, n] * (x_scale[m] * w_scale[e, n])`: a large activation scale times
    a large accumulator would overflow fp32 before a small weight scale brings it back). It differs from
    `torch._scaled_grouped_mm` (fast accumulation) only by the order of accumulation. Rows past `offs[-1]` stay 0.
    """
    out = torch.zeros(xq.shape[0], w_data.shape[1], dtype=torch.float32, device=xq.device)
    start = 0
    for e, end in enumerate(offs.tolist()):  # one host sync: this runs where no grouped fp8 GEMM exists
        if end > start:
            acc = xq[start:end].float() @ w_data[e].float().T
            out[start:end] = acc * (x_scale[start:end, None] * w_scale[e][None, :])
        start = end
    return out.to(out_dtype)


def _fake(xq, x_scale, w_data, w_scale, offs, out_dtype):
    return xq.new_empty((xq.shape[0], w_data.shape[1]), dtype=out_dtype)


SCALED_GROUPED_MM = define_op(
    "scaled_grouped_mm_reference",
    "(Tensor xq, Tensor x_scale, Tensor w_data, Tensor w_scale, Tensor offs, ScalarType out_dtype) -> Tensor",
    reference=scaled_grouped_mm_reference,
    fake=_fake,
)
