"""The state one ReaLB model shares across its experts modules: config, modality, telemetry.

Kept outside the modules' parameters so checkpoints hold exactly what the stock model holds.
"""

from __future__ import annotations

import contextlib
import copy
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch

from . import telemetry_ops
from .config import RealbConfig
from .formats import get_format, resolve_low_precision
from .kernels.counts import routing_counts_many
from .modality import TEXT, ModalityTracker, placeholder_ids
from .policy import PolicyParams, expert_ranges
from .telemetry import Telemetry
from .telemetry_log import DeviceLog, attach_log


def model_telemetry(**kwargs: Any) -> Telemetry:
    """A `Telemetry` that counts deferred routing with the routing kernels."""
    return Telemetry(count_routing=partial(routing_counts_many, text_code=TEXT), **kwargs)


@dataclass(frozen=True)
class LayerShape:
    """What a config is checked against for one experts layer."""

    num_experts: int  # the layer's global expert count
    hidden: int
    intermediate: int


def named_low_formats(config: RealbConfig) -> set[str]:
    """Low formats the config names explicitly ("auto" is resolved later, per device)."""
    names = {config.low_precision} if config.low_precision != "auto" else set()
    for precision in (config.rank_precisions or {}).values():
        if precision == "low":
            names |= {config.low_precision} - {"auto"}
        elif precision not in ("high", config.high_precision):
            names.add(precision)
    return names


def check_layer(name: str, shape: LayerShape, config: RealbConfig) -> None:
    """`config` fits layer `name`: its ep_size divides the experts, and block-scaled formats it names divide both
    GEMMs' reduction dims (hidden, intermediate). ValueError naming the layer and the fix otherwise."""
    try:
        expert_ranges(shape.num_experts, config.ep_size)
    except ValueError:
        raise ValueError(
            f"ep_size={config.ep_size} must divide the number of experts ({shape.num_experts}) of {name}; choose "
            f"an ep_size among the divisors of {shape.num_experts}"
        ) from None
    for fmt_name in sorted(named_low_formats(config)):
        block = getattr(get_format(fmt_name), "block_size", 1)
        if shape.hidden % block or shape.intermediate % block:
            raise ValueError(
                f"{fmt_name} needs the experts' hidden ({shape.hidden}) and intermediate ({shape.intermediate}) sizes "
                f"of {name} to be multiples of its block size {block}; choose another low_precision (e.g. 'fp8')"
            )


@torch._dynamo.assume_constant_result  # traced code gets the answer as a constant, asked outside the trace
def resolved_low_precision(name: str, device: str) -> str:
    """`resolve_low_precision`: "auto" asks the device's capability and installed packages, which dynamo cannot
    trace on every torch version (torch 2.11 refuses `importlib.util.find_spec` under `fullgraph=True`)."""
    return resolve_low_precision(name, device)


class Settings:
    """One config and its policy parameters per device. Never changed once made: `reconfigure` makes a new one, so
    a forward holding this one decides every layer with it. `serial` names it in the device log (equal configs of
    one runtime share a serial)."""

    __slots__ = ("config", "serial", "_params")

    def __init__(self, config: RealbConfig, serial: int = 0):
        self.config = config
        self.serial = serial
        self._params: dict[torch.device, PolicyParams] = {}

    def params(self, device: torch.device) -> PolicyParams:
        """Policy parameters with "auto" resolved for the device the experts run on (cached per device). Traced code
        builds them afresh: dynamo folds them into constants, and a cache lookup would add guards on the cache, and
        a recompile once the first compiled call filled it."""
        if torch.compiler.is_compiling():
            return self._make(device)
        params = self._params.get(device)  # torch.device hashes by type and index
        if params is None:
            params = self._params[device] = self._make(device)
        return params

    def _make(self, device: torch.device) -> PolicyParams:
        c = self.config
        return PolicyParams(
            policy=c.policy,
            high=c.high_precision,
            low=resolved_low_precision(c.low_precision, str(device)),
            granularity=c.granularity,
            ep_size=c.ep_size,
            modality_threshold=c.modality_threshold,
            batch_threshold=c.batch_threshold,
            imbalance_threshold=c.imbalance_threshold,
            low_cost_ratio=c.low_cost_ratio,
            rank_precisions=tuple((c.rank_precisions or {}).items()),
            conversion_cost=c.conversion_cost if c.weight_cache == "on_the_fly" else 0.0,  # copies: made once
        )


class _PerThread(threading.local):
    """Per thread, keyed by runtime id: the settings of the forward in flight and of `configured` blocks (attributes
    from the start, so reading them never raises)."""

    def __init__(self) -> None:
        self.in_flight: dict[int, Settings] = {}
        self.overrides: dict[int, Settings] = {}


_THREAD = _PerThread()
MAX_SERIALS = 1024  # distinct configs a runtime can still name in the device log (the oldest are forgotten)


@dataclass(eq=False)
class RealbRuntime:
    """The state one ReaLB model shares across its experts modules.

    Thread model: one model may serve several threads at once. What belongs to one call is kept per thread: the
    modality of the forward in flight (`ModalityTracker`) and the settings it decides with, taken when the
    forward starts. So `reconfigure` applies between forwards, never in the middle of one, and `configured(...)`
    gives the calling thread its own settings for the forwards it starts inside the block. Telemetry and the
    persistent weight copies are shared by the model's threads (records of concurrent forwards interleave).
    """

    config: RealbConfig
    modality: ModalityTracker = field(default_factory=ModalityTracker)
    telemetry: Telemetry = field(default_factory=model_telemetry)
    ep: Any = None  # realb_hf.ep.EpState under real expert parallelism (None: one process, virtual EP)
    layers: dict[str, LayerShape] = field(default_factory=dict)  # every converted experts layer
    _settings: Settings | None = field(default=None, repr=False)
    _settings_of: RealbConfig | None = field(default=None, repr=False)  # the config object `_settings` copies
    _serials: dict[str, int] = field(default_factory=dict, repr=False)  # config as JSON -> its serial
    _by_serial: dict[int, Settings] = field(default_factory=dict, repr=False)  # serial -> its first Settings
    handle: int = field(init=False, repr=False, compare=False)  # how compiled code names this runtime

    def __post_init__(self) -> None:
        self.handle = telemetry_ops.register(self)
        if self.telemetry.device_log is None:
            self.telemetry.device_log = DeviceLog(self.logged_params)
        self._refresh()  # in eager code: a first forward traced by dynamo would copy the config while tracing

    def __setstate__(self, state: dict) -> None:  # a copy (deepcopy, pickle) gets its own handle
        self.__dict__.update(state)
        self.handle = telemetry_ops.register(self)

    @classmethod
    def for_model(cls, model: torch.nn.Module, config: RealbConfig) -> RealbRuntime:
        image_id, video_id = placeholder_ids(model.config)
        return cls(config=config, modality=ModalityTracker(image_id, video_id))

    @property
    def settings(self) -> Settings:
        """The settings a layer call decides with: those of the forward in flight in this thread, else of this
        thread's `configured` block, else the model's."""
        key = id(self)
        settings = _THREAD.in_flight.get(key) or _THREAD.overrides.get(key)
        if settings is not None:
            return settings
        if self._settings_of is not self.config:  # a config object swapped in by hand
            self._refresh()
        return self._settings

    @torch.compiler.disable  # dynamo cannot trace the copy; compiled code reaches it only after a swapped config
    def _refresh(self) -> None:
        """New settings from a copy of the config: forwards in flight keep the settings they took."""
        self._settings = self._new_settings(copy.deepcopy(self.config))
        self._settings_of = self.config

    def _new_settings(self, config: RealbConfig) -> Settings:
        """Settings for `config` (a copy nobody changes), with the serial of an equal config if one is known."""
        key = config.to_json_string(use_diff=False)
        serial = self._serials.get(key)
        if serial is not None:
            return Settings(config, serial)
        if len(self._serials) >= MAX_SERIALS:
            del self._by_serial[self._serials.pop(next(iter(self._serials)))]
        serial = next(reversed(self._by_serial), 0) + 1  # serials grow in insertion order
        settings = self._by_serial[serial] = Settings(config, serial)
        self._serials[key] = serial
        return settings

    def logged_params(self, serial: int, device: torch.device) -> PolicyParams | None:
        """The policy parameters of settings `serial` on `device` (device log records); None once forgotten."""
        settings = self._by_serial.get(serial)
        return settings.params(device) if settings is not None else None

    def params(self, device: torch.device) -> PolicyParams:
        """Policy parameters for `device` from `settings` (every layer call asks: kept to two lookups)."""
        settings = self.settings
        found = None if torch.compiler.is_compiling() else settings._params.get(device)
        return found if found is not None else settings.params(device)

    def begin_forward(self) -> None:
        """At the start of a model forward (called by its wrapped forward): the forward decides every layer with
        today's settings."""
        _THREAD.in_flight[id(self)] = self.settings
        if not self.telemetry.enabled:
            return  # telemetry off counts nothing: a compiled forward then runs no host operator to split its graph
        if torch.compiler.is_compiling():
            telemetry_ops.next_forward(self.handle)
        else:
            self.telemetry.next_forward()

    def in_forward(self) -> bool:
        """Whether this thread is inside a forward of the model (between `begin_forward` and `end_forward`)."""
        return id(self) in _THREAD.in_flight

    def end_forward(self) -> None:
        _THREAD.in_flight.pop(id(self), None)

    def attach_log(self, module: torch.nn.Module) -> None:
        """Give a converted experts module its device log, once its weights are where they run."""
        attach_log(module, self.layers[module.realb_name].num_experts)
        self.telemetry.device_log.add(module.realb_name, module)

    def add_layer(self, name: str, shape: LayerShape) -> None:
        """Register a converted experts layer, after checking the config against it."""
        check_layer(name, shape, self.config)
        self.layers[name] = shape

    def reconfigure(self, **changes: Any) -> None:
        """Change runtime knobs of a loaded model for every forward that starts afterwards, in any thread;
        validated like the constructor and against every layer (nothing changes if a value is refused)."""
        self._checked(changes)
        self.config.update(**changes)  # valid: a copy passed the same checks
        self._refresh()

    @contextlib.contextmanager
    def configured(self, **changes: Any) -> Iterator[RealbConfig]:
        """Settings for the forwards this thread starts inside the block (per-request settings of a server),
        checked like `reconfigure`; the model's own settings, and other threads', stay as they are."""
        overrides = _THREAD.overrides
        previous = overrides.get(id(self))
        candidate = self._checked(changes, base=previous.config if previous is not None else None)
        overrides[id(self)] = self._new_settings(candidate)
        try:
            yield candidate
        finally:
            if previous is None:
                overrides.pop(id(self), None)
            else:
                overrides[id(self)] = previous

    def _checked(self, changes: dict[str, Any], base: RealbConfig | None = None) -> RealbConfig:
        """A copy of `base` (the model's config) with `changes` applied, after every check loading makes."""
        allowed = RealbConfig.get_runtime_fields()
        unknown = sorted(set(changes) - set(allowed))
        if unknown:
            raise ValueError(f"cannot change {unknown} on a loaded model; runtime fields: {allowed}")
        if self.ep is not None and changes.get("ep_size", self.ep.size) != self.ep.size:
            raise ValueError(
                f"ep_size is fixed at {self.ep.size} by the real expert parallelism this model was loaded with"
            )
        candidate = copy.deepcopy(base if base is not None else self.config)
        candidate.update(**changes)  # raises on a bad value
        for name, shape in self.layers.items():
            check_layer(name, shape, candidate)
        return candidate
