"""What the demo's controls may say: the limits of a request and `DemoSettings`, checked before anything runs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .models import ep_size_choices

MAX_COPIES = 128
MAX_NEW_TOKENS = 256
# Only the policies that need no extra input; "static" needs a per-rank map (use the Python API for it).
DEMO_POLICIES = ("realb", "all_low", "off")

# Settings that must be whole numbers, by the label of their control in the page (refusals name the control).
WHOLE_NUMBER_CONTROLS = {
    "batch_threshold": "batch threshold",
    "ep_size": "virtual EP size",
    "copies": "batch of N copies",
    "max_new_tokens": "max new tokens",
}


@dataclass
class DemoSettings:
    """What the controls say. Runtime fields go to `get_runtime(model).reconfigure`, the rest shape the request.

    Defaults are chosen so the bundled model's default request crosses the batch threshold: 48 copies of one
    image question (49 tokens each) are 2352 prefill tokens > 2048.
    """

    policy: str = "realb"
    low_precision: str = "auto"
    modality_threshold: float = 0.7
    batch_threshold: int = 2048
    imbalance_threshold: float = 0.1
    granularity: str = "rank"
    ep_size: int = 4
    copies: int = 48
    max_new_tokens: int = 8

    def runtime_changes(self) -> dict[str, Any]:
        """Keyword arguments for `RealbRuntime.reconfigure` (validated there like `RealbConfig`)."""
        return {
            "policy": self.policy,
            "rank_precisions": None,
            "low_precision": self.low_precision,
            "modality_threshold": float(self.modality_threshold),
            "batch_threshold": int(self.batch_threshold),
            "imbalance_threshold": float(self.imbalance_threshold),
            "granularity": self.granularity,
            "ep_size": int(self.ep_size),
        }

    def validate(self, num_experts: int | None = None) -> DemoSettings:
        """Coerce slider floats to ints and raise `ValueError` with a readable message for bad values."""
        for name, label in WHOLE_NUMBER_CONTROLS.items():
            value = getattr(self, name)
            try:
                whole = int(float(value))
                ok = not isinstance(value, bool) and float(value) == whole
            except (TypeError, ValueError, OverflowError):
                ok = False
            if not ok:
                raise ValueError(f"{label} must be a whole number, got {value!r}")
            setattr(self, name, whole)
        if self.policy not in DEMO_POLICIES:
            raise ValueError(f"policy {self.policy!r} is not offered here; choose one of {list(DEMO_POLICIES)}")
        if not 1 <= self.copies <= MAX_COPIES:
            raise ValueError(f"batch of N copies must be between 1 and {MAX_COPIES}, got {self.copies}")
        if not 1 <= self.max_new_tokens <= MAX_NEW_TOKENS:
            raise ValueError(f"max new tokens must be between 1 and {MAX_NEW_TOKENS}, got {self.max_new_tokens}")
        if self.ep_size < 1:
            raise ValueError(f"virtual EP size must be >= 1, got {self.ep_size}")
        if num_experts is not None and num_experts % self.ep_size:
            raise ValueError(
                f"virtual EP size {self.ep_size} must divide the {num_experts} experts: "
                f"choose one of {ep_size_choices(num_experts)}"
            )
        from realb_hf import RealbConfig

        RealbConfig(**{k: v for k, v in self.runtime_changes().items() if k != "rank_precisions"})  # field checks
        return self


__all__ = ["DEMO_POLICIES", "MAX_COPIES", "MAX_NEW_TOKENS", "WHOLE_NUMBER_CONTROLS", "DemoSettings"]
