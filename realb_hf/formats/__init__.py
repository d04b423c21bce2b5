"""Registry of the compute precisions an expert group can run in, and the "auto" choice of low one.

torchao is only imported when an FP4 format first quantizes something, so importing this package (and
`realb_hf`) stays fast.
"""

from __future__ import annotations

import torch

from .base import PrecisionFormat
from .bf16 import Bf16Format
from .fp8 import Fp8Format, Fp8Weight, quantize_rowwise
from .mxfp4 import Mxfp4Format
from .nvfp4 import Nvfp4Format

FORMATS: dict[str, PrecisionFormat] = {
    "bf16": Bf16Format(),
    "fp8": Fp8Format(),
    "nvfp4": Nvfp4Format(),
    "mxfp4": Mxfp4Format(),
}

LOW_PRECISIONS: tuple[str, ...] = ("fp8", "nvfp4", "mxfp4")


def get_format(name: str) -> PrecisionFormat:
    """The format registered as `name`; ValueError naming the allowed values otherwise."""
    try:
        return FORMATS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown precision format {name!r}; allowed values: {', '.join(FORMATS)}") from None


def resolve_low_precision(name: str, device: torch.device | str) -> str:
    """The low precision to lower overloaded experts to on `device`; "auto" picks the fastest real one.

    "auto": "nvfp4" where NVFP4 runs natively (CUDA capability 10.0+ with torchao's grouped kernel
    available); "fp8" everywhere else: Hopper and Ada (fp8 tensor cores), every other CUDA GPU below
    sm100 (emulated there, like on CPU, so accuracy studies still run), CPU and other devices. Explicit
    names are validated and returned as given, emulated or not.
    """
    if name == "auto":
        return "nvfp4" if FORMATS["nvfp4"].is_native(torch.device(device)) else "fp8"
    if name not in LOW_PRECISIONS:
        raise ValueError(f"unknown low precision {name!r}; allowed values: auto, {', '.join(LOW_PRECISIONS)}")
    return name


__all__ = [
    "FORMATS",
    "LOW_PRECISIONS",
    "Bf16Format",
    "Fp8Format",
    "Fp8Weight",
    "Mxfp4Format",
    "Nvfp4Format",
    "PrecisionFormat",
    "get_format",
    "quantize_rowwise",
    "resolve_low_precision",
]
