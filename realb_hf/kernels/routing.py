"""The routing bookkeeping of a ReaLB layer in three launches: routing counts with the decision
(`counts_and_flags`), then a stable counting sort of the rows by (precision, expert) (`sort_rows`: keys, group
offsets and where every row goes).

Done with torch ops each step is 5-20 small launches (`torch.sort` alone costs 120-180 µs of host time), and the
host time to issue them exceeded the layer's GPU work: on H200 (2026-11-28) an isolated fp8 call at 8k tokens
issued its launches in 1.6 ms for ~1.1 ms of GPU work, 0.6 ms of it this bookkeeping; these kernels issue it in
~0.2 ms (docs/benchmarks.md). Steps
that need every block's counts (the decision, group offsets, per-block starts) run in the last block to finish
(an atomic counter), not in a launch of their own. On CUDA these are Triton kernels; elsewhere (and as the
reference the GPU tests and the interpreter test compare against) the same steps in torch ops. Every function is
exact integer or float64 arithmetic: both paths give identical results.
"""

from __future__ import annotations

from typing import NamedTuple

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
        done_ptr,
        prm_ptr,
        flags_ptr,
        rows,
        E,
        EP,
        PER,
        TOP_K: tl.constexpr,
        HAS_MOD: tl.constexpr,
        TEXT_CODE: tl.constexpr,
        BINS: tl.constexpr,
        DECIDE: tl.constexpr,
        EP_BLOCK: tl.constexpr,
        PER_BLOCK: tl.constexpr,
        EXPERT: tl.constexpr,
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
        if DECIDE:  # the last block to finish sees every count (acquire) and makes the decision
            tl.debug_barrier()
            if tl.atomic_add(done_ptr, 1) == tl.num_programs(0) - 1:
                _decide(out_ptr, prm_ptr, flags_ptr, E, EP, PER, EP_BLOCK, PER_BLOCK, EXPERT)

    @triton.jit
    def _decide(
        counts_ptr,
        prm_ptr,
        out_ptr,
        E,
        EP,
        PER,
        EP_BLOCK: tl.constexpr,
        PER_BLOCK: tl.constexpr,
        EXPERT: tl.constexpr,
    ):
        """`policy.lowered_experts_on_device` for `counts (2, E)` -> `out (E,)` int8, in one program (launched on
        its own, or called by `_counts_kernel`'s last block)."""
        r = tl.arange(0, EP_BLOCK)[:, None]
        j = tl.arange(0, PER_BLOCK)[None, :]
        m = (r < EP) & (j < PER)
        idx = r * PER + j
        # .cg: read through L2, where other programs' atomics landed (see _counts_kernel)
        pairs = tl.load(counts_ptr + idx, mask=m, other=0, cache_modifier=".cg").to(tl.int64)
        vision_pairs = tl.load(counts_ptr + E + idx, mask=m, other=0, cache_modifier=".cg").to(tl.int64)
        tokens = tl.sum(pairs, axis=1).to(tl.float64)
        vision = tl.sum(vision_pairs, axis=1).to(tl.float64)
        hot_scale = tl.load(prm_ptr)
        modality_threshold = tl.load(prm_ptr + 1)
        cost_ratio = tl.load(prm_ptr + 2)
        saving = tl.load(prm_ptr + 3)
        mean = tl.sum(tokens, axis=0) / EP
        hot = tokens > mean * hot_scale
        if EXPERT:
            # policy._lowered_experts_of_hot_ranks: candidates sorted by pairs (descending, then expert id) through
            # one sort key that also carries the expert's column, so the flags go back to their experts.
            target = tl.max(tl.where(hot, 0.0, tokens), axis=0)
            share = pairs.to(tl.float64)
            share = vision_pairs.to(tl.float64) / tl.where(pairs > 0, share, 1.0)  # f64: IEEE division
            candidate = hot[:, None] & (pairs > 0) & (share >= modality_threshold)
            column = PER_BLOCK - 1 - j
            key = tl.where(candidate, pairs * PER_BLOCK + column, column - PER_BLOCK)
            key = tl.sort(key, dim=1, descending=True)
            taken = tl.where(key >= 0, key // PER_BLOCK, 0)
            before = (tl.cumsum(taken, axis=1) - taken).to(tl.float64)
            lower = (key >= 0) & (tokens[:, None] - saving * before > target)
            col = PER_BLOCK - 1 - (key & (PER_BLOCK - 1))
            tl.store(out_ptr + r * PER + col, lower.to(tl.int8), mask=(r < EP) & (col < PER))
        else:
            share = tl.where(tokens > 0, vision / tl.where(tokens > 0, tokens, 1.0), 0.0)  # f64: IEEE division
            eligible = hot & (share >= modality_threshold)
            floor = tl.max(tl.where(eligible, tokens * cost_ratio, tokens), axis=0)
            lowered = eligible & (tokens > floor)
            flags = (lowered[:, None] & (j >= 0)).to(tl.int8)
            tl.store(out_ptr + idx, flags, mask=m)

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
        # finite check of the tokens these rows belong to (rows of a token holding inf/NaN run in high precision)
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
            bad += tl.sum(((x - x) != 0).to(tl.int32), axis=1)  # inf - inf and NaN - NaN are NaN
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


def inverse_permutation(perm: torch.Tensor) -> torch.Tensor:
    """`position` with `position[perm[i]] = i`: where each original row went (one small scatter, no sort)."""
    position = torch.empty_like(perm)
    position[perm] = torch.arange(perm.numel(), device=perm.device, dtype=perm.dtype)
    return position


def take_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """`x[index]` for a 2-D `x`, copying whole rows: rows of 1- or 2-byte elements are moved as 4-byte words
    (an element-wise gather of bytes runs far below memory bandwidth)."""
    itemsize = x.element_size()
    if (
        itemsize < 4
        and x.dim() == 2
        and x.stride(-1) == 1
        and (x.size(-1) * itemsize) % 4 == 0
        and (x.stride(0) * itemsize) % 4 == 0
        and (x.storage_offset() * itemsize) % 4 == 0
    ):
        return x.view(torch.int32).index_select(0, index).view(x.dtype)
    return x.index_select(0, index)


def histogram(values: torch.Tensor, bins: int) -> torch.Tensor:
    """Counts of the integers 0..bins-1 in `values` (int64), with no host sync.

    `torch.histc` as transformers' grouped_mm path uses it (shared-memory histogram; CUDA bincount reads the
    input's max back to the host, and scatter_add contends on a few hot bins). Deterministic algorithms need
    int input on CUDA and float input on CPU. histc maps values to bins in float32, which is exact for the few
    hundred to few thousand bins used here but not for millions (`routing_counts_many` scatter-adds).
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
        return _counts_triton(ids, top_k, modality, num_experts)[0]
    bins = torch.where(ids < num_experts, ids, num_experts)  # sentinels land in a spare bin
    if modality is not None:
        bins = bins + (num_experts + 1) * (modality != TEXT).repeat_interleave(top_k)
    counts = histogram(bins, 2 * (num_experts + 1)).view(2, num_experts + 1)[:, :num_experts]
    return torch.stack([counts[0] + counts[1], counts[1]])


def routing_counts_many(
    indices: list[torch.Tensor], modalities: list[torch.Tensor | None], num_experts: int
) -> torch.Tensor:
    """`routing_counts` of many layer calls at once, `(N, 2, num_experts)`: a handful of launches whatever N (one
    concatenation, one segment map, one scatter-add) and no host sync, so deferred telemetry costs little.
    All indices share `num_experts`, top-k and device."""
    top_k = indices[0].shape[-1]
    device = indices[0].device
    n = len(indices)
    width = 2 * (num_experts + 1)  # per call: [pairs by expert, spare bin for sentinels, vision pairs, spare]
    ids = torch.cat(indices).view(-1).clamp(max=num_experts).int()  # sentinels -> the spare bin
    tokens = [i.shape[0] for i in indices]
    if len(set(tokens)) == 1:  # decode steps: every call the same size, so each call's bins are one row
        bins = ids.view(n, tokens[0] * top_k).add_(torch.arange(0, n * width, width, device=device, dtype=torch.int32)[:, None])
    else:
        lengths = torch.tensor(tokens) * top_k
        if device.type == "cuda":  # a pinned source makes the copy asynchronous (no host sync)
            lengths = lengths.pin_memory()
        segment = torch.repeat_interleave(
            torch.arange(n, device=device, dtype=torch.int32), lengths.to(device, non_blocking=True),
            output_size=ids.numel(),
        )
        bins = ids.add_(segment * width)
    bins = bins.reshape(-1)
    if any(m is not None for m in modalities):
        text = torch.full((max(tokens),), TEXT, dtype=torch.int8, device=device)
        mods = torch.cat([(m if m is not None else text[:t]).to(torch.int8) for m, t in zip(modalities, tokens)])
        bins = bins.add_((mods != TEXT).int().repeat_interleave(top_k) * (num_experts + 1))
    # scatter-add, not `histogram` (histc bins through float32: not exact for millions of bins) nor bincount
    # (on CUDA it reads the input's max back to the host)
    counts = torch.zeros(n * width, dtype=torch.int64, device=device)
    counts.index_add_(0, bins, torch.ones(1, dtype=torch.int64, device=device).expand(bins.numel()))
    counts = counts.view(n, 2, num_experts + 1)[:, :, :num_experts]
    return torch.stack([counts[:, 0] + counts[:, 1], counts[:, 1]], dim=1)


def counts_and_flags(
    top_k_index: torch.Tensor, modality: torch.Tensor | None, num_experts: int, params
) -> tuple[torch.Tensor, torch.Tensor]:
    """`routing_counts` and the `lowered_flags` decided from them; on CUDA one launch for both (the last block
    of the counting decides), no host sync."""
    from ..policy import decides_on_device, expert_ranges

    num_tokens = top_k_index.shape[0]
    ids = top_k_index.reshape(-1)
    if not (_on_gpu(ids) and decides_on_device(params) and num_tokens >= params.batch_threshold and ids.numel()):
        counts = routing_counts(top_k_index, modality, num_experts)
        return counts, lowered_flags(counts, num_tokens, params)
    expert_ranges(num_experts, params.ep_size)  # validates ep_size
    return _counts_triton(ids, top_k_index.shape[-1], modality, num_experts, params)


def _counts_triton(
    ids: torch.Tensor, top_k: int, modality: torch.Tensor | None, num_experts: int, params=None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    scratch = torch.zeros(2 * num_experts + 1, dtype=torch.int32, device=ids.device)  # counts, blocks done
    out = scratch[: 2 * num_experts]
    flags = torch.empty(num_experts, dtype=torch.int8, device=ids.device) if params is not None else None
    if ids.numel():
        decide = params is not None
        ep = params.ep_size if decide else 1
        per = num_experts // ep
        _counts_kernel[_grid(ids.numel())](
            ids,
            modality if modality is not None else ids,
            out,
            scratch[2 * num_experts :],
            _decision_params(params, ids.device) if decide else out,
            flags if decide else out,
            ids.numel(),
            num_experts,
            ep,
            per,
            TOP_K=top_k,
            HAS_MOD=modality is not None,
            TEXT_CODE=TEXT,
            BINS=triton.next_power_of_2(num_experts + 1),
            DECIDE=decide,
            EP_BLOCK=triton.next_power_of_2(ep),
            PER_BLOCK=triton.next_power_of_2(per),
            EXPERT=decide and params.granularity == "expert",
            enable_fp_fusion=False,  # the decision's `tokens - saving * before` rounds twice, as in Python
        )
    return out.view(2, num_experts), flags.view(torch.bool) if flags is not None else None


def lowered_flags(counts: torch.Tensor, num_tokens: int, params) -> torch.Tensor:
    """`policy.lowered_experts_on_device`, in one launch on CUDA: `counts (2, E)` -> `(E,)` bool."""
    from ..policy import decides_on_device, expert_ranges, lowered_experts_on_device

    num_experts = counts.shape[-1]
    if not _on_gpu(counts) or not decides_on_device(params) or num_tokens < params.batch_threshold:
        return lowered_experts_on_device(counts, num_tokens, params)
    expert_ranges(num_experts, params.ep_size)  # validates ep_size
    prm = _decision_params(params, counts.device)
    out = torch.empty(num_experts, dtype=torch.int8, device=counts.device)
    per = num_experts // params.ep_size
    _decide[(1,)](
        counts.contiguous(),
        prm,
        out,
        num_experts,
        params.ep_size,
        per,
        EP_BLOCK=triton.next_power_of_2(params.ep_size),
        PER_BLOCK=triton.next_power_of_2(per),
        EXPERT=params.granularity == "expert",
        enable_fp_fusion=False,  # `tokens - saving * before` rounds twice, as in Python, not as one FMA
    )
    return out.view(torch.bool)


_PARAMS: dict[tuple, torch.Tensor] = {}


def _decision_params(params, device: torch.device) -> torch.Tensor:
    """(1 + imbalance_threshold, modality_threshold, cost ratio, 1 - cost ratio) as float64 on `device`, cached
    (the Python doubles `decide` uses, bit for bit)."""
    ratio = params.cost_ratio
    key = (1.0 + params.imbalance_threshold, params.modality_threshold, ratio, 1.0 - ratio, str(device))
    if key not in _PARAMS:
        from ..experts import _host_to_device

        if len(_PARAMS) >= 64:
            _PARAMS.clear()
        _PARAMS[key] = _host_to_device(list(key[:4]), torch.float64, device)
    return _PARAMS[key]


class SortedRows(NamedTuple):
    """Every (token, slot) row sorted by `code * E + expert`, code 0 high precision, 1 low, 2 another EP rank's
    expert (rows of tokens holding inf/NaN run high). Stable: rows of one key keep their order."""

    rows: torch.Tensor  # (R,) token of each sorted row: high rows, then low rows, then other ranks'
    position: torch.Tensor  # (R,) per (token, slot): high rows 0..n_high-1, low rows R + 0..n_low-1, else -1
    offs: torch.Tensor  # (2, E) int32 cumulative row ends per expert, of the high and of the low group
    totals: torch.Tensor  # (2,) int32 n_high, n_low


def sort_rows(
    top_k_index: torch.Tensor, low_experts: torch.Tensor, hidden: torch.Tensor, num_experts: int
) -> SortedRows:
    """The bookkeeping of a mixed-precision experts forward, on the device: `low_experts (E,)` bool says which
    experts run low. On CUDA two launches (a counting sort: keys and counts, then places), no host sync."""
    ids = top_k_index.reshape(-1)
    top_k = top_k_index.shape[-1]
    num_rows = ids.numel()
    if not _on_gpu(ids):
        finite = torch.isfinite(hidden).all(dim=-1).repeat_interleave(top_k)
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
        return SortedRows(perm // top_k, position, ends.int(), totals.int())
    return _sort_rows_triton(ids, top_k, low_experts, hidden, num_experts)


def _sort_rows_triton(
    ids: torch.Tensor,
    top_k: int,
    low_experts: torch.Tensor,
    hidden: torch.Tensor,
    num_experts: int,
    block_tile: int = 64,
) -> SortedRows:
    """`sort_rows` on CUDA (or in Triton's interpreter); `block_tile`: blocks scanned per step by the last block."""
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
