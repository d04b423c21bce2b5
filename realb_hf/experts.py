"""`RealbExperts`: a drop-in for any transformers experts class decorated with `@use_experts_implementation`.

The quantizer swaps an experts module's class for `Realb<Original>` (RealbExperts first in the MRO), so every
parameter, buffer, layout flag and `_apply_gate` of the original stays exactly as it was. Per forward:
routing -> policy decision -> telemetry record -> if nothing is lowered, the stock forward (whatever
`config._experts_implementation` selects); otherwise every precision runs its experts as one grouped GEMM.

Under real expert parallelism (`realb_hf.distributed`), the ReaLB EP implementation decides from the global
routing and calls `realb_run_local` / `realb_run_local_fp8` with this rank's local expert ids instead.
"""

from __future__ import annotations

import torch
from transformers.activations import SiLUActivation
from transformers.integrations.moe import _default_apply_gate

from . import sync_free
from .formats import get_format
from .kernels.combine import weighted_combine
from .kernels.counts import counts_and_flags, histogram, routing_counts
from .kernels.rows import host_to_device, inverse_permutation, take_rows
from .modality import TEXT
from .policy import (
    Decision,
    PolicyParams,
    RoutingStats,
    decide,
    decide_without_routing,
    decides_on_device,
    needs_routing,
)
from .runtime import RealbRuntime
from .telemetry import DeferredRouting, make_record

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

    def realb_routing_counts(
        self, top_k_index: torch.Tensor, modality: torch.Tensor | None, num_experts: int | None = None
    ) -> torch.Tensor:
        """(2, num_experts) on the routing's device: token-expert pairs per expert, and of those the vision ones.

        Ids >= `num_experts` (EP sentinels) are not counted. No host sync, so EP can exchange it as it is.
        """
        num_experts = self.num_experts if num_experts is None else num_experts
        return routing_counts(top_k_index, modality, num_experts, TEXT)

    def realb_routing_stats(self, top_k_index: torch.Tensor, modality: torch.Tensor | None) -> RoutingStats:
        """Token-expert pairs per global expert, and how many of them are vision tokens (one host sync)."""
        both = self.realb_routing_counts(top_k_index, modality).tolist()
        return RoutingStats(tuple(both[0]), tuple(both[1]), int(top_k_index.shape[0]))

    def realb_decide(self, stats: RoutingStats, params: PolicyParams, modality_source: str) -> Decision:
        """The policy's decision for this layer and batch, recorded in telemetry."""
        decision = decide(stats, params)
        self.realb_record(stats, decision, params, modality_source)
        return decision

    def realb_record(self, stats: RoutingStats, decision: Decision, params: PolicyParams, modality_source: str) -> None:
        """Telemetry record of one decision (EP calls it once the layer's GPU work is queued)."""
        runtime = self.realb_runtime
        record = make_record(runtime.telemetry.forwards, self.realb_name, stats, decision, params, modality_source)
        runtime.telemetry.add(record)

    # ---- forward ---------------------------------------------------------------------------------

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        runtime = self.realb_runtime
        if runtime is None:
            return super().forward(hidden_states, top_k_index, top_k_weights)
        params = runtime.params(hidden_states.device)
        num_tokens = hidden_states.shape[0]
        reads_routing = needs_routing(params, num_tokens)
        if not reads_routing:  # the decode-sized fast path: decided by the config alone, cached
            decision, all_high = self._realb_config_decision(params)
            if runtime.telemetry.enabled:  # counted later, many calls at once: no launch on the decode path
                modality = runtime.modality.for_rows(num_tokens, self.realb_pool)
                source = runtime.modality.source if modality is not None else "none"
                counts = DeferredRouting(top_k_index, modality, self.num_experts)
                runtime.telemetry.add_deferred(self.realb_name, counts, num_tokens, decision, params, source)
            if all_high:
                return super().forward(hidden_states, top_k_index, top_k_weights)
        sync_free_ok = self._realb_sync_free_ok(hidden_states, params.high, params.low)
        if reads_routing:
            modality = runtime.modality.for_rows(num_tokens, self.realb_pool)
            source = runtime.modality.source if modality is not None else "none"
            if sync_free_ok and decides_on_device(params):
                # Decided on the device; telemetry recomputes the same decision on the host when it is read.
                counts, low_experts = counts_and_flags(
                    top_k_index, modality, self.num_experts, params.device_rule(), TEXT
                )
                runtime.telemetry.add_deferred(self.realb_name, counts, num_tokens, None, params, source)
                return self._realb_sync_free(
                    hidden_states, top_k_index, top_k_weights, low_experts, params.high, params.low
                )
            stats = self.realb_routing_stats(top_k_index, modality)  # the one host sync of the host path
            decision = self.realb_decide(stats, params, source)
            if decision.all_high(params.high):
                return super().forward(hidden_states, top_k_index, top_k_weights)
        if sync_free_ok and set(decision.expert_precision) <= {params.high, params.low}:
            low_experts = self._realb_low_flags(decision.expert_precision, params.high, hidden_states.device)
            return self._realb_sync_free(hidden_states, top_k_index, top_k_weights, low_experts, params.high, params.low)
        return self._realb_mixed_forward(
            hidden_states, top_k_index, top_k_weights, decision.expert_precision, params.high
        )

    def _realb_config_decision(self, params: PolicyParams) -> tuple[Decision, bool]:
        """`decide_without_routing` and whether it keeps every expert high, cached for `params` (the runtime
        caches its params object until reconfigured), so a decode step's layer call costs two lookups."""
        cached = self.__dict__.get("_realb_config_cache")
        if cached is None or cached[0] is not params:
            decision = decide_without_routing(params, self.num_experts)
            cached = self._realb_config_cache = (params, decision, decision.all_high(params.high))
        return cached[1], cached[2]

    # ---- the sync-free path (CUDA) -----------------------------------------------------------------

    def _realb_sync_free_ok(self, hidden_states: torch.Tensor, high: str, low: str) -> bool:
        return hidden_states.device.type == "cuda" and sync_free.covers(self, high, low, hidden_states)

    def _realb_sync_free(
        self,
        hidden_states: torch.Tensor,
        top_k_index: torch.Tensor,
        top_k_weights: torch.Tensor,
        low_experts: torch.Tensor,
        high: str,
        low: str,
        ready=None,
    ) -> torch.Tensor:
        """`sync_free.mixed_forward` with the experts flagged in `low_experts` ((E,) bool, device) in `low`."""
        weights = self._realb_low_weights(low, low_experts, ready)
        return sync_free.mixed_forward(self, hidden_states, top_k_index, top_k_weights, low_experts, high, low, weights)

    def _realb_low_weights(self, low: str, low_experts: torch.Tensor, ready=None) -> tuple[object, object]:
        """(first, down) in `low` covering every expert id (unflagged ones may be left unconverted).

        persistent: the cached copies. on_the_fly: `ready`'s all-experts conversion if a prefetch queued one,
        else converted now, skipping unflagged experts on the device (transient: freed after the layer)."""
        if self.realb_runtime.config.weight_cache == "persistent":
            first, down, _ = self._realb_packed(low, [])
            return first, down
        prepared = ready.get(low) if ready is not None else None
        if prepared is not None and prepared[2] is None:
            return prepared[0], prepared[1]
        return self.realb_convert_flagged(low, low_experts)

    def realb_convert_flagged(self, fmt_name: str, flags: torch.Tensor) -> tuple[object, object]:
        """Every expert's slot converted to `fmt_name`, skipping (on CUDA) the experts whose flag is 0 on the device."""
        fmt = get_format(fmt_name)
        first, down = self._realb_weights()
        with torch.no_grad():
            return (
                fmt.quantize_weight(first.detach(), expert_flags=flags),
                fmt.quantize_weight(down.detach(), expert_flags=flags),
            )

    def _realb_low_flags(self, precisions: tuple[str, ...], high: str, device: torch.device) -> torch.Tensor:
        """(E,) bool on `device`: which experts a host-side decision lowered (cached like expert codes)."""
        return self._realb_expert_code(tuple(int(p != high) for p in precisions), device).bool()

    # ---- real expert parallelism: called by realb_hf.distributed's EP implementations -------------

    def realb_run_local(
        self,
        hidden_states: torch.Tensor,
        top_k_index: torch.Tensor,
        top_k_weights: torch.Tensor,
        precisions: tuple[str, ...],
        high: str,
        ready=None,
    ) -> torch.Tensor:
        """This rank's experts on local ids (ids >= num_experts are other ranks' and contribute nothing).

        `precisions` holds one precision per local expert, already decided from the global routing; `ready`
        optionally holds weights converted ahead of time (`realb_hf.distributed.WeightPrefetch`).
        """
        if precisions.count(high) == len(precisions):
            return super().forward(hidden_states, top_k_index, top_k_weights)
        lows = set(precisions) - {high}
        low = next(iter(lows))
        if len(lows) == 1 and self._realb_sync_free_ok(hidden_states, high, low):
            flags = self._realb_low_flags(precisions, high, hidden_states.device)
            return self._realb_sync_free(hidden_states, top_k_index, top_k_weights, flags, high, low, ready)
        return self._realb_mixed_forward(hidden_states, top_k_index, top_k_weights, precisions, high, ready)

    def realb_run_local_fp8(
        self,
        xq: torch.Tensor,
        x_scale: torch.Tensor,
        expert_ids: torch.Tensor,
        out_dtype: torch.dtype,
        ready=None,
        counts_host: list[int] | None = None,
    ) -> torch.Tensor:
        """Rows that arrived already quantized to fp8 (rowwise, `formats.fp8.quantize_rowwise`), one local
        expert per row and unit weight, through this rank's experts in fp8: no re-quantization of the input.
        `xq` is the e4m3 data or its bytes (uint8, as received); `counts_host` (rows per local expert, when the
        caller knows them) saves a host sync.
        """
        num_rows = xq.shape[0]
        hidden_dim = self.down_proj.shape[-1] if self.is_transposed else self.down_proj.shape[1]
        if num_rows == 0:
            return torch.zeros(0, hidden_dim, dtype=out_dtype, device=xq.device)
        ids_sorted, perm = torch.sort(expert_ids, stable=True)
        if counts_host is None:
            counts_host = torch.bincount(ids_sorted, minlength=self.num_experts).tolist()
        experts = [e for e, c in enumerate(counts_host) if c]
        first, down, covered = self._realb_packed("fp8", experts, ready)
        offs = _offsets(counts_host, covered, xq.device)
        xq_sorted = take_rows(xq, perm)  # gathered as bytes when received as bytes: runs everywhere
        if xq_sorted.dtype == torch.uint8:
            xq_sorted = xq_sorted.view(torch.float8_e4m3fn)
        fmt = get_format("fp8")
        gate = self._realb_gate(ids_sorted)
        y = fmt.expert_mlp_on(
            (xq_sorted, x_scale[perm]), first, down, offs, gate, self._realb_plain_swiglu(), out_dtype
        )
        if self.has_bias:
            y = y + self.down_proj_bias[ids_sorted]
        if self.has_post_expert_norm:
            y = self.post_expert_norm(y)
        return take_rows(y, inverse_permutation(perm))  # a row gather: faster than out[perm] = y

    def _realb_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(first, down) projection weights in the (E, N, K) layout every format expects (views, no copies)."""
        first = self.gate_up_proj if self.has_gate else self.up_proj
        down = self.down_proj
        if self.is_transposed:
            return first.transpose(-2, -1), down.transpose(-2, -1)
        return first, down

    def realb_convert(self, fmt_name: str, experts: list[int]) -> tuple[object, object]:
        """`experts` (local ids, ascending) converted to `fmt_name` now: (first, down) packed weights."""
        fmt = get_format(fmt_name)
        first, down = self._realb_weights()
        with torch.no_grad():
            if experts == list(range(experts[0], experts[-1] + 1)):  # rank granularity: a slice, no gather
                sel_first, sel_down = first[experts[0] : experts[-1] + 1], down[experts[0] : experts[-1] + 1]
            else:
                idx = host_to_device(experts, torch.long, first.device)
                sel_first, sel_down = first.index_select(0, idx), down.index_select(0, idx)
            return fmt.quantize_weight(sel_first.detach()), fmt.quantize_weight(sel_down.detach())

    def _realb_packed(self, fmt_name: str, experts: list[int], ready=None) -> tuple[object, object, list[int] | None]:
        """Packed (first, down) weights covering `experts` in `fmt_name`, and the experts they hold (None: all).

        on_the_fly: convert just these experts now (transient, freed after the layer), unless `ready` already
        converted a superset of them ahead of time (zero-row groups cost nothing in the GEMM).
        persistent: convert all experts once and keep them.
        """
        first, down = self._realb_weights()
        if fmt_name == self.realb_runtime.config.high_precision:
            return first, down, None
        if self.realb_runtime.config.weight_cache == "persistent":
            if fmt_name not in self._realb_cache:
                fmt = get_format(fmt_name)
                with torch.no_grad():
                    packed = (fmt.quantize_weight(first.detach()), fmt.quantize_weight(down.detach()))
                self._realb_cache[fmt_name] = packed
                self.realb_runtime.telemetry.extra_memory_bytes += sum(fmt.weight_nbytes(p) for p in packed)
            return *self._realb_cache[fmt_name], None
        prepared = ready.get(fmt_name) if ready is not None else None
        if prepared is not None and (prepared[2] is None or set(experts) <= set(prepared[2])):
            return prepared  # covered None: every expert's slot (flagged conversion)
        return *self.realb_convert(fmt_name, experts), experts

    def realb_free_cache(self) -> None:
        self._realb_cache = {}

    def _realb_mixed_forward(
        self,
        hidden_states: torch.Tensor,
        top_k_index: torch.Tensor,
        top_k_weights: torch.Tensor,
        expert_precision: tuple[str, ...],
        high: str,
        ready=None,
    ) -> torch.Tensor:
        """`expert_precision` has one entry per expert this module holds (all of them, or this rank's under EP)."""
        device = hidden_states.device
        num_tokens, top_k = top_k_index.shape
        num_experts = self.num_experts
        formats = [high, *sorted(set(expert_precision) - {high})]  # code 0 is always high precision
        code_of = {f: i for i, f in enumerate(formats)}
        expert_code = self._realb_expert_code(tuple(code_of[p] for p in expert_precision), device)

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
        counts = histogram(key_sorted, (len(formats) + 1) * num_experts)
        counts = counts[: len(formats) * num_experts].view(len(formats), num_experts)
        counts_host = counts.tolist()

        outputs, start = [], 0
        for code, fmt_name in enumerate(formats):
            group_rows = sum(counts_host[code])
            if group_rows == 0:
                continue
            experts = [e for e in range(num_experts) if counts_host[code][e]]  # only experts with rows convert
            end = start + group_rows
            outputs.append(
                self._realb_group(
                    fmt_name, hidden_states, rows[start:end], ids_sorted[start:end], counts_host[code], experts, ready
                )
            )
            start = end
        hidden_dim = hidden_states.shape[-1]
        y = (
            torch.cat(outputs)
            if len(outputs) > 1
            else outputs[0]
            if outputs
            else hidden_states.new_empty(0, hidden_dim)
        )
        if self.has_post_expert_norm:
            y = self.post_expert_norm(y)
        # Position of every (token, slot) among the computed rows; -1 for other ranks' experts.
        position = inverse_permutation(perm)
        position = torch.where(position < start, position, -1)
        out = weighted_combine(
            y.to(hidden_states.dtype), position.view(num_tokens, top_k), weights.view(num_tokens, top_k)
        )
        return out.to(hidden_states.dtype)

    def _realb_group(
        self,
        fmt_name: str,
        hidden: torch.Tensor,
        rows: torch.Tensor,
        ids: torch.Tensor,
        counts_host: list[int],
        experts: list[int],
        ready=None,
    ) -> torch.Tensor:
        """One precision's rows (sorted by expert; `rows` index `hidden`) through both projections."""
        first, down, covered = self._realb_packed(fmt_name, experts, ready)
        offs = _offsets(counts_host, covered, hidden.device)
        gate = self._realb_gate(ids)
        fmt = get_format(fmt_name)
        y = fmt.expert_mlp_on(
            fmt.gather_activations(hidden, rows), first, down, offs, gate, self._realb_plain_swiglu(), hidden.dtype
        )
        if self.has_bias:
            y = y + self.down_proj_bias[ids]
        return y

    def _realb_gate(self, ids: torch.Tensor):
        """First projection's output -> down projection's input for rows of experts `ids` (bias, then gating)."""

        def gate(h: torch.Tensor) -> torch.Tensor:
            if self.has_bias:
                h = h + (self.gate_up_proj_bias if self.has_gate else self.up_proj_bias)[ids]
            return self._apply_gate(h) if self.has_gate else self.act_fn(h)

        return gate

    def _realb_expert_code(self, codes: tuple[int, ...], device: torch.device) -> torch.Tensor:
        """Per-expert format codes on the device, cached: a decision repeats across batches, and building the
        tensor from host memory would stall the stream on every call."""
        cache = self.__dict__.setdefault("_realb_code_cache", {})
        key = (codes, str(device))
        if key not in cache:
            if len(cache) >= 64:
                cache.clear()
            cache[key] = host_to_device(list(codes), torch.long, device)
        return cache[key]

    def _realb_plain_swiglu(self) -> bool:
        """silu(gate) * up on a concatenated gate|up without bias: what fused SwiGLU kernels compute."""
        return (
            self.has_gate
            and self.is_concatenated
            and not self.has_bias
            and type(self)._apply_gate is _default_apply_gate
            and isinstance(getattr(self, "act_fn", None), (torch.nn.SiLU, SiLUActivation))
        )


def _offsets(counts_host: list[int], covered: list[int] | None, device: torch.device) -> torch.Tensor:
    """int32 cumulative row ends per expert group (all experts, or only `covered` ones), built on the host."""
    counts = counts_host if covered is None else [counts_host[e] for e in covered]
    ends, total = [], 0
    for c in counts:
        total += c
        ends.append(total)
    return host_to_device(ends, torch.int32, device)
