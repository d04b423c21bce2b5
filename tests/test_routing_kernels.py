"""`kernels.routing`: every Triton step equals its torch reference (the CPU path) exactly. CUDA only."""

import random

import pytest
import torch

from realb_hf.kernels import routing
from realb_hf.policy import PolicyParams, lowered_experts_on_device

cuda = pytest.mark.cuda


def ids_with_sentinels(tokens, top_k, num_experts, seed):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, num_experts + 1, (tokens, top_k), generator=gen)  # num_experts = another rank's
    return ids


@cuda
@pytest.mark.parametrize("with_modality", [False, True])
@pytest.mark.parametrize("tokens, top_k, num_experts", [(0, 8, 128), (1, 2, 8), (3000, 8, 128), (777, 6, 72)])
def test_routing_counts(with_modality, tokens, top_k, num_experts):
    ids = ids_with_sentinels(tokens, top_k, num_experts, 0)
    modality = torch.randint(0, 3, (tokens,), dtype=torch.int8) if with_modality else None
    ref = routing.routing_counts(ids, modality, num_experts)
    got = routing.routing_counts(ids.cuda(), modality.cuda() if with_modality else None, num_experts)
    assert torch.equal(got.cpu().long(), ref.long())


@cuda
def test_rank_decision_equals_the_policy_on_random_counts():
    rng = random.Random(0)
    lowered = 0
    for trial in range(300):
        ep = rng.choice([1, 2, 4, 8])
        per = rng.choice([1, 3, 16, 18, 32])
        tokens = torch.tensor([rng.choice([0, rng.randint(0, 3000)]) for _ in range(ep * per)])
        tokens[: per * rng.randint(0, 1)] *= rng.choice([1, 3])
        vision = (tokens.double() * torch.tensor([rng.random() for _ in range(ep * per)])).long()
        counts = torch.stack([tokens, vision])
        params = PolicyParams(
            ep_size=ep,
            modality_threshold=rng.choice([0.0, 0.5, 0.7]),
            imbalance_threshold=rng.choice([0.0, 0.1, 0.3]),
            low_cost_ratio=rng.choice([None, 0.5, 0.78]),
        )
        ref = lowered_experts_on_device(counts, 4096, params)
        got = routing.rank_decision(counts.cuda(), 4096, params).cpu()
        assert torch.equal(got, ref), (trial, counts, params)
        lowered += bool(ref.any())
    assert lowered > 30


@cuda
@pytest.mark.parametrize("tokens, top_k, num_experts", [(0, 8, 32), (1, 1, 4), (2000, 8, 32), (501, 6, 18)])
def test_row_keys_offsets_and_positions(tokens, top_k, num_experts):
    ids = ids_with_sentinels(tokens, top_k, num_experts, 1)
    low = torch.rand(num_experts) < 0.5
    finite = torch.rand(tokens) < 0.9
    keys, counts = routing.row_keys(ids, low, finite, num_experts)
    gkeys, gcounts = routing.row_keys(ids.cuda(), low.cuda(), finite.cuda(), num_experts)
    assert torch.equal(gkeys.cpu(), keys) and torch.equal(gcounts.cpu().long(), counts.long())
    offs, totals = routing.group_offsets(counts)
    goffs, gtotals = routing.group_offsets(gcounts)
    assert torch.equal(goffs.cpu(), offs) and torch.equal(gtotals.cpu().long(), totals.long())
    keys_sorted, perm = torch.sort(keys, stable=True)
    rows, position = routing.slot_positions(perm, keys_sorted, totals, num_experts, top_k)
    grows, gposition = routing.slot_positions(perm.cuda(), keys_sorted.cuda(), gtotals, num_experts, top_k)
    assert torch.equal(grows.cpu(), rows) and torch.equal(gposition.cpu(), position)


@cuda
def test_counts_of_rows_sorted_by_expert():
    """What an EP rank receives: rows grouped by expert (the case block histograms exist for)."""
    ids = torch.sort(torch.randint(0, 33, (50_000,)))[0].view(-1, 1)
    ref = routing.routing_counts(ids, None, 32)
    assert torch.equal(routing.routing_counts(ids.cuda(), None, 32).cpu().long(), ref.long())
    low = torch.rand(32) < 0.5
    finite = torch.ones(50_000, dtype=torch.bool)
    keys, counts = routing.row_keys(ids, low, finite, 32)
    gkeys, gcounts = routing.row_keys(ids.cuda(), low.cuda(), finite.cuda(), 32)
    assert torch.equal(gkeys.cpu(), keys) and torch.equal(gcounts.cpu().long(), counts.long())
