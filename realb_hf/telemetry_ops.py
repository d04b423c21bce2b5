"""Telemetry's hand-offs as registered operators, for code that torch.compile traces.

Dynamo cannot trace a lock, and a graph break in every MoE layer would cost what compiling saves. So while
compiling, telemetry's inputs go through opaque operators of the `realb_telemetry` namespace. Their Python runs
each time the compiled graph runs, with real tensors, and calls the same `Telemetry` methods eager code calls, so
compiled and eager forwards leave the same records. A compiled model forward hands over all its layer calls in one
operator call at its end (`receive_forward`: one Python call per forward, and no split of a CUDA-graph capture in
the middle of the model); a layer compiled on its own hands over each call (`receive`).

Invariants:
- the operators mutate `TALLY` (a CPU scalar counting hand-offs), so no graph pass drops them as dead code;
- they are tagged cudagraph-unsafe: a CUDA graph replays kernels, not Python, so torch.compile does not capture a
  graph that holds them (compile with telemetry off for `mode="reduce-overhead"`);
- the settings a layer call decided with are read again when the operator runs: the compiled graph's guards
  hold them equal to those it was traced with.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch

from .telemetry import DeferredRouting, LayerCounts

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


def _nothing(*args) -> None:
    return None


def _define(name: str, schema: str, impl) -> torch._ops.OpOverload:
    _LIBRARY.define(name + schema, tags=_TAGS)
    _LIBRARY.impl(name, impl, "CompositeExplicitAutograd")
    torch.library.register_fake(f"{NAMESPACE}::{name}", _nothing, lib=_LIBRARY)
    return getattr(getattr(torch.ops, NAMESPACE), name).default


def _receive_forward(
    tally: torch.Tensor,
    held: list[torch.Tensor],
    modalities: list[torch.Tensor | None],
    num_tokens: list[int],
    runtime: int,
    next_forward: bool,
    layers: list[str],
    num_experts: list[int],
    sources: list[str],
) -> None:
    owner = _runtime(runtime)
    telemetry = owner.telemetry
    if next_forward:
        telemetry.next_forward()
    for i, layer in enumerate(layers):
        routed = num_experts[i] > 0  # the routing itself (counted later), else (2, E) counts
        counts = DeferredRouting(held[i], modalities[i], num_experts[i]) if routed else held[i]
        params = owner.params(held[i].device)
        telemetry.receive(layer, LayerCounts(counts, None, num_tokens[i], params, sources[i]))
    tally.add_(1)


_RECEIVE_FORWARD = _define(
    "receive_forward",
    "(Tensor(a!) tally, Tensor[] held, Tensor?[] modalities, SymInt[] num_tokens, int runtime, bool next_forward,"
    " str[] layers, int[] num_experts, str[] sources) -> ()",
    _receive_forward,
)


def receive_forward(handle: int, next_forward: bool, calls: list[tuple[str, LayerCounts]]) -> None:
    """A compiled forward's telemetry at its end: the forward count (`next_forward`) and its layer calls' counts
    (never host `RoutingStats`: those went in at once, see `receive_now`)."""
    held, modalities, num_tokens, layers, num_experts, sources = [], [], [], [], [], []
    for layer, counts in calls:
        routing = counts.counts
        routed = type(routing) is DeferredRouting
        held.append(routing.top_k_index if routed else routing)
        modalities.append(routing.modality if routed else None)
        num_experts.append(routing.num_experts if routed else 0)
        num_tokens.append(counts.num_tokens)
        layers.append(layer)
        sources.append(counts.source)
    _RECEIVE_FORWARD(TALLY, held, modalities, num_tokens, handle, next_forward, layers, num_experts, sources)


def receive(handle: int, layer: str, counts: LayerCounts) -> None:
    """One layer call's counts, from a layer compiled on its own (no model forward around it)."""
    receive_forward(handle, False, [(layer, counts)])


@torch.compiler.disable
def receive_now(handle: int, layer: str, counts: LayerCounts) -> None:
    """Host `RoutingStats` (the host path): plain numbers a graph cannot carry go in eagerly, a graph break on that
    path only."""
    _runtime(handle).telemetry.receive(layer, counts)
