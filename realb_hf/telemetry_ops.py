"""Telemetry's hand-offs as registered operators, for code that torch.compile traces.

Dynamo cannot trace a lock, and a graph break in every MoE layer would cost what compiling saves. So while
compiling, a model's forward count and each layer call's counts go to telemetry through two opaque operators of
the `realb_telemetry` namespace. Their Python runs each time the compiled graph runs, with real tensors, and calls
the same `Telemetry` methods eager code calls, so compiled and eager forwards leave the same records.

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

from .telemetry import DeferredRouting, LayerCounts, RoutingStats

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


def receive(handle: int, layer: str, counts: LayerCounts, top_k_index: torch.Tensor) -> None:
    """`Telemetry.receive` from code being compiled. Counts decided on the host (the host path) are plain numbers,
    which a graph cannot carry: they go in eagerly, at the cost of a graph break on that path only."""
    held = counts.counts
    if type(held) is RoutingStats:
        _receive_now(handle, layer, counts)
    elif type(held) is DeferredRouting:
        _RECEIVE(TALLY, None, held.top_k_index, held.modality, handle, layer, held.num_experts, counts.source)
    else:
        _RECEIVE(TALLY, held, top_k_index, None, handle, layer, held.shape[-1], counts.source)


@torch.compiler.disable
def _receive_now(handle: int, layer: str, counts: LayerCounts) -> None:
    _runtime(handle).telemetry.receive(layer, counts)
