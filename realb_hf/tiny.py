"""Tiny, randomly initialised models of the supported families, built from configs (no downloads).

Used by the CLI's default run, the tests and the benchmarks' smoke mode. Dimensions keep
`2 * moe_intermediate_size != hidden_size` so checkpoint converters can tell tensors apart.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

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
        vision_config=_tiny_vision(
            temporal_patch_size=2, out_hidden_size=hidden, num_position_embeddings=64, deepstack_visual_indexes=[1]
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


# ---- more families ---------------------------------------------------------------------------------
# Shared tiny dimensions. Hidden and expert-intermediate sizes are multiples of 32 (the K dims of both
# expert GEMMs), so mxfp4 (32-element blocks) and nvfp4 (16) quantize them without padding; and
# 2 * MOE_INTERMEDIATE != HIDDEN keeps the fused gate_up tensor distinguishable from its transpose.
HIDDEN = 64
MOE_INTERMEDIATE = 96
NUM_EXPERTS = 8
TOP_K = 2
LAYERS = 2
TEXT_TOKENS = 8  # text tokens per row after the image
VISION_START_ID, VISION_END_ID = 3, 4
PAD_ID, EOS_ID, BOS_ID = 0, 1, 2


def _tiny_vision(**extra) -> dict:
    """A two-block vision tower with 4-pixel patches merged 2x2: a few tokens per image."""
    return dict(
        depth=2,
        hidden_size=32,
        intermediate_size=64,
        num_heads=2,
        in_channels=3,
        patch_size=4,
        spatial_merge_size=2,
        **extra,
    )


# Placeholder and start/end ids of the VLMs that mark image and video spans with their own tokens.
_START_END_TOKEN_IDS = dict(
    image_token_id=IMAGE_TOKEN_ID,
    video_token_id=VIDEO_TOKEN_ID,
    image_start_token_id=VISION_START_ID,
    image_end_token_id=VISION_END_ID,
    video_start_token_id=7,
    video_end_token_id=8,
    tie_word_embeddings=False,
)


def _common_text(**extra) -> dict:
    """Fields every tiny text config shares (vocab, sizes, special ids)."""
    return dict(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        max_position_embeddings=512,
        pad_token_id=PAD_ID,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        tie_word_embeddings=False,
        **extra,
    )


def tiny_glm4v_moe_config():
    from transformers import Glm4vMoeConfig

    return Glm4vMoeConfig(
        text_config=_deepseek_moe(
            num_key_value_heads=2,
            n_group=1,
            topk_group=1,
            first_k_dense_replace=0,  # every layer MoE
            # head_dim 16, partial_rotary_factor 0.5 -> 8 rotary dims -> 4 frequencies split 2/1/1 (t/h/w)
            rope_parameters={
                "rope_type": "default",
                "rope_theta": 10000.0,
                "mrope_section": [2, 1, 1],
                "partial_rotary_factor": 0.5,
            },
        ),
        vision_config=_tiny_vision(image_size=32, temporal_patch_size=2, out_hidden_size=HIDDEN),
        **_START_END_TOKEN_IDS,
    )


def tiny_ernie4_5_vl_moe_config():
    from transformers import Ernie4_5_VLMoeConfig

    return Ernie4_5_VLMoeConfig(
        text_config=_common_text(
            intermediate_size=96,
            num_key_value_heads=2,
            use_bias=False,
            moe_intermediate_size=[MOE_INTERMEDIATE, MOE_INTERMEDIATE],  # text pool, vision pool
            moe_num_experts=NUM_EXPERTS,  # each pool has this many experts
            moe_k=TOP_K,
            moe_num_shared_experts=1,
            mlp_layer_types=["sparse"] * LAYERS,
            # head_dim 16 -> 8 frequencies: h 3, w 3, t 2 (h and w must match)
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [3, 3, 2]},
        ),
        vision_config=_tiny_vision(temporal_merge_size=2),
        **_START_END_TOKEN_IDS,
    )


def _deepseek_moe(**extra) -> dict:
    """Text fields of DeepSeek-style MoE configs (routed + one shared expert), as GLM-4.5V and DeepSeek-OCR-2 use."""
    return _common_text(
        intermediate_size=96,
        moe_intermediate_size=MOE_INTERMEDIATE,
        n_routed_experts=NUM_EXPERTS,
        num_experts_per_tok=TOP_K,
        n_shared_experts=1,
        **extra,
    )


def _deepseek_v3_text(**extra) -> dict:
    return _deepseek_moe(
        num_key_value_heads=4,
        n_group=2,
        topk_group=1,
        first_k_dense_replace=0,  # every layer MoE
        q_lora_rank=32,
        kv_lora_rank=32,
        qk_rope_head_dim=8,
        qk_nope_head_dim=16,
        v_head_dim=16,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        **extra,
    )


def tiny_kimi_k25_config():
    from transformers import Kimi_K25Config

    return Kimi_K25Config(
        text_config=_deepseek_v3_text(model_type="deepseek_v3"),
        vision_config=dict(
            patch_size=4,
            pos_emb_height=8,
            pos_emb_width=8,
            pos_emb_time=4,
            num_attention_heads=2,
            num_hidden_layers=2,
            hidden_size=32,
            intermediate_size=64,
            merge_kernel_size=[2, 2],
        ),
        projection_hidden_size=32,  # = vision hidden size (the projector's pre-norm width)
        image_token_id=IMAGE_TOKEN_ID,
        video_token_id=VIDEO_TOKEN_ID,
        vision_start_token_id=VISION_START_ID,
        vision_end_token_id=VISION_END_ID,
        tie_word_embeddings=False,
    )


# DeepSeek-OCR-2: a tiny SAM (64 px images, 4 px patches -> 16x16, neck + two stride-2 convs -> 4x4 = 16 patches)
# feeds a tiny Qwen2-style encoder that appends 144 learned queries (the 768 px set, used for <= 144 patches);
# each image becomes its 144 query features plus one view separator.
OCR2_IMAGE_SIZE = 64
OCR2_TOKENS_PER_IMAGE = 144 + 1


def tiny_deepseek_ocr2_config():
    from transformers import DeepseekOcr2Config

    return DeepseekOcr2Config(
        text_config=_deepseek_moe(
            num_key_value_heads=4,
            topk_method="greedy",
            mlp_layer_types=["sparse"] * LAYERS,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        ),
        vision_config=dict(
            sam_config=dict(
                hidden_size=32,
                output_channels=32,
                num_hidden_layers=2,
                num_attention_heads=2,
                image_size=OCR2_IMAGE_SIZE,
                patch_size=4,
                window_size=4,
                global_attn_indexes=[1],
                mlp_dim=64,
                downsample_channels=[32, 32],  # the last one is the encoder's hidden size
            ),
            encoder_config=dict(
                vocab_size=VOCAB,
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=1,
                num_attention_heads=2,
                num_key_value_heads=2,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
            ),
        ),
        image_token_id=IMAGE_TOKEN_ID,
        tie_word_embeddings=False,
    )


def tiny_qwen3_moe_config():
    from transformers import Qwen3MoeConfig

    return Qwen3MoeConfig(
        **_common_text(
            intermediate_size=96,
            num_key_value_heads=2,
            head_dim=16,
            moe_intermediate_size=MOE_INTERMEDIATE,
            num_experts=NUM_EXPERTS,
            num_experts_per_tok=TOP_K,
            decoder_sparse_step=1,
            mlp_only_layers=[],
            norm_topk_prob=True,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        )
    )


def tiny_deepseek_v3_config():
    from transformers import DeepseekV3Config

    return DeepseekV3Config(**_deepseek_v3_text())


def tiny_mixtral_config():
    from transformers import MixtralConfig

    return MixtralConfig(
        **_common_text(
            intermediate_size=MOE_INTERMEDIATE,  # Mixtral's experts use intermediate_size
            num_key_value_heads=2,
            head_dim=16,
            num_local_experts=NUM_EXPERTS,
            num_experts_per_tok=TOP_K,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        )
    )


def tiny_gpt_oss_config():
    from transformers import GptOssConfig

    return GptOssConfig(
        **_common_text(
            intermediate_size=MOE_INTERMEDIATE,  # per expert; gate_up is (E, H, 2I), interleaved, with biases
            num_key_value_heads=2,
            head_dim=16,
            num_local_experts=NUM_EXPERTS,
            num_experts_per_tok=TOP_K,
            sliding_window=8,
            rope_parameters={  # YaRN as in the real model, scaled to the tiny context (4 * 128 = 512)
                "rope_type": "yarn",
                "rope_theta": 150000.0,
                "factor": 4.0,
                "beta_fast": 32.0,
                "beta_slow": 1.0,
                "truncate": False,
                "original_max_position_embeddings": 128,
            },
        )
    )


# ---- batches ---------------------------------------------------------------------------------------


def _text_ids(gen: torch.Generator, n: int) -> list[int]:
    """Random ordinary-text token ids (above every special id)."""
    return torch.randint(10, VOCAB, (n,), generator=gen).tolist()


def text_batch(config=None, batch: int = 2, seed: int = 0, tokens: int = 16) -> TinyBatch:
    """A text-only batch for any tiny family."""
    gen = torch.Generator().manual_seed(seed)
    input_ids = torch.tensor([_text_ids(gen, tokens) for _ in range(batch)])
    return TinyBatch(kwargs=dict(input_ids=input_ids, attention_mask=torch.ones_like(input_ids)), num_image_tokens=0)


def _rows_with_image(
    gen: torch.Generator, batch: int, image_tokens: int, start: int | None, end: int | None, text_tokens: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids [start] image... [end] text..., and mm_token_type_ids (1 on image placeholders only)."""
    rows, types = [], []
    for _ in range(batch):
        ids = ([start] if start is not None else []) + [IMAGE_TOKEN_ID] * image_tokens
        ids += ([end] if end is not None else []) + _text_ids(gen, text_tokens)
        rows.append(ids)
        types.append([1 if t == IMAGE_TOKEN_ID else 0 for t in ids])
    return torch.tensor(rows), torch.tensor(types, dtype=torch.int32)


def glm4v_moe_image_batch(
    config=None, batch: int = 2, seed: int = 0, grid: tuple[int, int] = (8, 8), text_tokens: int = TEXT_TOKENS
) -> TinyBatch:
    """One image of `grid` patches per row; Qwen-VL-style flattened patches, M-RoPE from mm_token_type_ids."""
    vision = (config or tiny_glm4v_moe_config()).vision_config
    patch_dim = vision.in_channels * vision.temporal_patch_size * vision.patch_size**2
    return _flat_patch_batch(vision.spatial_merge_size, patch_dim, batch, seed, grid, text_tokens)


def _flat_patch_batch(
    merge: int, patch_dim: int, batch: int, seed: int, grid: tuple[int, int], text_tokens: int, moe_types: bool = False
) -> TinyBatch:
    """Rows with one image of `grid` flattened patches (merged `merge` x `merge`), M-RoPE from mm_token_type_ids;
    `moe_types` adds ERNIE's `moe_mm_token_type_ids` (image start/end tokens count as vision too)."""
    gen = torch.Generator().manual_seed(seed)
    h, w = grid
    image_tokens = h * w // merge**2
    input_ids, types = _rows_with_image(gen, batch, image_tokens, VISION_START_ID, VISION_END_ID, text_tokens)
    kwargs = dict(
        input_ids=input_ids,
        attention_mask=torch.ones_like(input_ids),
        pixel_values=torch.randn(batch * h * w, patch_dim, generator=gen),
        image_grid_thw=torch.tensor([[1, h, w]] * batch),
        mm_token_type_ids=types,
    )
    if moe_types:
        kwargs["moe_mm_token_type_ids"] = types.clone()
        kwargs["moe_mm_token_type_ids"][(input_ids == VISION_START_ID) | (input_ids == VISION_END_ID)] = 1
    return TinyBatch(kwargs=kwargs, num_image_tokens=batch * image_tokens)


def ernie4_5_vl_moe_image_batch(
    config=None, batch: int = 2, seed: int = 0, grid: tuple[int, int] = (8, 8), text_tokens: int = TEXT_TOKENS
) -> TinyBatch:
    """One image per row, with both type-id tensors the ERNIE processor returns.

    `mm_token_type_ids` marks the image placeholders (M-RoPE); `moe_mm_token_type_ids` also marks the image
    start/end tokens as vision, and routes those rows to the vision expert pool.
    """
    vision = (config or tiny_ernie4_5_vl_moe_config()).vision_config
    patch_dim = vision.in_channels * vision.patch_size**2
    return _flat_patch_batch(vision.spatial_merge_size, patch_dim, batch, seed, grid, text_tokens, moe_types=True)


def kimi_k25_image_batch(
    config=None,
    batch: int = 2,
    seed: int = 0,
    grid: tuple[int, int] = (8, 8),
    text_tokens: int = TEXT_TOKENS,
    dtype: torch.dtype = torch.bfloat16,
) -> TinyBatch:
    """One image per row as (patches, 3, p, p) pixel patches; Kimi takes no type ids (modality from input_ids).

    Kimi's patch embedding does not cast its input, so pixels come in the model dtype (`dtype`).
    """
    vision = (config or tiny_kimi_k25_config()).vision_config
    gen = torch.Generator().manual_seed(seed)
    h, w = grid
    kh, kw = vision.merge_kernel_size
    image_tokens = h * w // (kh * kw)
    p = vision.patch_size
    input_ids, _ = _rows_with_image(gen, batch, image_tokens, VISION_START_ID, VISION_END_ID, text_tokens)
    return TinyBatch(
        kwargs=dict(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            pixel_values=torch.randn(batch * h * w, 3, p, p, generator=gen).to(dtype),
            image_grid_thw=torch.tensor([[1, h, w]] * batch),
        ),
        num_image_tokens=batch * image_tokens,
    )


def deepseek_ocr2_image_batch(
    config=None, batch: int = 2, seed: int = 0, text_tokens: int = TEXT_TOKENS, dtype: torch.dtype = torch.bfloat16
) -> TinyBatch:
    """One global view per row (no local crops): 145 placeholders each; OCR-2 takes no type ids.

    OCR-2's SAM does not cast its input, so pixels come in the model dtype (`dtype`).
    """
    size = (config or tiny_deepseek_ocr2_config()).vision_config.sam_config.image_size
    gen = torch.Generator().manual_seed(seed)
    input_ids, _ = _rows_with_image(gen, batch, OCR2_TOKENS_PER_IMAGE, None, None, text_tokens)
    return TinyBatch(
        kwargs=dict(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            pixel_values=torch.randn(batch, 3, size, size, generator=gen).to(dtype),
        ),
        num_image_tokens=batch * OCR2_TOKENS_PER_IMAGE,
    )


def _qwen3_vl_batch(config=None, batch: int = 2, seed: int = 0) -> TinyBatch:
    return qwen3_vl_image_batch(batch=batch, text_tokens=TEXT_TOKENS, seed=seed, config=config)


@dataclass(frozen=True)
class TinyFamily:
    """One supported model family at tiny size: `batch(config, batch=2, seed=0)` fits `config()`'s model."""

    name: str
    config: Callable[[], Any]
    batch: Callable[..., TinyBatch]
    is_vlm: bool

    def build(self, seed: int = 0, dtype: torch.dtype = torch.bfloat16) -> torch.nn.Module:
        return build_tiny_model(self.config(), seed=seed, dtype=dtype)


TINY_FAMILIES: dict[str, TinyFamily] = {
    f.name: f
    for f in (
        TinyFamily("qwen3_vl_moe", tiny_qwen3_vl_moe_config, _qwen3_vl_batch, True),
        TinyFamily("glm4v_moe", tiny_glm4v_moe_config, glm4v_moe_image_batch, True),
        TinyFamily("ernie4_5_vl_moe", tiny_ernie4_5_vl_moe_config, ernie4_5_vl_moe_image_batch, True),
        TinyFamily("kimi_k25", tiny_kimi_k25_config, kimi_k25_image_batch, True),
        TinyFamily("deepseek_ocr2", tiny_deepseek_ocr2_config, deepseek_ocr2_image_batch, True),
        TinyFamily("qwen3_moe", tiny_qwen3_moe_config, text_batch, False),
        TinyFamily("deepseek_v3", tiny_deepseek_v3_config, text_batch, False),
        TinyFamily("mixtral", tiny_mixtral_config, text_batch, False),
        TinyFamily("gpt_oss", tiny_gpt_oss_config, text_batch, False),
    )
}
