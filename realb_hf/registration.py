"""Register "realb" with transformers' quantizer registry, once per process."""

from __future__ import annotations

import logging

from transformers.quantizers import auto

from .config import QUANT_METHOD, RealbConfig
from .quantizer import RealbHfQuantizer

logger = logging.getLogger(__name__)


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


def _saved_realb_config(saved) -> RealbConfig | None:
    if isinstance(saved, RealbConfig):
        return saved
    if isinstance(saved, dict) and saved.get("quant_method") == QUANT_METHOD:
        return RealbConfig.from_dict(saved)
    return None


def merge_reload_config(original):
    """transformers' `merge_quantization_configs`, except for a RealbConfig passed when reloading a ReaLB model.

    transformers warns there that the saved config is used, that "loading attributes ... will be overwritten" and
    that "the rest will be ignored", which reads as if settings were lost. What happens is exact and logged instead:
    every saved setting stays, except the runtime fields the passed RealbConfig set explicitly (INFO); fields a
    saved model fixes are kept from the save, with a warning when the passed config asked for another value.
    """

    def merge(cls, quantization_config, quantization_config_from_args):
        saved = _saved_realb_config(quantization_config)
        if saved is None or not isinstance(quantization_config_from_args, RealbConfig):
            return original(quantization_config, quantization_config_from_args)
        applied, ignored = quantization_config_from_args.override_saved(saved)
        changes = ", ".join(f"{k}={v!r}" for k, v in applied.items()) or "nothing (it sets no runtime field)"
        logger.info("ReaLB: reloading with the saved settings; the RealbConfig given to from_pretrained changes %s", changes)
        if ignored:
            logger.warning(
                "ReaLB: %s from the RealbConfig given to from_pretrained %s not used: a saved model keeps its own (%s)",
                ", ".join(f"{k}={v!r}" for k, v in ignored.items()),
                "is" if len(ignored) == 1 else "are",
                ", ".join(f"{k}={getattr(saved, k)!r}" for k in ignored),
            )
        return saved

    merge.realb_original = original
    return merge


def register() -> None:
    """Idempotent: importing or reloading realb_hf never trips transformers' "already registered" error."""
    _register_once(auto.AUTO_QUANTIZATION_CONFIG_MAPPING, RealbConfig, auto.register_quantization_config)
    _register_once(auto.AUTO_QUANTIZER_MAPPING, RealbHfQuantizer, auto.register_quantizer)
    if RealbConfig not in auto.LOADING_ATTRIBUTES_CONFIG_TYPES:
        # The stock merge, if anything calls it unwrapped, then also lets a passed RealbConfig override runtime knobs.
        auto.LOADING_ATTRIBUTES_CONFIG_TYPES = (*auto.LOADING_ATTRIBUTES_CONFIG_TYPES, RealbConfig)
    current = auto.AutoHfQuantizer.merge_quantization_configs
    original = getattr(current.__func__, "realb_original", current)  # a reloaded realb_hf wraps the stock one again
    auto.AutoHfQuantizer.merge_quantization_configs = classmethod(merge_reload_config(original))
