"""`RealbExperts`: a drop-in for any transformers experts class decorated with `@use_experts_implementation`.

The quantizer swaps an experts module's class for `Realb<Original>` (RealbExperts first in the MRO), so every
parameter, buffer, layout flag and `_apply_gate` of the original stays exactly as it was. A forward is
`plan_layer` (decision, executor, telemetry input), then one executor. Real expert parallelism (`realb_hf.ep`)
plans and runs through the same public methods, with its placement and the counts it exchanged.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .. import telemetry_log, telemetry_ops
from ..kernels import counts as count_kernels
from ..modality import TEXT
from ..policy import RoutingStats
from ..runtime import RealbRuntime
from . import device_path, host_path, received
from .plan import DEVICE, HOST, RECEIVED, STOCK, LayerPlan, Placement, plan_layer
from .weights import Prefetch, weights_for

_SWAPPED: dict[type, type] = {}


def is_fused_experts(module: torch.nn.Module) -> bool:
    """True for modules whose class carries transformers' `@use_experts_implementation`."""
    forward = getattr(type(module), "forward", None)
    return (
        hasattr(forward, "__wrapped__")
        and hasattr(module, "is_concatenated")
        and hasattr(module, "has_gate")
        and hasattr(module, "num_experts")
    )


def realb_class_for(cls: type) -> type:
    """The Realb subclass of an experts class (one per original class, so isinstance checks stay cheap)."""
    if issubclass(cls, RealbExperts):
        return cls
    if cls not in _SWAPPED:
        _SWAPPED[cls] = type(f"Realb{cls.__name__}", (RealbExperts, cls), {"__module__": __name__})
    return _SWAPPED[cls]


class RealbExperts(torch.nn.Module):
    """Runs each expert group at the precision ReaLB's policy chose for this layer and batch."""

    realb_runtime: RealbRuntime | None = None
    realb_name: str = ""
    realb_pool: str | None = None  # "text"/"vision" for modality-isolated pools (ERNIE-4.5-VL)
    realb_placement: Placement | None = None  # the global experts held here (set again under real EP)
    # "auto" | "always" | "never": where the device executor may run (`device_path.supports`)
    realb_device_path: str = "auto"
    realb_fuse_swiglu: bool = True  # False: formats run the model's own gating instead of fused SwiGLU kernels

    def realb_attach(self, runtime: RealbRuntime, name: str, pool: str | None = None) -> None:
        self.realb_runtime = runtime
        self.realb_name = name
        self.realb_pool = pool
        self.realb_placement = Placement.whole(self.num_experts)
        self.realb_weight_cache: dict = {}  # format -> persistent PackedWeights (weight_cache="persistent")
        self.realb_plan_cache: list = []  # the config-only decision of the params in use

    def realb_free_cache(self) -> None:
        """Drop persistent low-precision copies (they are made again when next needed)."""
        self.realb_weight_cache = {}

    # ---- planning --------------------------------------------------------------------------------

    def realb_modality(self, num_rows: int) -> tuple[torch.Tensor | None, str]:
        """Modality codes of the rows this module received in the forward in flight, and where they came from."""
        return self.realb_runtime.modality.rows(num_rows, self.realb_pool)

    def realb_routing_counts(
        self, top_k_index: torch.Tensor, modality: torch.Tensor | None, num_experts: int
    ) -> torch.Tensor:
        """(2, num_experts) on the routing's device: token-expert pairs per expert, and of those the vision ones.
        Ids >= `num_experts` (EP sentinels) are not counted. No host sync, so EP can exchange it as it is."""
        return count_kernels.routing_counts(top_k_index, modality, num_experts, TEXT)

    def realb_plan(
        self,
        hidden_states: torch.Tensor,
        top_k_index: torch.Tensor,
        modality: tuple[torch.Tensor | None, str] | None = None,
        host_stats: RoutingStats | None = None,
        quantized_dispatch: bool = False,
        ep_rank: int = 0,
        record: bool = True,
    ) -> LayerPlan:
        """`plan_layer` for this module: global ids in `top_k_index`, this module's placement and params."""
        params = self.realb_runtime.params(hidden_states.device)
        return plan_layer(
            self, hidden_states, top_k_index, params, self.realb_placement, modality, host_stats, quantized_dispatch,
            ep_rank, self.realb_plan_cache, record,
        )  # fmt: skip

    # ---- execution -------------------------------------------------------------------------------

    def realb_run(
        self,
        plan: LayerPlan,
        hidden_states: torch.Tensor,
        top_k_index: torch.Tensor,
        top_k_weights: torch.Tensor,
        ready: Prefetch | None = None,
    ) -> torch.Tensor:
        """`plan`'s executor on rows in the model dtype; `top_k_index` holds local ids (ids >= num_experts belong
        to other EP ranks). `ready`: weights an EP prefetch converted ahead of time."""
        if plan.executor == STOCK:
            return super().forward(hidden_states, top_k_index, top_k_weights)
        self._realb_refuse_training()
        if plan.executor == DEVICE:
            low_weights = weights_for(self, plan.low, flags=plan.low_flags, ready=ready)
            return device_path.run(
                self, hidden_states, top_k_index, top_k_weights, plan.low_flags, plan.high, low_weights
            )
        if plan.executor == HOST:
            return host_path.run(self, hidden_states, top_k_index, top_k_weights, plan.precisions, plan.high, ready)
        raise ValueError(f"executor {plan.executor!r} takes quantized rows: use realb_run_received")

    def realb_run_received(
        self,
        plan: LayerPlan,
        xq: torch.Tensor,
        x_scale: torch.Tensor,
        expert_ids: torch.Tensor,
        out_dtype: torch.dtype,
        ready: Prefetch | None = None,
        rows_per_expert: Sequence[int] | None = None,
    ) -> torch.Tensor:
        """The received executor: rows already quantized to `plan.low` (one local expert per row, unit weight)."""
        if plan.executor != RECEIVED:
            raise ValueError(f"realb_run_received needs a plan with the received executor, got {plan.executor!r}")
        self._realb_refuse_training()
        return received.run(self, xq, x_scale, expert_ids, out_dtype, ready, rows_per_expert)

    def _realb_refuse_training(self) -> None:
        """Lowered experts are for inference: their formats define no backward."""
        if self.training and torch.is_grad_enabled():
            raise RuntimeError(
                f"{self.realb_name}: ReaLB lowered these experts to low precision while the model trains (train mode "
                "with gradients enabled), and low-precision experts have no backward. ReaLB is for inference: call "
                "model.eval() or run under torch.no_grad(), or train with RealbConfig(policy='off') "
                "(realb_hf.get_runtime(model).reconfigure(policy='off')), which never lowers anything"
            )

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        runtime = self.realb_runtime
        if runtime is None:
            return super().forward(hidden_states, top_k_index, top_k_weights)
        telemetry = runtime.telemetry
        plan = self.realb_plan(hidden_states, top_k_index, record=telemetry.enabled)
        if plan.telemetry is not None:
            if torch.compiler.is_compiling():  # dynamo cannot trace telemetry's lock: the device log takes it
                log = getattr(self, telemetry_log.BUFFER, None) if runtime.in_forward() else None
                telemetry_ops.receive(runtime, self.realb_name, plan.telemetry, top_k_index, log)
            else:
                telemetry.receive(self.realb_name, plan.telemetry)
        return self.realb_run(plan, hidden_states, top_k_index, top_k_weights)
