"""`RealbExperts`: a drop-in for any transformers experts class decorated with `@use_experts_implementation`.

The quantizer swaps an experts module's class for `Realb<Original>` (RealbExperts first in the MRO), so every
parameter, buffer, layout flag and `_apply_gate` of the original stays exactly as it was. Per forward:
routing -> policy decision -> telemetry record -> if nothing is lowered, the stock forward (whatever
`config._experts_implementation` selects); otherwise every precision runs its experts as one grouped GEMM.
"""

from __future__ import annotations

import torch
from transformers.activations import SiLUActivation
from transformers.integrations.moe import _default_apply_gate

from .formats import get_format
from .modality import TEXT
from .policy import Decision, PolicyParams, RoutingStats, decide
from .runtime import RealbRuntime
from .telemetry import make_record

_SWAPPED: dict[type, type] = {}


def is_fused_experts(module: torch.nn.Module) -> bool:
    """True for modules whose class carries transformers' `@use_experts_implementation`."""
    forward = getattr(type(module), "forward", None)
    return (
        hasattr(forward, "__wrapped__")
        and hasattr(module, "is_concatenated")
        and hasattr(module, "has_gate")
        and hasattr(module, "num_experts")
    )


def realb_class_for(cls: type) -> type:
    """The Realb subclass of an experts class (one per original class, so isinstance checks stay cheap)."""
    if issubclass(cls, RealbExperts):
        return cls
    if cls not in _SWAPPED:
        _SWAPPED[cls] = type(f"Realb{cls.__name__}", (RealbExperts, cls), {"__module__": __name__})
    return _SWAPPED[cls]


class RealbExperts(torch.nn.Module):
    """Runs each expert group at the precision ReaLB's policy chose for this layer and batch."""

    realb_runtime: RealbRuntime | None = None
    realb_name: str = ""
    realb_pool: str | None = None  # "text"/"vision" for modality-isolated pools (ERNIE-4.5-VL)

    def realb_attach(self, runtime: RealbRuntime, name: str, pool: str | None = None) -> None:
        self.realb_runtime = runtime
        self.realb_name = name
        self.realb_pool = pool
        self._realb_cache: dict[str, tuple] = {}

    # ---- routing ---------------------------------------------------------------------------------

    def realb_routing_stats(self, top_k_index: torch.Tensor, modality: torch.Tensor | None) -> RoutingStats:
        """Token-expert pairs per global expert, and how many of them are vision tokens (one host sync)."""
        num_experts = self.num_experts
        ids = top_k_index.reshape(-1)
        valid = ids < num_experts
        counts = torch.bincount(ids[valid], minlength=num_experts)
        if modality is not None:
            vision_rows = (modality != TEXT).repeat_interleave(top_k_index.shape[-1])
            vision = torch.bincount(ids[valid & vision_rows], minlength=num_experts)
        else:
            vision = torch.zeros_like(counts)
        both = torch.stack([counts, vision]).tolist()
        return RoutingStats(tuple(both[0]), tuple(both[1]), int(top_k_index.shape[0]))

    # ---- forward ---------------------------------------------------------------------------------

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        runtime = self.realb_runtime
        if runtime is None:
            return super().forward(hidden_states, top_k_index, top_k_weights)
        params = runtime.params(hidden_states.device)
        modality = runtime.modality.for_rows(hidden_states.shape[0], self.realb_pool)
        stats = self.realb_routing_stats(top_k_index, modality)
        decision = decide(stats, params)
        source = runtime.modality.source if modality is not None else "none"
        runtime.telemetry.add(make_record(runtime.telemetry.forwards, self.realb_name, stats, decision, params, source))
        if decision.all_high(params.high):
            return super().forward(hidden_states, top_k_index, top_k_weights)
        return self._realb_mixed_forward(hidden_states, top_k_index, top_k_weights, decision, params)

    def _realb_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(first, down) projection weights in the (E, N, K) layout every format expects (views, no copies)."""
        first = self.gate_up_proj if self.has_gate else self.up_proj
        down = self.down_proj
        if self.is_transposed:
            return first.transpose(-2, -1), down.transpose(-2, -1)
        return first, down

    def _realb_packed(self, fmt_name: str, experts: list[int]) -> tuple[object, object, bool]:
        """Packed (first, down) weights of `experts` in `fmt_name`, and whether they cover all experts.

        on_the_fly: convert just these experts now (transient, freed after the layer).
        persistent: convert all experts once and keep them; zero-row groups cost nothing in the GEMM.
        """
        fmt = get_format(fmt_name)
        first, down = self._realb_weights()
        if fmt_name == self.realb_runtime.config.high_precision:
            return first, down, True
        if self.realb_runtime.config.weight_cache == "persistent":
            if fmt_name not in self._realb_cache:
                with torch.no_grad():
                    packed = (fmt.quantize_weight(first.detach()), fmt.quantize_weight(down.detach()))
                self._realb_cache[fmt_name] = packed
                self.realb_runtime.telemetry.extra_memory_bytes += sum(fmt.weight_nbytes(p) for p in packed)
            return *self._realb_cache[fmt_name], True
        idx = torch.tensor(experts, device=first.device)
        contiguous = experts == list(range(experts[0], experts[-1] + 1))
        with torch.no_grad():
            if contiguous:  # rank granularity: a slice, no gather
                sel_first, sel_down = first[experts[0] : experts[-1] + 1], down[experts[0] : experts[-1] + 1]
            else:
                sel_first, sel_down = first.index_select(0, idx), down.index_select(0, idx)
            return fmt.quantize_weight(sel_first.detach()), fmt.quantize_weight(sel_down.detach()), False

    def realb_free_cache(self) -> None:
        self._realb_cache = {}

    def _realb_mixed_forward(
        self,
        hidden_states: torch.Tensor,
        top_k_index: torch.Tensor,
        top_k_weights: torch.Tensor,
        decision: Decision,
        params: PolicyParams,
    ) -> torch.Tensor:
        device = hidden_states.device
        num_tokens, top_k = top_k_index.shape
        num_experts = self.num_experts
        formats = sorted(set(decision.expert_precision), key=lambda f: f != params.high)  # high first
        code_of = {f: i for i, f in enumerate(formats)}
        expert_code = torch.tensor([code_of[p] for p in decision.expert_precision], device=device)

        ids = top_k_index.reshape(-1)
        weights = top_k_weights.reshape(-1)
        sentinel = ids >= num_experts  # other ranks' experts under real EP: contribute nothing here
        safe_ids = ids.clamp(max=num_experts - 1)
        row_code = expert_code[safe_ids]
        # Rows holding inf/NaN are computed in high precision: same result as the stock path for those rows.
        finite = torch.isfinite(hidden_states).all(dim=-1).repeat_interleave(top_k)
        row_code = torch.where(finite, row_code, torch.zeros_like(row_code))
        row_code = torch.where(sentinel, torch.full_like(row_code, len(formats)), row_code)

        key = row_code * num_experts + safe_ids
        key_sorted, perm = torch.sort(key, stable=True)
        rows = perm // top_k  # token of each sorted row: formats gather (and may quantize) in one pass
        ids_sorted = safe_ids[perm]
        # rows per (format, expert); the sentinel block sits after every format's block.
        counts = torch.bincount(key_sorted, minlength=(len(formats) + 1) * num_experts)
        counts = counts[: len(formats) * num_experts].view(len(formats), num_experts)
        counts_host = counts.tolist()

        out = hidden_states.new_zeros(ids.shape[0], hidden_states.shape[-1])
        start = 0
        for code, fmt_name in enumerate(formats):
            group_rows = sum(counts_host[code])
            if group_rows == 0:
                continue
            experts = [e for e in range(num_experts) if counts_host[code][e]]  # only experts with rows convert
            end = start + group_rows
            out[start:end] = self._realb_group(
                fmt_name, hidden_states, rows[start:end], ids_sorted[start:end], counts[code], experts
            )
            start = end

        if self.has_post_expert_norm:
            out[:start] = self.post_expert_norm(out[:start])
        out = out * weights[perm].masked_fill(sentinel[perm], 0.0).unsqueeze(-1)
        unsorted = torch.empty_like(out)
        unsorted[perm] = out
        return unsorted.view(num_tokens, top_k, hidden_states.shape[-1]).sum(dim=1).to(hidden_states.dtype)

    def _realb_group(
        self,
        fmt_name: str,
        hidden: torch.Tensor,
        rows: torch.Tensor,
        ids: torch.Tensor,
        counts: torch.Tensor,
        experts: list[int],
    ) -> torch.Tensor:
        """One precision's rows (sorted by expert; `rows` index `hidden`) through both projections."""
        first, down, full = self._realb_packed(fmt_name, experts)
        offs = torch.cumsum(counts if full else counts[experts], dim=0, dtype=torch.int32)

        def gate(h: torch.Tensor) -> torch.Tensor:
            if self.has_bias:
                h = h + (self.gate_up_proj_bias if self.has_gate else self.up_proj_bias)[ids]
            return self._apply_gate(h) if self.has_gate else self.act_fn(h)

        y = get_format(fmt_name).expert_mlp(hidden, rows, first, down, offs, gate, self._realb_plain_swiglu())
        if self.has_bias:
            y = y + self.down_proj_bias[ids]
        return y

    def _realb_plain_swiglu(self) -> bool:
        """silu(gate) * up on a concatenated gate|up without bias: what fused SwiGLU kernels compute."""
        return (
            self.has_gate
            and self.is_concatenated
            and not self.has_bias
            and type(self)._apply_gate is _default_apply_gate
            and isinstance(getattr(self, "act_fn", None), (torch.nn.SiLU, SiLUActivation))
        )
