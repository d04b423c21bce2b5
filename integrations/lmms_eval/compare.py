"""One table from several lmms-eval runs of the realb model: scores beside what ReaLB did (no lmms-eval import).

    python -m integrations.lmms_eval.compare logs/          # every <date>_results.json under logs/
    python -m integrations.lmms_eval.compare a_results.json b_results.json --json   # rows as JSON
    python -m integrations.lmms_eval.compare logs/ --accuracy report.json   # beside `realb_hf.accuracy`'s rows

Per run (one row each, oldest first): the ReaLB knobs from `--model_args`, every task score (stderr left out), and
from the run's telemetry summary the prefill lowered-token share, the share of prefill layer records that lowered
something, the mean predicted MoE-layer speedup (cost model) and the seconds spent in generate/forward.

`--accuracy` takes the JSON of `python -m realb_hf.accuracy` on the same model and questions (the realb_synthetic
data written by `make_data` with the same `--tasks`, `--n` and `--seed`) and puts beside each run the accuracy
tool's row of the same configuration: the stock row for `realb=false` and `policy=off` (which computes what the stock
model does), the row with the same policy, low precision, granularity, M_d, EP size and batch threshold otherwise
(`all_low`: the same low precision). lmms-eval sends `batch_size` requests per forward in document order, which is
the accuracy tool's "mixed" batching: with the same batch size the same batches reach the model, so the exact
matches agree question for question. A different batch size is flagged, since ReaLB's decisions depend on the batch.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

KNOBS = ("realb", "policy", "low_precision", "modality_threshold", "granularity", "ep_size", "batch_threshold")
MATCHED = ("policy", "low_precision", "granularity", "modality_threshold", "ep_size", "batch_threshold")


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


def _pairs(model_args: str) -> dict[str, str]:
    return dict(p.split("=", 1) for p in str(model_args).split(",") if "=" in p)


def _knobs(model_args: str) -> str:
    pairs = _pairs(model_args)
    return ",".join(f"{k}={pairs[k]}" for k in KNOBS if k in pairs) or "(defaults)"


def matching_row(model_args: str, rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The `realb_hf.accuracy` result row computing what a run with `model_args` computes (None: no such row)."""
    from realb_hf.accuracy_setup import realb_setting

    from ._args import realb_config_from_args, split_realb_args

    pairs = _pairs(model_args)
    if pairs.get("realb", "true").strip().lower() in ("false", "no", "0"):
        wanted = None
    else:
        wanted = realb_config_from_args(split_realb_args(pairs)[0]).to_dict()
    if wanted is None or wanted["policy"] == "off":
        return next((r for r in rows if r["realb"] is None), None)
    keys = ("policy", "low_precision") if wanted["policy"] == "all_low" else MATCHED
    for r in rows:
        if r["realb"] is not None and all(realb_setting(r["realb"], k) == wanted[k] for k in keys):
            return r
    return None


def attach_accuracy(rows: list[dict[str, Any]], report: dict[str, Any]) -> list[dict[str, Any]]:
    """Each run's matching row of an accuracy report's "mixed" batching (its exact match per modality, its batch
    size and whether that equals the run's) under `"accuracy"`."""
    mixed = next((run["results"] for run in report["runs"] if run["batching"] == "mixed"), None)
    if mixed is None:
        raise ValueError("the accuracy report has no 'mixed' batching, the one lmms-eval's document order matches")
    for row in rows:
        found = matching_row(row["model"], mixed)
        row["accuracy"] = found and {
            "name": found["name"],
            **{k: found["accuracy"].get(k) for k in ("image", "text", "overall")},
            "batch_size": report["batch_size"],
            "same_batches": row["batch_size"] == report["batch_size"] and row["requests"] == report["n"],
        }
    return rows


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
    """One row per results file; ValueError names a path that is missing, empty of runs, or not a results file."""
    files: list[Path] = []
    for p in map(Path, paths):
        if not p.exists():
            raise ValueError(f"{p}: no such file or folder")
        found = sorted(p.rglob("*_results.json")) if p.is_dir() else [p]
        if not found:
            raise ValueError(f"{p}: no lmms-eval results (*_results.json) in this folder")
        files += found
    rows = []
    for path in sorted(files, key=lambda f: f.name):
        try:
            results = json.loads(path.read_text())
        except ValueError as err:
            raise ValueError(f"{path}: not an lmms-eval results JSON ({err})") from None
        if not isinstance(results, dict) or "results" not in results:
            raise ValueError(f"{path}: not an lmms-eval results JSON (no 'results' table)")
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
                "batch_size": (summary or {}).get("batch_size"),
                "requests": (summary or {}).get("overall", {}).get("requests"),
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
    beside = any("accuracy" in r for r in rows)
    if beside:
        head += ["realb_hf.accuracy row", "its image / text / overall %", "same batches"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["knobs"], *(num(r["scores"].get(m), ".4f") for m in metrics)]
        cells += [pct(r["lowered_token_fraction"]), pct(r["layers_lowered_fraction"])]
        cells += [num(r["predicted_speedup"], ".3f"), num(r["seconds"], ".0f")]
        if beside:
            acc = r.get("accuracy")
            if acc is None:
                cells += ["(no row of this configuration)", "-", "-"]
            else:
                cells += [acc["name"], " / ".join(pct(acc[k]) for k in ("image", "text", "overall"))]
                cells.append("yes" if acc["same_batches"] else f"no (batch size {acc['batch_size']})")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("paths", nargs="+", help="results JSON files or folders holding them")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON instead of a Markdown table")
    parser.add_argument(
        "--accuracy", metavar="REPORT.json", help="a `python -m realb_hf.accuracy` JSON: its matching rows beside"
    )
    args = parser.parse_args(argv)
    try:
        rows = collect(args.paths)
    except ValueError as err:
        parser.error(str(err))
    if args.accuracy:
        try:
            report = json.loads(Path(args.accuracy).read_text())
            attach_accuracy(rows, report)
        except (OSError, ValueError, KeyError) as err:
            parser.error(f"--accuracy {args.accuracy}: {err}")
    print(json.dumps(rows, indent=1) if args.json else to_markdown(rows), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
