"""Which CUDA compute capability a device has, as the one test every format's `is_native` needs."""

from __future__ import annotations

import torch


def cuda_capability(device: torch.device | str) -> tuple[int, int]:
    """(major, minor) of a CUDA device; (0, 0) for CPU and every other device type.

    Returning (0, 0) instead of None lets callers write `cuda_capability(d) >= (9, 0)` without a
    separate "is it CUDA" branch.
    """
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return (0, 0)
    return torch.cuda.get_device_capability(device)
