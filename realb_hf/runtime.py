"""The state one ReaLB model shares across its experts modules: config, modality, telemetry.

Kept outside the modules' parameters so checkpoints hold exactly what the stock model holds.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch

from .config import RealbConfig
from .formats import get_format, resolve_low_precision
from .kernels.counts import routing_counts_many
from .modality import TEXT, ModalityTracker, placeholder_ids
from .policy import PolicyParams, expert_ranges
from .telemetry import Telemetry


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


@dataclass(eq=False)
class RealbRuntime:
    config: RealbConfig
    modality: ModalityTracker = field(default_factory=ModalityTracker)
    telemetry: Telemetry = field(default_factory=model_telemetry)
    ep: Any = None  # realb_hf.ep.EpState under real expert parallelism (None: one process, virtual EP)
    layers: dict[str, LayerShape] = field(default_factory=dict)  # every converted experts layer
    _params: dict[torch.device, PolicyParams] = field(default_factory=dict, repr=False)

    @classmethod
    def for_model(cls, model: torch.nn.Module, config: RealbConfig) -> RealbRuntime:
        image_id, video_id = placeholder_ids(model.config)
        return cls(config=config, modality=ModalityTracker(image_id, video_id))

    def params(self, device: torch.device) -> PolicyParams:
        """Policy parameters with "auto" resolved for the device the experts run on (cached per device until reconfigured)."""
        params = self._params.get(device)  # torch.device hashes by type and index
        if params is None:
            c = self.config
            params = self._params[device] = PolicyParams(
                policy=c.policy,
                high=c.high_precision,
                low=resolve_low_precision(c.low_precision, device),
                granularity=c.granularity,
                ep_size=c.ep_size,
                modality_threshold=c.modality_threshold,
                batch_threshold=c.batch_threshold,
                imbalance_threshold=c.imbalance_threshold,
                low_cost_ratio=c.low_cost_ratio,
                rank_precisions=tuple((c.rank_precisions or {}).items()),
            )
        return params

    def add_layer(self, name: str, shape: LayerShape) -> None:
        """Register a converted experts layer, after checking the config against it."""
        check_layer(name, shape, self.config)
        self.layers[name] = shape

    def reconfigure(self, **changes) -> None:
        """Change runtime knobs of a loaded model (e.g. from the demo); validated like the constructor."""
        allowed = RealbConfig.get_runtime_fields()
        unknown = sorted(set(changes) - set(allowed))
        if unknown:
            raise ValueError(f"cannot change {unknown} on a loaded model; runtime fields: {allowed}")
        if self.ep is not None and changes.get("ep_size", self.ep.size) != self.ep.size:
            raise ValueError(
                f"ep_size is fixed at {self.ep.size} by the real expert parallelism this model was loaded with"
            )
        candidate = copy.deepcopy(self.config)
        candidate.update(**changes)  # validates the values; the model's config is untouched if this raises
        for name, shape in self.layers.items():
            check_layer(name, shape, candidate)
        self.config.update(**changes)
        self._params.clear()
