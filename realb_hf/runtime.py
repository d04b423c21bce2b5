"""The state one ReaLB model shares across its experts modules: config, modality, telemetry.

Kept outside the modules' parameters so checkpoints hold exactly what the stock model holds.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch

from .config import RealbConfig
from .formats import resolve_low_precision
from .kernels.counts import routing_counts_many
from .modality import TEXT, ModalityTracker, placeholder_ids
from .policy import PolicyParams
from .telemetry import Telemetry


def model_telemetry(**kwargs: Any) -> Telemetry:
    """A `Telemetry` that counts deferred routing with the routing kernels."""
    return Telemetry(count_routing=partial(routing_counts_many, text_code=TEXT), **kwargs)


@dataclass(eq=False)
class RealbRuntime:
    config: RealbConfig
    modality: ModalityTracker = field(default_factory=ModalityTracker)
    telemetry: Telemetry = field(default_factory=model_telemetry)
    ep: Any = None  # realb_hf.ep.EpState under real expert parallelism (None: one process, virtual EP)
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
        self.config.update(**changes)
        self._params.clear()
