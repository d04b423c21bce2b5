"""Record the routing a real model produces, and replay it: into the layer benchmark or back into a model.

A trace holds, per forward and per MoE layer (every fused experts module), exactly what that experts module
received: `top_k_index`, `top_k_weights` and the modality of its rows (from ReaLB's modality tracker). One
call records it on your GPU:

    import realb_hf
    from realb_hf.bench.trace import record_trace
    model = AutoModelForImageTextToText.from_pretrained(..., quantization_config=realb_hf.RealbConfig(policy="off"))
    record_trace(model, batches, "qwen3vl.trace.pt")   # batches: an iterable of model(**kwargs) dicts

File: one `torch.save` of a plain dict (tensors, strings, numbers, lists; loads with `weights_only=True`):
`{"format": "realb_hf.trace", "version": 1, "model_type", "layers": [names], "num_experts": {name: E},
"forwards": [{"input_shape": [B, S] | None, "routing": {name: {"top_k_index", "top_k_weights",
"modality" | None}}}], "meta": {...}}`. Tensors are stored on the CPU exactly as the model produced them
(dtype included), so save -> load is bit-exact.

A module called more than once in one forward gets keys `name`, `name#1`, `name#2`, ...
"""

from __future__ import annotations

import contextlib
import datetime
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..experts import RealbExperts, is_fused_experts
from .workload import Workload

TRACE_FORMAT = "realb_hf.trace"
TRACE_VERSION = 1


@dataclass
class LayerRouting:
    top_k_index: torch.Tensor
    top_k_weights: torch.Tensor
    modality: torch.Tensor | None  # (T,) int8, None when the model's inputs did not tell


@dataclass
class TraceForward:
    routing: dict[str, LayerRouting] = field(default_factory=dict)
    input_shape: list[int] | None = None  # (batch, seq) of input_ids / inputs_embeds when known


@dataclass
class Trace:
    model_type: str
    layers: list[str]
    num_experts: dict[str, int]
    forwards: list[TraceForward] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)

    # ---- access ----------------------------------------------------------------------------------

    def routing(self, forward: int, layer: str) -> LayerRouting:
        try:
            return self.forwards[forward].routing[layer]
        except IndexError:
            raise ValueError(f"trace has {len(self.forwards)} forwards; no forward {forward}") from None
        except KeyError:
            raise ValueError(f"forward {forward} of the trace has no layer {layer!r}; layers: {self.layers}") from None

    def __iter__(self) -> Iterator[tuple[int, str, LayerRouting]]:
        for i, fwd in enumerate(self.forwards):
            for name, routing in fwd.routing.items():
                yield i, name, routing

    def resolve_layer(self, layer: str | int | None) -> str:
        """A layer name from a name, an index into `layers`, or None (the first layer)."""
        if layer is None:
            return self.layers[0]
        if isinstance(layer, int) or (isinstance(layer, str) and layer.lstrip("-").isdigit()):
            return self.layers[int(layer)]
        if layer not in self.layers:
            raise ValueError(f"no layer {layer!r} in the trace; layers: {self.layers}")
        return layer

    def workload(self, layer: str | int | None = None, forward: int = 0) -> Workload:
        """One recorded (layer, forward) as a benchmark workload (unknown modality counts as text)."""
        name = self.resolve_layer(layer)
        r = self.routing(forward, name)
        base = name.split("#")[0]
        modality = r.modality if r.modality is not None else torch.zeros(r.top_k_index.shape[0], dtype=torch.int8)
        source = f"trace:{self.meta.get('path', '?')}:{name}:forward{forward}"
        return Workload(
            r.top_k_index.clone(),
            r.top_k_weights.float(),
            modality.to(torch.int8),
            self.num_experts[base],
            source=source,
        )

    def summary(self) -> dict[str, Any]:
        tokens = [r.top_k_index.shape[0] for _, _, r in self]
        return {
            "model_type": self.model_type,
            "forwards": len(self.forwards),
            "layers": len(self.layers),
            "records": len(tokens),
            "tokens_per_record": sorted(set(tokens)),
            "modality_known": all(r.modality is not None for _, _, r in self),
            "meta": self.meta,
        }

    # ---- file ------------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": TRACE_FORMAT,
            "version": TRACE_VERSION,
            "model_type": self.model_type,
            "layers": list(self.layers),
            "num_experts": dict(self.num_experts),
            "forwards": [
                {
                    "input_shape": f.input_shape,
                    "routing": {
                        name: {"top_k_index": r.top_k_index, "top_k_weights": r.top_k_weights, "modality": r.modality}
                        for name, r in f.routing.items()
                    },
                }
                for f in self.forwards
            ],
            "meta": dict(self.meta),
        }

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(self.to_dict(), path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> Trace:
        data = torch.load(Path(path), map_location="cpu", weights_only=True)
        if not isinstance(data, dict) or data.get("format") != TRACE_FORMAT:
            raise ValueError(f"{path} is not a realb_hf routing trace")
        if data.get("version") != TRACE_VERSION:
            raise ValueError(f"{path}: trace version {data.get('version')} is not supported (this is {TRACE_VERSION})")
        forwards = [
            TraceForward(
                routing={
                    name: LayerRouting(r["top_k_index"], r["top_k_weights"], r["modality"])
                    for name, r in f["routing"].items()
                },
                input_shape=f["input_shape"],
            )
            for f in data["forwards"]
        ]
        meta = {**data.get("meta", {}), "path": str(path)}
        return cls(data["model_type"], list(data["layers"]), dict(data["num_experts"]), forwards, meta)


def experts_modules(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """Every fused experts module of `model` (ReaLB-converted or stock), by its name in `model`."""
    found = {name: m for name, m in model.named_modules() if isinstance(m, RealbExperts) or is_fused_experts(m)}
    if not found:
        raise ValueError("this model has no fused experts module (a class decorated with @use_experts_implementation)")
    return found


def _call_args(args: tuple, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    names = ("hidden_states", "top_k_index", "top_k_weights")
    values = list(args[:3]) + [kwargs.get(n) for n in names[len(args[:3]) :]]
    if any(v is None for v in values):
        raise ValueError("an experts module was called without (hidden_states, top_k_index, top_k_weights)")
    return values[0], values[1], values[2]


def _input_shape(args: tuple, kwargs: dict) -> list[int] | None:
    for key in ("input_ids", "inputs_embeds"):
        t = kwargs.get(key)
        if isinstance(t, torch.Tensor):
            return list(t.shape[:2])
    if args and isinstance(args[0], torch.Tensor):
        return list(args[0].shape[:2])
    return None


def _model_type(model: torch.nn.Module) -> str:
    config = getattr(model, "config", None)
    return getattr(config, "model_type", type(model).__name__)


class _ForwardCounter:
    """Assigns every experts call to the model forward in flight, and numbers repeated calls of one module."""

    def __init__(self) -> None:
        self.forward = -1
        self.calls: dict[str, int] = {}

    def next(self) -> None:
        self.forward += 1
        self.calls = {}

    def key(self, name: str) -> str:
        n = self.calls.get(name, 0)
        self.calls[name] = n + 1
        return name if n == 0 else f"{name}#{n}"


class TraceRecorder:
    """Records routing while attached (`with TraceRecorder(model) as rec: model(**batch)`; `rec.trace`)."""

    def __init__(self, model: torch.nn.Module, max_forwards: int | None = None):
        self.model = model
        self.max_forwards = max_forwards
        self.modules = experts_modules(model)
        runtime = getattr(model, "realb", None)
        self._modality = runtime.modality if runtime is not None else None
        self.trace = Trace(
            model_type=_model_type(model),
            layers=list(self.modules),
            num_experts={name: int(m.num_experts) for name, m in self.modules.items()},
            meta={
                "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "torch": str(torch.__version__),
                "modality_source": "realb" if runtime is not None else "none (model not converted with realb_hf)",
            },
        )
        self._counter = _ForwardCounter()
        self._handles: list = []

    def _recording(self) -> bool:
        return self._counter.forward >= 0 and (self.max_forwards is None or self._counter.forward < self.max_forwards)

    def attach(self) -> TraceRecorder:
        self.detach()

        def on_model(module, args, kwargs):
            self._counter.next()
            if self._recording():
                self.trace.forwards.append(TraceForward(input_shape=_input_shape(args, kwargs)))

        self._handles.append(self.model.register_forward_pre_hook(on_model, with_kwargs=True))
        for name, module in self.modules.items():
            self._handles.append(module.register_forward_pre_hook(self._layer_hook(name), with_kwargs=True))
        return self

    def _layer_hook(self, name: str):
        def hook(module, args, kwargs):
            if not self._recording():
                return None
            hidden, index, weights = _call_args(args, kwargs)
            modality = None
            if self._modality is not None:
                codes = self._modality.for_rows(hidden.shape[0], getattr(module, "realb_pool", None))
                modality = None if codes is None else codes.detach().to("cpu", torch.int8).clone()
            self.trace.forwards[-1].routing[self._counter.key(name)] = LayerRouting(
                index.detach().cpu().clone(), weights.detach().cpu().clone(), modality
            )
            return None

        return hook

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __enter__(self) -> TraceRecorder:
        return self.attach()

    def __exit__(self, *exc) -> None:
        self.detach()


def record_trace(
    model: torch.nn.Module,
    inputs: Iterable[dict[str, Any] | tuple | torch.Tensor],
    path: str | Path | None = None,
    max_forwards: int | None = None,
) -> Trace:
    """Run `model` on every item of `inputs` (dicts of kwargs, tuples of args or one tensor) under no_grad,
    record every MoE layer's routing, save it to `path` when given, and return the trace.

    Convert the model with realb_hf first (e.g. `RealbConfig(policy="off")`: routing and outputs unchanged) so
    that the modality of every row is recorded too; a stock model records modality None.
    """
    with TraceRecorder(model, max_forwards=max_forwards) as recorder, torch.no_grad():
        for item in inputs:
            if isinstance(item, dict):
                model(**item)
            elif isinstance(item, tuple):
                model(*item)
            else:
                model(item)
    if path is not None:
        recorder.trace.meta["path"] = str(path)
        recorder.trace.save(path)
    return recorder.trace


class RoutingReplayer:
    """While attached, every experts module of `model` receives the trace's routing instead of its router's.

    The i-th model forward while attached gets trace forward `(start + i) % len(trace.forwards)` (cycling). Layers are matched
    by name; a row-count mismatch raises (the batch must have the recorded number of tokens). Hidden states
    still come from the model, so its outputs equal the recording run's when inputs and weights do.
    """

    def __init__(self, model: torch.nn.Module, trace: Trace, cycle: bool = True, start: int = 0):
        self.model = model
        self.trace = trace
        self.cycle = cycle
        self.modules = experts_modules(model)
        missing = sorted({k.split("#")[0] for f in trace.forwards for k in f.routing} - set(self.modules))
        if missing:
            raise ValueError(f"the trace has layers this model lacks: {missing[:4]}{'...' if len(missing) > 4 else ''}")
        self._counter = _ForwardCounter()
        self._counter.forward = start - 1  # the next model forward replays trace forward `start`
        self._handles: list = []
        self._cache: dict[tuple[int, str, torch.device], LayerRouting] = {}

    def _forward_index(self) -> int:
        i = self._counter.forward
        n = len(self.trace.forwards)
        if i >= n and not self.cycle:
            raise ValueError(f"the trace has {n} forwards; forward {i} has nothing to replay")
        return i % n

    def _layer_hook(self, name: str):
        def hook(module, args, kwargs):
            hidden, index, weights = _call_args(args, kwargs)
            fwd = self._forward_index()
            key = self._counter.key(name)
            routing = self.trace.forwards[fwd].routing.get(key)
            if routing is None:
                return None  # not recorded: keep the model's own routing
            if routing.top_k_index.shape[0] != hidden.shape[0]:
                raise ValueError(
                    f"{key}: the trace has {routing.top_k_index.shape[0]} rows for forward {fwd}, the model sent "
                    f"{hidden.shape[0]}; replay needs batches of the recorded size"
                )
            cache_key = (fwd, key, hidden.device)
            if cache_key not in self._cache:
                self._cache[cache_key] = LayerRouting(
                    routing.top_k_index.to(hidden.device), routing.top_k_weights.to(hidden.device), None
                )
            cached = self._cache[cache_key]
            new_args = (hidden, cached.top_k_index, cached.top_k_weights.to(weights.dtype))
            rest = {k: v for k, v in kwargs.items() if k not in ("hidden_states", "top_k_index", "top_k_weights")}
            return new_args + tuple(args[3:]), rest

        return hook

    def attach(self) -> RoutingReplayer:
        self.detach()
        self._handles.append(
            self.model.register_forward_pre_hook(lambda m, a, k: self._counter.next(), with_kwargs=True)
        )
        for name, module in self.modules.items():
            self._handles.append(module.register_forward_pre_hook(self._layer_hook(name), with_kwargs=True))
        return self

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __enter__(self) -> RoutingReplayer:
        return self.attach()

    def __exit__(self, *exc) -> None:
        self.detach()


@contextlib.contextmanager
def replay_routing(model: torch.nn.Module, trace: Trace | str | Path, cycle: bool = True, start: int = 0):
    """`with replay_routing(model, trace): model(**batch)` runs the model with the trace's routing."""
    if not isinstance(trace, Trace):
        trace = Trace.load(trace)
    with RoutingReplayer(model, trace, cycle=cycle, start=start) as replayer:
        yield replayer


__all__ = [
    "TRACE_FORMAT",
    "TRACE_VERSION",
    "LayerRouting",
    "RoutingReplayer",
    "Trace",
    "TraceForward",
    "TraceRecorder",
    "experts_modules",
    "record_trace",
    "replay_routing",
]
