"""A stable counting sort of a layer's (token, slot) rows by (precision group, expert), on the device.

The experts' GEMMs want their rows grouped by precision and then by expert, and the combine wants to know where
every (token, slot) went. `sort_rows` produces both, with the group offsets and sizes the GEMMs take, without
a host sync: on CUDA in two launches (keys and per-block counts, then places). Steps that need every block's
counts (group offsets, per-block starts) run in the last block to finish (an atomic counter), not in a launch
of their own. Elsewhere, and as the reference the GPU tests and the interpreter test compare against, the same
result from torch ops; both are exact integer arithmetic.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .counts import histogram
from .library import define_op

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None
    tl = None

_BLOCK = 1024  # rows per program
# Rows whose magnitude exceeds this run in high precision, like rows holding inf/NaN: fp8 GEMM epilogues multiply
# the accumulator by the activation scale before the weight scale, and for activation scales near 1e30 that
# product overflows fp32 even where the output (the product with both scales) is finite in bf16.
LOW_PRECISION_LIMIT = 2.0**100


def rows_fit_low_precision(hidden: torch.Tensor) -> torch.Tensor:
    """(T,) bool: rows of `hidden (T, H)` whose entries are finite and at most `LOW_PRECISION_LIMIT` in magnitude."""
    return (hidden.abs() <= LOW_PRECISION_LIMIT).all(dim=-1)  # NaN compares false, inf exceeds


if triton is not None:
    _LIMIT = tl.constexpr(LOW_PRECISION_LIMIT)

    @triton.jit(do_not_specialize=["rows", "tokens", "NB"])
    def _keys_kernel(
        ids_ptr,
        flags_ptr,
        hidden_ptr,
        keys_ptr,
        table_ptr,
        counts_ptr,
        done_ptr,
        start_ptr,
        base_ptr,
        offs_ptr,
        totals_ptr,
        rows,
        tokens,
        H,
        h_stride,
        E,
        NB,
        TOP_K: tl.constexpr,
        BINS: tl.constexpr,
        TOK_BLOCK: tl.constexpr,
        H_CHUNK: tl.constexpr,
        BB: tl.constexpr,
        KC: tl.constexpr,
    ):
        """Sort key of every row of one block of 1024 rows, and the block's rows per key; the last program to
        finish turns every block's counts into where each (block, key) starts in the sorted order."""
        pid = tl.program_id(0)
        first_row = pid.to(tl.int64) * 1024
        offs = first_row + tl.arange(0, 1024)
        m = offs < rows
        # the tokens these rows belong to must fit low precision (see LOW_PRECISION_LIMIT), else they run high
        t0 = first_row // TOP_K
        tok = t0 + tl.arange(0, TOK_BLOCK)
        tm = (tok < tokens) & (tok <= (first_row + 1023) // TOP_K)
        bad = tl.zeros([TOK_BLOCK], dtype=tl.int32)
        for c in tl.range(0, H, H_CHUNK):
            cols = c + tl.arange(0, H_CHUNK)
            x = tl.load(
                hidden_ptr + tok[:, None] * h_stride + cols[None, :],
                mask=tm[:, None] & (cols < H)[None, :],
                other=0.0,
            ).to(tl.float32)
            bad += tl.sum((~(tl.abs(x) <= _LIMIT)).to(tl.int32), axis=1)  # NaN compares false, inf exceeds
        finite = tl.gather(bad, tl.where(m, offs // TOP_K - t0, 0).to(tl.int32), 0) == 0

        ids = tl.load(ids_ptr + offs, mask=m, other=0).to(tl.int64)
        safe = tl.minimum(ids, E - 1)
        low = tl.load(flags_ptr + safe, mask=m, other=0) != 0
        code = tl.where(ids >= E, 2, tl.where(finite & low, 1, 0)).to(tl.int64)
        key = code * E + safe
        tl.store(keys_ptr + offs, key, mask=m)
        bins = tl.arange(0, BINS)
        hist = tl.histogram(tl.where(m, key, 3 * E).to(tl.int32), BINS)  # padding rows land in bin 3E
        tl.store(table_ptr + pid * BINS + bins, hist)
        tl.atomic_add(counts_ptr + bins, hist, mask=bins < 3 * E)
        tl.debug_barrier()  # every thread's stores precede the release below
        if tl.atomic_add(done_ptr, 1) == NB - 1:  # the last block: all counts are in (acquire)
            counts = tl.atomic_add(counts_ptr + bins, 0, mask=bins < 3 * E)  # read through L2
            counts = tl.where(bins < 3 * E, counts, 0)
            start = tl.cumsum(counts, axis=0) - counts  # first sorted row of each key
            tl.store(start_ptr + bins, start)
            # cumulative row ends of the high and the low group per expert, and both groups' sizes
            n_high = tl.sum(tl.where(bins < E, counts, 0), axis=0)
            n_low = tl.sum(tl.where((bins >= E) & (bins < 2 * E), counts, 0), axis=0)
            ends = tl.where(bins < E, start + counts, start + counts - n_high)
            tl.store(offs_ptr + bins, ends.to(tl.int32), mask=bins < 2 * E)
            tl.store(totals_ptr, n_high.to(tl.int32))
            tl.store(totals_ptr + 1, n_low.to(tl.int32))
            tl.debug_barrier()
            for kc in tl.range(0, BINS, KC):
                keys_c = kc + tl.arange(0, KC)
                carry = tl.load(start_ptr + keys_c)
                for bb in tl.range(0, NB, BB):
                    blocks = bb + tl.arange(0, BB)
                    at = blocks[:, None] * BINS + keys_c[None, :]
                    tile = tl.load(table_ptr + at, mask=(blocks < NB)[:, None], other=0, cache_modifier=".cg")
                    before = tl.cumsum(tile, axis=0) - tile
                    tl.store(base_ptr + at, carry[None, :] + before, mask=(blocks < NB)[:, None])
                    carry += tl.sum(tile, axis=0)

    @triton.jit(do_not_specialize=["rows"])
    def _place_kernel(
        keys_ptr, base_ptr, totals_ptr, pos_ptr, rows_ptr, rows, E, TOP_K: tl.constexpr, BINS: tl.constexpr
    ):
        """Each row's place in the stable sort by key: its (block, key) start plus its rank among the block's rows
        of that key. Writes the token of every sorted row and the sorted place of every (token, slot)."""
        pid = tl.program_id(0)
        first_row = pid.to(tl.int64) * 1024
        local = tl.arange(0, 1024)
        m = first_row + local < rows
        key = tl.load(keys_ptr + first_row + local, mask=m, other=3 * E)
        hist = tl.histogram(key.to(tl.int32), BINS)
        before = tl.cumsum(hist, axis=0) - hist  # rows of this block with a smaller key
        ordered = tl.sort(key * 1024 + local)  # stable: ties keep their row order through `local`
        key_s = ordered // 1024
        slot = first_row + (ordered % 1024)
        rank = tl.arange(0, 1024) - tl.gather(before, key_s.to(tl.int32), 0)
        valid = slot < rows
        place = tl.load(base_ptr + pid * BINS + key_s, mask=valid, other=0) + rank
        code = key_s // E
        n_high = tl.load(totals_ptr).to(tl.int64)
        position = tl.where(code == 0, place, tl.where(code == 1, place - n_high + rows, -1))
        tl.store(pos_ptr + slot, position, mask=valid)
        tl.store(rows_ptr + place, slot // TOP_K, mask=valid)


class SortedRows(NamedTuple):
    """Every (token, slot) row sorted by `code * E + expert`, code 0 high precision, 1 low, 2 another EP rank's
    expert (rows of tokens that do not fit low precision, `rows_fit_low_precision`, run high). Stable: rows of one key keep their order."""

    rows: torch.Tensor  # (R,) token of each sorted row: high rows, then low rows, then other ranks'
    position: torch.Tensor  # (R,) per (token, slot): high rows 0..n_high-1, low rows R + 0..n_low-1, else -1
    offs: torch.Tensor  # (2, E) int32 cumulative row ends per expert, of the high and of the low group
    totals: torch.Tensor  # (2,) int32 n_high, n_low


def _sort_reference(
    top_k_index: torch.Tensor, low_experts: torch.Tensor, hidden: torch.Tensor, num_experts: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    ids = top_k_index.reshape(-1)
    top_k = top_k_index.shape[-1]
    num_rows = ids.numel()
    finite = rows_fit_low_precision(hidden).repeat_interleave(top_k)
    code = torch.where(finite, low_experts[ids.clamp(max=num_experts - 1)].long(), 0)
    code = torch.where(ids >= num_experts, 2, code)
    keys = code * num_experts + ids.clamp(max=num_experts - 1)
    keys_sorted, perm = torch.sort(keys, stable=True)
    counts = histogram(keys, 3 * num_experts).view(3, num_experts)
    ends = counts[:2].cumsum(dim=1)
    totals = ends[:, -1]
    code_sorted = keys_sorted // num_experts
    at = torch.arange(num_rows, device=ids.device)
    sorted_position = torch.where(code_sorted == 0, at, torch.where(code_sorted == 1, at - totals[0] + num_rows, -1))
    position = torch.empty_like(perm)
    position[perm] = sorted_position
    return perm // top_k, position, ends.int(), totals.int()


def _sort_fake(top_k_index, low_experts, hidden, num_experts):
    rows = top_k_index.numel()
    return (
        top_k_index.new_empty((rows,), dtype=torch.int64),
        top_k_index.new_empty((rows,), dtype=torch.int64),
        top_k_index.new_empty((2, num_experts), dtype=torch.int32),
        top_k_index.new_empty((2,), dtype=torch.int32),
    )


def _sort_cuda(top_k_index, low_experts, hidden, num_experts):
    return tuple(sort_rows_triton(top_k_index.reshape(-1), top_k_index.shape[-1], low_experts, hidden, num_experts))


_SORT = define_op(
    "sort_rows",
    "(Tensor top_k_index, Tensor low_experts, Tensor hidden, int num_experts) -> (Tensor, Tensor, Tensor, Tensor)",
    reference=_sort_reference,
    fake=_sort_fake,
    cuda=_sort_cuda if triton is not None else None,
)


def sort_rows(
    top_k_index: torch.Tensor, low_experts: torch.Tensor, hidden: torch.Tensor, num_experts: int
) -> SortedRows:
    """The bookkeeping of a mixed-precision experts forward, on the device: `low_experts (E,)` bool says which
    experts run low. On CUDA two launches (a counting sort: keys and counts, then places), no host sync."""
    return SortedRows(*_SORT(top_k_index, low_experts, hidden, num_experts))


def sort_rows_triton(
    ids: torch.Tensor,
    top_k: int,
    low_experts: torch.Tensor,
    hidden: torch.Tensor,
    num_experts: int,
    block_tile: int = 64,
) -> SortedRows:
    """`sort_rows` of the flat `ids` (`top_k` per token) on CUDA (or in Triton's interpreter); `block_tile`: blocks
    scanned per step by the last block."""
    num_rows = ids.numel()
    device = ids.device
    bins = triton.next_power_of_2(3 * num_experts + 1)
    blocks = max(1, triton.cdiv(num_rows, _BLOCK))
    scratch = torch.zeros(bins + 1, dtype=torch.int32, device=device)  # counts per key, blocks done
    table = torch.empty(blocks, bins, dtype=torch.int32, device=device)
    base = torch.empty(blocks, bins, dtype=torch.int32, device=device)
    start = torch.empty(bins, dtype=torch.int32, device=device)
    offs = torch.zeros(2, num_experts, dtype=torch.int32, device=device)
    totals = torch.zeros(2, dtype=torch.int32, device=device)
    keys = torch.empty(num_rows, dtype=torch.int64, device=device)
    rows = torch.empty(num_rows, dtype=torch.int64, device=device)
    position = torch.empty(num_rows, dtype=torch.int64, device=device)
    if num_rows:
        flat = hidden.reshape(-1, hidden.shape[-1])
        if flat.stride(-1) != 1:
            flat = flat.contiguous()
        tok_block = triton.next_power_of_2(_BLOCK // top_k + 2)  # tokens whose rows meet one block of rows
        _keys_kernel[(blocks,)](
            ids, low_experts, flat, keys, table, scratch, scratch[bins:], start, base, offs, totals,
            num_rows, flat.shape[0], flat.shape[1], flat.stride(0), num_experts, blocks,
            TOP_K=top_k, BINS=bins, TOK_BLOCK=tok_block, H_CHUNK=max(16, 8192 // tok_block),
            BB=min(block_tile, triton.next_power_of_2(blocks)), KC=min(bins, 64), num_warps=8,
        )
        _place_kernel[(blocks,)](keys, base, totals, position, rows, num_rows, num_experts, TOP_K=top_k, BINS=bins)
    return SortedRows(rows, position, offs, totals)
