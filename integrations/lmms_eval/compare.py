"""One table from several lmms-eval runs of the realb model: scores beside what ReaLB did (no lmms-eval import).

    python -m integrations.lmms_eval.compare logs/          # every <date>_results.json under logs/
    python -m integrations.lmms_eval.compare a_results.json b_results.json --json   # rows as JSON

Per run (one row each, oldest first): the ReaLB knobs from `--model_args`, every task score (stderr left out), and
from the run's telemetry summary the prefill lowered-token share, the share of prefill layer records that lowered
something, the mean predicted MoE-layer speedup (cost model) and the seconds spent in generate/forward.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

KNOBS = ("realb", "policy", "low_precision", "modality_threshold", "granularity", "ep_size", "batch_threshold")


def _summary(path: Path, results: dict[str, Any]) -> dict[str, Any] | None:
    realb = results.get("realb")
    if isinstance(realb, list):
        realb = realb[0] if realb else None
    if isinstance(realb, dict):
        return realb.get("summary")
    # Plain `lmms-eval` (plugin route): the telemetry is stamped when the run ends, after the results' stamp and
    # before the next run starts, so the run's summary is the first one at or after its results' stamp.
    stamp = path.name.removesuffix("_results.json")
    later = sorted(p for p in path.parent.glob("*_realb_summary.json") if p.name >= f"{stamp}_realb_summary.json")
    return json.loads(later[0].read_text()) if later else None


def _knobs(model_args: str) -> str:
    pairs = dict(p.split("=", 1) for p in str(model_args).split(",") if "=" in p)
    return ",".join(f"{k}={pairs[k]}" for k in KNOBS if k in pairs) or "(defaults)"


def _scores(results: dict[str, Any]) -> dict[str, float]:
    out: dict[str, float] = {}
    for task, metrics in sorted(results.get("results", {}).items()):
        for key, value in metrics.items():
            name = key.split(",")[0]
            if "stderr" in name or not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            out[f"{task}/{name}"] = float(value)
    return out


def collect(paths: list[str | Path]) -> list[dict[str, Any]]:
    files: list[Path] = []
    for p in map(Path, paths):
        files += sorted(p.rglob("*_results.json")) if p.is_dir() else [p]
    rows = []
    for path in sorted(files, key=lambda f: f.name):
        results = json.loads(path.read_text())
        config = results.get("config", {})
        summary = _summary(path, results)
        prefill = (summary or {}).get("overall", {}).get("prefill", {})
        rows.append(
            {
                "file": str(path),
                "model": config.get("model_args", ""),
                "knobs": _knobs(config.get("model_args", "")),
                "scores": _scores(results),
                "lowered_token_fraction": prefill.get("lowered_token_fraction"),
                "layers_lowered_fraction": prefill.get("layers_lowered_fraction"),
                "predicted_speedup": prefill.get("predicted_speedup"),
                "seconds": (summary or {}).get("overall", {}).get("seconds"),
            }
        )
    return rows


def to_markdown(rows: list[dict[str, Any]]) -> str:
    metrics = sorted({m for r in rows for m in r["scores"]})

    def pct(x):
        return "-" if x is None else f"{100 * x:.1f}"

    def num(x, fmt):
        return "-" if x is None else format(x, fmt)

    head = ["run (ReaLB knobs)", *metrics, "prefill lowered tok %", "prefill layers lowered %", "pred. speedup", "s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["knobs"], *(num(r["scores"].get(m), ".4f") for m in metrics)]
        cells += [pct(r["lowered_token_fraction"]), pct(r["layers_lowered_fraction"])]
        cells += [num(r["predicted_speedup"], ".3f"), num(r["seconds"], ".0f")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("paths", nargs="+", help="results JSON files or folders holding them")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON instead of a Markdown table")
    args = parser.parse_args(argv)
    rows = collect(args.paths)
    print(json.dumps(rows, indent=1) if args.json else to_markdown(rows), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
