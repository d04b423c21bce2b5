"""The MoE layers the benchmarks time: real models' expert shapes, their stock experts modules, and one EP rank's
share of a layer (its block of experts, as transformers' expert parallelism shards them)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..apply import apply_realb_to_experts
from ..config import RealbConfig
from ..experts import Placement


@dataclass(frozen=True)
class LayerPreset:
    name: str
    family: str  # "qwen3_vl_moe" | "deepseek_v2": which transformers experts class
    hidden: int
    intermediate: int  # moe_intermediate_size
    num_experts: int
    top_k: int
    source: str

    def config(self):
        if self.family == "qwen3_vl_moe":
            from transformers import Qwen3VLMoeTextConfig as config_class

            experts_field = "num_experts"
        elif self.family == "deepseek_v2":
            from transformers import DeepseekV2Config as config_class

            experts_field = "n_routed_experts"
        else:
            raise ValueError(f"unknown family {self.family!r}")
        return config_class(
            hidden_size=self.hidden,
            moe_intermediate_size=self.intermediate,
            num_experts_per_tok=self.top_k,
            hidden_act="silu",
            experts_implementation="grouped_mm",  # transformers' default inside a model
            **{experts_field: self.num_experts},
        )

    def experts_class(self) -> type:
        if self.family == "qwen3_vl_moe":
            from transformers.models.qwen3_vl_moe.modeling_qwen3_vl_moe import Qwen3VLMoeTextExperts

            return Qwen3VLMoeTextExperts
        from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2Experts

        return DeepseekV2Experts


PRESETS: dict[str, LayerPreset] = {
    "qwen3-vl-30b-a3b": LayerPreset(
        "qwen3-vl-30b-a3b",
        "qwen3_vl_moe",
        2048,
        768,
        128,
        8,
        "Qwen/Qwen3-VL-30B-A3B-Instruct text_config (Qwen3VLMoeTextExperts)",
    ),
    "deepseek-vl2-small": LayerPreset(
        "deepseek-vl2-small",
        "deepseek_v2",
        2048,
        1408,
        64,
        6,
        "deepseek-ai/deepseek-vl2-small language_config = DeepSeekMoE-16B: hidden 2048, moe_intermediate 1408, "
        "64 routed experts (+2 shared, not benchmarked), top-6 (DeepseekV2Experts)",
    ),
    "deepseek-vl2": LayerPreset(
        "deepseek-vl2",
        "deepseek_v2",
        2560,
        1536,
        72,
        6,
        "deepseek-ai/deepseek-vl2 language_config = DeepSeekMoE-27B: hidden 2560, moe_intermediate 1536, "
        "72 routed experts (+2 shared, not benchmarked), top-6 (DeepseekV2Experts)",
    ),
    "tiny": LayerPreset("tiny", "qwen3_vl_moe", 64, 96, 16, 4, "CPU test size"),
}
ALIASES = {"deepseek-v2-vl": "deepseek-vl2-small"}


def get_preset(name: str) -> LayerPreset:
    name = ALIASES.get(name, name)
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS) + sorted(ALIASES)}")
    return PRESETS[name]


def build_experts(
    preset: LayerPreset, device: torch.device, dtype: torch.dtype = torch.bfloat16, seed: int = 0
) -> torch.nn.Module:
    """The stock transformers experts module of `preset`, random weights allocated directly on `device`."""
    config = preset.config()
    with torch.device("meta"):
        module = preset.experts_class()(config)
    gen = torch.Generator(device=device).manual_seed(seed)
    for name in ("gate_up_proj", "down_proj"):
        shape = getattr(module, name).shape
        fan_in = shape[-1]
        weight = torch.randn(shape, device=device, dtype=dtype, generator=gen) * fan_in**-0.5
        setattr(module, name, torch.nn.Parameter(weight, requires_grad=False))
    return module.eval()


def rank_module(
    full: torch.nn.Module, lo: int, hi: int, expert_parallel: bool, config: RealbConfig | None = None
) -> torch.nn.Module:
    """An experts module holding experts [lo, hi) of `full` (weight views, no copy), as one EP rank holds them.

    With `config`, a ReaLB module converted as real EP converts it: the layer's module first (the conversion's
    layout checks see the layer's experts), then it keeps its experts and `realb_placement` places them in the layer.
    """
    with torch.device("meta"):
        module = type(full)(full.config)
    if config is not None:
        apply_realb_to_experts(module, config, name=f"experts[{lo}:{hi}]")
    module.num_experts = hi - lo
    for name in ("gate_up_proj", "down_proj"):
        setattr(module, name, torch.nn.Parameter(getattr(full, name)[lo:hi], requires_grad=False))
    # transformers' EP sharding sets this private flag on every rank (no public setter exists): with it the stock
    # forward skips the sentinel ids that stand for other ranks' experts (the all_reduce form)
    module._is_expert_parallel = expert_parallel
    if config is not None:
        module.realb_placement = Placement(lo, hi - lo, full.num_experts)
    return module.eval()


__all__ = ["ALIASES", "PRESETS", "LayerPreset", "build_experts", "get_preset", "rank_module"]
