"""The reference executor: any mix of formats, group sizes read on the host.

Rows are sorted by (format, expert) and every format runs its rows as one grouped GEMM; group sizes come back to
the host (one sync) to slice the groups and convert only the experts that have rows. Every format runs here, FP4
emulation included, so this is the numerical reference the device path is held bit-equal to on CPU.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..formats import get_format
from ..kernels import counts as count_kernels
from ..kernels import rows as row_kernels
from ..kernels.combine import weighted_combine
from ..kernels.sort import rows_fit_low_precision
from .mlp import group_mlp
from .plan import on_device
from .weights import Prefetch, weights_for


@torch.compiler.disable  # reads group sizes on the host: compiled code runs this executor eagerly
def run(
    module: torch.nn.Module,
    hidden: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    precisions: Sequence[str],
    high: str,
    ready: Prefetch | None = None,
) -> torch.Tensor:
    """`module`'s experts with local expert e in `precisions[e]`. Ids >= num_experts are other EP ranks' experts
    (they contribute nothing); rows of tokens that do not fit low precision (inf/NaN, or beyond
    `kernels.sort.LOW_PRECISION_LIMIT`) run in `high`."""
    device = hidden.device
    num_tokens, top_k = top_k_index.shape
    num_experts = module.num_experts
    formats = [high, *sorted(set(precisions) - {high})]  # code 0 is always high precision
    code_of = {f: i for i, f in enumerate(formats)}
    expert_code = on_device(tuple(code_of[p] for p in precisions), torch.long, device)

    ids = top_k_index.reshape(-1)
    sentinel = ids >= num_experts
    safe_ids = ids.clamp(max=num_experts - 1)
    row_code = expert_code[safe_ids]
    finite = rows_fit_low_precision(hidden).repeat_interleave(top_k)
    row_code = torch.where(finite, row_code, torch.zeros_like(row_code))
    row_code = torch.where(sentinel, torch.full_like(row_code, len(formats)), row_code)

    key_sorted, perm = torch.sort(row_code * num_experts + safe_ids, stable=True)
    rows = perm // top_k  # token of each sorted row: formats gather (and may quantize) in one pass
    ids_sorted = safe_ids[perm]
    # rows per (format, expert); the sentinel block sits after every format's block
    counts = count_kernels.histogram(key_sorted, (len(formats) + 1) * num_experts)
    counts_host = counts[: len(formats) * num_experts].view(len(formats), num_experts).tolist()

    outputs, start = [], 0
    for code, fmt_name in enumerate(formats):
        group = counts_host[code]
        group_rows = sum(group)
        if group_rows == 0:
            continue
        end = start + group_rows
        experts = [e for e in range(num_experts) if group[e]]  # only experts with rows convert
        packed = weights_for(module, fmt_name, experts=experts, ready=ready)
        acts = get_format(fmt_name).gather_activations(hidden, rows[start:end])
        group_ids = ids_sorted[start:end]
        outputs.append(group_mlp(module, acts, packed, packed.offsets(group, device), group_ids, hidden.dtype))
        start = end
    if len(outputs) > 1:
        y = torch.cat(outputs)
    else:
        y = outputs[0] if outputs else hidden.new_empty(0, hidden.shape[-1])
    if module.has_post_expert_norm:
        y = module.post_expert_norm(y)
    # position of every (token, slot) among the computed rows; -1 for other ranks' experts
    position = row_kernels.inverse_permutation(perm)
    position = torch.where(position < start, position, -1)
    out = weighted_combine(
        y.to(hidden.dtype), position.view(num_tokens, top_k), top_k_weights.reshape(num_tokens, top_k)
    )
    return out.to(hidden.dtype)
