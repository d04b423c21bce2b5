"""lmms-eval `--model_args` -> a `RealbConfig` and the wrapper's own options (no lmms-eval import here).

lmms-eval parses `key=value,key=value` and turns "true"/"false" into bools, digit strings into ints and
anything float-like into floats; everything else stays a string. This module turns those values into what
`RealbConfig` and the wrapper expect, so every `RealbConfig` field can be given on the command line:

    policy=realb,low_precision=fp8,modality_threshold=0.7,ep_size=4,batch_threshold=2048
    policy=static,ep_size=2,rank_precisions=0:low;1:high          (or rank_precisions={"0":"low","1":"high"})
    modules_to_not_convert=visual;layers.0                        (or a JSON list)
    low_cost_ratio=none                                           (None: the format's default)
"""

from __future__ import annotations

import json
from typing import Any

from realb_hf.config import RealbConfig

# Every RealbConfig field, in the config's own order (quant_method is fixed).
REALB_FIELDS: tuple[str, ...] = tuple(k for k in RealbConfig().to_dict() if k != "quant_method")
_NONE_WORDS = ("none", "null", "")
_INT_FIELDS = ("batch_threshold", "ep_size")
_FLOAT_FIELDS = ("modality_threshold", "imbalance_threshold", "low_cost_ratio", "conversion_cost")
_OPTIONAL_FIELDS = ("rank_precisions", "low_cost_ratio", "modules_to_not_convert")


def _is_none(value: Any) -> bool:
    return value is None or (isinstance(value, str) and value.strip().lower() in _NONE_WORDS)


def _rank_precisions(value: Any) -> Any:
    """`{"0": "low"}` (JSON), `0:low;1:high` or a dict -> {rank: precision}; RealbConfig validates the rest."""
    if isinstance(value, dict):
        return value
    if isinstance(value, str):
        text = value.strip().strip("'")
        if text.startswith("{"):
            try:
                return json.loads(text)
            except json.JSONDecodeError as err:
                raise ValueError(f"rank_precisions={value!r} is not valid JSON: {err}") from None
        out: dict[str, str] = {}
        for item in filter(None, (p.strip() for p in text.replace("|", ";").split(";"))):
            rank, sep, precision = item.partition(":")
            if not sep:
                raise ValueError(
                    f"rank_precisions={value!r}: write rank:precision pairs separated by ';' (e.g. 0:low;1:high) "
                    'or a JSON object (e.g. {"0":"low","1":"high"})'
                )
            out[rank.strip()] = precision.strip()
        return out
    return value


def _name_list(value: Any) -> Any:
    """`a;b`, `["a","b"]` (JSON) or a list -> list of strings."""
    if isinstance(value, (list, tuple)):
        return list(value)
    if isinstance(value, str):
        text = value.strip().strip("'")
        if text.startswith("["):
            try:
                return json.loads(text)
            except json.JSONDecodeError as err:
                raise ValueError(f"modules_to_not_convert={value!r} is not valid JSON: {err}") from None
        return [p.strip() for p in text.split(";") if p.strip()]
    return value


def _coerce(name: str, value: Any) -> Any:
    if name in _OPTIONAL_FIELDS and _is_none(value):
        return None
    if name == "rank_precisions":
        return _rank_precisions(value)
    if name == "modules_to_not_convert":
        return _name_list(value)
    if name in _INT_FIELDS:
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str) and value.strip().lstrip("-").isdigit():
            return int(value)
    if name in _FLOAT_FIELDS and isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass  # RealbConfig names the field and what is allowed
    return value


def realb_config_from_args(args: dict[str, Any]) -> RealbConfig:
    """A validated `RealbConfig` from the RealbConfig fields among `args` (fields left out keep their defaults)."""
    fields = {name: _coerce(name, args[name]) for name in REALB_FIELDS if name in args}
    return RealbConfig(**fields)


def split_realb_args(kwargs: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(RealbConfig fields, everything else) of a model-args dict."""
    realb = {k: v for k, v in kwargs.items() if k in REALB_FIELDS}
    rest = {k: v for k, v in kwargs.items() if k not in REALB_FIELDS}
    return realb, rest


def as_bool(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "false", "yes", "no", "1", "0"):
        return value.strip().lower() in ("true", "yes", "1")
    raise ValueError(f"model arg {name}={value!r} must be true or false")


def as_json_dict(name: str, value: Any) -> dict[str, Any]:
    if _is_none(value):
        return {}
    if isinstance(value, dict):
        return dict(value)
    if isinstance(value, str):
        try:
            out = json.loads(value.strip().strip("'"))
        except json.JSONDecodeError as err:
            raise ValueError(f"model arg {name}={value!r} must be a JSON object: {err}") from None
        if isinstance(out, dict):
            return out
    raise ValueError(f'model arg {name}={value!r} must be a JSON object, e.g. {name}={{"key": 1}}')
