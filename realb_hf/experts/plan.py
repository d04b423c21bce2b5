"""`plan_layer`: the one place that decides how a ReaLB experts layer runs for one batch.

It answers three questions together, from the routing (or the config alone), the policy parameters, what the
device executor supports for this module and batch, and the EP placement:
- where the decision is made: from the config alone (policies off/static/all_low, and batches below the
  threshold), on the device (the dynamic policy when the device executor runs: no host sync), or on the host
  (counts read back once; EP all-to-all hands in the global counts it already read);
- which executor runs: the module's stock forward (nothing lowered here), the device path, the host path (any mix
  of formats), or the received path (EP rows that arrive quantized);
- what telemetry receives (`telemetry.LayerCounts`).

Every rank of an EP group plans from the same global counts, so every rank reaches the same decision.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch

from ..kernels import counts as count_kernels
from ..kernels import rows as row_kernels
from ..modality import TEXT
from ..policy import (
    Decision,
    PolicyParams,
    RoutingStats,
    decide,
    decide_without_routing,
    decides_on_device,
    needs_routing,
)
from ..telemetry import DeferredRouting, LayerCounts
from ..tracing import exporting
from . import device_path

STOCK, DEVICE, HOST, RECEIVED = "stock", "device", "host", "received"
EXECUTORS = (STOCK, DEVICE, HOST, RECEIVED)


@dataclass(frozen=True)
class Placement:
    """The global experts one experts module holds: `[first, first + num_local)` of `num_global`."""

    first: int
    num_local: int
    num_global: int

    @classmethod
    def whole(cls, num_experts: int) -> Placement:
        """One process holding every expert (virtual EP: the policy still plans for `ep_size` ranks)."""
        return cls(0, num_experts, num_experts)

    @property
    def local(self) -> slice:
        return slice(self.first, self.first + self.num_local)


class LayerPlan(NamedTuple):
    """How one layer call runs (see the module docstring)."""

    executor: str  # one of EXECUTORS
    high: str
    low: str | None  # the low format of the device and received executors
    low_flags: torch.Tensor | None  # (num_local,) bool on the device: experts in `low` (device executor)
    precisions: tuple[str, ...] | None  # one per local expert; None when decided on the device
    decision: Decision | None  # the global decision, when made on the host or from the config
    fp8_ranks: tuple[bool, ...] | None  # EP all-to-all: ranks whose rows travel as fp8 (None: none do)
    telemetry: LayerCounts | None  # None when the caller records nothing (telemetry off)


_ON_DEVICE: dict[tuple, torch.Tensor] = {}


def on_device(values: tuple, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A small constant tensor (per-expert codes or flags) on `device`, cached: decisions repeat across batches,
    and building it from host memory every call would stall the stream. Traced code makes it a constant of the
    graph instead (no cache to guard on, nothing copied from the host when the graph runs)."""
    if torch.compiler.is_compiling():
        return torch.tensor(values, dtype=dtype, device=device)
    key = (values, dtype, str(device))
    tensor = _ON_DEVICE.get(key)
    if tensor is None:
        if len(_ON_DEVICE) >= 256:
            _ON_DEVICE.clear()
        tensor = row_kernels.host_to_device(list(values), torch.long, device).to(dtype)
        _ON_DEVICE[key] = tensor
    return tensor


class ConfigDecision(NamedTuple):
    params: PolicyParams
    placement: Placement
    decision: Decision
    precisions: tuple[str, ...]
    stock: LayerPlan | None  # the plan when every local expert stays high (telemetry not attached)


def config_decision(cache: list, params: PolicyParams, placement: Placement) -> ConfigDecision:
    """`decide_without_routing` for `placement`, cached in `cache` (a one-slot list the caller owns) while the same
    params object is in use: the runtime keeps it until reconfigured, so a decode step costs two identity checks.
    Traced code skips the cache: dynamo folds the decision into constants anyway, and reading the cache would add
    guards on it, and a recompile once the first compiled call filled it."""
    hit = None if torch.compiler.is_compiling() else (cache[0] if cache else None)
    if hit is None or hit.params is not params or hit.placement is not placement:
        decision = decide_without_routing(params, placement.num_global)
        precisions = decision.expert_precision[placement.local]
        all_high = precisions.count(params.high) == len(precisions)
        stock = LayerPlan(STOCK, params.high, None, None, precisions, decision, None, None) if all_high else None
        hit = ConfigDecision(params, placement, decision, precisions, stock)
        if not torch.compiler.is_compiling():
            cache[:] = [hit]
    return hit


@torch.compiler.disable  # a host read: compiled code breaks the graph here rather than trace data-dependent numbers
def routing_stats(top_k_index: torch.Tensor, modality: torch.Tensor | None, num_experts: int) -> RoutingStats:
    """Pairs and vision pairs per expert, on the host (one host sync)."""
    both = count_kernels.routing_counts(top_k_index, modality, num_experts, TEXT).tolist()
    return RoutingStats(tuple(both[0]), tuple(both[1]), int(top_k_index.shape[0]))


def plan_layer(
    module: torch.nn.Module,
    hidden: torch.Tensor,
    top_k_index: torch.Tensor,
    params: PolicyParams,
    placement: Placement,
    modality: tuple[torch.Tensor | None, str] | None = None,
    host_stats: RoutingStats | None = None,
    quantized_dispatch: bool = False,
    ep_rank: int = 0,
    cache: list | None = None,
    record: bool = True,
) -> LayerPlan:
    """Plan one call of `module` on `hidden` routed by `top_k_index` (global expert ids).

    `modality`: (codes, source) of the rows; None: asked of `module.realb_modality` only when needed.
    `host_stats`: the global counts when the caller already holds them on the host (EP all-to-all).
    `quantized_dispatch`: EP all-to-all may send fp8 rows to ranks lowered to fp8 (this rank is `ep_rank`).
    `cache`: the caller's slot for config-only decisions (`config_decision`).
    `record`: whether telemetry takes this call; a config-only call with nothing lowered then costs a few lookups.
    """
    num_tokens = top_k_index.shape[0]
    # torch.export with a dynamic token count: one program must serve batches on both sides of the batch threshold,
    # so the device decision takes the threshold as a tensor op instead of a branch on the size
    exporting_sizes = exporting() and isinstance(num_tokens, torch.SymInt) and decides_on_device(params)
    if host_stats is None and not exporting_sizes and not needs_routing(params, num_tokens):
        hit = config_decision(cache if cache is not None else [], params, placement)
        if not record and hit.stock is not None:
            return hit.stock
        counts = None
        if record:
            codes, source = modality if modality is not None else module.realb_modality(num_tokens)
            routing = DeferredRouting(top_k_index, codes, placement.num_global)
            counts = LayerCounts(routing, hit.decision, num_tokens, params, source)
        if hit.stock is not None:
            return LayerPlan(STOCK, params.high, None, None, hit.precisions, hit.decision, None, counts)
        return _from_precisions(module, hidden, params, hit.precisions, hit.decision, counts)
    codes, source = modality if modality is not None else module.realb_modality(num_tokens)
    supported = device_path.supports(module, hidden)
    if (
        host_stats is None
        and decides_on_device(params)
        and supported
        and device_path.runs_formats(params.high, params.low)
    ):
        device_counts, flags = count_kernels.counts_and_flags(
            top_k_index, codes, placement.num_global, params.device_rule(), TEXT
        )
        if exporting_sizes:
            flags = flags & (torch.full((), num_tokens, device=flags.device) >= params.batch_threshold)
        counts = LayerCounts(device_counts, None, num_tokens, params, source)
        return LayerPlan(DEVICE, params.high, params.low, flags[placement.local], None, None, None, counts)
    if host_stats is None:
        if exporting():
            raise RuntimeError(_host_decision_in_export(module, params, supported))
        host_stats = routing_stats(top_k_index, codes, placement.num_global)
    decision = decide(host_stats, params)
    precisions = decision.expert_precision[placement.local]
    counts = LayerCounts(host_stats, decision, host_stats.num_tokens, params, source)
    plan = _from_precisions(module, hidden, params, precisions, decision, counts, supported)
    if quantized_dispatch and "fp8" in decision.rank_precision:
        plan = plan._replace(fp8_ranks=tuple(p == "fp8" for p in decision.rank_precision))
        if plan.fp8_ranks[ep_rank]:  # every local expert is fp8: rows arrive quantized
            plan = plan._replace(executor=RECEIVED, low="fp8", low_flags=None)
    return plan


def _host_decision_in_export(module: torch.nn.Module, params: PolicyParams, supported: bool) -> str:
    why = (
        f"low_precision={params.low!r} runs on the host path (the device path takes bf16 or fp8)"
        if supported
        else "the device path does not run this module here (see realb_hf.experts.device_path.supports: CUDA, or "
        "realb_device_path='always', with bf16 activations and plain SwiGLU experts)"
    )
    return (
        f"{getattr(module, 'realb_name', 'experts')}: torch.export cannot trace ReaLB's dynamic policy here because "
        f"the decision would read routing counts back to the host, and {why}. Export with policy 'off', 'static' or "
        "'all_low', or where the device path runs the dynamic policy"
    )


def _from_precisions(
    module: torch.nn.Module,
    hidden: torch.Tensor,
    params: PolicyParams,
    precisions: Sequence[str],
    decision: Decision,
    counts: LayerCounts | None,
    supported: bool | None = None,
) -> LayerPlan:
    """The executor for a decision known on the host: stock when every local expert stays high, the device path for
    one low format it runs, the host path otherwise."""
    high = params.high
    lows = set(precisions) - {high}
    if not lows:
        return LayerPlan(STOCK, high, None, None, tuple(precisions), decision, None, counts)
    if supported is None:
        supported = device_path.supports(module, hidden)
    if len(lows) == 1:
        (low,) = lows
        if supported and device_path.runs_formats(high, low):
            flags = on_device(tuple(p != high for p in precisions), torch.bool, hidden.device)
            return LayerPlan(DEVICE, high, low, flags, tuple(precisions), decision, None, counts)
    return LayerPlan(HOST, high, None, None, tuple(precisions), decision, None, counts)
