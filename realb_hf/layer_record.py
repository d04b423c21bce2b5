"""`LayerRecord`: what ReaLB saw and decided in one MoE layer of one forward, built from the routing counts and
the decision alone (so a record can be built long after the layer ran, when its counts reach the host)."""

from __future__ import annotations

from dataclasses import dataclass

from .policy import Decision, PolicyParams, RoutingStats, balancedness, predicted_rank_costs, rank_loads, vision_shares


@dataclass(frozen=True)
class LayerRecord:
    """One MoE layer (one experts module) in one forward."""

    forward: int
    layer: str
    num_tokens: int
    tokens_per_rank: list[int]
    vision_share_per_rank: list[float]
    precision_per_rank: list[str]
    balancedness_tokens: float  # mean/max of token-expert pairs per rank
    balancedness_cost_before: float  # mean/max of predicted time, all ranks high
    balancedness_cost_after: float  # mean/max of predicted time with the decision applied
    predicted_speedup: float  # slowest rank before / slowest rank after
    lowered_fraction: float  # share of token-expert pairs computed in low precision
    lowered_experts: int
    reason: str
    modality_source: str


def make_record(
    forward: int, layer: str, stats: RoutingStats, decision: Decision, params: PolicyParams, modality_source: str
) -> LayerRecord:
    tokens, vision = rank_loads(stats, params.ep_size)
    all_high = [params.high] * stats.num_experts
    before = predicted_rank_costs(stats, all_high, params)
    after = predicted_rank_costs(stats, decision.expert_precision, params)
    total = sum(stats.expert_tokens)
    lowered = [e for e, p in enumerate(decision.expert_precision) if p != params.high]
    slowest_after = max(after, default=0.0)
    return LayerRecord(
        forward=forward,
        layer=layer,
        num_tokens=stats.num_tokens,
        tokens_per_rank=tokens,
        vision_share_per_rank=[round(s, 6) for s in vision_shares(tokens, vision)],
        precision_per_rank=list(decision.rank_precision),
        balancedness_tokens=balancedness(tokens),
        balancedness_cost_before=balancedness(before),
        balancedness_cost_after=balancedness(after),
        predicted_speedup=max(before, default=0.0) / slowest_after if slowest_after > 0 else 1.0,
        lowered_fraction=sum(stats.expert_tokens[e] for e in lowered) / total if total else 0.0,
        lowered_experts=len(lowered),
        reason=decision.reason,
        modality_source=modality_source,
    )


__all__ = ["LayerRecord", "make_record"]
