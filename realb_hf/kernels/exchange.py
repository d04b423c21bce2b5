"""What one rank contributes to all-to-all EP's count exchange, built in one launch.

`exchange_counts` gives the vector every rank all-gathers, `[pairs per expert (E), vision pairs per expert (E),
rows, unfit]`: the routing counts the decision and the split sizes need, this rank's row count, and whether any of
its rows does not fit fp8 (inf/NaN or beyond `LOW_PRECISION_LIMIT`, see `kernels.sort`), which keeps the whole
exchange in the model dtype. transformers' all-to-all builds its count vector with a zero fill and a scatter-add;
this one costs a zero fill and one Triton launch on CUDA, whatever it carries, so the modality counts and the
finite check add no launch, no collective and no host sync to the layer.
"""

from __future__ import annotations

import torch

from .counts import routing_counts
from .library import define_op
from .sort import LOW_PRECISION_LIMIT, rows_fit_low_precision

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None
    tl = None

_BLOCK = 1024  # routed pairs counted per program
_CHECK_ROWS = 16  # rows of the hidden states checked per program

if triton is not None:
    from .counts import count_block

    _LIMIT = tl.constexpr(LOW_PRECISION_LIMIT)

    @triton.jit(do_not_specialize=["pairs", "tokens", "count_blocks"])
    def _exchange_kernel(
        ids_ptr,
        mod_ptr,
        hidden_ptr,
        out_ptr,
        pairs,
        tokens,
        count_blocks,
        E,
        H,
        h_stride,
        TOP_K: tl.constexpr,
        HAS_MOD: tl.constexpr,
        TEXT_CODE: tl.constexpr,
        BINS: tl.constexpr,
        CHECK: tl.constexpr,
        ROWS: tl.constexpr,
        H_CHUNK: tl.constexpr,
    ):
        pid = tl.program_id(0)
        if pid < count_blocks:
            count_block(ids_ptr, mod_ptr, out_ptr, pid, pairs, E, TOP_K, HAS_MOD, TEXT_CODE, BINS)
        if pid == 0:
            tl.store(out_ptr + 2 * E, tokens.to(tl.int32))
        if CHECK:
            r = pid.to(tl.int64) * ROWS + tl.arange(0, ROWS)
            rm = r < tokens
            bad = tl.zeros([ROWS], dtype=tl.int32)
            for c in tl.range(0, H, H_CHUNK):
                cols = c + tl.arange(0, H_CHUNK)
                x = tl.load(
                    hidden_ptr + r[:, None] * h_stride + cols[None, :], mask=rm[:, None] & (cols < H)[None, :], other=0.0
                ).to(tl.float32)
                bad += tl.sum((~(tl.abs(x) <= _LIMIT)).to(tl.int32), axis=1)  # NaN compares false, inf exceeds
            tl.atomic_max(out_ptr + 2 * E + 1, (tl.max(bad, axis=0) > 0).to(tl.int32))


def _exchange_reference(top_k_index, modality, hidden, num_experts, text_code, check_finite):
    counts = routing_counts(top_k_index, modality, num_experts, text_code).reshape(-1)
    rows = torch.full((1,), top_k_index.shape[0], dtype=counts.dtype, device=counts.device)
    if check_finite:
        unfit = (~rows_fit_low_precision(hidden)).any().reshape(1).to(counts.dtype)
    else:
        unfit = torch.zeros(1, dtype=counts.dtype, device=counts.device)
    return torch.cat([counts, rows, unfit])


def _exchange_fake(top_k_index, modality, hidden, num_experts, text_code, check_finite):
    dtype = torch.int32 if triton is not None and top_k_index.device.type == "cuda" else torch.int64
    return top_k_index.new_empty((2 * num_experts + 2,), dtype=dtype)


def exchange_counts_triton(
    top_k_index: torch.Tensor,
    modality: torch.Tensor | None,
    hidden: torch.Tensor,
    num_experts: int,
    text_code: int,
    check_finite: bool,
) -> torch.Tensor:
    """`exchange_counts` in one Triton launch after the zero fill (on CUDA, or in Triton's interpreter), int32."""
    ids = top_k_index.reshape(-1)
    out = torch.zeros(2 * num_experts + 2, dtype=torch.int32, device=ids.device)
    tokens = top_k_index.shape[0]
    count_blocks = triton.cdiv(ids.numel(), _BLOCK)
    blocks = max(count_blocks, triton.cdiv(tokens, _CHECK_ROWS) if check_finite else 0)
    if blocks:
        flat = hidden.reshape(tokens, -1)
        if flat.stride(-1) != 1:
            flat = flat.contiguous()
        _exchange_kernel[(blocks,)](
            ids, modality if modality is not None else ids, flat, out,
            ids.numel(), tokens, count_blocks, num_experts, flat.shape[1], flat.stride(0),
            TOP_K=top_k_index.shape[-1], HAS_MOD=modality is not None, TEXT_CODE=text_code,
            BINS=triton.next_power_of_2(num_experts + 1), CHECK=check_finite, ROWS=_CHECK_ROWS,
            H_CHUNK=min(1024, triton.next_power_of_2(max(flat.shape[1], 16))),
        )  # fmt: skip
    return out


_EXCHANGE = define_op(
    "exchange_counts",
    "(Tensor top_k_index, Tensor? modality, Tensor hidden, int num_experts, int text_code, bool check_finite) -> Tensor",
    reference=_exchange_reference,
    fake=_exchange_fake,
    cuda=exchange_counts_triton if triton is not None else None,
)


def exchange_counts(
    top_k_index: torch.Tensor,
    modality: torch.Tensor | None,
    hidden: torch.Tensor,
    num_experts: int,
    text_code: int,
    check_finite: bool,
) -> torch.Tensor:
    """`(2E + 2,)` on the routing's device, no host sync: pairs per expert (global ids; ids >= E, EP sentinels,
    are not counted), of those the pairs of rows whose `modality` code is not `text_code`, the number of rows,
    and 1 when `check_finite` and a row of `hidden (T, H)` does not fit fp8 (0 otherwise). int32 from the
    Triton kernel, int64 from the reference."""
    return _EXCHANGE(top_k_index, modality, hidden, num_experts, text_code, check_finite)
