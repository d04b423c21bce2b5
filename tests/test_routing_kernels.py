"""`kernels.counts` and `kernels.sort`: every Triton step equals its torch reference (the CPU path) exactly.

CUDA only, but for the row helpers and the batched counting, which run everywhere."""

import random

import pytest
import torch

from realb_hf.kernels import counts as counting
from realb_hf.kernels import rows, sort
from realb_hf.modality import TEXT
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
    ref = counting.routing_counts(ids, modality, num_experts, TEXT)
    got = counting.routing_counts(ids.cuda(), modality.cuda() if with_modality else None, num_experts, TEXT)
    assert torch.equal(got.cpu().long(), ref.long())


@cuda
@pytest.mark.parametrize("granularity", ["rank", "expert"])
def test_decision_equals_the_policy_on_random_counts(granularity):
    rng = random.Random(0)
    lowered = 0
    for trial in range(300):
        ep = rng.choice([1, 2, 4, 8])
        per = rng.choice([1, 3, 16, 18, 32])
        tokens = torch.tensor([rng.choice([0, rng.randint(0, 3000)]) for _ in range(ep * per)])
        tokens[: per * rng.randint(0, 1)] *= rng.choice([1, 3])
        vision_share = [rng.choice([rng.random(), 1.0, 0.9]) for _ in range(ep * per)]
        vision = (tokens.double() * torch.tensor(vision_share)).long()
        counts = torch.stack([tokens, vision])
        params = PolicyParams(
            ep_size=ep,
            modality_threshold=rng.choice([0.0, 0.5, 0.7]),
            imbalance_threshold=rng.choice([0.0, 0.1, 0.3]),
            low_cost_ratio=rng.choice([None, 0.5, 0.78]),
            granularity=granularity,
        )
        ref = lowered_experts_on_device(counts, 4096, params)
        got = counting.lowered_flags(counts.cuda(), params.device_rule()).cpu()
        assert torch.equal(got, ref), (trial, counts, params)
        lowered += bool(ref.any())
    assert lowered > 30


def skewed_routing(rng: random.Random, tokens: int, top_k: int, num_experts: int, ep: int):
    """Ids with rank 0's experts over-picked, and a modality per token (some vision-heavy ranks)."""
    gen = torch.Generator().manual_seed(rng.randrange(1 << 30))
    ids = torch.randint(0, num_experts, (tokens, top_k), generator=gen)
    hot = torch.rand(tokens, top_k, generator=gen) < rng.choice([0.0, 0.3, 0.6])
    ids = torch.where(hot, ids % (num_experts // ep), ids)
    modality = (torch.rand(tokens, generator=gen) < rng.choice([0.2, 0.7, 0.95])).to(torch.int8)
    return ids, modality


@cuda
@pytest.mark.parametrize("granularity", ["rank", "expert"])
def test_counts_and_flags_in_one_launch(granularity):
    rng = random.Random(1)
    lowered = 0
    for trial in range(60):
        ep = rng.choice([1, 2, 4, 8])
        num_experts = ep * rng.choice([2, 8, 32])
        tokens = rng.choice([1, 700, 5000])
        ids, modality = skewed_routing(rng, tokens, rng.choice([2, 8]), num_experts, ep)
        rule = PolicyParams(
            ep_size=ep, granularity=granularity,
            imbalance_threshold=rng.choice([0.0, 0.1]), modality_threshold=rng.choice([0.5, 0.7]),
        ).device_rule()
        ref_counts, ref_flags = counting.counts_and_flags(ids, modality, num_experts, rule, TEXT)
        counts, flags = counting.counts_and_flags(ids.cuda(), modality.cuda(), num_experts, rule, TEXT)
        assert torch.equal(counts.cpu().long(), ref_counts.long()), trial
        assert torch.equal(flags.cpu(), ref_flags), (trial, rule)
        lowered += bool(ref_flags.any())
    assert lowered > 10


def assert_same_sort(got: sort.SortedRows, ref: sort.SortedRows) -> None:
    for name, g, r in zip(ref._fields, got, ref):
        assert torch.equal(g.cpu().long(), r.long()), name


@cuda
@pytest.mark.parametrize(
    "tokens, top_k, num_experts", [(0, 8, 32), (1, 1, 4), (2000, 8, 32), (501, 6, 18), (9000, 8, 128), (40_000, 2, 8)]
)
def test_sort_rows(tokens, top_k, num_experts):
    """Counting sort on the GPU == stable torch.sort on the CPU: rows, positions, offsets, totals."""
    ids = ids_with_sentinels(tokens, top_k, num_experts, 1)
    low = torch.rand(num_experts) < 0.5
    hidden = torch.randn(tokens, 96).bfloat16()
    if tokens > 10:
        hidden[3, 5], hidden[9, 0] = float("inf"), float("nan")  # these tokens' rows run high
    ref = sort.sort_rows(ids, low, hidden, num_experts)
    for _ in range(3):  # the last-block hand-off must hold on every run, not once
        assert_same_sort(sort.sort_rows(ids.cuda(), low.cuda(), hidden.cuda(), num_experts), ref)


@cuda
def test_sort_rows_of_rows_grouped_by_expert():
    """What an EP rank receives: rows grouped by expert (whole blocks of one key)."""
    ids = torch.sort(torch.randint(0, 33, (50_000,)))[0].view(-1, 1)
    ref = counting.routing_counts(ids, None, 32, TEXT)
    assert torch.equal(counting.routing_counts(ids.cuda(), None, 32, TEXT).cpu().long(), ref.long())
    low = torch.rand(32) < 0.5
    hidden = torch.randn(50_000, 16).bfloat16()
    assert_same_sort(sort.sort_rows(ids.cuda(), low.cuda(), hidden.cuda(), 32), sort.sort_rows(ids, low, hidden, 32))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=cuda)])
@pytest.mark.parametrize(
    "sizes", [[1, 5, 300], [7], [0], [0, 5]], ids=["mixed sizes", "one size", "empty calls", "some empty"]
)
@pytest.mark.parametrize("with_modality", [True, False])
def test_routing_counts_many_equals_one_call_at_a_time(device, sizes, with_modality):
    """Deferred telemetry counts many layer calls together: same counts as `routing_counts` call by call."""
    rng = random.Random(3)
    indices, modalities = [], []
    for trial in range(40):
        tokens = rng.choice(sizes)
        ids = torch.randint(0, 17, (tokens, 4))  # 16 experts; 16 is another rank's
        indices.append(ids.to(device))
        mod = torch.randint(0, 3, (tokens,), dtype=torch.int8).to(device)
        modalities.append(mod if with_modality and trial % 3 else None)
    many = counting.routing_counts_many(indices, modalities, 16, TEXT)
    for got, ids, mod in zip(many, indices, modalities):
        assert torch.equal(got.cpu().long(), counting.routing_counts(ids.cpu(), None if mod is None else mod.cpu(), 16, TEXT).long())


@cuda
def test_routing_counts_many_does_not_sync():
    """Telemetry counts deferred routing when MAX_PENDING calls wait, in the serving path: no host sync."""
    indices = [torch.randint(0, 17, (n, 4), device="cuda") for n in (3, 3, 9)]
    modalities = [None, torch.ones(3, dtype=torch.int8, device="cuda"), None]
    counting.routing_counts_many(indices, modalities, 16, TEXT)  # warm-up (first use may allocate pinned memory)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        counting.routing_counts_many(indices, modalities, 16, TEXT)
        counting.routing_counts_many(indices[:2], modalities[:2], 16, TEXT)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=cuda)])
@pytest.mark.parametrize(
    "make",
    [
        lambda d: torch.randn(37, 64, device=d).to(torch.bfloat16),  # 2-byte rows, moved as words
        lambda d: torch.randint(0, 255, (37, 68), dtype=torch.uint8, device=d)[:, :64],  # fp8 bytes + scale, as received
        lambda d: torch.randint(0, 255, (37, 67), dtype=torch.uint8, device=d)[:, :64],  # row stride not word-aligned
        lambda d: torch.randint(0, 255, (37, 6), dtype=torch.uint8, device=d),  # row not a whole number of words
        lambda d: torch.randn(37, 5, device=d),  # 4-byte elements: index_select as is
        lambda d: torch.randn(37, 64, device=d).to(torch.float8_e4m3fn),
    ],
    ids=["bf16", "bytes of received rows", "unaligned stride", "short rows", "fp32", "fp8"],
)
def test_take_rows_equals_indexing(device, make):
    """The row gather of the all-to-all experts and combine moves whole rows, bit for bit what `x[index]` gives."""
    x = make(device)
    index = torch.randperm(x.shape[0], device=device)[:30]
    got = rows.take_rows(x, index)
    assert got.dtype == x.dtype and got.shape == (30, x.shape[1])
    assert torch.equal(got.view(torch.uint8).cpu(), x[index].contiguous().view(torch.uint8).cpu())


def test_inverse_permutation():
    perm = torch.randperm(1000)
    position = rows.inverse_permutation(perm)
    assert torch.equal(position[perm], torch.arange(1000)) and torch.equal(perm[position], torch.arange(1000))
    assert rows.inverse_permutation(torch.empty(0, dtype=torch.long)).numel() == 0
