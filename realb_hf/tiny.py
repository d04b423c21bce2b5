"""Tiny, randomly initialised models of the supported families, built from configs (no downloads).

Used by the CLI's default run, the tests and the benchmarks' smoke mode. Dimensions keep
`2 * moe_intermediate_size != hidden_size` so checkpoint converters can tell tensors apart.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

IMAGE_TOKEN_ID = 5
VIDEO_TOKEN_ID = 6
VOCAB = 128


@dataclass
class TinyBatch:
    """Inputs for one forward of a tiny model: `kwargs` go straight into `model(**kwargs)`."""

    kwargs: dict
    num_image_tokens: int


def tiny_qwen3_vl_moe_config(num_experts: int = 8, top_k: int = 2, layers: int = 2, hidden: int = 64):
    from transformers import Qwen3VLMoeConfig

    return Qwen3VLMoeConfig(
        text_config=dict(
            vocab_size=VOCAB,
            hidden_size=hidden,
            intermediate_size=96,
            num_hidden_layers=layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            moe_intermediate_size=96,
            num_experts=num_experts,
            num_experts_per_tok=top_k,
            decoder_sparse_step=1,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
            max_position_embeddings=512,
            pad_token_id=0,
            tie_word_embeddings=False,
        ),
        vision_config=dict(
            depth=2,
            hidden_size=32,
            intermediate_size=64,
            num_heads=2,
            in_channels=3,
            patch_size=4,
            spatial_merge_size=2,
            temporal_patch_size=2,
            out_hidden_size=hidden,
            num_position_embeddings=64,
            deepstack_visual_indexes=[1],
        ),
        image_token_id=IMAGE_TOKEN_ID,
        video_token_id=VIDEO_TOKEN_ID,
        vision_start_token_id=3,
        vision_end_token_id=4,
        tie_word_embeddings=False,
    )


def build_tiny_model(config, seed: int = 0, dtype: torch.dtype = torch.bfloat16) -> torch.nn.Module:
    """A randomly initialised model for `config`, with experts scaled so that outputs are not all noise."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    torch.manual_seed(seed)
    is_vlm = hasattr(config, "vision_config")
    auto = AutoModelForImageTextToText if is_vlm else AutoModelForCausalLM
    model = auto.from_config(config, dtype=dtype)
    return model.eval()


def qwen3_vl_image_batch(
    batch: int = 2, text_tokens: int = 8, grid: tuple[int, int] = (8, 8), seed: int = 0, config=None
) -> TinyBatch:
    """An image+text batch for a tiny Qwen3-VL-MoE: every row holds one image of `grid` patches then text."""
    vision = config.vision_config if config is not None else tiny_qwen3_vl_moe_config().vision_config
    merge = vision.spatial_merge_size
    gen = torch.Generator().manual_seed(seed)
    h, w = grid
    image_tokens = (h * w) // (merge * merge)
    patch_dim = vision.in_channels * vision.temporal_patch_size * vision.patch_size**2
    pixel_values = torch.randn(batch * h * w, patch_dim, generator=gen)
    image_grid_thw = torch.tensor([[1, h, w]] * batch)
    rows, types = [], []
    for _ in range(batch):
        text = torch.randint(10, VOCAB, (text_tokens,), generator=gen).tolist()
        ids = [3] + [IMAGE_TOKEN_ID] * image_tokens + [4] + text
        rows.append(ids)
        types.append([0] + [1] * image_tokens + [0] + [0] * text_tokens)
    input_ids = torch.tensor(rows)
    return TinyBatch(
        kwargs=dict(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            pixel_values=pixel_values,
            image_grid_thw=image_grid_thw,
            mm_token_type_ids=torch.tensor(types, dtype=torch.int32),
        ),
        num_image_tokens=batch * image_tokens,
    )
