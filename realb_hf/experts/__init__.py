"""The ReaLB MoE layer: `RealbExperts` (the swapped experts class), the layer plan that decides how each call runs,
the executors, the weights they compute with, and the adapter for per-expert ModuleList experts."""

from .module import RealbExperts, is_fused_experts, realb_class_for
from .plan import DEVICE, EXECUTORS, HOST, RECEIVED, STOCK, LayerPlan, Placement, plan_layer
from .weights import PackedWeights, Prefetch, weights_for

__all__ = [
    "DEVICE",
    "EXECUTORS",
    "HOST",
    "RECEIVED",
    "STOCK",
    "LayerPlan",
    "PackedWeights",
    "Placement",
    "Prefetch",
    "RealbExperts",
    "is_fused_experts",
    "plan_layer",
    "realb_class_for",
    "weights_for",
]
