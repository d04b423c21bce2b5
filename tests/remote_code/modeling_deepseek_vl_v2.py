"""A tiny DeepSeek-VL2 in the layout of deepseek_vl2/models/modeling_deepseek_vl_v2.py, for realb_hf's tests.

Written from the public description, not copied: `DeepseekVLV2ForCausalLM` holds `vision` (a one-conv patch
encoder here instead of SigLIP), `projector` (`MlpProjector`, "mlp_gelu"), the `image_newline` and
`view_seperator` embeddings (tile_tag "2D") and `language` (the DeepSeek-V2 MoE text model). Images arrive as
`images` (batch, tiles, 3, H, W) with `images_spatial_crop` (batch, images, 2) = (width tiles, height tiles);
each image is a global view plus its local tiles, laid out row by row with a newline embedding after every row
and a view separator between global and local views, and scattered into the positions where the top-level
`images_seq_mask` (batch, seq) is True. That mask is the only place the model marks image tokens.
"""

import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers import initialization as init

from .configuration_deepseek import DeepseekV2Config
from .modeling_deepseek import DeepseekV2ForCausalLM


class VisionEncoderConfig(PretrainedConfig):
    model_type = "vision"

    def __init__(self, image_size=16, patch_size=4, width=32, **kwargs):
        self.image_size = image_size
        self.patch_size = patch_size
        self.width = width
        super().__init__(**kwargs)


class MlpProjectorConfig(PretrainedConfig):
    model_type = "mlp_projector"

    def __init__(self, projector_type="mlp_gelu", input_dim=32, n_embed=64, depth=2, **kwargs):
        self.projector_type = projector_type
        self.input_dim = input_dim
        self.n_embed = n_embed
        self.depth = depth
        super().__init__(**kwargs)


class DeepseekVLV2Config(PretrainedConfig):
    model_type = "deepseek_vl_v2"

    def __init__(self, tile_tag="2D", global_view_pos="head", candidate_resolutions=((16, 16),), **kwargs):
        vision_config = kwargs.pop("vision_config", {})
        projector_config = kwargs.pop("projector_config", {})
        language_config = kwargs.pop("language_config", {})
        super().__init__(**kwargs)
        self.vision_config = VisionEncoderConfig(**vision_config) if isinstance(vision_config, dict) else vision_config
        self.projector_config = (
            MlpProjectorConfig(**projector_config) if isinstance(projector_config, dict) else projector_config
        )
        self.language_config = (
            DeepseekV2Config(**language_config) if isinstance(language_config, dict) else language_config
        )
        self.tile_tag = tile_tag
        self.global_view_pos = global_view_pos
        self.candidate_resolutions = candidate_resolutions

    def to_dict(self):
        out = super().to_dict()
        for key in ("vision_config", "projector_config", "language_config"):
            out[key] = getattr(self, key).to_dict()
        return out


class TinyVisionEncoder(nn.Module):
    """(tiles, 3, H, W) -> (tiles, (H/p) * (W/p), width)."""

    def __init__(self, config):
        super().__init__()
        self.patch_embed = nn.Conv2d(3, config.width, kernel_size=config.patch_size, stride=config.patch_size)
        self.norm = nn.LayerNorm(config.width)

    def forward(self, tiles):
        return self.norm(self.patch_embed(tiles).flatten(2).transpose(1, 2))


class MlpProjector(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        if cfg.projector_type != "mlp_gelu":
            raise NotImplementedError(cfg.projector_type)
        modules = [nn.Linear(cfg.input_dim, cfg.n_embed)]
        for _ in range(1, cfg.depth):
            modules += [nn.GELU(), nn.Linear(cfg.n_embed, cfg.n_embed)]
        self.layers = nn.Sequential(*modules)

    def forward(self, x):
        return self.layers(x)


class DeepseekVLV2PreTrainedModel(PreTrainedModel):
    config_class = DeepseekVLV2Config
    base_model_prefix = "deepseek_vl_v2"
    _no_split_modules = []

    def _init_weights(self, module):
        super()._init_weights(module)  # Linear, Conv2d, LayerNorm
        if isinstance(module, DeepseekVLV2ForCausalLM):
            std = module.config.projector_config.n_embed**-0.5
            init.normal_(module.image_newline, std=std)
            init.normal_(module.view_seperator, std=std)


class DeepseekVLV2ForCausalLM(DeepseekVLV2PreTrainedModel):
    def __init__(self, config):
        super().__init__(config)
        self.vision = TinyVisionEncoder(config.vision_config)
        self.projector = MlpProjector(config.projector_config)
        self.tile_tag = config.tile_tag
        self.global_view_pos = config.global_view_pos
        if self.tile_tag != "2D":
            raise NotImplementedError("tile_tag 1D")
        self.image_newline = nn.Parameter(torch.zeros(config.projector_config.n_embed))
        self.view_seperator = nn.Parameter(torch.zeros(config.projector_config.n_embed))
        self.language = DeepseekV2ForCausalLM(config.language_config)
        self.post_init()

    def get_input_embeddings(self):
        return self.language.get_input_embeddings()

    def _format_image(self, global_feat, local_feat, tiles_w, tiles_h, side):
        """Global view rows + newline, separator, local tiles as one grid of rows + newline."""
        dim = global_feat.shape[-1]
        newline = self.image_newline.to(global_feat.dtype)
        glob = torch.cat([global_feat.view(side, side, dim), newline.expand(side, 1, dim)], dim=1).reshape(-1, dim)
        grid = local_feat.view(tiles_h, tiles_w, side, side, dim).permute(0, 2, 1, 3, 4)
        grid = grid.reshape(tiles_h * side, tiles_w * side, dim)
        local = torch.cat([grid, newline.expand(tiles_h * side, 1, dim)], dim=1).reshape(-1, dim)
        sep = self.view_seperator.to(global_feat.dtype)[None]
        parts = [glob, sep, local] if self.global_view_pos == "head" else [local, sep, glob]
        return torch.cat(parts, dim=0)

    def prepare_inputs_embeds(self, input_ids, images=None, images_seq_mask=None, images_spatial_crop=None, **_):
        embeds = self.language.get_input_embeddings()(input_ids)
        if images is None or images_spatial_crop is None or images_spatial_crop.sum() == 0:
            return embeds
        feats = self.projector(self.vision(images.flatten(0, 1).to(embeds.dtype)))  # (b * tiles, hw, D)
        feats = feats.view(images.shape[0], images.shape[1], *feats.shape[1:])
        side = int(feats.shape[2] ** 0.5)
        for b in range(images.shape[0]):
            pieces, tile = [], 0
            for tiles_w, tiles_h in images_spatial_crop[b].tolist():
                if tiles_w == 0 or tiles_h == 0:
                    break
                n_local = tiles_w * tiles_h
                pieces.append(
                    self._format_image(feats[b, tile], feats[b, tile + 1 : tile + 1 + n_local], tiles_w, tiles_h, side)
                )
                tile += 1 + n_local
            if pieces:
                embeds[b].masked_scatter_(images_seq_mask[b].unsqueeze(-1), torch.cat(pieces).to(embeds.dtype))
        return embeds

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        inputs_embeds=None,
        images=None,
        images_seq_mask=None,
        images_spatial_crop=None,
        **kwargs,
    ):
        if inputs_embeds is None:
            inputs_embeds = self.prepare_inputs_embeds(input_ids, images, images_seq_mask, images_spatial_crop)
        return self.language(input_ids=None, attention_mask=attention_mask, inputs_embeds=inputs_embeds)
