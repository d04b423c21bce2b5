"""A tiny Kimi-VL in the layout of Kimi-VL-A3B's modeling_kimi_vl.py, for realb_hf's tests.

Written from the public description, not copied: `KimiVLForConditionalGeneration` holds `vision_tower` (a
MoonViT-like patch embedding with a learned position embedding and the 2x2 patch merger; no transformer
blocks), `multi_modal_projector` (pre_norm, linear_1, GELU, linear_2) and `language_model` (the DeepSeek-V3
MoE text model). Images arrive as `pixel_values` (patches, 3, p, p) with `image_grid_hws` (images, 2); their
features replace the embeddings of the tokens equal to `config.media_placeholder_token_id`, the only place
the model marks image tokens.
"""

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init

from .configuration_kimi_vl import KimiVLConfig
from .modeling_deepseek import DeepseekV3ForCausalLM


class MoonVitPretrainedModel(nn.Module):
    """(patches, 3, p, p) + grid (h, w) per image -> per image (h/kh * w/kw, kh * kw, hidden)."""

    def __init__(self, config):
        super().__init__()
        self.merge_kernel_size = config.merge_kernel_size
        self.patch_embed = nn.Conv2d(3, config.hidden_size, kernel_size=config.patch_size, stride=config.patch_size)
        self.pos_emb = nn.Parameter(
            torch.zeros(config.init_pos_emb_height, config.init_pos_emb_width, config.hidden_size)
        )

    def forward(self, pixel_values, grid_hws):
        x = self.patch_embed(pixel_values).flatten(1)
        kh, kw = self.merge_kernel_size
        out, start = [], 0
        for h, w in grid_hws.tolist():
            seq = x[start : start + h * w] + self.pos_emb[:h, :w].reshape(h * w, -1).to(x.dtype)
            out.append(
                seq.view(h // kh, kh, w // kw, kw, -1).permute(0, 2, 1, 3, 4).reshape(h * w // (kh * kw), kh * kw, -1)
            )
            start += h * w
        return out


class KimiVLMultiModalProjector(nn.Module):
    def __init__(self, config):
        super().__init__()
        kh, kw = config.vision_config.merge_kernel_size
        self.hidden_size = config.vision_config.hidden_size * kh * kw
        self.pre_norm = nn.LayerNorm(config.vision_config.hidden_size, eps=1e-5)
        self.linear_1 = nn.Linear(self.hidden_size, self.hidden_size, bias=True)
        self.act = nn.GELU()
        self.linear_2 = nn.Linear(self.hidden_size, config.text_config.hidden_size, bias=True)

    def forward(self, image_features):
        hidden = self.pre_norm(torch.cat(image_features, dim=0)).view(-1, self.hidden_size)
        return self.linear_2(self.act(self.linear_1(hidden)))


class KimiVLPreTrainedModel(PreTrainedModel):
    config_class = KimiVLConfig
    base_model_prefix = "model"
    _no_split_modules = ["DeepseekV2DecoderLayer"]

    def _init_weights(self, module):
        super()._init_weights(module)  # Linear, Conv2d, LayerNorm
        if isinstance(module, MoonVitPretrainedModel):
            init.normal_(module.pos_emb, std=0.02)


class KimiVLForConditionalGeneration(KimiVLPreTrainedModel):
    def __init__(self, config):
        super().__init__(config)
        self.vision_tower = MoonVitPretrainedModel(config.vision_config)
        self.multi_modal_projector = KimiVLMultiModalProjector(config)
        self.language_model = DeepseekV3ForCausalLM(config.text_config)
        self.post_init()

    def get_input_embeddings(self):
        return self.language_model.get_input_embeddings()

    def _merge_with_image_features(self, inputs_embeds, input_ids, image_features):
        b, s, d = inputs_embeds.shape
        flat = inputs_embeds.reshape(-1, d).clone()
        flat[input_ids.flatten() == self.config.media_placeholder_token_id] = image_features.to(flat.dtype)
        return flat.view(b, s, d)

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        inputs_embeds=None,
        pixel_values=None,
        image_grid_hws=None,
        **kwargs,
    ):
        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)
        if pixel_values is not None and pixel_values.shape[0] > 0:
            features = self.multi_modal_projector(
                self.vision_tower(pixel_values.to(inputs_embeds.dtype), image_grid_hws)
            )
            inputs_embeds = self._merge_with_image_features(inputs_embeds, input_ids, features)
        return self.language_model(attention_mask=attention_mask, inputs_embeds=inputs_embeds)
