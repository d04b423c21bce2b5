"""The decision on hand-built routing: no model involved."""

import pytest

from realb_hf.policy import (
    DEFAULT_CONVERSION_COST,
    DEFAULT_LOW_COST_RATIO,
    REASON_BALANCED,
    REASON_LOWERED,
    REASON_SMALL_BATCH,
    PolicyParams,
    RoutingStats,
    balancedness,
    decide,
    expert_ranges,
    may_give_a_rank,
    predicted_rank_costs,
    rank_loads,
)


def stats(per_expert: list[tuple[int, int]], num_tokens: int = 4096) -> RoutingStats:
    """(tokens, vision tokens) per expert."""
    return RoutingStats(tuple(t for t, _ in per_expert), tuple(v for _, v in per_expert), num_tokens)


# 8 experts on 4 ranks (2 each). Rank 1 is overloaded and vision-dominated; rank 3 is overloaded and text-heavy.
VISION_HOT = stats([(100, 10), (100, 10), (400, 380), (200, 180), (100, 20), (100, 20), (150, 10), (150, 10)])
TEXT_HOT = stats([(100, 50), (100, 50), (100, 60), (100, 60), (100, 60), (100, 60), (400, 40), (200, 20)])

PARAMS = PolicyParams(policy="realb", low="fp8", ep_size=4, modality_threshold=0.7, batch_threshold=2048)


def test_expert_ranges_match_contiguous_ep_sharding():
    assert expert_ranges(8, 4) == [range(0, 2), range(2, 4), range(4, 6), range(6, 8)]
    assert expert_ranges(8, 1) == [range(0, 8)]
    with pytest.raises(ValueError, match="ep_size=3 must divide the number of experts \\(8\\)"):
        expert_ranges(8, 3)


def test_rank_loads_and_balancedness():
    tokens, vision = rank_loads(VISION_HOT, 4)
    assert tokens == [200, 600, 200, 300] and vision == [20, 560, 40, 20]
    assert balancedness(tokens) == pytest.approx(325 / 600)
    assert balancedness([0, 0]) == 1.0


def test_below_batch_threshold_nothing_is_lowered():
    d = decide(stats(list(zip(VISION_HOT.expert_tokens, VISION_HOT.expert_vision)), num_tokens=2047), PARAMS)
    assert d.reason == REASON_SMALL_BATCH and d.all_high("bf16")


def test_vision_heavy_overloaded_rank_is_lowered():
    d = decide(VISION_HOT, PARAMS)
    assert d.rank_precision == ("bf16", "fp8", "bf16", "bf16")
    assert d.reason == REASON_LOWERED


def test_text_heavy_overloaded_rank_stays_high_at_md_07():
    d = decide(TEXT_HOT, PARAMS)
    assert d.rank_precision == ("bf16",) * 4 and d.reason == REASON_BALANCED
    # Without modality control (M_d = 0) the same rank is lowered: the paper's accuracy-costly ablation.
    d0 = decide(TEXT_HOT, PolicyParams(**{**PARAMS.__dict__, "modality_threshold": 0.0}))
    assert d0.rank_precision == ("bf16", "bf16", "bf16", "fp8")


def test_eligible_rank_that_would_not_shorten_the_layer_stays_high():
    # Ranks 0 and 1 are both overloaded and vision-heavy; rank 1 (400) is under rank 0's lowered time (600*0.78).
    s = stats([(300, 300), (300, 300), (200, 200), (200, 200), (50, 0), (50, 0), (50, 0), (50, 0)])
    d = decide(s, PolicyParams(policy="realb", low="fp8", ep_size=4, imbalance_threshold=0.1))
    assert d.rank_precision == ("fp8", "bf16", "bf16", "bf16")


def test_balanced_batch_lowers_nothing():
    even = stats([(100, 100)] * 8)
    assert decide(even, PARAMS).all_high("bf16")


def test_single_rank_has_no_imbalance_to_fix():
    d = decide(VISION_HOT, PolicyParams(**{**PARAMS.__dict__, "ep_size": 1}))
    assert d.all_high("bf16")


def test_imbalance_threshold_controls_what_counts_as_overloaded():
    # Rank 1 is 600 / mean 325 = 1.85x the mean: lowered at 0.5, kept at 1.0.
    assert decide(VISION_HOT, PolicyParams(**{**PARAMS.__dict__, "imbalance_threshold": 0.5})).rank_precision[1] == "fp8"
    assert decide(VISION_HOT, PolicyParams(**{**PARAMS.__dict__, "imbalance_threshold": 1.0})).all_high("bf16")


def test_expert_granularity_lowers_fewer_tokens_for_the_same_balance():
    # Rank 1 = experts 2 (500 tokens) + 3 (100), both vision-dominated; the busiest other rank holds 300.
    s = stats([(100, 10), (100, 10), (500, 480), (100, 90), (100, 20), (100, 20), (150, 10), (150, 10)])
    params = PolicyParams(policy="realb", low="fp8", ep_size=4, low_cost_ratio=0.4)
    rank = decide(s, params)
    expert = decide(s, PolicyParams(**{**params.__dict__, "granularity": "expert"}))
    assert rank.rank_precision[1] == "fp8"
    assert expert.expert_precision[2:4] == ("fp8", "bf16") and expert.rank_precision[1] == "mixed"

    def lowered(d):
        return sum(t for t, p in zip(s.expert_tokens, d.expert_precision) if p != "bf16")

    assert lowered(expert) == 500 < lowered(rank) == 600
    # Same balance: the slowest rank's predicted time is 300 either way.
    assert max(predicted_rank_costs(s, expert.expert_precision, params)) == pytest.approx(300)
    assert max(predicted_rank_costs(s, rank.expert_precision, params)) == pytest.approx(300)


def test_expert_granularity_stops_once_the_rank_reaches_the_next_rank():
    # Rank 0 holds two equally hot vision experts; lowering one (cost 0.5) already reaches rank 1's load.
    s = stats([(400, 400), (400, 400), (300, 30), (300, 30), (100, 0), (100, 0), (100, 0), (100, 0)])
    params = PolicyParams(
        policy="realb", low="fp8", ep_size=4, granularity="expert", low_cost_ratio=0.5, imbalance_threshold=0.5
    )
    d = decide(s, params)
    assert d.expert_precision[:2] == ("fp8", "bf16")
    assert max(predicted_rank_costs(s, d.expert_precision, params)) == pytest.approx(600)
    rank_d = decide(s, PolicyParams(**{**params.__dict__, "granularity": "rank"}))
    assert rank_d.expert_precision[:2] == ("fp8", "fp8")


def test_static_all_low_and_off():
    s = VISION_HOT
    static = PolicyParams(policy="static", low="nvfp4", ep_size=4, rank_precisions=((0, "low"), (2, "mxfp4"), (3, "high")))
    assert decide(s, static).rank_precision == ("nvfp4", "bf16", "mxfp4", "bf16")
    assert decide(s, PolicyParams(policy="all_low", low="mxfp4", ep_size=4)).rank_precision == ("mxfp4",) * 4
    assert decide(s, PolicyParams(policy="off", ep_size=4)).all_high("bf16")


def test_decision_is_deterministic_and_pure():
    assert decide(VISION_HOT, PARAMS) == decide(VISION_HOT, PARAMS)


def test_cost_model_uses_measured_fp8_ratio_by_default():
    assert PARAMS.cost_ratio == DEFAULT_LOW_COST_RATIO["fp8"]
    costs = predicted_rank_costs(VISION_HOT, decide(VISION_HOT, PARAMS).expert_precision, PARAMS)
    assert costs == pytest.approx([200, 600 * 0.78, 200, 300])


def test_empty_layer_and_zero_token_experts():
    empty = stats([(0, 0)] * 8, num_tokens=4096)
    assert decide(empty, PARAMS).all_high("bf16")
    one_expert = stats([(4096, 4096)] + [(0, 0)] * 7)
    d = decide(one_expert, PARAMS)
    assert d.rank_precision == ("fp8", "bf16", "bf16", "bf16")


def test_routing_stats_validation():
    with pytest.raises(ValueError, match="one entry per expert"):
        RoutingStats((1, 2), (1,), 3)
    with pytest.raises(ValueError, match="between 0 and expert_tokens"):
        RoutingStats((1, 2), (2, 0), 3)


def test_decision_without_routing_is_cached_and_equal_to_decide():
    from realb_hf.policy import decide_without_routing

    for params in (
        PolicyParams(policy="off", ep_size=4),
        PolicyParams(policy="all_low", low="fp8", ep_size=4),
        PolicyParams(policy="realb", ep_size=4, batch_threshold=2048),
    ):
        cached = decide_without_routing(params, 8)
        assert cached is decide_without_routing(params, 8)
        assert cached == decide(RoutingStats.empty(8, 100), params)
    with pytest.raises(ValueError, match="always reads the routing"):
        decide_without_routing(PolicyParams(policy="realb", ep_size=4, batch_threshold=0), 8)


def _device_choice(s: RoutingStats, params: PolicyParams) -> list[bool]:
    import torch

    from realb_hf.policy import lowered_experts_on_device

    counts = torch.tensor([s.expert_tokens, s.expert_vision])
    return lowered_experts_on_device(counts, s.num_tokens, params).tolist()


def _host_choice(s: RoutingStats, params: PolicyParams) -> list[bool]:
    return [p == params.low for p in decide(s, params).expert_precision]


@pytest.mark.parametrize("case", [VISION_HOT, TEXT_HOT, stats([(0, 0)] * 8), stats([(100, 100)] * 8)])
@pytest.mark.parametrize("granularity", ["rank", "expert"])
def test_device_decision_equals_host_decision_on_hand_built_cases(case, granularity):
    for ep in (1, 2, 4, 8):
        params = PolicyParams(policy="realb", low="fp8", ep_size=ep, batch_threshold=2048, granularity=granularity)
        assert _device_choice(case, params) == _host_choice(case, params), ep
    small = stats(list(zip(case.expert_tokens, case.expert_vision)), num_tokens=10)
    assert not any(_device_choice(small, PARAMS))


@pytest.mark.parametrize("granularity", ["rank", "expert"])
def test_device_decision_equals_host_decision_on_random_routing(granularity):
    import random

    rng = random.Random(0)
    lowered_cases = converted_cases = partial_ranks = 0
    for trial in range(400):
        ep = rng.choice([1, 2, 4, 8])
        per_rank = rng.choice([1, 2, 4, 9])
        tokens = [rng.choice([0, rng.randint(0, 50), rng.randint(0, 2000)]) for _ in range(ep * per_rank)]
        hot = rng.randrange(ep)
        for e in range(hot * per_rank, (hot + 1) * per_rank):
            tokens[e] *= rng.choice([1, 2, 3])
        vision = [rng.choice([t, rng.randint(0, t), int(t * 0.7)]) for t in tokens]
        s = RoutingStats(tuple(tokens), tuple(vision), rng.choice([100, 4096]))
        params = PolicyParams(
            policy="realb",
            low=rng.choice(["fp8", "nvfp4"]),
            ep_size=ep,
            modality_threshold=rng.choice([0.0, 0.5, 0.7, 1.0]),
            imbalance_threshold=rng.choice([0.0, 0.1, 0.5]),
            low_cost_ratio=rng.choice([None, 0.5, 0.78, 1.0]),
            granularity=granularity,
            conversion_cost=rng.choice([0.0, 0.0, 0.0, 25.0, 150.0, DEFAULT_CONVERSION_COST]),
        )
        host = _host_choice(s, params)
        assert _device_choice(s, params) == host, (trial, s, params)
        lowered_cases += any(host)
        converted_cases += any(host) and params.conversion_cost > 0
        partial_ranks += "mixed" in decide(s, params).rank_precision
    assert lowered_cases > 40  # the sample exercises lowering, not only "nothing to do"
    assert converted_cases > 5  # also with a conversion cost
    assert granularity == "rank" or partial_ranks > 20  # and experts of one rank split between precisions


def test_expert_granularity_lowers_the_hottest_vision_experts_first():
    # rank 0: experts 0..3 (vision 900, text 800, vision 600, vision 600); rank 1 holds 1000 text pairs
    s = stats([(900, 900), (800, 0), (600, 600), (600, 600), (250, 0), (250, 0), (250, 0), (250, 0)], num_tokens=4096)
    params = PolicyParams(policy="realb", granularity="expert", ep_size=2, low_cost_ratio=0.5)
    # 2900 pairs -> 2450 after expert 0 -> 2150 after expert 2 (first of the tie) -> 1850 after expert 3
    assert _host_choice(s, params) == [True, False, True, True, False, False, False, False]
    assert _device_choice(s, params) == _host_choice(s, params)
    assert decide(s, params).rank_precision == ("mixed", "bf16")


def test_device_decision_covers_only_the_dynamic_policy():
    import torch

    from realb_hf.policy import decides_on_device, lowered_experts_on_device

    assert decides_on_device(PARAMS) and decides_on_device(PolicyParams(policy="realb", granularity="expert"))
    for other in (PolicyParams(policy="static"), PolicyParams(policy="all_low"), PolicyParams(policy="off")):
        assert not decides_on_device(other)
        with pytest.raises(ValueError, match="no device-side decision"):
            lowered_experts_on_device(torch.zeros(2, 8, dtype=torch.long), 4096, other)
    with pytest.raises(ValueError, match="must divide"):
        lowered_experts_on_device(torch.zeros(2, 6, dtype=torch.long), 4096, PARAMS)


def test_conversion_keeps_a_rank_high_exactly_when_it_outweighs_the_saving():
    # rank 1 of VISION_HOT: 600 pairs against 300 for the next rank; at ratio 0.5 lowering saves 300 pairs, and a
    # rank of 2 experts costs 2 conversions: it gains while 300 + 2 * conversion < 600
    for conversion, lowered in ((0.0, True), (149.0, True), (150.0, False), (512.0, False)):
        params = PolicyParams(policy="realb", ep_size=4, low_cost_ratio=0.5, conversion_cost=conversion)
        assert decide(VISION_HOT, params).rank_precision[1] == ("fp8" if lowered else "bf16"), conversion
        assert _device_choice(VISION_HOT, params) == _host_choice(VISION_HOT, params)
    # the conversion only counts where it is paid: the same rank against a closer second rank stays lowered to
    # the floor the others set, and with no conversion the decision is the linear model's
    assert decide(VISION_HOT, PARAMS) == decide(VISION_HOT, PolicyParams(**{**PARAMS.__dict__, "conversion_cost": 0}))


def test_expert_granularity_stops_at_the_first_expert_not_worth_converting():
    # rank 0: experts 0..3 (vision 900, text 800, vision 600, vision 600); rank 1 holds 1000 text pairs; at ratio
    # 0.5 the candidates save 450, 300 and 300 pairs
    s = stats([(900, 900), (800, 0), (600, 600), (600, 600), (250, 0), (250, 0), (250, 0), (250, 0)], num_tokens=4096)
    expected = {0.0: [0, 2, 3], 250.0: [0, 2, 3], 299.0: [0, 2, 3], 300.0: [0], 449.0: [0], 450.0: []}
    for conversion, lowered in expected.items():
        params = PolicyParams(policy="realb", granularity="expert", ep_size=2, low_cost_ratio=0.5,
                              conversion_cost=conversion)  # fmt: skip
        host = _host_choice(s, params)
        assert [e for e, low in enumerate(host) if low] == lowered, conversion
        assert _device_choice(s, params) == host, conversion


@pytest.mark.parametrize("granularity", ["rank", "expert"])
def test_with_conversion_the_policy_never_predicts_a_loss_against_nothing_lowered(granularity):
    """What the conversion term changes: at rank granularity it only removes lowered ranks (a subset of the linear
    model's choice); at either granularity every rank it lowers is predicted faster, conversion included, than unlowered, so the layer never slower
    (rank granularity lowers only when the layer gains; expert granularity may lower a hot rank that is not the
    slowest, as without the term)."""
    import random

    rng = random.Random(1)
    changed = 0
    for _ in range(300):
        ep, per = rng.choice([2, 4, 8]), rng.choice([1, 4, 16])
        tokens = [rng.randint(0, 3000) for _ in range(ep * per)]
        for e in range(per):
            tokens[e] *= rng.choice([1, 2, 4])
        s = RoutingStats(tuple(tokens), tuple(int(t * rng.choice([0.5, 0.8, 1.0])) for t in tokens), 4096)
        linear = PolicyParams(policy="realb", ep_size=ep, granularity=granularity, imbalance_threshold=0.0,
                              modality_threshold=0.5)  # fmt: skip
        params = PolicyParams(**{**linear.__dict__, "conversion_cost": rng.choice([50.0, DEFAULT_CONVERSION_COST])})
        without, with_conversion = _host_choice(s, linear), _host_choice(s, params)
        if granularity == "rank":  # a subset (expert granularity may lower one more expert to cover a conversion)
            assert all(w or not c for w, c in zip(without, with_conversion))
        nothing = max(predicted_rank_costs(s, [params.high] * len(tokens), params))
        chosen = max(predicted_rank_costs(s, decide(s, params).expert_precision, params))
        assert chosen <= nothing
        assert chosen < nothing or not any(with_conversion) or granularity == "expert"
        costs = predicted_rank_costs(s, decide(s, params).expert_precision, params)
        assert all(c <= t for c, t in zip(costs, rank_loads(s, ep)[0])), (costs, rank_loads(s, ep)[0], params)
        changed += without != with_conversion
    assert changed > 20  # the sample exercises the term


@pytest.mark.parametrize("ep_size", [2, 4])
def test_counting_the_conversion_keeps_the_real_ep_benchmarks_hot_rank_in_bf16(ep_size):
    """The workload of `realb_hf.bench.ep_layer` (16k tokens, 70% vision, rank 0 at 1.6x the mean): the linear
    model lowers rank 0, while with `DEFAULT_CONVERSION_COST` the conversion of its experts outweighs the saving
    and every rank stays bf16, the choice docs/design.md compares with the measured all-reduce rows."""
    from realb_hf.bench.ep_layer import skewed_routing
    from realb_hf.experts.plan import routing_stats

    ids, _, codes, achieved = skewed_routing(16384, 128, 8, ep_size, 0.7, 1.6)
    s = routing_stats(ids, codes, 128)
    assert abs(achieved - 1.6) < 0.01
    linear = PolicyParams(policy="realb", low="fp8", ep_size=ep_size)
    counted = PolicyParams(**{**linear.__dict__, "conversion_cost": DEFAULT_CONVERSION_COST})
    assert decide(s, linear).rank_precision == ("fp8",) + ("bf16",) * (ep_size - 1)
    assert decide(s, counted).rank_precision == ("bf16",) * ep_size
    assert _device_choice(s, counted) == _host_choice(s, counted)


def test_conversion_cost_is_validated():
    assert PolicyParams(conversion_cost=7).device_rule().conversion_cost == 7.0
    for bad in (-1.0, float("nan"), float("inf"), True, "512", None):
        with pytest.raises(ValueError, match=r"conversion_cost must be a finite number of token-expert pairs >= 0"):
            PolicyParams(conversion_cost=bad)


def test_fp8_dispatch_is_possible_only_where_a_rank_can_run_fp8():
    assert may_give_a_rank(PolicyParams(policy="realb", low="fp8", ep_size=2), "fp8", 8)
    assert not may_give_a_rank(PolicyParams(policy="realb", low="fp8", ep_size=1), "fp8", 8)
    assert not may_give_a_rank(PolicyParams(policy="realb", low="nvfp4", ep_size=2), "fp8", 8)
    assert not may_give_a_rank(PolicyParams(policy="off", ep_size=2), "fp8", 8)
    assert may_give_a_rank(PolicyParams(policy="all_low", low="fp8", ep_size=2), "fp8", 8)
    static = PolicyParams(policy="static", low="nvfp4", ep_size=2, rank_precisions=((0, "fp8"),))
    assert may_give_a_rank(static, "fp8", 8) and not may_give_a_rank(static, "nvfp4", 8)
    assert not may_give_a_rank(PolicyParams(policy="static", ep_size=2, rank_precisions=((0, "high"),)), "fp8", 8)
