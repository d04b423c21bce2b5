"""ReaLB telemetry of an lmms-eval run: per task and overall, prefill and decode apart (no lmms-eval import here).

The wrapper hands in each batch's telemetry records and resets the model's telemetry, so memory stays bounded
over a whole benchmark. Prefill forwards (one per `generate` batch, and every loglikelihood forward) carry
`batch_size x prompt length` tokens: they are where ReaLB's batch threshold can be crossed and ranks lowered.
Decode steps carry `batch_size` tokens each and normally stay below the threshold (reason `below_batch_threshold`).

Files written next to lmms-eval's `<date>_results.json` (same folder, `<output_path>/<model name>/`):

- `<stamp>_realb_summary.json`: run metadata, the ReaLB config, and per task + overall for "prefill", "decode"
  and "all": records, layers lowered, lowered token fraction, balancedness, predicted speedup, reasons.
- `<stamp>_realb_summary.md`: the same as a table.
- `<stamp>_realb_telemetry.json`: the summary plus the kept `LayerRecord`s (`records="prefill"` by default),
  each tagged with its batch, task and phase.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

RECORD_MODES = ("prefill", "all", "none")
PHASES = ("prefill", "decode", "all")


@dataclass
class Aggregate:
    """Sums over `LayerRecord`s; `to_dict()` gives the means `realb_hf.Telemetry.summary` gives for the same records."""

    records: int = 0
    layers_lowered: int = 0
    token_pairs: int = 0
    lowered_pairs: float = 0.0
    vision_pairs: float = 0.0
    sum_balancedness_tokens: float = 0.0
    sum_cost_before: float = 0.0
    sum_cost_after: float = 0.0
    sum_speedup: float = 0.0
    reasons: Counter = field(default_factory=Counter)
    rank_records: list[int] = field(default_factory=list)  # records that saw rank r
    rank_low: list[int] = field(default_factory=list)  # ... in which rank r ran (partly) low

    def add(self, records, high: str = "bf16") -> None:
        for r in records:
            pairs = sum(r.tokens_per_rank)
            self.records += 1
            self.layers_lowered += 1 if r.lowered_experts else 0
            self.token_pairs += pairs
            self.lowered_pairs += r.lowered_fraction * pairs
            self.vision_pairs += sum(t * s for t, s in zip(r.tokens_per_rank, r.vision_share_per_rank))
            self.sum_balancedness_tokens += r.balancedness_tokens
            self.sum_cost_before += r.balancedness_cost_before
            self.sum_cost_after += r.balancedness_cost_after
            self.sum_speedup += r.predicted_speedup
            self.reasons[r.reason] += 1
            ranks = len(r.precision_per_rank)
            if len(self.rank_records) < ranks:
                grow = ranks - len(self.rank_records)
                self.rank_records += [0] * grow
                self.rank_low += [0] * grow
            for rank, precision in enumerate(r.precision_per_rank):
                self.rank_records[rank] += 1
                self.rank_low[rank] += 1 if precision != high else 0

    def merge(self, other: Aggregate) -> None:
        for name in (
            "records",
            "layers_lowered",
            "token_pairs",
            "lowered_pairs",
            "vision_pairs",
            "sum_balancedness_tokens",
            "sum_cost_before",
            "sum_cost_after",
            "sum_speedup",
        ):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.reasons.update(other.reasons)
        grow = len(other.rank_records) - len(self.rank_records)
        if grow > 0:
            self.rank_records += [0] * grow
            self.rank_low += [0] * grow
        for rank, (seen, low) in enumerate(zip(other.rank_records, other.rank_low)):
            self.rank_records[rank] += seen
            self.rank_low[rank] += low

    def to_dict(self) -> dict[str, Any]:
        n = self.records

        def mean(total: float, default: float) -> float:
            return total / n if n else default

        pairs = self.token_pairs
        return {
            "records": n,
            "layers_lowered": self.layers_lowered,
            "layers_lowered_fraction": self.layers_lowered / n if n else 0.0,
            "token_pairs": pairs,
            "lowered_token_fraction": self.lowered_pairs / pairs if pairs else 0.0,
            "vision_share": self.vision_pairs / pairs if pairs else 0.0,
            "balancedness_tokens": mean(self.sum_balancedness_tokens, 1.0),
            "balancedness_cost_before": mean(self.sum_cost_before, 1.0),
            "balancedness_cost_after": mean(self.sum_cost_after, 1.0),
            "predicted_speedup": mean(self.sum_speedup, 1.0),
            "rank_low_fraction": [low / seen if seen else 0.0 for seen, low in zip(self.rank_records, self.rank_low)],
            "reasons": dict(sorted(self.reasons.items())),
        }


@dataclass
class TaskStats:
    requests: int = 0
    batches: int = 0
    prompt_tokens: int = 0  # padded batch x length of every prefill forward, summed
    images: int = 0
    generated_tokens: int = 0
    seconds: float = 0.0  # time in generate / forward
    request_types: Counter = field(default_factory=Counter)
    phases: dict[str, Aggregate] = field(default_factory=lambda: {p: Aggregate() for p in PHASES})

    def merge(self, other: TaskStats) -> None:
        self.requests += other.requests
        self.batches += other.batches
        self.prompt_tokens += other.prompt_tokens
        self.images += other.images
        self.generated_tokens += other.generated_tokens
        self.seconds += other.seconds
        self.request_types.update(other.request_types)
        for phase in PHASES:
            self.phases[phase].merge(other.phases[phase])

    def to_dict(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "batches": self.batches,
            "request_types": dict(self.request_types),
            "prompt_tokens": self.prompt_tokens,
            "prompt_tokens_per_batch": self.prompt_tokens / self.batches if self.batches else 0.0,
            "images": self.images,
            "generated_tokens": self.generated_tokens,
            "seconds": round(self.seconds, 3),
            **{phase: agg.to_dict() for phase, agg in self.phases.items()},
        }


class EvalReport:
    """Everything ReaLB saw and decided during one lmms-eval run of one model (one process)."""

    def __init__(self, meta: dict[str, Any], records: str = "prefill", high: str = "bf16"):
        if records not in RECORD_MODES:
            raise ValueError(f"telemetry_records={records!r}; choose one of {list(RECORD_MODES)}")
        self.meta = dict(meta)
        self.record_mode = records
        self.high = high
        self.tasks: dict[str, TaskStats] = {}
        self.kept: list[dict[str, Any]] = []
        self.batches = 0
        self.dropped_records = 0

    def add_batch(
        self,
        task: str,
        request_type: str,
        requests: int,
        prompt_tokens: int,
        images: int,
        generated_tokens: int,
        seconds: float,
        records=None,
        prefill_forward: int = 1,
        dropped: int = 0,
    ) -> None:
        """One model batch; `records` are the telemetry records of this batch only (None: ReaLB is not applied)."""
        stats = self.tasks.setdefault(task, TaskStats())
        stats.requests += requests
        stats.batches += 1
        stats.prompt_tokens += prompt_tokens
        stats.images += images
        stats.generated_tokens += generated_tokens
        stats.seconds += seconds
        stats.request_types[request_type] += requests
        self.dropped_records += dropped
        batch = self.batches
        self.batches += 1
        if records is None:
            return
        prefill = [r for r in records if r.forward == prefill_forward]
        decode = [r for r in records if r.forward != prefill_forward]
        stats.phases["prefill"].add(prefill, self.high)
        stats.phases["decode"].add(decode, self.high)
        stats.phases["all"].add(records, self.high)
        keep = {"prefill": prefill, "all": records, "none": []}[self.record_mode]
        for r in keep:
            phase = "prefill" if r.forward == prefill_forward else "decode"
            self.kept.append({"batch": batch, "task": task, "phase": phase, **asdict(r)})

    def overall(self) -> TaskStats:
        total = TaskStats()
        for stats in self.tasks.values():
            total.merge(stats)
        return total

    def summary(self) -> dict[str, Any]:
        return {
            **self.meta,
            "batches": self.batches,
            "dropped_records": self.dropped_records,
            "overall": self.overall().to_dict(),
            "tasks": {task: stats.to_dict() for task, stats in sorted(self.tasks.items())},
        }

    def to_dict(self) -> dict[str, Any]:
        return {"summary": self.summary(), "records_kept": self.record_mode, "records": self.kept}

    def markdown(self) -> str:
        s = self.summary()
        config = s.get("realb_config")
        lines = [
            f"# ReaLB telemetry: {s.get('model', '?')}",
            "",
            f"ReaLB: {json.dumps(config) if config else 'not applied (realb=false, stock model)'}",
            f"Low precision resolved to: {s.get('low_precision_resolved', '-')}; device: {s.get('device', '-')}; "
            f"batch size: {s.get('batch_size', '-')}",
            "",
            "Prefill forwards (one per batch) are where ReaLB can lower ranks; decode steps carry batch_size tokens",
            "each and stay under `batch_threshold`. Predicted speedup: slowest EP rank before / after the decision",
            "(cost model, not a measurement).",
            "",
            "| task | requests | batches | prompt tok/batch | prefill lowered tok % | prefill layers lowered % "
            "| balancedness (tokens) | cost balancedness before -> after | predicted speedup | decode lowered tok % "
            "| seconds |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        rows = [*s["tasks"].items(), ("**overall**", s["overall"])]
        for task, t in rows:
            p, d = t["prefill"], t["decode"]
            lines.append(
                f"| {task} | {t['requests']} | {t['batches']} | {t['prompt_tokens_per_batch']:.0f} "
                f"| {100 * p['lowered_token_fraction']:.1f} | {100 * p['layers_lowered_fraction']:.1f} "
                f"| {p['balancedness_tokens']:.3f} | {p['balancedness_cost_before']:.3f} -> "
                f"{p['balancedness_cost_after']:.3f} | {p['predicted_speedup']:.3f} "
                f"| {100 * d['lowered_token_fraction']:.1f} | {t['seconds']:.1f} |"
            )
        o = s["overall"]["prefill"]
        if o["records"]:
            lines += [
                "",
                f"Prefill decisions (reason: records): {o['reasons']}",
                f"Share of prefill records in which each EP rank ran low: "
                f"{[round(x, 3) for x in o['rank_low_fraction']]}",
                f"Vision share of routed token-expert pairs (prefill): {o['vision_share']:.3f}",
            ]
        return "\n".join(lines) + "\n"

    def write(self, directory: str | Path, stamp: str) -> dict[str, Path]:
        """Write the summary (JSON + Markdown) and the telemetry (JSON with records) into `directory`."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        paths = {
            "summary": directory / f"{stamp}_realb_summary.json",
            "markdown": directory / f"{stamp}_realb_summary.md",
            "telemetry": directory / f"{stamp}_realb_telemetry.json",
        }
        paths["summary"].write_text(json.dumps(self.summary(), indent=2) + "\n")
        paths["markdown"].write_text(self.markdown())
        paths["telemetry"].write_text(json.dumps(self.to_dict(), indent=1) + "\n")
        return paths
