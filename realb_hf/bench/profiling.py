"""Where a timed call spends its time: GPU busy (compute, communication) and idle, the longest kernels, host ops
and ReaLB's labelled sections (torch.profiler).

A layer that reads a count back to the host leaves the GPU idle while the host prepares the next launches; the
idle share says how much of a measured time is host work, which a kernel-level table alone cannot show.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from typing import Any

import torch
from torch.autograd import DeviceType

from ..ep.groups import SECTION_PREFIX

CALL_LABEL = "realb_bench::call"
_COMMUNICATION = ("nccl", "gloo")


def _union_ms(intervals: list[tuple[float, float]]) -> float:
    """Total length (ms) of the union of (start, end) intervals given in µs."""
    total, end = 0.0, float("-inf")
    for start, stop in sorted(intervals):
        if stop <= end:
            continue
        total += stop - max(start, end)
        end = stop
    return total / 1e3


def _top(durations: dict[str, float], calls: int, n: int) -> list[list]:
    return [[name, round(us / calls / 1e3, 4)] for name, us in sorted(durations.items(), key=lambda kv: -kv[1])[:n]]


def summarize(events, calls: int, top: int = 6, closed: bool = False) -> dict[str, Any]:
    """Per-call means (ms) from profiler events of `calls` calls, each marked with `CALL_LABEL`. `closed`: each
    marked range starts and ends with a device sync, so a call's kernels are those that start inside it (work
    between the ranges, such as the caller's loop, is left out)."""
    host = [e for e in events if e.device_type == DeviceType.CPU]
    windows = sorted((e.time_range.start, e.time_range.end) for e in host if e.name == CALL_LABEL)
    if len(windows) != calls:
        raise ValueError(f"expected {calls} '{CALL_LABEL}' ranges in the profile, found {len(windows)}")
    # the device copies of labelled ranges (user annotations) are not work
    kernels = [
        e
        for e in events
        if e.device_type == DeviceType.CUDA
        and not getattr(e, "is_user_annotation", False)
        and not (e.name == CALL_LABEL or e.name.startswith(SECTION_PREFIX))
    ]
    host_ops = [e for e in host if e.name != CALL_LABEL]
    compute, comm, wall, kernel_time, host_self, sections = [], [], 0.0, defaultdict(float), defaultdict(float), {}
    for i, (start, host_end) in enumerate(windows):
        limit = host_end if closed else windows[i + 1][0] if i + 1 < len(windows) else float("inf")
        mine = [k for k in kernels if start <= k.time_range.start < limit]
        end = max([host_end] + [k.time_range.end for k in mine])
        wall += (end - start) / 1e3
        for k in mine:
            span = (k.time_range.start, k.time_range.end)
            (comm if any(c in k.name.lower() for c in _COMMUNICATION) else compute).append(span)
            kernel_time[k.name] += k.time_range.end - k.time_range.start
    for e in host_ops:
        if not any(start <= e.time_range.start <= end for start, end in windows):
            continue  # the sync and the `before` hook between calls are not the call's work
        if e.name.startswith(SECTION_PREFIX):
            sections[e.name] = sections.get(e.name, 0.0) + e.time_range.end - e.time_range.start
        else:
            host_self[e.name] += e.self_cpu_time_total
    gpu = bool(kernels)  # no device events: a CPU run, nothing to say about a GPU
    busy = _union_ms(compute + comm) / calls
    return {
        "calls": calls,
        "wall_ms": wall / calls,
        "gpu_busy_ms": busy if gpu else None,
        "gpu_compute_ms": _union_ms(compute) / calls if gpu else None,
        "gpu_communication_ms": _union_ms(comm) / calls if gpu else None,
        "gpu_idle_ms": wall / calls - busy if gpu else None,
        "top_kernels_ms": _top(kernel_time, calls, top),
        "top_host_ops_self_ms": _top(host_self, calls, top),
        "sections_host_ms": {name: round(us / calls / 1e3, 4) for name, us in sorted(sections.items())},
    }


def profile_calls(
    fn: Callable[[], object],
    calls: int = 3,
    trace_path: str | None = None,
    before: Callable[[], object] | None = None,
) -> dict[str, Any]:
    """Run `fn` `calls` times under torch.profiler (a device sync after each, then `before`, e.g. a barrier that
    starts every rank's call together) and summarize them; `trace_path` also writes the Chrome trace."""
    from torch.profiler import profile, record_function

    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    with profile(activities=_activities()) as prof:
        for _ in range(calls):
            if before is not None:
                before()
            with record_function(CALL_LABEL):
                fn()
            if cuda:
                torch.cuda.synchronize()
    if trace_path:
        prof.export_chrome_trace(trace_path)
    return summarize(prof.events(), calls)


def _activities() -> list:
    from torch.profiler import ProfilerActivity

    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    return [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])


def profile_marked(fn: Callable[[], object], count: Callable[[], int]) -> dict[str, Any]:
    """Run `fn` once under torch.profiler, where `fn` marks calls itself (`CALL_LABEL`, each range closed by device
    syncs; `count()` says how many it has marked so far), and summarize the calls it marked."""
    from torch.profiler import profile

    before = count()
    with profile(activities=_activities()) as prof:
        fn()
    return summarize(prof.events(), count() - before, closed=True)
