"""Register "realb" with transformers' quantizer registry, once per process."""

from __future__ import annotations

from transformers.quantizers import auto

from .config import QUANT_METHOD, RealbConfig
from .quantizer import RealbHfQuantizer


def _register_once(mapping: dict, cls: type, register) -> None:
    existing = mapping.get(QUANT_METHOD)
    if existing is cls:
        return
    if existing is not None and existing.__module__ != cls.__module__:
        raise RuntimeError(
            f"quantization method {QUANT_METHOD!r} is already registered by {existing.__module__}.{existing.__name__}; "
            "realb_hf cannot share the name with another package"
        )
    mapping.pop(QUANT_METHOD, None)  # a reloaded realb_hf module replaces its own earlier class
    register(QUANT_METHOD)(cls)


def register() -> None:
    """Idempotent: importing or reloading realb_hf never trips transformers' "already registered" error."""
    _register_once(auto.AUTO_QUANTIZATION_CONFIG_MAPPING, RealbConfig, auto.register_quantization_config)
    _register_once(auto.AUTO_QUANTIZER_MAPPING, RealbHfQuantizer, auto.register_quantizer)
    if RealbConfig not in auto.LOADING_ATTRIBUTES_CONFIG_TYPES:
        # Lets a RealbConfig passed at reload override the saved one's runtime knobs (get_loading_attributes).
        auto.LOADING_ATTRIBUTES_CONFIG_TYPES = (*auto.LOADING_ATTRIBUTES_CONFIG_TYPES, RealbConfig)
