"""What each rank ran under real EP, and the telemetry of all ranks gathered on one."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

import torch
import torch.distributed as dist

from ..policy import Decision, decide
from ..telemetry import LayerCounts, Telemetry


def layer_entry(
    forward: int, layer: str, decision: Decision, precisions: Sequence[str], rows: int, fp8_dispatch: bool,
    converted: int, high: str,
) -> dict:  # fmt: skip
    """One per-rank log entry; `converted` -1 (a flagged conversion) counts this rank's lowered experts."""
    kinds = set(precisions)
    if converted < 0:
        converted = sum(p != high for p in precisions)
    return {
        "forward": forward,
        "layer": layer,
        "precision": kinds.pop() if len(kinds) == 1 else "mixed",
        "rows": int(rows),
        "fp8_dispatch": bool(fp8_dispatch),
        "converted_experts": int(converted),
        "reason": decision.reason,
    }


def entry_from_counts(
    forward: int, layer: str, counts: LayerCounts, telemetry: Telemetry, local: slice, fp8_dispatch: bool,
    converted: int,
) -> dict:  # fmt: skip
    """`layer_entry` of a layer whose counts (and maybe decision) stayed on the device: read them back now."""
    stats = telemetry.host_stats(counts)
    decision = counts.decision if counts.decision is not None else decide(stats, counts.params)
    rows = sum(stats.expert_tokens[local])
    precisions = decision.expert_precision[local]
    return layer_entry(forward, layer, decision, precisions, rows, fp8_dispatch, converted, counts.params.high)


def rank_report(model: torch.nn.Module) -> dict[str, Any]:
    """This rank's ReaLB state: telemetry (identical on every rank), what it ran, bytes moved, extra memory."""
    runtime = getattr(model, "realb", None)
    if runtime is None:
        raise ValueError("this model does not run ReaLB")
    state = runtime.ep
    return {
        "rank": dist.get_rank() if dist.is_initialized() else 0,
        "ep_rank": state.rank if state else 0,
        "ep_size": state.size if state else 1,
        "implementation": state.implementation if state else None,
        "extra_memory_bytes": runtime.telemetry.extra_memory_bytes,
        "telemetry": runtime.telemetry.to_dict(),
        "applied": list(state.applied) if state else [],
        "comm_bytes": dict(state.comm) if state else {},
        "ep_state": {k: v for k, v in asdict(state).items() if not k.startswith("_") and k != "comm"} if state else None,
    }


def gather_report(model: torch.nn.Module, dst: int = 0) -> dict[str, Any] | None:
    """Every rank's `rank_report`, gathered on global rank `dst` into one report (None on the other ranks).

    `decisions_agree` says whether the ranks of every EP group recorded the same decisions (they must: they decide
    from the same global counts; different EP groups serve different batches); `per_rank_extra_memory_bytes` lists
    the persistent low-precision copies each rank keeps.
    """
    mine = rank_report(model)
    if not dist.is_initialized() or dist.get_world_size() == 1:
        reports = [mine]
    else:
        reports = [None] * dist.get_world_size() if dist.get_rank() == dst else None
        dist.gather_object(mine, reports, dst=dst)
        if dist.get_rank() != dst:
            return None
    groups: dict[tuple, list] = {}
    for r in reports:
        key = tuple((r["ep_state"] or {}).get("group_ranks", ())) or (r["rank"],)
        groups.setdefault(key, []).append(r["telemetry"]["records"])
    return {
        "world_size": len(reports),
        "ep_size": mine["ep_size"],
        "implementation": mine["implementation"],
        "ep_groups": [list(g) for g in groups],
        "decisions_agree": all(all(recs == group[0] for recs in group) for group in groups.values()),
        "summary": reports[0]["telemetry"]["summary"],
        "per_rank_extra_memory_bytes": [r["extra_memory_bytes"] for r in reports],
        "per_rank_comm_bytes": [r["comm_bytes"] for r in reports],
        "ranks": reports,
    }
