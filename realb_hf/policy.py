"""ReaLB's decision: routing of one MoE layer for one batch -> a precision for every EP rank (or expert).

Pure functions of plain numbers: no model, no randomness (`lowered_experts_on_device` is the same decision
as tensor ops, so a GPU can decide without reading the counts back). Every rank of a real EP group sees
the same routing counts, so every rank computes the same decision without talking to the others.

The cost model is linear: a rank's predicted time is the sum over its experts of
`tokens(expert) * ratio(precision(expert))`, with ratio 1 for high precision and `low_cost_ratio` for the
low one, plus `conversion_cost` for every lowered expert when its weights are converted per call. Ratios
describe the *target* hardware's native kernels, so decisions made while studying accuracy on a CPU (emulated
formats) are the decisions a GPU deployment would make.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import torch

from .kernels.counts import DecisionRule, lowered_flags_reference

# Predicted low-precision expert-MLP time relative to bf16: fp8 from the fused fp8 expert MLP against bf16 on
# Hopper (docs/benchmarks.md, "Cost model"); nvfp4/mxfp4 an assumption for Blackwell FP4 tensor cores.
DEFAULT_LOW_COST_RATIO = {"fp8": 0.78, "nvfp4": 0.6, "mxfp4": 0.6}
# Converting one expert's weights per call (weight_cache="on_the_fly"), in token-expert pairs at high precision.
# A pair costs 2 flops per weight (one multiply-add in each of gate, up, down); a conversion moves 3 bytes per
# weight (read bf16, write fp8). The ratio of the two times is 3/2 * (GEMM flop/s) / (conversion bytes/s), which
# the weight shapes cancel out of: about 1.5 * 365 flops per byte on Hopper (docs/benchmarks.md, "Cost model").
DEFAULT_CONVERSION_COST = 512.0

REASON_OFF = "off"
REASON_STATIC = "static"
REASON_ALL_LOW = "all_low"
REASON_SMALL_BATCH = "below_batch_threshold"
REASON_BALANCED = "no_eligible_rank"
REASON_LOWERED = "lowered"


@dataclass(frozen=True)
class RoutingStats:
    """What the policy needs from one layer's routing: token-expert pairs per global expert."""

    expert_tokens: tuple[int, ...]
    expert_vision: tuple[int, ...]  # of those pairs, how many come from image or video tokens
    num_tokens: int  # tokens in the forward (each counted once, not once per top-k slot)

    def __post_init__(self) -> None:
        if len(self.expert_tokens) != len(self.expert_vision):
            raise ValueError("expert_tokens and expert_vision must have one entry per expert")
        if any(v > t or v < 0 for t, v in zip(self.expert_tokens, self.expert_vision)):
            raise ValueError("expert_vision must lie between 0 and expert_tokens for every expert")

    @property
    def num_experts(self) -> int:
        return len(self.expert_tokens)

    @classmethod
    def empty(cls, num_experts: int, num_tokens: int) -> RoutingStats:
        """Stand-in counts for decisions that do not read them (see `needs_routing`)."""
        zeros = (0,) * num_experts
        return cls(zeros, zeros, num_tokens)


@dataclass(frozen=True)
class PolicyParams:
    """The config fields the decision depends on, with `low` already resolved to a format name."""

    policy: str = "realb"
    high: str = "bf16"
    low: str = "fp8"
    granularity: str = "rank"
    ep_size: int = 1
    modality_threshold: float = 0.7
    batch_threshold: int = 2048
    imbalance_threshold: float = 0.1
    low_cost_ratio: float | None = None
    rank_precisions: tuple[tuple[int, str], ...] = ()  # policy="static": (rank, "high"|"low"|format)
    conversion_cost: float = 0.0  # pairs' worth of time per lowered expert converted per call (0: persistent)

    def __post_init__(self) -> None:
        cost = self.conversion_cost
        if isinstance(cost, bool) or not isinstance(cost, (int, float)) or not 0.0 <= cost < float("inf"):
            raise ValueError(
                f"conversion_cost must be a finite number of token-expert pairs >= 0 (e.g. {DEFAULT_CONVERSION_COST}"
                f" for on_the_fly conversion, 0 for persistent copies), got {cost!r}"
            )

    @property
    def cost_ratio(self) -> float:
        return self.cost_of(self.low)

    def cost_of(self, precision: str) -> float:
        """Predicted time of one token-expert pair at `precision`, relative to high precision."""
        if precision == self.high:
            return 1.0
        if precision == self.low and self.low_cost_ratio is not None:
            return self.low_cost_ratio
        return DEFAULT_LOW_COST_RATIO[precision]

    def device_rule(self) -> DecisionRule:
        """The numbers of the dynamic policy's device-side decision (`lowered_experts_on_device`)."""
        return DecisionRule(
            ep_size=self.ep_size,
            expert_granularity=self.granularity == "expert",
            imbalance_threshold=self.imbalance_threshold,
            modality_threshold=self.modality_threshold,
            cost_ratio=self.cost_ratio,
            conversion_cost=float(self.conversion_cost),
        )


@dataclass(frozen=True)
class Decision:
    """Precision per expert (global ids) and per rank ("mixed" when a rank's experts differ)."""

    expert_precision: tuple[str, ...]
    rank_precision: tuple[str, ...]
    reason: str

    def all_high(self, high: str) -> bool:
        return self.expert_precision.count(high) == len(self.expert_precision)


def expert_ranges(num_experts: int, ep_size: int) -> list[range]:
    """Experts of each rank: contiguous equal blocks, exactly as transformers' EP shards dim 0."""
    if ep_size < 1 or num_experts % ep_size:
        raise ValueError(f"ep_size={ep_size} must divide the number of experts ({num_experts})")
    per_rank = num_experts // ep_size
    return [range(r * per_rank, (r + 1) * per_rank) for r in range(ep_size)]


def rank_loads(stats: RoutingStats, ep_size: int) -> tuple[list[int], list[int]]:
    """(token-expert pairs per rank, vision pairs per rank)."""
    ranges = expert_ranges(stats.num_experts, ep_size)
    tokens = [sum(stats.expert_tokens[e] for e in r) for r in ranges]
    vision = [sum(stats.expert_vision[e] for e in r) for r in ranges]
    return tokens, vision


def vision_shares(tokens: Sequence[int], vision: Sequence[int]) -> list[float]:
    return [v / t if t else 0.0 for t, v in zip(tokens, vision)]


def predicted_rank_costs(stats: RoutingStats, expert_precision: Sequence[str], params: PolicyParams) -> list[float]:
    """Predicted compute time per rank, in units of one token-expert pair at high precision (lowered experts'
    per-call conversion included)."""
    return [
        sum(stats.expert_tokens[e] * params.cost_of(expert_precision[e]) for e in r)
        + params.conversion_cost * sum(expert_precision[e] != params.high for e in r)
        for r in expert_ranges(stats.num_experts, params.ep_size)
    ]


def balancedness(loads: Sequence[float]) -> float:
    """mean / max: 1.0 is perfectly balanced; an idle layer counts as balanced."""
    peak = max(loads, default=0)
    return (sum(loads) / len(loads)) / peak if peak > 0 else 1.0


def _rank_precision(expert_precision: Sequence[str], num_experts: int, ep_size: int) -> tuple[str, ...]:
    out = []
    for r in expert_ranges(num_experts, ep_size):
        kinds = {expert_precision[e] for e in r}
        out.append(kinds.pop() if len(kinds) == 1 else "mixed")
    return tuple(out)


def _decision(expert_precision: list[str], params: PolicyParams, reason: str) -> Decision:
    n = len(expert_precision)
    return Decision(tuple(expert_precision), _rank_precision(expert_precision, n, params.ep_size), reason)


def overloaded_ranks(tokens: Sequence[int], imbalance_threshold: float) -> list[int]:
    """Ranks whose load exceeds the mean by more than `imbalance_threshold` (a fraction of the mean)."""
    mean = sum(tokens) / len(tokens)
    return [r for r, t in enumerate(tokens) if t > mean * (1.0 + imbalance_threshold)]


def needs_routing(params: PolicyParams, num_tokens: int) -> bool:
    """Whether `decide` reads the routing counts: only the dynamic policy, at or above the batch threshold."""
    return params.policy == "realb" and num_tokens >= params.batch_threshold


@lru_cache(maxsize=1024)
def decide_without_routing(params: PolicyParams, num_experts: int) -> Decision:
    """`decide` where `needs_routing` is false: the answer depends on the config alone, so it is cached."""
    if params.policy == "realb" and params.batch_threshold == 0:
        raise ValueError("policy 'realb' with batch_threshold=0 always reads the routing")
    return decide(RoutingStats.empty(num_experts, 0), params)


def decide(stats: RoutingStats, params: PolicyParams) -> Decision:
    """Choose the precision of every expert for this layer and batch."""
    n = stats.num_experts
    ranges = expert_ranges(n, params.ep_size)
    if params.policy == "off":
        return _decision([params.high] * n, params, REASON_OFF)
    if params.policy == "all_low":
        return _decision([params.low] * n, params, REASON_ALL_LOW)
    if params.policy == "static":
        named = {"high": params.high, "low": params.low}
        per_rank = dict(params.rank_precisions)
        precision = [params.high] * n
        for r, experts in enumerate(ranges):
            for e in experts:
                precision[e] = named.get(per_rank.get(r, "high"), per_rank.get(r, "high"))
        return _decision(precision, params, REASON_STATIC)
    if params.policy != "realb":
        raise ValueError(f"unknown policy {params.policy!r}; choose one of ['realb', 'static', 'all_low', 'off']")

    precision = [params.high] * n
    if stats.num_tokens < params.batch_threshold:
        return _decision(precision, params, REASON_SMALL_BATCH)
    tokens, vision = rank_loads(stats, params.ep_size)
    hot = overloaded_ranks(tokens, params.imbalance_threshold)
    if params.granularity == "rank":
        shares = vision_shares(tokens, vision)
        eligible = [r for r in hot if shares[r] >= params.modality_threshold]
        # The layer ends with its slowest rank: with every eligible rank that gains lowered that is `floor`. A
        # lowered rank costs its pairs at the low ratio plus the conversion of its experts (when converted per
        # call); one whose conversion outweighs its saving stays high. An eligible rank already at or under the
        # floor gains nothing from lowering, so it keeps its precision (and accuracy).
        conversion = params.conversion_cost * len(ranges[0])
        floor = max(
            [min(tokens[r], tokens[r] * params.cost_ratio + conversion) for r in eligible]
            + [t for r, t in enumerate(tokens) if r not in eligible]
        )
        lowered = [r for r in eligible if tokens[r] > floor]
        for r in lowered:
            for e in ranges[r]:
                precision[e] = params.low
        return _decision(precision, params, REASON_LOWERED if lowered else REASON_BALANCED)
    return _decide_experts(stats, params, tokens, hot, precision)


def _decide_experts(
    stats: RoutingStats, params: PolicyParams, tokens: list[int], hot: list[int], precision: list[str]
) -> Decision:
    """Expert granularity: lower an overloaded rank's hottest vision-dominated experts, one at a time,
    until its predicted time no longer exceeds the busiest rank that is not overloaded, or (with a conversion
    cost) until the next expert's saving no longer exceeds the cost of converting it."""
    ranges = expert_ranges(stats.num_experts, params.ep_size)
    target = max((t for r, t in enumerate(tokens) if r not in hot), default=0)
    saving, conversion = 1.0 - params.cost_ratio, params.conversion_cost
    any_lowered = False
    for r in hot:
        lowered_pairs = 0  # an exact integer, so the device decision computes the very same floats from it
        candidates = [
            e
            for e in ranges[r]
            if stats.expert_tokens[e] and stats.expert_vision[e] / stats.expert_tokens[e] >= params.modality_threshold
        ]
        for k, e in enumerate(sorted(candidates, key=lambda e: (-stats.expert_tokens[e], e))):
            # predicted time with the k experts before this one lowered (and converted)
            if tokens[r] - saving * lowered_pairs + conversion * k <= target:
                break
            if conversion != 0.0 and not saving * stats.expert_tokens[e] > conversion:
                break
            precision[e] = params.low
            lowered_pairs += stats.expert_tokens[e]
            any_lowered = True
    return _decision(precision, params, REASON_LOWERED if any_lowered else REASON_BALANCED)


def may_give_a_rank(params: PolicyParams, precision: str, num_experts: int) -> bool:
    """Whether `decide` can give every expert of some rank `precision` under `params`, for some routing: EP
    all-to-all checks its rows for fp8 only when a rank can run (and so receive its rows in) fp8."""
    if params.policy == "realb":
        return params.low == precision and params.ep_size > 1  # one rank is never above the mean
    return precision in decide_without_routing(params, num_experts).rank_precision


def decides_on_device(params: PolicyParams) -> bool:
    """Whether `lowered_experts_on_device` implements this policy (the dynamic one, either granularity)."""
    return params.policy == "realb"


def lowered_experts_on_device(counts: torch.Tensor, num_tokens: int, params: PolicyParams) -> torch.Tensor:
    """`decide`'s choice as device tensor ops: `counts (2, E)` (token-expert pairs per expert, vision ones) ->
    `(E,)` bool, True where the expert runs in `params.low`. No host sync.

    Same arithmetic as `decide` (exact integer sums, float64, same operations), so both give the same decision
    for the same counts; tests hold them equal. Telemetry recomputes the decision on the host with `decide`.
    """
    if not decides_on_device(params):
        raise ValueError(f"no device-side decision for policy={params.policy!r}")
    num_experts = counts.shape[-1]
    expert_ranges(num_experts, params.ep_size)  # validates ep_size
    if num_tokens < params.batch_threshold:
        return torch.zeros(num_experts, dtype=torch.bool, device=counts.device)
    return lowered_flags_reference(counts, params.device_rule())
