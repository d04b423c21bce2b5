"""The routing bookkeeping of a ReaLB layer as a handful of kernels: counts, the rank decision, row keys,
group offsets and slot positions.

Done with torch ops each of these is 5-20 small launches, and the host time to issue them exceeded the layer's
GPU work: on H200 (2026-11-28, `python -m realb_hf.bench.hot_rank --graphs`, the device-decided layer with
nothing lowered at 256 tokens) an isolated call took 2.7 ms against 0.34 ms of GPU time (CUDA-graph replay)
with the torch-op version. On CUDA each step here is one
Triton launch; elsewhere (and as the reference the GPU tests compare against) the same step in torch ops.
Every function is exact integer or float64 arithmetic: both paths give identical results.
"""

from __future__ import annotations

import torch

from ..modality import TEXT

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None
    tl = None

_BLOCK = 1024

if triton is not None:

    @triton.jit
    def _counts_kernel(
        ids_ptr,
        mod_ptr,
        out_ptr,
        rows,
        E,
        TOP_K: tl.constexpr,
        HAS_MOD: tl.constexpr,
        TEXT_CODE: tl.constexpr,
        BINS: tl.constexpr,
    ):
        # A block histogram, then one atomic per bin: rows sorted by expert (what an EP rank receives) would
        # otherwise send a whole block's atomics to one address.
        offs = tl.program_id(0).to(tl.int64) * 1024 + tl.arange(0, 1024)
        m = offs < rows
        ids = tl.load(ids_ptr + offs, mask=m, other=0).to(tl.int64)
        valid = m & (ids < E)
        bins = tl.arange(0, BINS)
        tl.atomic_add(out_ptr + bins, tl.histogram(tl.where(valid, ids, E).to(tl.int32), BINS), mask=bins < E)
        if HAS_MOD:
            vision = tl.load(mod_ptr + offs // TOP_K, mask=m, other=TEXT_CODE) != TEXT_CODE
            hist = tl.histogram(tl.where(valid & vision, ids, E).to(tl.int32), BINS)
            tl.atomic_add(out_ptr + E + bins, hist, mask=bins < E)

    @triton.jit
    def _rank_decision_kernel(
        counts_ptr, prm_ptr, out_ptr, E, EP, PER, EP_BLOCK: tl.constexpr, PER_BLOCK: tl.constexpr
    ):
        r = tl.arange(0, EP_BLOCK)[:, None]
        j = tl.arange(0, PER_BLOCK)[None, :]
        m = (r < EP) & (j < PER)
        idx = r * PER + j
        tokens = tl.sum(tl.load(counts_ptr + idx, mask=m, other=0).to(tl.float64), axis=1)
        vision = tl.sum(tl.load(counts_ptr + E + idx, mask=m, other=0).to(tl.float64), axis=1)
        hot_scale = tl.load(prm_ptr)
        modality_threshold = tl.load(prm_ptr + 1)
        cost_ratio = tl.load(prm_ptr + 2)
        mean = tl.sum(tokens, axis=0) / EP
        hot = tokens > mean * hot_scale
        share = tl.where(tokens > 0, vision / tl.where(tokens > 0, tokens, 1.0), 0.0)  # f64: IEEE division
        eligible = hot & (share >= modality_threshold)
        floor = tl.max(tl.where(eligible, tokens * cost_ratio, tokens), axis=0)
        lowered = eligible & (tokens > floor)
        flags = (lowered[:, None] & (j >= 0)).to(tl.int8)
        tl.store(out_ptr + idx, flags, mask=m)

    @triton.jit
    def _row_keys_kernel(
        ids_ptr, flags_ptr, finite_ptr, key_ptr, counts_ptr, rows, E, TOP_K: tl.constexpr, BINS: tl.constexpr
    ):
        offs = tl.program_id(0).to(tl.int64) * 1024 + tl.arange(0, 1024)
        m = offs < rows
        ids = tl.load(ids_ptr + offs, mask=m, other=0).to(tl.int64)
        safe = tl.minimum(ids, E - 1)
        low = tl.load(flags_ptr + safe, mask=m, other=0) != 0
        finite = tl.load(finite_ptr + offs // TOP_K, mask=m, other=1) != 0
        code = tl.where(ids >= E, 2, tl.where(finite & low, 1, 0)).to(tl.int64)
        key = code * E + safe
        tl.store(key_ptr + offs, key, mask=m)
        bins = tl.arange(0, BINS)  # block histogram, one atomic per bin (see _counts_kernel)
        tl.atomic_add(counts_ptr + bins, tl.histogram(tl.where(m, key, 3 * E).to(tl.int32), BINS), mask=bins < 3 * E)

    @triton.jit
    def _offsets_kernel(counts_ptr, offs_ptr, n_ptr, E, BLOCK: tl.constexpr):
        j = tl.arange(0, BLOCK)
        m = j < E
        high = tl.load(counts_ptr + j, mask=m, other=0)
        low = tl.load(counts_ptr + E + j, mask=m, other=0)
        tl.store(offs_ptr + j, tl.cumsum(high, axis=0), mask=m)
        tl.store(offs_ptr + E + j, tl.cumsum(low, axis=0), mask=m)
        tl.store(n_ptr, tl.sum(high, axis=0))
        tl.store(n_ptr + 1, tl.sum(low, axis=0))

    @triton.jit
    def _positions_kernel(perm_ptr, keys_ptr, n_ptr, pos_ptr, rows_ptr, rows, E, TOP_K: tl.constexpr):
        i = tl.program_id(0).to(tl.int64) * 1024 + tl.arange(0, 1024)
        m = i < rows
        slot = tl.load(perm_ptr + i, mask=m, other=0)
        code = tl.load(keys_ptr + i, mask=m, other=0) // E
        n_high = tl.load(n_ptr).to(tl.int64)
        position = tl.where(code == 0, i, tl.where(code == 1, i - n_high + rows, -1))
        tl.store(pos_ptr + slot, position, mask=m)
        tl.store(rows_ptr + i, slot // TOP_K, mask=m)


def histogram(values: torch.Tensor, bins: int) -> torch.Tensor:
    """Counts of the integers 0..bins-1 in `values` (int64), with no host sync.

    `torch.histc` as transformers' grouped_mm path uses it (shared-memory histogram; CUDA bincount reads the
    input's max back to the host, and scatter_add contends on a few hot bins). Deterministic algorithms need
    int input on CUDA and float input on CPU.
    """
    data = values.int() if values.device.type == "cuda" else values.float()
    return torch.histc(data, bins=bins, min=0, max=bins - 1).long()


def _on_gpu(t: torch.Tensor) -> bool:
    return triton is not None and t.device.type == "cuda"


def _grid(rows: int) -> tuple[int]:
    return (max(1, triton.cdiv(rows, _BLOCK)),)


def routing_counts(
    top_k_index: torch.Tensor, modality: torch.Tensor | None, num_experts: int
) -> torch.Tensor:
    """(2, num_experts): token-expert pairs per expert, and of those the vision ones (ids >= num_experts, EP
    sentinels, are not counted). No host sync."""
    ids = top_k_index.reshape(-1)
    top_k = top_k_index.shape[-1]
    if _on_gpu(ids):
        out = torch.zeros(2 * num_experts, dtype=torch.int32, device=ids.device)
        if ids.numel():
            mod = modality if modality is not None else ids
            _counts_kernel[_grid(ids.numel())](
                ids,
                mod,
                out,
                ids.numel(),
                num_experts,
                TOP_K=top_k,
                HAS_MOD=modality is not None,
                TEXT_CODE=TEXT,
                BINS=triton.next_power_of_2(num_experts + 1),
            )
        return out.view(2, num_experts)
    bins = torch.where(ids < num_experts, ids, num_experts)  # sentinels land in a spare bin
    if modality is not None:
        bins = bins + (num_experts + 1) * (modality != TEXT).repeat_interleave(top_k)
    counts = histogram(bins, 2 * (num_experts + 1)).view(2, num_experts + 1)[:, :num_experts]
    return torch.stack([counts[0] + counts[1], counts[1]])


def rank_decision(counts: torch.Tensor, num_tokens: int, params) -> torch.Tensor:
    """`policy.lowered_experts_on_device`, in one launch on CUDA: `counts (2, E)` -> `(E,)` bool."""
    from ..policy import decides_on_device, expert_ranges, lowered_experts_on_device

    num_experts = counts.shape[-1]
    if not _on_gpu(counts) or not decides_on_device(params) or num_tokens < params.batch_threshold:
        return lowered_experts_on_device(counts, num_tokens, params)
    expert_ranges(num_experts, params.ep_size)  # validates ep_size
    prm = _decision_params(params, counts.device)
    out = torch.empty(num_experts, dtype=torch.int8, device=counts.device)
    per = num_experts // params.ep_size
    _rank_decision_kernel[(1,)](
        counts.contiguous(),
        prm,
        out,
        num_experts,
        params.ep_size,
        per,
        EP_BLOCK=triton.next_power_of_2(params.ep_size),
        PER_BLOCK=triton.next_power_of_2(per),
    )
    return out.view(torch.bool)


_PARAMS: dict[tuple, torch.Tensor] = {}


def _decision_params(params, device: torch.device) -> torch.Tensor:
    """(1 + imbalance_threshold, modality_threshold, cost ratio) as float64 on `device`, cached (the Python
    doubles `decide` uses, bit for bit)."""
    key = (1.0 + params.imbalance_threshold, params.modality_threshold, params.cost_ratio, str(device))
    if key not in _PARAMS:
        from ..experts import _host_to_device

        _PARAMS[key] = _host_to_device(list(key[:3]), torch.float64, device)
    return _PARAMS[key]


def row_keys(
    top_k_index: torch.Tensor, low_experts: torch.Tensor, finite: torch.Tensor, num_experts: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sort key of every (token, slot) row, `code * E + expert` with code 0 high precision, 1 low, 2 another EP
    rank's expert (rows of non-finite tokens run high), and the rows per key `(3, E)`."""
    ids = top_k_index.reshape(-1)
    top_k = top_k_index.shape[-1]
    if _on_gpu(ids):
        keys = torch.empty_like(ids, dtype=torch.int64)
        counts = torch.zeros(3 * num_experts, dtype=torch.int32, device=ids.device)
        if ids.numel():
            _row_keys_kernel[_grid(ids.numel())](
                ids,
                low_experts,
                finite,
                keys,
                counts,
                ids.numel(),
                num_experts,
                TOP_K=top_k,
                BINS=triton.next_power_of_2(3 * num_experts + 1),
            )
        return keys, counts.view(3, num_experts)
    safe = ids.clamp(max=num_experts - 1)
    code = low_experts[safe].long()
    code = torch.where(finite.repeat_interleave(top_k), code, 0)
    code = torch.where(ids >= num_experts, 2, code)
    keys = code * num_experts + safe
    return keys, histogram(keys, 3 * num_experts).view(3, num_experts)


def group_offsets(counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """From rows per key `(3, E)`: int32 cumulative row ends `(2, E)` of the high and low groups, and their row
    totals `(2,)` (n_high, n_low) on the device."""
    num_experts = counts.shape[-1]
    if _on_gpu(counts):
        offs = torch.empty(2, num_experts, dtype=torch.int32, device=counts.device)
        totals = torch.empty(2, dtype=torch.int32, device=counts.device)
        _offsets_kernel[(1,)](counts, offs, totals, num_experts, BLOCK=triton.next_power_of_2(num_experts))
        return offs, totals
    ends = counts[:2].cumsum(dim=1)
    return ends.int(), ends[:, -1]


def slot_positions(
    perm: torch.Tensor, keys_sorted: torch.Tensor, totals: torch.Tensor, num_experts: int, top_k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(token of each sorted row, position of each (token, slot) among the computed rows): high rows at
    0..n_high-1, low rows at rows + 0..n_low-1 (the combine's joint index), other ranks' experts -1."""
    num_rows = perm.numel()
    if _on_gpu(perm):
        position = torch.empty_like(perm)
        rows = torch.empty_like(perm)
        if num_rows:
            _positions_kernel[_grid(num_rows)](perm, keys_sorted, totals, position, rows, num_rows, num_experts, TOP_K=top_k)
        return rows, position
    code = keys_sorted // num_experts
    at = torch.arange(num_rows, device=perm.device)
    sorted_position = torch.where(code == 0, at, torch.where(code == 1, at - totals[0] + num_rows, -1))
    position = torch.empty_like(perm)
    position[perm] = sorted_position
    return perm // top_k, position
