"""realb_hf: ReaLB (real-time precision load balancing for multimodal MoE under expert parallelism) for transformers.

Importing this package registers the "realb" quantization method with transformers, so
`from_pretrained(..., quantization_config=RealbConfig(...))` works and saved ReaLB models reload as ReaLB models.
"""

from .noise import demote_harmless_import_warnings

demote_harmless_import_warnings()  # before anything below imports torchao (through transformers' quantizers)

from .apply import apply_realb, apply_realb_to_experts, get_runtime, get_telemetry
from .config import RealbConfig
from .experts import RealbExperts
from .layer_record import LayerRecord
from .policy import Decision, PolicyParams, RoutingStats, decide
from .quantizer import SUPPORTED_FAMILIES, RealbHfQuantizer
from .registration import register
from .telemetry import Telemetry

__version__ = "0.1.0"

register()

__all__ = [
    "SUPPORTED_FAMILIES",
    "Decision",
    "LayerRecord",
    "PolicyParams",
    "RealbConfig",
    "RealbExperts",
    "RealbHfQuantizer",
    "RoutingStats",
    "Telemetry",
    "apply_realb",
    "apply_realb_to_experts",
    "decide",
    "get_runtime",
    "get_telemetry",
]
