"""What one rank of a virtual EP layer is called with: its rows in either EP form, the perfectly balanced rows
of the oracle, and a ReaLB rank's call (plan from the layer's global routing, then run on the rank's rows)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from ..experts import RealbExperts
from ..experts.plan import routing_stats as count_routing
from ..policy import RoutingStats
from .workload import Workload, uniform_pairs

MODALITY_SOURCE = "bench"  # telemetry's name for where the modality codes of a rank call came from


@dataclass
class RankInputs:
    calls: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]  # (rows, local ids, weights), one per input set
    hidden: list[torch.Tensor]  # the layer's (T, H) rows of each input set: what a ReaLB rank plans from
    pairs: int
    vision_pairs: int
    expert_rows: torch.Tensor  # (local experts,) pairs per local expert (CPU)

    def realb_calls(self) -> list[tuple[torch.Tensor, ...]]:
        """The arguments of `realb_rank_call` for every input set."""
        return [(h, *c) for h, c in zip(self.hidden, self.calls)]


def rank_inputs(
    workload: Workload, hidden_sets: Sequence[torch.Tensor], rank: int, ep_size: int, form: str
) -> RankInputs:
    """The experts call of `rank` for every hidden-state set (see the module docstring for the forms)."""
    e_local = workload.num_experts // ep_size
    lo = rank * e_local
    index, weights, modality = workload.top_k_index, workload.top_k_weights, workload.modality
    top_k = index.shape[1]
    flat = index.reshape(-1)
    on_rank = (flat >= lo) & (flat < lo + e_local)
    vision_slots = (modality != 0).repeat_interleave(top_k)
    pairs = int(on_rank.sum())
    vision_pairs = int((on_rank & vision_slots).sum())
    expert_rows = torch.bincount((flat[on_rank] - lo).cpu(), minlength=e_local)
    dtype = hidden_sets[0].dtype
    hidden = list(hidden_sets)
    if ep_size == 1:
        calls = [(h, index, weights.to(dtype)) for h in hidden_sets]
        return RankInputs(calls, hidden, pairs, vision_pairs, expert_rows)
    if form == "all_reduce":
        local = torch.where(on_rank, flat - lo, torch.full_like(flat, e_local)).view_as(index)
        masked = weights.to(dtype).masked_fill(~on_rank.view_as(index), 0.0)
        calls = [(h, local, masked) for h in hidden_sets]
        return RankInputs(calls, hidden, pairs, vision_pairs, expert_rows)
    slots = on_rank.nonzero().squeeze(1)
    local_ids = flat[slots] - lo
    order = torch.sort(local_ids, stable=True).indices
    slots, local_ids = slots[order], local_ids[order]
    tokens = slots // top_k
    ids = local_ids.unsqueeze(1)
    ones = torch.ones(ids.shape, dtype=dtype, device=ids.device)
    calls = [(h[tokens], ids, ones) for h in hidden_sets]
    return RankInputs(calls, hidden, pairs, vision_pairs, expert_rows)


def oracle_inputs(
    workload: Workload, hidden_sets: Sequence[torch.Tensor], ep_size: int, form: str
) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """One rank's call when the layer's pairs are spread perfectly evenly over ranks and experts."""
    e_local = workload.num_experts // ep_size
    tokens, top_k = workload.top_k_index.shape
    total = tokens * top_k
    device = workload.top_k_index.device
    dtype = hidden_sets[0].dtype
    if ep_size > 1 and form == "all_reduce":
        slot = torch.arange(total, device=device)
        local = slot % ep_size == 0
        ids = uniform_pairs(int(local.sum()), e_local).to(device)
        index = torch.full((total,), e_local, dtype=torch.int64, device=device)
        index[local] = ids
        weights = torch.where(local, 1.0 / top_k, 0.0).to(dtype).view(tokens, top_k)
        return [(h, index.view(tokens, top_k), weights) for h in hidden_sets]
    if ep_size == 1:
        index = uniform_pairs(total, e_local).to(device)
        perm = torch.randperm(total, generator=torch.Generator().manual_seed(0)).to(device)
        index = index[perm].view(tokens, top_k)  # distinct ids per row are not needed for timing
        weights = torch.full((tokens, top_k), 1.0 / top_k, dtype=dtype, device=device)
        return [(h, index, weights) for h in hidden_sets]
    pairs = -(-total // ep_size)
    ids = uniform_pairs(pairs, e_local).to(device).unsqueeze(1)
    rows = torch.arange(pairs, device=device) % tokens
    ones = torch.ones(ids.shape, dtype=dtype, device=device)
    return [(h[rows], ids, ones) for h in hidden_sets]


# ---- decisions and the rank call ----------------------------------------------------------------


def routing_stats(workload: Workload) -> RoutingStats:
    """Pairs and vision pairs per global expert: what every rank's ReaLB policy sees."""
    return count_routing(workload.top_k_index, workload.modality, workload.num_experts)


RANK_CALL = (
    "as the all-reduce EP runs a layer on each rank: RealbExperts.realb_plan from the layer's global routing "
    "(config-only decisions without the routing; the dynamic policy on the device where the device executor runs, "
    "else from counts read back once), then RealbExperts.realb_run of the planned executor on the rank's rows"
)


def realb_rank_call(module: RealbExperts, workload: Workload) -> Callable[..., torch.Tensor]:
    """One EP rank's ReaLB layer call, `call(hidden, x, local_ids, weights)`: plan from the layer's `hidden` rows
    and global routing (the same plan on every rank), then run this rank's experts on its rows `x`."""
    index, modality = workload.top_k_index, (workload.modality, MODALITY_SOURCE)

    def call(hidden: torch.Tensor, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        plan = module.realb_plan(hidden, index, modality)
        return module.realb_run(plan, x, ids, weights)

    return call


__all__ = [
    "MODALITY_SOURCE",
    "RANK_CALL",
    "RankInputs",
    "oracle_inputs",
    "rank_inputs",
    "realb_rank_call",
    "routing_stats",
]
