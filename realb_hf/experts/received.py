"""The executor for rows that arrive already quantized: EP all-to-all sends fp8 rows (rowwise e4m3 + one fp32 scale
per row) to ranks lowered to fp8, and they run this rank's experts in fp8 without being quantized again.

Each row holds one (token, expert) pair of top-1 with unit weight: the routing weights apply on the sender.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..kernels import counts as count_kernels
from ..kernels import rows as row_kernels
from .mlp import group_mlp
from .weights import Prefetch, weights_for

FORMAT = "fp8"


def run(
    module: torch.nn.Module,
    xq: torch.Tensor,
    x_scale: torch.Tensor,
    expert_ids: torch.Tensor,
    out_dtype: torch.dtype,
    ready: Prefetch | None = None,
    rows_per_expert: Sequence[int] | None = None,
) -> torch.Tensor:
    """(R, H) expert outputs in `out_dtype` for rows `xq` (e4m3 data, or its bytes as received) of local experts
    `expert_ids` (R,). `rows_per_expert` (host ints, when the caller knows them) saves a host sync."""
    hidden_dim = module.down_proj.shape[-1] if module.is_transposed else module.down_proj.shape[1]
    if xq.shape[0] == 0:
        return torch.zeros(0, hidden_dim, dtype=out_dtype, device=xq.device)
    ids_sorted, perm = torch.sort(expert_ids, stable=True)
    if rows_per_expert is None:
        rows_per_expert = count_kernels.histogram(ids_sorted, module.num_experts).tolist()
    experts = [e for e, c in enumerate(rows_per_expert) if c]
    packed = weights_for(module, FORMAT, experts=experts, ready=ready)
    xq_sorted = row_kernels.take_rows(xq, perm)  # gathered as bytes when received as bytes
    if xq_sorted.dtype == torch.uint8:
        xq_sorted = xq_sorted.view(torch.float8_e4m3fn)
    offs = packed.offsets(rows_per_expert, xq.device)
    y = group_mlp(module, (xq_sorted, x_scale[perm]), packed, offs, ids_sorted, out_dtype)
    if module.has_post_expert_norm:
        y = module.post_expert_norm(y)
    return row_kernels.take_rows(y, row_kernels.inverse_permutation(perm))  # a row gather, not a scatter
