"""Saving a model so transformers' EP loader reads it back.

transformers 5.23 converts some checkpoint layouts with `Transpose(check_dims=True)`, which compares the
checkpoint tensor with the parameter's *global* shape; under EP the tensor is already this rank's dim-0 shard, so a
checkpoint saved in the model's own layout (what `save_pretrained` writes) is transposed by mistake and loading
fails with a size mismatch. Hub checkpoints use the source layout and load fine.
"""

from __future__ import annotations

from pathlib import Path

import torch

# model type -> expert tensors stored (E, in, out) in the source layout
SOURCE_LAYOUT_TRANSPOSED = {"qwen3_vl_moe": ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")}


def save_for_expert_parallel(model: torch.nn.Module, path: str | Path) -> None:
    """`save_pretrained`, with expert tensors in the layout transformers' EP loader reads correctly.

    Only Qwen3-VL-MoE needs it; other families are saved unchanged. The result loads with and without EP.
    """
    from safetensors.torch import load_file, save_file

    model.save_pretrained(path)
    suffixes = SOURCE_LAYOUT_TRANSPOSED.get(getattr(model.config, "model_type", ""), ())
    if not suffixes:
        return
    for file in sorted(Path(path).glob("*.safetensors")):
        tensors = load_file(file)
        changed = False
        for key, tensor in tensors.items():
            if key.endswith(suffixes) and tensor.dim() == 3:
                tensors[key] = tensor.transpose(1, 2).contiguous()
                changed = True
        if changed:
            save_file(tensors, file, metadata={"format": "pt"})
