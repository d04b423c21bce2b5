"""`RealbConfig`: what ReaLB may do to a model, validated up front and saved in `config.json`.

Weights on disk stay in the model dtype; the config only says how experts may run. Every field is a
plain JSON value so `save_pretrained` -> `from_pretrained` restores it exactly.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from typing import Any

from transformers.utils.quantization_config import QuantizationConfigMixin

from .formats import LOW_PRECISIONS

QUANT_METHOD = "realb"
LOW_PRECISION_CHOICES = ("auto", *LOW_PRECISIONS)
HIGH_PRECISION_CHOICES = ("bf16",)
POLICIES = ("realb", "static", "all_low", "off")
GRANULARITIES = ("rank", "expert")
WEIGHT_CACHES = ("on_the_fly", "persistent")
# A rank in `rank_precisions` may name a format, or "low"/"high" for the config's resolved choices.
RANK_PRECISION_CHOICES = ("high", "low", *HIGH_PRECISION_CHOICES, *LOW_PRECISIONS)


class _Unset:
    """Marks an argument the caller did not pass (distinct from passing the default value)."""

    def __repr__(self) -> str:
        return "<default>"


_UNSET: Any = _Unset()


@dataclass(frozen=True)
class _Field:
    default: Any
    runtime: bool  # may a config passed at reload override the saved value?


# Order is the order of __init__ arguments and of the JSON keys.
_FIELDS: dict[str, _Field] = {
    "low_precision": _Field("auto", True),
    "high_precision": _Field("bf16", False),
    "policy": _Field("realb", True),
    "rank_precisions": _Field(None, True),
    "modality_threshold": _Field(0.7, True),
    "batch_threshold": _Field(2048, True),
    "imbalance_threshold": _Field(0.1, True),
    "granularity": _Field("rank", True),
    "weight_cache": _Field("on_the_fly", True),
    "ep_size": _Field(1, True),
    "low_cost_ratio": _Field(None, True),
    "conversion_cost": _Field(0.0, True),
    "modules_to_not_convert": _Field(None, False),
}


def _choice(name: str, value: Any, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise ValueError(f"RealbConfig.{name}={value!r} is not allowed; choose one of {list(allowed)}")
    return value


def _number(name: str, value: Any, lo: float, hi: float | None, *, integer: bool = False, lo_open: bool = False) -> Any:
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds):
        kind = "an int" if integer else "a number"
        raise ValueError(f"RealbConfig.{name} must be {kind}, got {value!r}")
    bad_lo = value <= lo if lo_open else value < lo
    if bad_lo or (hi is not None and value > hi) or value != value:
        lo_txt = f"({lo}" if lo_open else f"[{lo}"
        hi_txt = f"{hi}]" if hi is not None else "inf)"
        raise ValueError(f"RealbConfig.{name}={value!r} is out of range; allowed: {lo_txt}, {hi_txt}")
    return value if integer else float(value)


class RealbConfig(QuantizationConfigMixin):
    """Configuration of ReaLB's per-layer, per-rank precision switching.

    Args:
        low_precision: precision of lowered ranks: "auto" (fp8 on CUDA below sm100, nvfp4 on sm100+,
            emulated fp8 on CPU), "fp8", "nvfp4" or "mxfp4".
        high_precision: precision of ranks that are not lowered; "bf16" means the model's own dtype.
        policy: "realb" (the paper's dynamic decision), "static" (fixed `rank_precisions`), "all_low"
            (every rank low, the FP4-everywhere baseline) or "off" (always high; telemetry only).
        rank_precisions: for policy="static": {rank: precision}; precision is "high", "low" or a format name.
            Ranks left out run high.
        modality_threshold: M_d, the minimum vision share of a rank's load for it to be lowered (0 to 1).
        batch_threshold: below this many tokens in a forward, nothing is lowered.
        imbalance_threshold: a rank is overloaded when its load exceeds the mean by more than this fraction.
        granularity: "rank" (lower whole ranks, the paper) or "expert" (lower only the hottest
            vision-dominated experts of an overloaded rank until it no longer exceeds the next rank).
        weight_cache: "on_the_fly" (convert a lowered layer's weights per forward, no persistent memory) or
            "persistent" (keep low-precision copies of every expert; costs memory, saves conversions).
        ep_size: expert-parallel size the policy plans for; in one process the experts are split into this many
            contiguous virtual ranks, exactly as transformers' EP would shard them.
        low_cost_ratio: predicted time of a lowered expert's compute relative to high precision on the target
            hardware; None uses the format's default (see `realb_hf.policy.DEFAULT_LOW_COST_RATIO`).
        conversion_cost: predicted time of converting one lowered expert's weights, in token-expert pairs at high
            precision, which the dynamic policy counts against a lowering's saving when weight_cache="on_the_fly"
            (0: not counted; `realb_hf.policy.DEFAULT_CONVERSION_COST` is the H200 estimate, see docs/design.md).
        modules_to_not_convert: module name fragments whose experts are left untouched.

    Defaults: low_precision="auto", high_precision="bf16", policy="realb", rank_precisions=None,
    modality_threshold=0.7, batch_threshold=2048, imbalance_threshold=0.1, granularity="rank",
    weight_cache="on_the_fly", ep_size=1, low_cost_ratio=None, conversion_cost=0.0, modules_to_not_convert=None.
    """

    def __init__(
        self,
        low_precision: str = _UNSET,
        high_precision: str = _UNSET,
        policy: str = _UNSET,
        rank_precisions: dict[int, str] | None = _UNSET,
        modality_threshold: float = _UNSET,
        batch_threshold: int = _UNSET,
        imbalance_threshold: float = _UNSET,
        granularity: str = _UNSET,
        weight_cache: str = _UNSET,
        ep_size: int = _UNSET,
        low_cost_ratio: float | None = _UNSET,
        conversion_cost: float = _UNSET,
        modules_to_not_convert: list[str] | None = _UNSET,
        **kwargs: Any,
    ):
        quant_method = kwargs.pop("quant_method", QUANT_METHOD)
        if quant_method != QUANT_METHOD:
            raise ValueError(f"RealbConfig.quant_method must be {QUANT_METHOD!r}, got {quant_method!r}")
        if kwargs:
            raise ValueError(f"RealbConfig got unknown field(s) {sorted(kwargs)}; known fields: {list(_FIELDS)}")
        self.quant_method = QUANT_METHOD
        given = {name: value for name, value in locals().items() if name in _FIELDS}
        # Fields the caller passed: the only ones a config given at reload overrides in the saved one.
        self._explicit = {name for name, value in given.items() if value is not _UNSET}
        for name, field in _FIELDS.items():
            value = given[name]
            setattr(self, name, copy.deepcopy(field.default) if value is _UNSET else value)
        self.post_init()

    def post_init(self) -> None:
        """Validate every field; raise ValueError naming the field and what is allowed."""
        _choice("low_precision", self.low_precision, LOW_PRECISION_CHOICES)
        _choice("high_precision", self.high_precision, HIGH_PRECISION_CHOICES)
        _choice("policy", self.policy, POLICIES)
        _choice("granularity", self.granularity, GRANULARITIES)
        _choice("weight_cache", self.weight_cache, WEIGHT_CACHES)
        self.modality_threshold = _number("modality_threshold", self.modality_threshold, 0.0, 1.0)
        self.batch_threshold = _number("batch_threshold", self.batch_threshold, 0, None, integer=True)
        self.imbalance_threshold = _number("imbalance_threshold", self.imbalance_threshold, 0.0, None)
        self.ep_size = _number("ep_size", self.ep_size, 1, None, integer=True)
        if self.low_cost_ratio is not None:
            self.low_cost_ratio = _number("low_cost_ratio", self.low_cost_ratio, 0.0, 1.0, lo_open=True)
        self.conversion_cost = float(_number("conversion_cost", self.conversion_cost, 0.0, None))
        self.rank_precisions = self._validated_rank_precisions(self.rank_precisions)
        if self.modules_to_not_convert is not None:
            if not isinstance(self.modules_to_not_convert, (list, tuple)) or not all(
                isinstance(m, str) for m in self.modules_to_not_convert
            ):
                raise ValueError(
                    f"RealbConfig.modules_to_not_convert must be a list of module-name strings, "
                    f"got {self.modules_to_not_convert!r}"
                )
            self.modules_to_not_convert = list(self.modules_to_not_convert)

    def _validated_rank_precisions(self, value: Any) -> dict[int, str] | None:
        if self.policy == "static" and not value:
            raise ValueError('RealbConfig.policy="static" needs rank_precisions, e.g. {0: "low", 1: "high"}')
        if value is None:
            return None
        if self.policy != "static":
            raise ValueError(
                f"RealbConfig.rank_precisions is only used with policy='static' (got policy={self.policy!r}); "
                "remove it or set policy='static'"
            )
        if not isinstance(value, dict):
            raise ValueError(f"RealbConfig.rank_precisions must be a dict {{rank: precision}}, got {value!r}")
        out: dict[int, str] = {}
        for key, precision in value.items():
            try:
                rank = int(key)  # JSON turns int keys into strings
            except (TypeError, ValueError):
                raise ValueError(f"RealbConfig.rank_precisions key {key!r} is not a rank number") from None
            if isinstance(key, bool) or str(rank) != str(key).strip() or not 0 <= rank < self.ep_size:
                raise ValueError(
                    f"RealbConfig.rank_precisions key {key!r} is not a rank in [0, {self.ep_size - 1}] "
                    f"(ep_size={self.ep_size})"
                )
            out[rank] = _choice(f"rank_precisions[{rank}]", precision, RANK_PRECISION_CHOICES)
        return dict(sorted(out.items()))

    def to_dict(self) -> dict[str, Any]:
        return {"quant_method": self.quant_method, **{name: copy.deepcopy(getattr(self, name)) for name in _FIELDS}}

    def get(self, key: str, default: Any = None) -> Any:
        """Dict-style read: transformers reads a model config's `quantization_config` with `.get` when that config
        is passed to `from_pretrained(..., config=model.config)`, and after loading it holds this object."""
        return self.to_dict().get(key, default)

    def __iter__(self):
        yield from self.to_dict().items()

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RealbConfig) and self.to_dict() == other.to_dict()

    def to_json_string(self, use_diff: bool = True) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False) + "\n"

    def get_loading_attributes(self) -> dict[str, Any]:
        """Runtime knobs the caller set explicitly: these override the saved config at reload."""
        names = {n for n in self._explicit if _FIELDS[n].runtime}
        if "policy" in names:
            names.add("rank_precisions")  # a new policy must not inherit the saved static map
        return {name: copy.deepcopy(getattr(self, name)) for name in _FIELDS if name in names}

    def override_saved(self, saved: RealbConfig) -> tuple[dict[str, Any], dict[str, Any]]:
        """Apply this config, passed at reload, to the `saved` one: what transformers' generic merge does, said
        exactly. Returns (applied, ignored): the runtime fields this config set explicitly, now in `saved`, and
        the fields it set that a saved model fixes (`high_precision`, `modules_to_not_convert`) where they differ
        from the saved values, which stay."""
        applied = self.get_loading_attributes()
        for name, value in applied.items():
            setattr(saved, name, value)
        ignored = {
            name: getattr(self, name)
            for name in _FIELDS
            if name in self._explicit and not _FIELDS[name].runtime and getattr(self, name) != getattr(saved, name)
        }
        return applied, ignored

    @staticmethod
    def get_runtime_fields() -> list[str]:
        """Fields that may change on a loaded model or be overridden at reload."""
        return [name for name, f in _FIELDS.items() if f.runtime]

    def update(self, **kwargs: Any) -> dict[str, Any]:
        """Set fields, re-validate (restoring the old values if invalid) and return the unknown keys."""
        before = {name: getattr(self, name) for name in _FIELDS}
        if kwargs.get("policy", "static") != "static" and "rank_precisions" not in kwargs:
            kwargs = {**kwargs, "rank_precisions": None}  # leaving "static" drops its map
        unused = super().update(**kwargs)
        try:
            self.post_init()
        except ValueError:
            for name, value in before.items():
                setattr(self, name, value)
            raise
        self._explicit |= {k for k in kwargs if k in _FIELDS}
        return unused
