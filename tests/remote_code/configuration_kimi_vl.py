"""Configs of the tiny Kimi-VL in tests/remote_code (see modeling_kimi_vl.py): `KimiVLConfig` with
`vision_config` (MoonViT), `text_config` (DeepSeek-V3) and `media_placeholder_token_id`, the id of the image
placeholder token in `input_ids`. Written for realb_hf's offline tests; not the upstream file.
"""

from transformers import PretrainedConfig

from .configuration_deepseek import DeepseekV3Config


class MoonViTConfig(PretrainedConfig):
    model_type = "moonvit"

    def __init__(self, patch_size=4, init_pos_emb_height=8, init_pos_emb_width=8, hidden_size=32,
                 merge_kernel_size=(2, 2), **kwargs):  # fmt: skip
        self.patch_size = patch_size
        self.init_pos_emb_height = init_pos_emb_height
        self.init_pos_emb_width = init_pos_emb_width
        self.hidden_size = hidden_size
        self.merge_kernel_size = list(merge_kernel_size)
        super().__init__(**kwargs)


class KimiVLConfig(PretrainedConfig):
    model_type = "kimi_vl"

    def __init__(self, vision_config=None, text_config=None, ignore_index=-100, media_placeholder_token_id=5,
                 pad_token_id=0, **kwargs):  # fmt: skip
        self.vision_config = (
            MoonViTConfig(**(vision_config or {})) if not isinstance(vision_config, PretrainedConfig) else vision_config
        )
        self.text_config = (
            DeepseekV3Config(**(text_config or {})) if not isinstance(text_config, PretrainedConfig) else text_config
        )
        self.ignore_index = ignore_index
        self.media_placeholder_token_id = media_placeholder_token_id
        super().__init__(pad_token_id=pad_token_id, **kwargs)

    def to_dict(self):
        out = super().to_dict()
        out["vision_config"] = self.vision_config.to_dict()
        out["text_config"] = self.text_config.to_dict()
        return out
