"""What both ReaLB token movements share: the experts module, its plan, the weight prefetch and the per-rank log.

Every rank plans from the global routing counts (all-reduce: the global ids it holds; all-to-all: the counts it
exchanged), so every rank reaches the same decision and runs its own experts at the precision it gives them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..experts import DEVICE, HOST, RECEIVED, LayerPlan, Prefetch
from ..policy import RoutingStats
from .report import entry_from_counts, layer_entry
from .state import EpState


def grad_flows(*tensors: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


class RealbEP:
    """Mixed in before transformers' `AllReduceEP` / `AllToAllEP`."""

    def __init__(self, experts, ep_mesh, tp_mesh):
        super().__init__(experts, ep_mesh, tp_mesh)
        self.experts = experts
        self.rank = ep_mesh.get_local_rank()

    @property
    def state(self) -> EpState:
        return self.experts.realb_runtime.ep

    def local_rows(self, plan: LayerPlan) -> Sequence[int] | None:
        """Rows per local expert when the plan's counts are on the host."""
        counts = plan.telemetry.counts
        return counts.expert_tokens[self.experts.realb_placement.local] if type(counts) is RoutingStats else None

    def prefetch(self, plan: LayerPlan, rows_per_expert: Sequence[int] | None) -> Prefetch | None:
        """Start converting this rank's lowered experts (on_the_fly), before the token movement is queued.

        Device executor: every flagged expert (the flags stay on the device). Host and received executors: the
        lowered experts with rows (all lowered experts when the counts are not on the host)."""
        module, side_stream = self.experts, self.state.side_stream
        if plan.executor == DEVICE:
            return Prefetch.start(module, {plan.low: None}, side_stream, plan.low_flags)
        if plan.executor not in (HOST, RECEIVED):
            return None
        requests: dict[str, list[int]] = {}
        for e, precision in enumerate(plan.precisions):
            if precision != plan.high and (rows_per_expert is None or rows_per_expert[e]):
                requests.setdefault(precision, []).append(e)
        return Prefetch.start(module, requests, side_stream)

    def finish(self, plan: LayerPlan, fp8_dispatch: bool, ready: Prefetch | None) -> None:
        """Telemetry and this rank's log entry, once the layer's work is queued."""
        module, state = self.experts, self.state
        runtime = module.realb_runtime
        runtime.telemetry.receive(module.realb_name, plan.telemetry)
        converted = ready.converted if ready is not None else 0
        forward, local = runtime.telemetry.forwards, module.realb_placement.local
        counts = plan.telemetry.counts
        if type(counts) is RoutingStats:
            rows = sum(counts.expert_tokens[local])
            state.log(
                layer_entry(forward, module.realb_name, plan.decision, plan.precisions, rows, fp8_dispatch, converted,
                            plan.high)  # fmt: skip
            )
        else:
            state.log_deferred(
                entry_from_counts, forward, module.realb_name, plan.telemetry, runtime.telemetry, local,
                fp8_dispatch, converted,
            )  # fmt: skip
