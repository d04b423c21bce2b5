"""A bare experts module with random weights, its ReaLB copy and a routing: layer-level test inputs."""

from __future__ import annotations

import copy

import torch

import realb_hf


def build_experts(hidden: int, inter: int, num_experts: int, device: torch.device | str = "cpu"):
    """A Qwen3-VL-MoE experts module (fused gate|up, SwiGLU, no bias) in bf16 with random weights."""
    from transformers import Qwen3VLMoeTextConfig
    from transformers.models.qwen3_vl_moe.modeling_qwen3_vl_moe import Qwen3VLMoeTextExperts

    config = Qwen3VLMoeTextConfig(hidden_size=hidden, moe_intermediate_size=inter, num_experts=num_experts)
    config._experts_implementation = "grouped_mm"
    module = Qwen3VLMoeTextExperts(config).to(device=device, dtype=torch.bfloat16)
    with torch.no_grad():
        module.gate_up_proj.normal_(0, hidden**-0.5)
        module.down_proj.normal_(0, inter**-0.5)
    return module.eval()


def realb_copy(module, **config):
    """A deep copy of `module` converted with `apply_realb_to_experts(RealbConfig(**config))`."""
    return realb_hf.apply_realb_to_experts(copy.deepcopy(module), realb_hf.RealbConfig(**config))


def routing(tokens: int, num_experts: int, top_k: int, hidden: int, device: torch.device | str, seed: int):
    """(hidden (T, H) bf16, top_k_index (T, k), top_k_weights (T, k) bf16) with distinct experts per token."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    index = torch.rand(tokens, num_experts, generator=gen).topk(top_k, dim=-1).indices.to(device)
    weights = torch.softmax(torch.randn(tokens, top_k, generator=gen), -1).to(device, torch.bfloat16)
    x = torch.randn(tokens, hidden, generator=gen).to(device, torch.bfloat16)
    return x, index, weights
