"""Telemetry's hand-offs from code that torch.compile or torch.export traces.

Dynamo cannot trace a lock, and a graph break in every MoE layer would cost what compiling saves. So a compiled
layer call writes its counts into its module's device log (`telemetry_log`: tensor ops inside the graph), and the
forward count goes through one opaque operator of the `realb_telemetry` namespace per forward, whose Python runs
each time the compiled graph runs and takes the previous forward's log. Exported programs, and layers without a
log, hand each call's counts over through a second operator instead. Either way compiled and eager forwards leave
the same records.

Invariants:
- the operators mutate `TALLY` (a CPU scalar counting hand-offs), so no graph pass drops them as dead code;
- they are tagged cudagraph-unsafe: a CUDA graph replays kernels, not Python, so inductor keeps them out of the
  CUDA graphs it records (a manual `torch.cuda.graph` capture needs telemetry off);
- the settings a layer call decided with are read again when the operator runs: the compiled graph's guards
  hold them equal to those it was traced with.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch

from .kernels.counts import routing_counts_reference
from .modality import TEXT
from .telemetry import DeferredRouting, LayerCounts, RoutingStats
from .telemetry_log import KIND_CONFIG, KIND_COUNTS, write_log
from .tracing import exporting

NAMESPACE = "realb_telemetry"
_LIBRARY = torch.library.Library(NAMESPACE, "FRAGMENT")
_TAGS = (torch.Tag.cudagraph_unsafe,) if hasattr(torch.Tag, "cudagraph_unsafe") else ()
_RUNTIMES: list[weakref.ref] = []  # handle -> runtime (`register`)

TALLY = torch.zeros((), dtype=torch.int64)  # hand-offs made by compiled code


def register(runtime: Any) -> int:
    """A handle compiled code passes for `runtime` (an int: operators take no Python objects)."""
    _RUNTIMES.append(weakref.ref(runtime))
    return len(_RUNTIMES) - 1


def _runtime(handle: int) -> Any:
    runtime = _RUNTIMES[handle]()
    if runtime is None:
        raise RuntimeError(f"a compiled graph handed telemetry to ReaLB runtime {handle}, which no longer exists")
    return runtime


def _next_forward(tally: torch.Tensor, runtime: int) -> None:
    _runtime(runtime).telemetry.next_forward()
    tally.add_(1)


def _receive(
    tally: torch.Tensor,
    counts: torch.Tensor | None,
    routing: torch.Tensor,
    modality: torch.Tensor | None,
    runtime: int,
    layer: str,
    num_experts: int,
    source: str,
) -> None:
    owner = _runtime(runtime)
    held = counts if counts is not None else DeferredRouting(routing, modality, num_experts)
    params = owner.params(routing.device)
    owner.telemetry.receive(layer, LayerCounts(held, None, routing.shape[0], params, source))
    tally.add_(1)


def _nothing(*args) -> None:
    return None


def _define(name: str, schema: str, impl) -> torch._ops.OpOverload:
    _LIBRARY.define(name + schema, tags=_TAGS)
    _LIBRARY.impl(name, impl, "CompositeExplicitAutograd")
    torch.library.register_fake(f"{NAMESPACE}::{name}", _nothing, lib=_LIBRARY)
    return getattr(getattr(torch.ops, NAMESPACE), name).default


_NEXT_FORWARD = _define("next_forward", "(Tensor(a!) tally, int runtime) -> ()", _next_forward)
_RECEIVE = _define(
    "receive",
    "(Tensor(a!) tally, Tensor? counts, Tensor routing, Tensor? modality, int runtime, str layer, int num_experts,"
    " str source) -> ()",
    _receive,
)


def next_forward(handle: int) -> None:
    """`Telemetry.next_forward` of runtime `handle`, from code being compiled."""
    _NEXT_FORWARD(TALLY, handle)


def receive(
    runtime: Any, layer: str, counts: LayerCounts, top_k_index: torch.Tensor, log: torch.Tensor | None
) -> None:
    """`Telemetry.receive` from code being compiled, for layer `layer` of `runtime` with device log `log` (None: it
    has none, or no model forward is in flight to take it, so a second call would overwrite it first). Counts
    decided on the host (the host path) are plain numbers, which a graph cannot carry: they go in eagerly, at the
    cost of a graph break on that path only."""
    handle, held = runtime.handle, counts.counts
    if not runtime.telemetry.enabled:  # read while tracing: dynamo guards on it
        return
    if type(held) is RoutingStats:
        _receive_now(handle, layer, counts)
    elif log is not None and not exporting():
        if type(held) is DeferredRouting:
            held = routing_counts_reference(held.top_k_index, held.modality, held.num_experts, TEXT)
        kind = KIND_COUNTS if counts.decision is None else KIND_CONFIG
        write_log(log, held, counts.num_tokens, runtime.settings.serial, counts.source, kind)
        runtime.telemetry.device_log.mark_written()  # a Python side effect: dynamo replays it after the graph
    elif type(held) is DeferredRouting:
        _RECEIVE(TALLY, None, held.top_k_index, held.modality, handle, layer, held.num_experts, counts.source)
    else:
        _RECEIVE(TALLY, held, top_k_index, None, handle, layer, held.shape[-1], counts.source)


@torch.compiler.disable
def _receive_now(handle: int, layer: str, counts: LayerCounts) -> None:
    _runtime(handle).telemetry.receive(layer, counts)
