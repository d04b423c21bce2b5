"""Timing calls back to back, and the peak memory they allocate.

GPU: CUDA events around each call with no synchronisation between calls, so one call's launches overlap the
previous call's kernels as they do inside a model; the median of `repeats` calls after `warmup`, rotating among
input sets. CPU: `time.perf_counter` with the same structure (a smoke test only).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch


@dataclass
class Timing:
    median_ms: float
    min_ms: float
    max_ms: float
    first_ms: float  # first warmup call (persistent caches are built there)
    samples: int


def time_calls(fn: Callable, inputs: Sequence[tuple], warmup: int, repeats: int, device: torch.device) -> Timing:
    """Median over `repeats` calls of `fn(*inputs[i % len(inputs)])`, after `warmup` calls."""
    cuda = device.type == "cuda"
    n = len(inputs)
    first = None
    if cuda:
        torch.cuda.synchronize(device)
    for i in range(max(warmup, 1)):
        t0 = time.perf_counter()
        if cuda:
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            fn(*inputs[i % n])
            e.record()
            if first is None:
                torch.cuda.synchronize(device)
                first = s.elapsed_time(e)
        else:
            fn(*inputs[i % n])
            if first is None:
                first = (time.perf_counter() - t0) * 1e3
    if cuda:
        torch.cuda.synchronize(device)
        events = []
        for i in range(repeats):
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            fn(*inputs[i % n])
            e.record()
            events.append((s, e))
        torch.cuda.synchronize(device)
        times = [s.elapsed_time(e) for s, e in events]
    else:
        times = []
        for i in range(repeats):
            t0 = time.perf_counter()
            fn(*inputs[i % n])
            times.append((time.perf_counter() - t0) * 1e3)
    return Timing(statistics.median(times), min(times), max(times), float(first), len(times))


class PeakMemory:
    """Peak bytes allocated above the level at entry (CUDA only; zeros elsewhere)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.peak = 0

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device) - self.base


__all__ = ["PeakMemory", "Timing", "time_calls"]
