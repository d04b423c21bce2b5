"""Routing counts per expert and the dynamic policy's per-expert decision, on the device with no host sync.

`counts_and_flags` counts the token-expert pairs of every expert (and the vision ones among them) and decides
from those counts which experts run in low precision, in one launch: the decision needs every block's counts,
so the last block to finish (an atomic counter) makes it. On CUDA these are Triton kernels; elsewhere (and as
the reference the GPU tests and the interpreter test compare against) the same steps in torch ops. Both are
exact integer or float64 arithmetic performing the same operations, so they give identical results.

The decision is `lowered_flags_reference` of a `DecisionRule`; whether the policy applies at all (which policy,
the batch threshold) is the caller's to decide.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .library import define_op
from .rows import host_to_device

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None
    tl = None

_BLOCK = 1024  # rows per program of `_counts_kernel`


@dataclass(frozen=True)
class DecisionRule:
    """The numbers the dynamic policy's device decision reads: EP ranks, granularity and thresholds."""

    ep_size: int
    expert_granularity: bool  # lower single experts of a hot rank, not the whole rank
    imbalance_threshold: float
    modality_threshold: float
    cost_ratio: float  # predicted time of a low-precision pair relative to a high-precision one
    conversion_cost: float = 0.0  # pairs' worth of time to convert one lowered expert's weights (0: none per call)


if triton is not None:

    @triton.jit
    def count_block(
        ids_ptr, mod_ptr, out_ptr, block, rows, E,
        TOP_K: tl.constexpr, HAS_MOD: tl.constexpr, TEXT_CODE: tl.constexpr, BINS: tl.constexpr,
    ):  # fmt: skip
        """Add block `block`'s 1024 token-expert pairs to `out[:E]` (pairs per expert) and, with a modality,
        `out[E:2E]` (vision pairs). A block histogram, then one atomic per bin: rows sorted by expert (what an EP rank
        receives) would otherwise send a whole block's atomics to one address. Ids >= E are not counted."""
        offs = block.to(tl.int64) * 1024 + tl.arange(0, 1024)
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
        count_block(ids_ptr, mod_ptr, out_ptr, tl.program_id(0), rows, E, TOP_K, HAS_MOD, TEXT_CODE, BINS)
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
        """`lowered_flags_reference` for `counts (2, E)` -> `out (E,)` int8, in one program (launched on its own,
        or called by `_counts_kernel`'s last block)."""
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
        conversion = tl.load(prm_ptr + 4)
        mean = tl.sum(tokens, axis=0) / EP
        hot = tokens > mean * hot_scale
        if EXPERT:
            # `_lowered_experts_of_hot_ranks`: candidates sorted by pairs (descending, then expert id) through one
            # sort key that also carries the expert's column, so the flags go back to their experts.
            target = tl.max(tl.where(hot, 0.0, tokens), axis=0)
            share = pairs.to(tl.float64)
            share = vision_pairs.to(tl.float64) / tl.where(pairs > 0, share, 1.0)  # f64: IEEE division
            candidate = hot[:, None] & (pairs > 0) & (share >= modality_threshold)
            column = PER_BLOCK - 1 - j
            key = tl.where(candidate, pairs * PER_BLOCK + column, column - PER_BLOCK)
            key = tl.sort(key, dim=1, descending=True)
            taken = tl.where(key >= 0, key // PER_BLOCK, 0)
            before = (tl.cumsum(taken, axis=1) - taken).to(tl.float64)
            cost = tokens[:, None] - saving * before + conversion * j.to(tl.float64)
            worth = (saving * taken.to(tl.float64) > conversion).to(tl.int32) + (conversion == 0.0).to(tl.int32) > 0
            go = (key >= 0) & (cost > target) & worth
            lower = tl.cumsum((~go).to(tl.int32), axis=1) == 0  # a prefix: the host loop stops at the first no
            col = PER_BLOCK - 1 - (key & (PER_BLOCK - 1))
            tl.store(out_ptr + r * PER + col, lower.to(tl.int8), mask=(r < EP) & (col < PER))
        else:
            share = tl.where(tokens > 0, vision / tl.where(tokens > 0, tokens, 1.0), 0.0)  # f64: IEEE division
            eligible = hot & (share >= modality_threshold)
            lowered_cost = tl.minimum(tokens, tokens * cost_ratio + conversion * PER)
            floor = tl.max(tl.where(eligible, lowered_cost, tokens), axis=0)
            lowered = eligible & (tokens > floor)
            flags = (lowered[:, None] & (j >= 0)).to(tl.int8)
            tl.store(out_ptr + idx, flags, mask=m)


def histogram(values: torch.Tensor, bins: int) -> torch.Tensor:
    """Counts of the integers 0..bins-1 in `values` (int64), with no host sync.

    `torch.histc` as transformers' grouped_mm path uses it (shared-memory histogram; CUDA bincount reads the
    input's max back to the host, and scatter_add contends on a few hot bins). Deterministic algorithms need
    int input on CUDA and float input on CPU. histc maps values to bins in float32, which is exact for the few
    hundred to few thousand bins used here but not for millions (`routing_counts_many` scatter-adds).
    """
    data = values.int() if values.device.type == "cuda" else values.float()
    return torch.histc(data, bins=bins, min=0, max=bins - 1).long()


def _check_rule(num_experts: int, rule: DecisionRule) -> None:
    if rule.ep_size < 1 or num_experts % rule.ep_size:
        raise ValueError(
            f"ep_size={rule.ep_size} must be a positive divisor of the number of experts ({num_experts})"
        )


def lowered_flags_reference(counts: torch.Tensor, rule: DecisionRule) -> torch.Tensor:
    """The dynamic policy's decision as tensor ops: `counts (2, E)` (token-expert pairs per expert, vision ones)
    -> `(E,)` bool, True where the expert runs in low precision. No host sync.

    Rank granularity: a rank is hot when its pairs exceed the mean by more than `imbalance_threshold`; hot ranks
    whose vision share reaches `modality_threshold` are eligible, and those still above the slowest rank once
    every eligible one that gains is lowered (`floor`) are lowered. A lowered rank costs its pairs times
    `cost_ratio` plus `conversion_cost` per expert, so a rank whose conversion outweighs its saving never gains.
    Expert granularity: see `_lowered_experts_of_hot_ranks`.
    Exact integer sums and float64, the operations of the host decision, so both decide alike.
    """
    num_experts = counts.shape[-1]
    _check_rule(num_experts, rule)
    per_expert = counts.view(2, rule.ep_size, -1).long()  # (2, ranks, experts of a rank)
    tokens, vision = per_expert.sum(-1).double()  # per rank: pairs, vision pairs
    hot = tokens > tokens.sum() / rule.ep_size * (1.0 + rule.imbalance_threshold)
    if rule.expert_granularity:
        return _lowered_experts_of_hot_ranks(per_expert, tokens, hot, rule).reshape(-1)
    share = torch.where(tokens > 0, vision / tokens.clamp(min=1), torch.zeros_like(tokens))
    eligible = hot & (share >= rule.modality_threshold)
    conversion = rule.conversion_cost * (num_experts // rule.ep_size)
    lowered_cost = torch.minimum(tokens, tokens * rule.cost_ratio + conversion)
    floor = torch.where(eligible, lowered_cost, tokens).max()
    lowered = eligible & (tokens > floor)
    return lowered.repeat_interleave(num_experts // rule.ep_size)


def _lowered_experts_of_hot_ranks(
    per_expert: torch.Tensor, tokens: torch.Tensor, hot: torch.Tensor, rule: DecisionRule
) -> torch.Tensor:
    """Expert granularity, (ranks, experts of a rank) bool: each hot rank lowers its vision-dominated experts one
    at a time, most pairs first, until its predicted time no longer exceeds the busiest rank that is not hot, or
    the next expert's saving no longer exceeds its `conversion_cost` (when there is one). That loop is a prefix of
    each rank's candidates sorted by pairs (descending, stable), cut at the first candidate that fails."""
    pairs, vision = per_expert[0], per_expert[1]
    target = torch.where(hot, torch.zeros_like(tokens), tokens).max()
    share = vision.double() / pairs.double().clamp(min=1)
    candidate = hot[:, None] & (pairs > 0) & (share >= rule.modality_threshold)
    key, order = torch.sort(torch.where(candidate, pairs, -1), dim=1, descending=True, stable=True)
    taken = key.clamp(min=0)
    before = taken.cumsum(1) - taken  # pairs already lowered when each candidate comes up (exact integers)
    saving, conversion = 1.0 - rule.cost_ratio, rule.conversion_cost
    k = torch.arange(key.shape[1], dtype=torch.float64, device=key.device)  # conversions before each candidate
    cost = tokens[:, None] - saving * before.double() + conversion * k
    worth = (saving * key.double() > conversion) | (conversion == 0.0)
    go = (key > 0) & (cost > target) & worth
    lower = go.long().cummin(1).values.bool()  # a prefix: the host loop stops at the first candidate that fails
    return torch.zeros_like(lower).scatter(1, order, lower)


def routing_counts_reference(
    top_k_index: torch.Tensor, modality: torch.Tensor | None, num_experts: int, text_code: int
) -> torch.Tensor:
    """`routing_counts` in torch ops (int64): what the operator runs off CUDA, and what compiled code that only
    records the counts traces, so that inductor fuses it instead of calling the operator."""
    ids = top_k_index.reshape(-1)
    top_k = top_k_index.shape[-1]
    bins = torch.where(ids < num_experts, ids, num_experts)  # sentinels land in a spare bin
    if modality is not None:
        bins = bins + (num_experts + 1) * (modality != text_code).repeat_interleave(top_k)
    counts = histogram(bins, 2 * (num_experts + 1)).view(2, num_experts + 1)[:, :num_experts]
    return torch.stack([counts[0] + counts[1], counts[1]])


def _counts_fake(top_k_index, modality, num_experts, text_code):
    # the Triton kernel counts with int32 atomics; the reference's histogram gives int64
    dtype = torch.int32 if triton is not None and top_k_index.device.type == "cuda" else torch.int64
    return top_k_index.new_empty((2, num_experts), dtype=dtype)


_COUNTS = define_op(
    "routing_counts",
    "(Tensor top_k_index, Tensor? modality, int num_experts, int text_code) -> Tensor",
    reference=routing_counts_reference,
    fake=_counts_fake,
    cuda=(lambda index, modality, experts, text: counts_triton(index, modality, experts, text)[0]) if triton else None,
)


def routing_counts(
    top_k_index: torch.Tensor, modality: torch.Tensor | None, num_experts: int, text_code: int
) -> torch.Tensor:
    """(2, num_experts): token-expert pairs per expert, and of those the ones of tokens whose `modality` code is
    not `text_code` (ids >= num_experts, EP sentinels, are not counted). No host sync. int32 from the Triton
    kernel, int64 from the reference."""
    return _COUNTS(top_k_index, modality, num_experts, text_code)


def routing_counts_many(
    indices: list[torch.Tensor], modalities: list[torch.Tensor | None], num_experts: int, text_code: int
) -> torch.Tensor:
    """`routing_counts` of many layer calls at once, `(N, 2, num_experts)`: a handful of launches whatever N (one
    concatenation, one segment map, one scatter-add) and no host sync, so deferred counting costs little.
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
        lengths = host_to_device([t * top_k for t in tokens], torch.int64, device)
        segment = torch.repeat_interleave(
            torch.arange(n, device=device, dtype=torch.int32), lengths, output_size=ids.numel()
        )
        bins = ids.add_(segment * width)
    bins = bins.reshape(-1)
    if any(m is not None for m in modalities):
        text = torch.full((max(tokens),), text_code, dtype=torch.int8, device=device)
        mods = torch.cat([(m if m is not None else text[:t]).to(torch.int8) for m, t in zip(modalities, tokens)])
        bins = bins.add_((mods != text_code).int().repeat_interleave(top_k) * (num_experts + 1))
    # scatter-add, not `histogram` (histc bins through float32: not exact for millions of bins) nor bincount
    # (on CUDA it reads the input's max back to the host)
    counts = torch.zeros(n * width, dtype=torch.int64, device=device)
    counts.index_add_(0, bins, torch.ones(1, dtype=torch.int64, device=device).expand(bins.numel()))
    counts = counts.view(n, 2, num_experts + 1)[:, :, :num_experts]
    return torch.stack([counts[:, 0] + counts[:, 1], counts[:, 1]], dim=1)


_RULE_SCHEMA = (
    "int ep_size, bool expert_granularity, float imbalance_threshold, float modality_threshold, float cost_ratio, "
    "float conversion_cost=0.0"
)


def _rule_args(rule: DecisionRule) -> tuple:
    """A rule as the operators take it: plain numbers (schemas hold no dataclasses)."""
    return (
        rule.ep_size,
        rule.expert_granularity,
        float(rule.imbalance_threshold),
        float(rule.modality_threshold),
        float(rule.cost_ratio),
        float(rule.conversion_cost),
    )


def _flags_fake(counts, *rule):
    return counts.new_empty((counts.shape[-1],), dtype=torch.bool)


_FLAGS = define_op(
    "lowered_flags",
    f"(Tensor counts, {_RULE_SCHEMA}) -> Tensor",
    reference=lambda counts, *rule: lowered_flags_reference(counts, DecisionRule(*rule)),
    fake=_flags_fake,
    cuda=(lambda counts, *rule: lowered_flags_triton(counts, DecisionRule(*rule))) if triton else None,
)


def lowered_flags(counts: torch.Tensor, rule: DecisionRule) -> torch.Tensor:
    """`lowered_flags_reference`, in one launch on CUDA: `counts (2, E)` -> `(E,)` bool."""
    _check_rule(counts.shape[-1], rule)
    return _FLAGS(counts, *_rule_args(rule))


def _counts_and_flags_reference(top_k_index, modality, num_experts, text_code, *rule):
    counts = routing_counts_reference(top_k_index, modality, num_experts, text_code)
    return counts, lowered_flags_reference(counts, DecisionRule(*rule))


def _counts_and_flags_fake(top_k_index, modality, num_experts, text_code, *rule):
    counts = _counts_fake(top_k_index, modality, num_experts, text_code)
    return counts, top_k_index.new_empty((num_experts,), dtype=torch.bool)


_COUNTS_AND_FLAGS = define_op(
    "counts_and_flags",
    f"(Tensor top_k_index, Tensor? modality, int num_experts, int text_code, {_RULE_SCHEMA}) -> (Tensor, Tensor)",
    reference=_counts_and_flags_reference,
    fake=_counts_and_flags_fake,
    cuda=(
        (lambda index, modality, experts, text, *rule: counts_triton(index, modality, experts, text, DecisionRule(*rule)))
        if triton
        else None
    ),
)


def counts_and_flags(
    top_k_index: torch.Tensor, modality: torch.Tensor | None, num_experts: int, rule: DecisionRule, text_code: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """`routing_counts` and the `lowered_flags` decided from them; on CUDA one launch for both (the last block
    of the counting decides), no host sync."""
    _check_rule(num_experts, rule)
    return _COUNTS_AND_FLAGS(top_k_index, modality, num_experts, text_code, *_rule_args(rule))


def counts_triton(
    top_k_index: torch.Tensor,
    modality: torch.Tensor | None,
    num_experts: int,
    text_code: int,
    rule: DecisionRule | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`routing_counts` ((2, E) int32) and, with a `rule`, its `lowered_flags` ((E,) bool) from one Triton launch
    (on CUDA, or in Triton's interpreter)."""
    ids = top_k_index.reshape(-1)
    scratch = torch.zeros(2 * num_experts + 1, dtype=torch.int32, device=ids.device)  # counts, blocks done
    out = scratch[: 2 * num_experts]
    decide = rule is not None
    if decide:
        _check_rule(num_experts, rule)
        # no pairs: no rank is above the mean, so nothing is lowered
        flags = (torch.empty if ids.numel() else torch.zeros)(num_experts, dtype=torch.int8, device=ids.device)
    if ids.numel():
        ep = rule.ep_size if decide else 1
        per = num_experts // ep
        _counts_kernel[(triton.cdiv(ids.numel(), _BLOCK),)](
            ids,
            modality if modality is not None else ids,
            out,
            scratch[2 * num_experts :],
            _decision_params(rule, ids.device) if decide else out,
            flags if decide else out,
            ids.numel(),
            num_experts,
            ep,
            per,
            TOP_K=top_k_index.shape[-1],
            HAS_MOD=modality is not None,
            TEXT_CODE=text_code,
            BINS=triton.next_power_of_2(num_experts + 1),
            DECIDE=decide,
            EP_BLOCK=triton.next_power_of_2(ep),
            PER_BLOCK=triton.next_power_of_2(per),
            EXPERT=decide and rule.expert_granularity,
            enable_fp_fusion=False,  # the decision's `tokens - saving * before` rounds twice, as in the reference
        )
    return out.view(2, num_experts), flags.view(torch.bool) if decide else None


def lowered_flags_triton(counts: torch.Tensor, rule: DecisionRule) -> torch.Tensor:
    """`lowered_flags_reference` in one Triton program (on CUDA, or in Triton's interpreter)."""
    num_experts = counts.shape[-1]
    _check_rule(num_experts, rule)
    out = torch.empty(num_experts, dtype=torch.int8, device=counts.device)
    per = num_experts // rule.ep_size
    _decide[(1,)](
        counts.contiguous(),
        _decision_params(rule, counts.device),
        out,
        num_experts,
        rule.ep_size,
        per,
        EP_BLOCK=triton.next_power_of_2(rule.ep_size),
        PER_BLOCK=triton.next_power_of_2(per),
        EXPERT=rule.expert_granularity,
        enable_fp_fusion=False,  # `tokens - saving * before` rounds twice, as in the reference, not as one FMA
    )
    return out.view(torch.bool)


_PARAMS: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def _decision_params(rule: DecisionRule, device: torch.device) -> torch.Tensor:
    """(1 + imbalance_threshold, modality_threshold, cost ratio, 1 - cost ratio, conversion cost) as float64 on
    `device`, cached
    (the Python doubles the reference uses, bit for bit). The host copy stays cached with it: a CUDA graph that
    captured the upload reads that host memory again on every replay."""
    ratio = rule.cost_ratio
    values = [1.0 + rule.imbalance_threshold, rule.modality_threshold, ratio, 1.0 - ratio, float(rule.conversion_cost)]
    key = (*values, str(device))
    if key not in _PARAMS:
        if len(_PARAMS) >= 64:
            _PARAMS.clear()
        host = torch.tensor(values, dtype=torch.float64)
        if device.type == "cuda":
            host = host.pin_memory()  # an asynchronous copy, no stream stall
        _PARAMS[key] = (host, host.to(device, non_blocking=True))
    return _PARAMS[key][1]
