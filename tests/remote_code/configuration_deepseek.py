"""Configs of the tiny DeepSeek-V2/V3 text model in tests/remote_code (see modeling_deepseek.py).

Field names and meanings follow the remote code of DeepSeek-VL2 (`DeepseekV2Config`) and Kimi-VL
(`DeepseekV3Config`): n_routed_experts, num_experts_per_tok, moe_intermediate_size, n_shared_experts,
first_k_dense_replace, moe_layer_freq, topk_method, scoring_func, n_group, topk_group, norm_topk_prob,
routed_scaling_factor, ep_size. Written for realb_hf's offline tests; not the upstream files.
"""

from transformers import PretrainedConfig


class DeepseekV2Config(PretrainedConfig):
    model_type = "deepseek_v2"

    def __init__(
        self,
        vocab_size=128,
        hidden_size=64,
        intermediate_size=96,
        moe_intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=4,
        n_shared_experts=1,
        n_routed_experts=8,
        ep_size=1,
        routed_scaling_factor=1.0,
        topk_method="greedy",
        n_group=1,
        topk_group=1,
        num_experts_per_tok=2,
        moe_layer_freq=1,
        first_k_dense_replace=1,
        norm_topk_prob=False,
        scoring_func="softmax",
        aux_loss_alpha=0.001,
        seq_aux=True,
        hidden_act="silu",
        max_position_embeddings=512,
        initializer_range=0.02,
        rms_norm_eps=1e-6,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=1,
        tie_word_embeddings=False,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.moe_intermediate_size = moe_intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.n_shared_experts = n_shared_experts
        self.n_routed_experts = n_routed_experts
        self.ep_size = ep_size
        self.routed_scaling_factor = routed_scaling_factor
        self.topk_method = topk_method
        self.n_group = n_group
        self.topk_group = topk_group
        self.num_experts_per_tok = num_experts_per_tok
        self.moe_layer_freq = moe_layer_freq
        self.first_k_dense_replace = first_k_dense_replace
        self.norm_topk_prob = norm_topk_prob
        self.scoring_func = scoring_func
        self.aux_loss_alpha = aux_loss_alpha
        self.seq_aux = seq_aux
        self.hidden_act = hidden_act
        self.max_position_embeddings = max_position_embeddings
        self.initializer_range = initializer_range
        self.rms_norm_eps = rms_norm_eps
        super().__init__(
            pad_token_id=pad_token_id,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )


class DeepseekV3Config(DeepseekV2Config):
    """Kimi-VL's text config: DeepSeek-V3 routing (sigmoid scores, `noaux_tc` top-k with a correction bias)."""

    model_type = "deepseek_v3"

    def __init__(self, topk_method="noaux_tc", scoring_func="sigmoid", norm_topk_prob=True, **kwargs):
        super().__init__(topk_method=topk_method, scoring_func=scoring_func, norm_topk_prob=norm_topk_prob, **kwargs)
