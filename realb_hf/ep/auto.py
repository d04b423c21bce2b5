"""transformers' `AutoEP` choice with the ReaLB token movements."""

from __future__ import annotations

import torch
from transformers.distributed.expert_parallel import EPImplementation

from .all_reduce import RealbAllReduceEP
from .all_to_all import RealbAllToAllEP


class RealbAutoEP(EPImplementation):
    """All-reduce at inference when the EP group shares one batch, all-to-all otherwise (as `AutoEP`)."""

    def __init__(self, experts, ep_mesh, tp_mesh):
        super().__init__(experts, ep_mesh, tp_mesh)
        self.all_to_all = RealbAllToAllEP(experts, ep_mesh, tp_mesh)
        self.all_reduce = RealbAllReduceEP(experts, ep_mesh, tp_mesh) if self.shares_batch else None

    def __call__(self, hidden_states, top_k_index, top_k_weights):
        if self.all_reduce is not None and not (torch.is_grad_enabled() and hidden_states.requires_grad):
            return self.all_reduce(hidden_states, top_k_index, top_k_weights)
        return self.all_to_all(hidden_states, top_k_index, top_k_weights)
