"""`RealbHfQuantizer`: the transformers hooks that turn a fused-MoE model into a ReaLB model.

Only module classes change; checkpoints hold the same tensors as the stock model, so saving, reloading,
per-expert <-> fused checkpoint conversion and EP/TP plans behave as without ReaLB.
"""

from __future__ import annotations

from transformers.quantizers.base import HfQuantizer

from .config import RealbConfig
from .ep.setup import install_expert_parallel, prepare_expert_parallel
from .experts import RealbExperts, is_fused_experts, realb_class_for
from .experts.modulelist import (
    REMOTE_CODE_FAMILIES,
    find_modulelist_moe,
    layout_stand_in,
    patch_modulelist_moe,
    stack_modulelist_experts,
    unstack_modulelist_experts,
)
from .modality import POOL_TEXT, POOL_VISION
from .runtime import LayerShape, RealbRuntime

SUPPORTED_FAMILIES = (
    "qwen3_vl_moe",
    "glm4v_moe",
    "ernie4_5_vl_moe",
    "qwen3_5_moe",
    "kimi_k25",
    "deepseek_ocr2",
    "qwen3_moe",
    "qwen2_moe",
    "deepseek_v2",
    "deepseek_v3",
    "mixtral",
    "olmoe",
    "gpt_oss",
)


def _pool_of(name: str) -> str | None:
    """ERNIE-4.5-VL keeps one expert pool per modality: each sees only its modality's rows."""
    if ".vision_moe." in f".{name}.":
        return POOL_VISION
    if ".text_moe." in f".{name}.":
        return POOL_TEXT
    return None


def layer_shape(module) -> LayerShape:
    """Experts, hidden and intermediate size of a fused experts module (or its stacked stand-in); reads shapes only,
    so it runs on the meta device before any weight loads."""
    first = module.gate_up_proj if module.has_gate else module.up_proj
    hidden = first.shape[1] if module.is_transposed else first.shape[2]
    inter = module.down_proj.shape[1] if module.is_transposed else module.down_proj.shape[2]
    return LayerShape(first.shape[0], hidden, inter)


def convert_experts_module(module, name: str, config: RealbConfig, runtime: RealbRuntime) -> None:
    """Swap one fused experts module for its Realb class; the checks raise before any weight loads."""
    runtime.add_layer(name, layer_shape(module))
    module.__class__ = realb_class_for(type(module))
    module.realb_attach(runtime, name, _pool_of(name))


def replace_with_realb_experts(model, config: RealbConfig, runtime: RealbRuntime) -> list[str]:
    """Swap every fused experts module (outside `modules_to_not_convert`) for its Realb class; return their names."""
    skip = config.modules_to_not_convert or []
    replaced = []
    for name, module in model.named_modules():
        if not name.endswith("experts") or not is_fused_experts(module):
            continue
        if any(fragment in name for fragment in skip):
            continue
        convert_experts_module(module, name, config, runtime)
        replaced.append(name)
    # per-expert nn.ModuleList MoE blocks (experts/modulelist.py): their weights are stacked after loading
    modulelist_blocks = list(find_modulelist_moe(model))
    for name, block in modulelist_blocks:
        if any(fragment in name for fragment in skip):
            continue
        runtime.add_layer(name, layer_shape(layout_stand_in(name, block.experts)))
        patch_modulelist_moe(block, runtime, name, _pool_of(name))
        replaced.append(name)
    if not replaced:
        model_type = getattr(model.config, "model_type", type(model).__name__)
        why = (
            f"all of them matched modules_to_not_convert={skip}"
            if modulelist_blocks or any(is_fused_experts(m) for _, m in model.named_modules())
            else "it has no fused experts module (a class decorated with transformers' @use_experts_implementation) "
            "and no per-expert nn.ModuleList MoE block (experts + gate + moe_infer)"
        )
        raise ValueError(
            f"ReaLB found nothing to convert in model type {model_type!r}: {why}. "
            f"Supported families include {list(SUPPORTED_FAMILIES)} and every other model whose experts use "
            "@use_experts_implementation, and the remote-code DeepSeek-V2/V3 MoE layout "
            f"({list(REMOTE_CODE_FAMILIES)}, trust_remote_code=True); Llama4 is not supported."
        )
    return replaced


class RealbHfQuantizer(HfQuantizer):
    """Hooks ReaLB into `from_pretrained(..., quantization_config=RealbConfig(...))`."""

    requires_calibration = False

    def __init__(self, quantization_config: RealbConfig, **kwargs):
        super().__init__(quantization_config, **kwargs)
        self.runtime: RealbRuntime | None = None

    def validate_environment(self, *args, **kwargs) -> None:
        # A config merged at reload had fields set one by one: check the combination once more.
        self.quantization_config.post_init()

    def _process_model_before_weight_loading(self, model, **kwargs):
        # Under DistributedConfig(ep_size=N): layout checks and RealbConfig.ep_size, before any weight loads.
        prepare_expert_parallel(model, self.quantization_config)
        self.runtime = RealbRuntime.for_model(model, self.quantization_config)
        replace_with_realb_experts(model, self.quantization_config, self.runtime)
        return model

    def _process_model_after_weight_loading(self, model, **kwargs):
        self.runtime.modality.attach(model, on_forward=self.runtime.begin_forward, on_end=self.runtime.end_forward)
        model.realb = self.runtime
        # transformers split the experts by EP after the pre-load hook: give them ReaLB's token movement now.
        install_expert_parallel(model, self.runtime)
        # Per-expert ModuleList experts: weights move into one stacked tensor pair per layer (no second copy kept).
        stack_modulelist_experts(model)
        for module in realb_modules(model):
            self.runtime.attach_log(module)
        return model

    def get_state_dict_and_metadata(self, model):
        # Stacked ModuleList experts share one storage per layer, which transformers would clone all at once while
        # saving: give each expert weight its own storage first (one layer at a time; restacked when next lowered).
        unstack_modulelist_experts(model)
        return super().get_state_dict_and_metadata(model)

    def is_serializable(self) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return False

    @property
    def is_compileable(self) -> bool:
        return True


def realb_modules(model) -> list[RealbExperts]:
    return [m for m in model.modules() if isinstance(m, RealbExperts)]
