"""A tiny DeepSeek-V2/V3 text model in the layout of the remote code that DeepSeek-VL2 and Kimi-VL load with
`trust_remote_code=True` (deepseek_vl2/models/modeling_deepseek.py; Kimi-VL's modeling_kimi_vl.py).

Written for realb_hf's offline tests from the public description of that code, not copied from it. What
matters to ReaLB is reproduced: the module and attribute names (`model.layers.N.mlp.experts.M.gate_proj`),
a MoE block `DeepseekV2MoE` holding `experts` as an `nn.ModuleList` of per-expert MLPs (gate_proj, up_proj,
down_proj without bias, SiLU), a `MoEGate` returning `(topk_idx, topk_weight, aux_loss)`, `shared_experts`,
MoE layers chosen by `first_k_dense_replace` / `moe_layer_freq`, and a `moe_infer(x, topk_ids, topk_weight)`
that loops over the experts at inference. Attention is a plain causal multi-head attention without a KV cache
(the real models use MLA / MHA with rotary embeddings): ReaLB never touches it.
"""

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.modeling_outputs import BaseModelOutput, CausalLMOutput

from .configuration_deepseek import DeepseekV2Config, DeepseekV3Config


class DeepseekV2RMSNorm(nn.Module):
    def __init__(self, hidden_size, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states):
        dtype = hidden_states.dtype
        hidden_states = hidden_states.float()
        hidden_states = hidden_states * torch.rsqrt(hidden_states.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * hidden_states.to(dtype)


class DeepseekV2MLP(nn.Module):
    def __init__(self, config, hidden_size=None, intermediate_size=None):
        super().__init__()
        self.hidden_size = hidden_size or config.hidden_size
        self.intermediate_size = intermediate_size or config.intermediate_size
        self.gate_proj = nn.Linear(self.hidden_size, self.intermediate_size, bias=False)
        self.up_proj = nn.Linear(self.hidden_size, self.intermediate_size, bias=False)
        self.down_proj = nn.Linear(self.intermediate_size, self.hidden_size, bias=False)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class MoEGate(nn.Module):
    """Router: scores in fp32 (softmax or sigmoid), top-k by `topk_method`, optional normalisation and scaling."""

    def __init__(self, config):
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.n_routed_experts = config.n_routed_experts
        self.routed_scaling_factor = config.routed_scaling_factor
        self.scoring_func = config.scoring_func
        self.topk_method = config.topk_method
        self.n_group = config.n_group
        self.topk_group = config.topk_group
        self.norm_topk_prob = config.norm_topk_prob
        self.weight = nn.Parameter(torch.empty(self.n_routed_experts, config.hidden_size))
        if self.topk_method == "noaux_tc":
            self.e_score_correction_bias = nn.Parameter(torch.zeros(self.n_routed_experts))

    def _group_mask(self, scores, group_scores):
        group_idx = torch.topk(group_scores, k=self.topk_group, dim=-1, sorted=False)[1]
        group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1)
        per_group = self.n_routed_experts // self.n_group
        return group_mask.unsqueeze(-1).expand(-1, self.n_group, per_group).reshape(scores.shape[0], -1).bool()

    def forward(self, hidden_states):
        h = hidden_states.shape[-1]
        logits = F.linear(hidden_states.reshape(-1, h).float(), self.weight.float())
        scores = logits.softmax(dim=-1) if self.scoring_func == "softmax" else logits.sigmoid()
        if self.topk_method == "greedy":
            topk_weight, topk_idx = torch.topk(scores, k=self.top_k, dim=-1, sorted=False)
        elif self.topk_method == "group_limited_greedy":
            group_scores = scores.view(scores.shape[0], self.n_group, -1).max(dim=-1).values
            masked = scores.masked_fill(~self._group_mask(scores, group_scores), 0.0)
            topk_weight, topk_idx = torch.topk(masked, k=self.top_k, dim=-1, sorted=False)
        elif self.topk_method == "noaux_tc":
            choice = scores + self.e_score_correction_bias.float().unsqueeze(0)
            group_scores = choice.view(scores.shape[0], self.n_group, -1).topk(2, dim=-1)[0].sum(dim=-1)
            masked = choice.masked_fill(~self._group_mask(scores, group_scores), 0.0)
            topk_idx = torch.topk(masked, k=self.top_k, dim=-1, sorted=False)[1]
            topk_weight = scores.gather(1, topk_idx)
        else:
            raise NotImplementedError(f"topk_method {self.topk_method!r}")
        if self.top_k > 1 and self.norm_topk_prob:
            topk_weight = topk_weight / (topk_weight.sum(dim=-1, keepdim=True) + 1e-20)
        return topk_idx, topk_weight * self.routed_scaling_factor, None


class DeepseekV2MoE(nn.Module):
    """Routed experts as an nn.ModuleList plus shared experts; `moe_infer` loops over the experts."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.num_experts_per_tok = config.num_experts_per_tok
        if getattr(config, "ep_size", 1) > 1:
            raise NotImplementedError("this tiny re-implementation has no expert parallelism of its own")
        self.ep_size, self.ep_rank = 1, 0
        self.experts_per_rank = config.n_routed_experts
        self.experts = nn.ModuleList(
            [
                DeepseekV2MLP(config, intermediate_size=config.moe_intermediate_size)
                for _ in range(config.n_routed_experts)
            ]
        )
        self.gate = MoEGate(config)
        if config.n_shared_experts is not None:
            self.shared_experts = DeepseekV2MLP(
                config, intermediate_size=config.moe_intermediate_size * config.n_shared_experts
            )

    def forward(self, hidden_states):
        identity = hidden_states
        orig_shape = hidden_states.shape
        topk_idx, topk_weight, _ = self.gate(hidden_states)
        hidden_states = hidden_states.view(-1, hidden_states.shape[-1])
        if self.training:  # the upstream training branch: one masked forward per expert
            flat = topk_idx.view(-1)
            rows = hidden_states.repeat_interleave(self.num_experts_per_tok, dim=0)
            y = torch.empty_like(rows)
            for i, expert in enumerate(self.experts):
                y[flat == i] = expert(rows[flat == i])
            y = (y.view(*topk_weight.shape, -1) * topk_weight.unsqueeze(-1)).sum(dim=1).to(rows.dtype).view(*orig_shape)
        else:
            y = self.moe_infer(hidden_states, topk_idx, topk_weight).view(*orig_shape)
        if self.config.n_shared_experts is not None:
            y = y + self.shared_experts(identity)
        return y

    @torch.no_grad()
    def moe_infer(self, x, topk_ids, topk_weight):
        counts = topk_ids.new_zeros((topk_ids.shape[0], len(self.experts))).scatter_(1, topk_ids, 1).sum(dim=0)
        idxs = topk_ids.view(-1).argsort()
        sorted_tokens = x[idxs // topk_ids.shape[1]]
        outputs, start = [], 0
        for i, num_tokens in enumerate(counts.tolist()):
            if num_tokens == 0:
                continue
            end = start + num_tokens
            outputs.append(self.experts[i + self.ep_rank * self.experts_per_rank](sorted_tokens[start:end]))
            start = end
        outs = torch.cat(outputs, dim=0) if outputs else sorted_tokens.new_empty(0)
        new_x = torch.empty_like(outs)
        new_x[idxs] = outs
        return (
            new_x.view(*topk_ids.shape, -1)
            .type(topk_weight.dtype)
            .mul_(topk_weight.unsqueeze(dim=-1))
            .sum(dim=1)
            .type(new_x.dtype)
        )


class DeepseekV2Attention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // self.num_heads
        self.q_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=False)
        self.o_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=False)

    def forward(self, hidden_states, attention_mask=None):
        b, s, _ = hidden_states.shape

        def heads(t):
            return t.view(b, s, self.num_heads, self.head_dim).transpose(1, 2)

        q, k, v = (
            heads(self.q_proj(hidden_states)),
            heads(self.k_proj(hidden_states)),
            heads(self.v_proj(hidden_states)),
        )
        mask = torch.ones(s, s, dtype=torch.bool, device=hidden_states.device).tril()
        if attention_mask is not None:
            mask = mask & attention_mask.bool()[:, None, None, :]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.o_proj(out.transpose(1, 2).reshape(b, s, -1))


class DeepseekV2DecoderLayer(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.self_attn = DeepseekV2Attention(config)
        is_moe = (
            config.n_routed_experts is not None
            and layer_idx >= config.first_k_dense_replace
            and layer_idx % config.moe_layer_freq == 0
        )
        self.mlp = DeepseekV2MoE(config) if is_moe else DeepseekV2MLP(config)
        self.input_layernorm = DeepseekV2RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = DeepseekV2RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, hidden_states, attention_mask=None):
        hidden_states = hidden_states + self.self_attn(self.input_layernorm(hidden_states), attention_mask)
        return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))


class DeepseekV2PreTrainedModel(PreTrainedModel):
    config_class = DeepseekV2Config
    base_model_prefix = "model"
    _no_split_modules = ["DeepseekV2DecoderLayer"]

    def _init_weights(self, module):
        super()._init_weights(module)  # Linear, Embedding, RMSNorm
        if isinstance(module, MoEGate):
            init.normal_(module.weight, mean=0.0, std=self.config.initializer_range)
            if module.topk_method == "noaux_tc":
                init.zeros_(module.e_score_correction_bias)


class DeepseekV2Model(DeepseekV2PreTrainedModel):
    def __init__(self, config):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList([DeepseekV2DecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = DeepseekV2RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, **kwargs):
        hidden_states = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        for layer in self.layers:
            hidden_states = layer(hidden_states, attention_mask)
        return BaseModelOutput(last_hidden_state=self.norm(hidden_states))


class DeepseekV2ForCausalLM(DeepseekV2PreTrainedModel):
    def __init__(self, config):
        super().__init__(config)
        self.model = DeepseekV2Model(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, **kwargs):
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds)
        return CausalLMOutput(logits=self.lm_head(hidden.last_hidden_state))


class DeepseekV3ForCausalLM(DeepseekV2ForCausalLM):
    """Kimi-VL's language model: the same layout with DeepSeek-V3 routing (see DeepseekV3Config)."""

    config_class = DeepseekV3Config
