"""Apply ReaLB to a model that is already built (from a config, or loaded without a quantization config).

`from_pretrained(..., quantization_config=RealbConfig(...))` is the usual way in; this is the same
conversion for models that exist already (tests, benchmarks, the demo's model switcher).
"""

from __future__ import annotations

import torch

from .config import RealbConfig
from .experts import RealbExperts, is_fused_experts
from .quantizer import RealbHfQuantizer, convert_experts_module
from .runtime import RealbRuntime
from .telemetry import Telemetry


def apply_realb(model: torch.nn.Module, config: RealbConfig | None = None) -> torch.nn.Module:
    """Convert `model` in place, exactly as `from_pretrained` with `quantization_config=config` would."""
    if getattr(model, "realb", None) is not None:
        raise ValueError("this model already runs ReaLB; change knobs with realb_hf.get_runtime(model).reconfigure(...)")
    if getattr(model, "hf_quantizer", None) is not None:
        method = model.hf_quantizer.quantization_config.quant_method
        raise ValueError(f"this model is already quantized with {method!r}; ReaLB needs a model in its own dtype")
    quantizer = RealbHfQuantizer(config or RealbConfig(), pre_quantized=False)
    quantizer.validate_environment()
    quantizer.preprocess_model(model)
    quantizer.postprocess_model(model)
    model.hf_quantizer = quantizer
    return model


def get_runtime(model: torch.nn.Module) -> RealbRuntime:
    """The ReaLB state of a converted model (config, modality tracker, telemetry)."""
    runtime = getattr(model, "realb", None)
    if runtime is None:
        raise ValueError(
            "this model does not run ReaLB: load it with quantization_config=RealbConfig(...) after `import realb_hf`, "
            "or call realb_hf.apply_realb(model)"
        )
    return runtime


def get_telemetry(model: torch.nn.Module) -> Telemetry:
    """Per-layer, per-rank records of a converted model (read, reset, export with `.to_json()`)."""
    return get_runtime(model).telemetry


def apply_realb_to_experts(module: torch.nn.Module, config: RealbConfig | None = None, name: str = "experts") -> RealbExperts:
    """Convert one fused experts module in place, with a runtime of its own (`module.realb_runtime`): layer
    benchmarks and layer-level tests, with no model around it. Modality is unknown (every row counts as text)."""
    if not is_fused_experts(module):
        raise ValueError(
            f"{type(module).__name__} is not a fused experts module (a class decorated with transformers' "
            "@use_experts_implementation); convert whole models with apply_realb"
        )
    if isinstance(module, RealbExperts):
        raise ValueError("this experts module already runs ReaLB")
    config = config or RealbConfig()
    config.post_init()
    runtime = RealbRuntime(config=config)
    convert_experts_module(module, name, config, runtime)
    runtime.attach_log(module)
    return module
