"""ReaLB's all-reduce token movement: every rank of the EP group holds the whole batch and the global expert ids,
so the global counts are local and the decision costs no communication."""

from __future__ import annotations

import torch
from transformers.distributed.expert_parallel import AllReduceEP
from transformers.distributed.parallel_utils import _AllReduceBackward, _AllReduceForward

from .base import RealbEP
from .groups import collective


class RealbAllReduceEP(RealbEP, AllReduceEP):
    """transformers' `AllReduceEP` (masked local experts, then an all-reduce) with this rank's experts at the
    precision ReaLB chose from the global ids, which transformers' `__call__` drops before the experts run."""

    def __call__(self, hidden_states, top_k_index, top_k_weights):
        module = self.experts
        num_local = module.realb_placement.num_local
        plan = module.realb_plan(hidden_states, top_k_index)
        ready = self.prefetch(plan, self.local_rows(plan))
        ep_group = self.ep_mesh.get_group()
        hidden_states = _AllReduceBackward.apply(hidden_states, ep_group)
        top_k_weights = _AllReduceBackward.apply(top_k_weights, ep_group)
        off_rank = (top_k_index // num_local) != self.rank
        local_index = torch.where(off_rank, num_local, top_k_index % num_local)
        output = module.realb_run(plan, hidden_states, local_index, top_k_weights.masked_fill(off_rank, 0.0), ready)
        with collective("all_reduce of the expert outputs", module):
            output = _AllReduceForward.apply(output, ep_group)
        self.finish(plan, False, ready)
        return output
