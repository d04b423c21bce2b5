"""Held-out accuracy of a ReaLB model under many precision configurations, on one loaded model.

    python -m realb_hf.accuracy --model demo/model --n 300 --out docs/accuracy.md

loads the model once in bf16, scores the stock model, converts it with `apply_realb` under virtual EP
(`--ep-size`, default 4) and switches configurations with `get_runtime(model).reconfigure(...)`. Every row
answers the same held-out questions (`heldout_set` of demo/tasks.py, or of `--tasks`) with greedy `generate`, many
questions per forward (left padding), so the prefill forward carries `batch_size x prompt length` tokens and crosses
the batch threshold. Exact match is scored per modality, and each row reports from telemetry how much ReaLB lowered.
Writes a Markdown report to `--out` and the full numbers as JSON next to it (same name, `.json`).

Library use: `evaluate(model, processor, examples, ...)` -> `AccuracyResult`, `run(model_dir, ...)` -> report dict,
`to_markdown(report)`.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import importlib
import importlib.util
import json
import platform
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from .apply import apply_realb, get_runtime, get_telemetry
from .bundled import bundled_model_dir, demo_module
from .config import RealbConfig

MODALITIES = ("image", "text")


@dataclass(frozen=True)
class EvalConfig:
    """One row of the table: `realb` None means the stock model (no ReaLB); otherwise RealbConfig runtime fields."""

    name: str
    realb: dict[str, Any] | None


def default_configs(batch_threshold: int = 2048) -> list[EvalConfig]:
    """bf16, ReaLB default, ReaLB rank/expert granularity at M_d 0/0.7/0.9 (fp8 and nvfp4), X-everywhere baselines."""
    rows = [
        EvalConfig("bf16 (stock, no ReaLB)", None),
        EvalConfig("ReaLB policy=off (plumbing check)", {"policy": "off"}),
        EvalConfig("ReaLB default config (auto = fp8 on CPU)", {"batch_threshold": RealbConfig().batch_threshold}),
    ]
    for low in ("fp8", "nvfp4"):
        for granularity in ("rank", "expert"):
            for md in (0.0, 0.7, 0.9):
                rows.append(
                    EvalConfig(
                        f"ReaLB {granularity}, M_d={md}, low={low}",
                        {"low_precision": low, "granularity": granularity, "modality_threshold": md},
                    )
                )
    for low in ("fp8", "nvfp4", "mxfp4"):
        rows.append(EvalConfig(f"{low} everywhere", {"policy": "all_low", "low_precision": low}))
    for row in rows:
        if row.realb is not None:
            row.realb.setdefault("batch_threshold", batch_threshold)
    return rows


@dataclass
class AccuracyResult:
    name: str
    realb: dict[str, Any] | None
    accuracy: dict[str, float]  # "image", "text", "overall" and one entry per task kind
    correct: dict[str, int]
    total: dict[str, int]
    lowered_token_fraction: float = 0.0  # share of token-expert pairs computed in low precision, all forwards
    prefill_lowered_token_fraction: float = 0.0  # the same over the prefill forwards only
    prefill_layers_lowered: float = 0.0  # share of (prefill forward, MoE layer) records that lowered something
    prefill_predicted_speedup: float = 1.0  # mean predicted MoE-layer speedup over prefill records (cost model)
    prefill_tokens: list[int] = field(default_factory=list)  # tokens per prefill forward
    answers: list[str] = field(default_factory=list)
    seconds: float = 0.0
    answer_nll: dict[str, float] = field(default_factory=dict)  # mean NLL (nats) of the right answer's first token


# ---- tasks -----------------------------------------------------------------------------------------------


def load_tasks(tasks: str | Path | None = None) -> ModuleType:
    """The task generator: `tasks` (a .py file or a module name) when given, else the bundled demo's tasks.

    Only code the caller named, or realb_hf's own demo, is ever imported: nothing is looked up next to a model.
    """
    if tasks is None:
        return demo_module("tasks")
    if str(tasks).endswith(".py"):
        return _module_from_file(Path(tasks))
    return importlib.import_module(str(tasks))


def _module_from_file(path: Path) -> ModuleType:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    spec = importlib.util.spec_from_file_location("realb_demo_tasks", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


# ---- evaluation ------------------------------------------------------------------------------------------


def _batches(examples: list, batch_size: int) -> list[list]:
    return [examples[i : i + batch_size] for i in range(0, len(examples), batch_size)]


@torch.no_grad()
def generate_answers(
    model, processor, examples: list, batch_size: int = 64, max_new_tokens: int = 4, on_prefill=None, nlls=None
) -> list[str]:
    """Greedy answers: chat template -> processor (left padding) -> `generate` -> decode, `batch_size` per forward.

    `on_prefill(input_ids)` is called before each batch (e.g. to note where its prefill forward starts). When `nlls`
    is a list, the negative log-likelihood (nats) of each right answer's first token under the prefill logits is
    appended to it: a finer measure of how far a configuration moved the model than exact match.
    """
    answers: list[str] = []
    tokenizer = processor.tokenizer
    for chunk in _batches(examples, batch_size):
        inputs = processor.apply_chat_template(
            [ex.messages() for ex in chunk],
            add_generation_prompt=True,
            tokenize=True,
            return_dict=True,
            return_tensors="pt",
            processor_kwargs={"padding": True, "padding_side": "left"},
        )
        if on_prefill is not None:
            on_prefill(inputs["input_ids"])
        out = model.generate(
            **inputs, max_new_tokens=max_new_tokens, do_sample=False, output_logits=True, return_dict_in_generate=True
        )
        texts = processor.batch_decode(out.sequences[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        answers += [t.strip() for t in texts]
        if nlls is not None:
            logp = torch.log_softmax(out.logits[0].float(), dim=-1)
            right = [tokenizer(ex.answer, add_special_tokens=False)["input_ids"][0] for ex in chunk]
            nlls += (-logp[torch.arange(len(chunk)), torch.tensor(right)]).tolist()
    return answers


def score(examples: list, answers: list[str]) -> tuple[dict[str, float], dict[str, int], dict[str, int]]:
    """Exact match per modality ("image"/"text"), overall and per task kind."""
    correct: dict[str, int] = {}
    total: dict[str, int] = {}
    for ex, answer in zip(examples, answers):
        hit = int(answer == ex.answer)
        for key in ("overall", ex.modality, ex.kind):
            correct[key] = correct.get(key, 0) + hit
            total[key] = total.get(key, 0) + 1
    accuracy = {k: correct[k] / total[k] for k in total}
    return accuracy, correct, total


def evaluate(model, processor, examples: list, config: EvalConfig, batch_size: int = 64) -> AccuracyResult:
    """Score `examples` under `config` on `model` (converted with `apply_realb` unless `config.realb` is None)."""
    has_realb = getattr(model, "realb", None) is not None
    if config.realb is None and has_realb:
        get_runtime(model).reconfigure(policy="off")  # same computation as stock; measured on its own below
    prefill_forwards: list[int] = []
    telemetry = None
    if config.realb is not None:
        if not has_realb:
            raise ValueError("call apply_realb(model, ...) before evaluating a ReaLB configuration")
        defaults = RealbConfig().to_dict()  # every row starts from the defaults, not from the previous row
        reset = {k: defaults[k] for k in RealbConfig.get_runtime_fields() if k not in ("ep_size", "batch_threshold")}
        get_runtime(model).reconfigure(**{**reset, **config.realb})
        telemetry = get_telemetry(model)
        telemetry.reset()

    def note(input_ids):
        if telemetry is not None:
            prefill_forwards.append(telemetry.forwards + 1)

    prefill_tokens: list[int] = []

    def on_prefill(input_ids):
        prefill_tokens.append(int(input_ids.numel()))
        note(input_ids)

    start = time.perf_counter()
    nlls: list[float] = []
    answers = generate_answers(model, processor, examples, batch_size=batch_size, on_prefill=on_prefill, nlls=nlls)
    seconds = time.perf_counter() - start
    accuracy, correct, total = score(examples, answers)
    answer_nll = {
        key: sum(v for v, ex in zip(nlls, examples) if key in ("overall", ex.modality)) / total[key]
        for key in ("overall", *MODALITIES)
        if key in total
    }
    result = AccuracyResult(
        name=config.name,
        realb=config.realb,
        accuracy=accuracy,
        correct=correct,
        total=total,
        prefill_tokens=prefill_tokens,
        answers=answers,
        seconds=seconds,
        answer_nll=answer_nll,
    )
    if telemetry is not None:
        summary = telemetry.summary()
        prefill = [r for r in telemetry.records if r.forward in set(prefill_forwards)]
        pre = telemetry.summary(prefill)
        result.lowered_token_fraction = summary["lowered_token_fraction"]
        result.prefill_lowered_token_fraction = pre["lowered_token_fraction"]
        result.prefill_layers_lowered = pre["layers_lowered"] / pre["records"] if pre["records"] else 0.0
        result.prefill_predicted_speedup = pre["predicted_speedup"] if pre["records"] else 1.0
    return result


BATCHINGS = ("by-modality", "mixed")


def order_for_batching(examples: list, batching: str) -> list:
    """ "by-modality": image questions first, then text ones, so a forward holds one modality (what bucketing prompts
    by length does here); "mixed": held-out order, so every forward mixes image and text questions."""
    if batching == "by-modality":
        return [ex for ex in examples if ex.modality == "image"] + [ex for ex in examples if ex.modality != "image"]
    if batching == "mixed":
        return list(examples)
    raise ValueError(f"batching={batching!r}; choose one of {list(BATCHINGS)}")


def run(
    model_dir: str | Path,
    n: int = 300,
    batch_size: int = 64,
    ep_size: int = 4,
    batch_threshold: int = 2048,
    seed: int = 0,
    tasks: str | Path | ModuleType | None = None,
    configs: list[EvalConfig] | None = None,
    progress: bool = True,
    batchings: tuple[str, ...] = BATCHINGS,
) -> dict[str, Any]:
    """Load `model_dir` once and score every configuration under every batching; returns the report (JSON values).

    The stock rows (`realb=None`) of every batching run first, on the untouched model; then `apply_realb` converts
    it once and every other row is a `reconfigure(...)`.
    """
    from transformers import AutoModelForImageTextToText, AutoProcessor

    task_module = tasks if isinstance(tasks, ModuleType) else load_tasks(tasks)
    heldout = task_module.heldout_set(n, seed=seed)
    ordered = {b: order_for_batching(heldout, b) for b in batchings}
    processor = AutoProcessor.from_pretrained(model_dir)
    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.bfloat16).eval()
    configs = configs if configs is not None else default_configs(batch_threshold)

    results: dict[tuple[str, int], AccuracyResult] = {}
    jobs = [(b, i) for b in batchings for i, c in enumerate(configs) if c.realb is None]
    jobs += [(b, i) for b in batchings for i, c in enumerate(configs) if c.realb is not None]
    for batching, i in jobs:
        config = configs[i]
        if config.realb is not None and getattr(model, "realb", None) is None:
            apply_realb(model, RealbConfig(ep_size=ep_size, batch_threshold=batch_threshold))
        result = evaluate(model, processor, ordered[batching], config, batch_size=batch_size)
        results[(batching, i)] = result
        if progress:
            acc = result.accuracy
            print(
                f"[{batching}] {config.name:<36} image {acc.get('image', 0) * 100:5.1f}  "
                f"text {acc.get('text', 0) * 100:5.1f}  overall {acc['overall'] * 100:5.1f}  "
                f"lowered {result.prefill_lowered_token_fraction * 100:5.1f}% ({result.seconds:.0f} s)",
                flush=True,
            )
    counts = {m: sum(1 for ex in heldout if ex.modality == m) for m in MODALITIES}
    return {
        "model": _model_label(model_dir),
        "n": n,
        "held_out_seed": seed,
        "counts": counts,
        "batch_size": batch_size,
        "ep_size": ep_size,
        "batch_threshold": batch_threshold,
        "num_experts": model.config.text_config.num_experts,
        "top_k": model.config.text_config.num_experts_per_tok,
        "moe_layers": model.config.text_config.num_hidden_layers,
        "machine": f"CPU ({platform.machine()}, {torch.get_num_threads()} threads), torch {torch.__version__}; "
        "fp8/nvfp4/mxfp4 emulated (quantize-dequantize, bf16 matmul)",
        "runs": [{"batching": b, "results": [asdict(results[(b, i)]) for i in range(len(configs))]} for b in batchings],
    }


def _model_label(model_dir: str | Path) -> str:
    """How the report names the model: the bundled one by its checkout path, whatever folder it was installed in."""
    try:
        bundled = Path(model_dir).resolve() == bundled_model_dir().resolve()
    except ImportError:  # no bundled demo here
        bundled = False
    return "demo/model" if bundled else str(model_dir)


# ---- report ----------------------------------------------------------------------------------------------


def _pct(x: float) -> str:
    return f"{x * 100:.1f}"


_BATCHING_TEXT = {
    "by-modality": "image questions batched together, then text questions (what bucketing prompts by length does); "
    "image forwards are ~70% vision tokens, the regime ReaLB targets",
    "mixed": "image and text questions mixed in held-out order (text rows padded to the image rows' length); "
    "vision tokens are about a third of each forward",
}


def _run_section(report: dict[str, Any], run: dict[str, Any]) -> list[str]:
    rows = run["results"]
    base = next((r for r in rows if r["realb"] is None), rows[0])
    tokens = sorted({t for row in rows for t in row["prefill_tokens"]})
    lines = [
        f"## Batching: {run['batching']}",
        "",
        f"{report['batch_size']} questions per `generate` call, left padding; {_BATCHING_TEXT.get(run['batching'], '')}. "
        f"Prefill forwards hold {', '.join(map(str, tokens))} tokens.",
        "",
        "| configuration | image | text | overall | Δ overall vs bf16 | answer NLL image / text | "
        "lowered pairs, prefill | prefill layers lowered | predicted MoE speedup |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        acc = r["accuracy"]
        delta = (acc["overall"] - base["accuracy"]["overall"]) * 100
        cells = [r["name"], _pct(acc.get("image", 0)), _pct(acc.get("text", 0)), _pct(acc["overall"]), f"{delta:+.1f}"]
        nll = r.get("answer_nll", {})
        cells.append(f"{nll.get('image', 0):.4f} / {nll.get('text', 0):.4f}")
        if r["realb"] is None:
            cells += ["-", "-", "-"]
        else:
            cells += [
                _pct(r["prefill_lowered_token_fraction"]) + "%",
                _pct(r["prefill_layers_lowered"]) + "%",
                f"{r['prefill_predicted_speedup']:.2f}x",
            ]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Per task kind (% exact match):", ""]
    kinds = [k for k in rows[0]["accuracy"] if k not in ("overall", *MODALITIES)]
    lines.append("| configuration | " + " | ".join(kinds) + " |")
    lines.append("| --- |" + " ---: |" * len(kinds))
    for r in rows:
        lines.append(f"| {r['name']} | " + " | ".join(_pct(r["accuracy"][k]) for k in kinds) + " |")
    lines += ["", f"Findings ({run['batching']}, computed from the rows above):", ""]
    lines += _findings(rows, base)
    lines.append("")
    return lines


def to_markdown(report: dict[str, Any], command: str, date: str) -> str:
    lines = [
        "# Accuracy of the bundled model under ReaLB",
        "",
        f"Date: {date}. Machine: {report['machine']}.",
        "",
        "Command (from the repository root):",
        "",
        "```",
        command,
        "```",
        "",
        f"Model: `{report['model']}` (tiny Qwen3-VL-MoE: {report['moe_layers']} MoE layers, {report['num_experts']} "
        f"experts, top-{report['top_k']}), trained by `demo/train.py` on `demo/tasks.py`. Held-out set: "
        f"`heldout_set({report['n']}, seed={report['held_out_seed']})`, {report['counts']['image']} image and "
        f"{report['counts']['text']} text questions, exact match of the greedy answer.",
        "",
        f"One loaded model: the stock rows run first, then `realb_hf.apply_realb(model, RealbConfig(ep_size="
        f"{report['ep_size']}))` converts it (virtual EP={report['ep_size']}, "
        f"{report['num_experts'] // report['ep_size']} experts per rank) and every other row is "
        "`realb_hf.get_runtime(model).reconfigure(...)` from the default config. ReaLB rows use "
        f"batch_threshold={report['batch_threshold']} tokens per forward (the default). Decode steps (one token per "
        "question) stay under it and run bf16 except in the X-everywhere rows.",
        "",
        "Columns: accuracy in % (image questions / text questions / all). *lowered pairs, prefill*: share of "
        "token-expert pairs of the prefill forwards computed in low precision (from `get_telemetry(model)`). "
        "*answer NLL*: mean negative log-likelihood (nats) of the right answer's first token under the prefill "
        "logits, per modality: it moves when a configuration perturbs the model even if no answer flips. "
        "*prefill layers lowered*: share of (prefill forward, MoE layer) pairs in which ReaLB lowered at least one "
        "rank or expert. *predicted MoE speedup*: mean over prefill layers of slowest-rank time before / after from "
        "ReaLB's cost model of the target GPU (fp8 0.78, fp4 0.6 of bf16 time), not a CPU measurement.",
        "",
    ]
    for run in report["runs"]:
        lines += _run_section(report, run)
    lines += ["## Caveats", ""]
    lines += [
        "- CPU run: fp8 (e4m3, rowwise scales), nvfp4 and mxfp4 are emulated (quantize, dequantize, bf16 grouped "
        "GEMM), so the table is about accuracy only; CPU timings mean nothing for the GPU kernels.",
        "- Tiny model on procedural tasks: the text tasks' question spaces are small (one-digit sums and differences, "
        "26 letters) and are memorised, while every held-out image is a new drawing. Absolute numbers say little about "
        "a real VLM; what carries over is the comparison between rows on one model and one question set.",
        "- Small perturbations rarely flip an answer of a model this confident: compare the answer-NLL column, "
        "which moves with every precision change even where exact match does not.",
        "- HF batches are padded: padding tokens count towards the tokens per forward (and so towards the batch "
        "threshold) and are routed like text tokens, which lowers the vision share of the ranks they land on. A "
        "server that packs sequences (vLLM) has no such tokens.",
        "- Only prefill forwards cross the threshold; the answer is the first generated token, so it comes from the "
        "prefill logits, which ReaLB did affect.",
        "- Greedy decoding, no sampling. The policy=off row answering exactly like the stock row checks that the "
        "ReaLB plumbing alone changes nothing.",
        "",
        "JSON with every answer: the `.json` file next to this one.",
        "",
    ]
    return "\n".join(lines)


def _find(rows: list[dict], name: str) -> dict | None:
    return next((r for r in rows if r["name"] == name), None)


def _findings(rows: list[dict], base: dict) -> list[str]:
    """Plain-language comparisons of the rows that answer the usual questions (target: within 1 point of bf16)."""
    out = []
    b = base["accuracy"]["overall"]

    def delta(r: dict) -> float:
        return (r["accuracy"]["overall"] - b) * 100

    off = _find(rows, "ReaLB policy=off (plumbing check)")
    if off is not None:
        same = off["answers"] == base["answers"]
        out.append(
            f"- policy=off gives {'exactly the same answers as' if same else 'DIFFERENT answers from'} the stock model "
            "(the ReaLB experts module computes what the stock one does when it lowers nothing)."
        )
    for low in ("fp8", "nvfp4"):
        for gran in ("rank", "expert"):
            r = _find(rows, f"ReaLB {gran}, M_d=0.7, low={low}")
            if r is None:
                continue
            verdict = "within" if abs(delta(r)) <= 1.0 else "NOT within"
            out.append(
                f"- ReaLB {gran} granularity, M_d=0.7, {low}: {r['accuracy']['overall'] * 100:.1f}% vs bf16 {b * 100:.1f}% "
                f"({delta(r):+.1f} points, {verdict} the 1-point target), with "
                f"{r['prefill_lowered_token_fraction'] * 100:.1f}% of prefill token-expert pairs in {low} and "
                f"{r['prefill_layers_lowered'] * 100:.0f}% of prefill MoE layers lowering something."
            )
    for low in ("fp8", "nvfp4"):
        r0 = _find(rows, f"ReaLB rank, M_d=0.0, low={low}")
        r9 = _find(rows, f"ReaLB rank, M_d=0.9, low={low}")
        if r0 is not None and r9 is not None:
            out.append(
                f"- Modality threshold, rank granularity, {low}: M_d=0.0 lowers "
                f"{r0['prefill_lowered_token_fraction'] * 100:.1f}% of prefill pairs ({delta(r0):+.1f} points), "
                f"M_d=0.9 lowers {r9['prefill_lowered_token_fraction'] * 100:.1f}% ({delta(r9):+.1f} points)."
            )
    picks = [("bf16", base)] + [
        (label, _find(rows, name))
        for label, name in (
            ("ReaLB rank M_d=0.7 fp8", "ReaLB rank, M_d=0.7, low=fp8"),
            ("ReaLB rank M_d=0.7 nvfp4", "ReaLB rank, M_d=0.7, low=nvfp4"),
            ("ReaLB rank M_d=0.0 nvfp4", "ReaLB rank, M_d=0.0, low=nvfp4"),
            ("nvfp4 everywhere", "nvfp4 everywhere"),
            ("mxfp4 everywhere", "mxfp4 everywhere"),
        )
    ]
    picks = [(label, r) for label, r in picks if r is not None and r.get("answer_nll")]
    if len(picks) > 1:
        out.append(
            "- Mean NLL of the right answer, image / text questions (nats): "
            + "; ".join(f"{label} {r['answer_nll']['image']:.4f} / {r['answer_nll']['text']:.4f}" for label, r in picks)
            + "."
        )
    everywhere = [r for r in rows if r["name"].endswith(" everywhere")]
    if everywhere:
        out.append(
            "- Everything low (the FP4/FP8-everywhere baselines): "
            + ", ".join(f"{r['name'].split()[0]} {delta(r):+.1f} points" for r in everywhere)
            + "."
        )
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m realb_hf.accuracy", description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="model directory (default: the bundled demo model, demo/model)")
    parser.add_argument("--n", type=int, default=300, help="held-out questions")
    parser.add_argument("--batch-size", type=int, default=64, help="questions per forward")
    parser.add_argument("--ep-size", type=int, default=4, help="virtual expert-parallel size")
    parser.add_argument(
        "--batch-threshold", type=int, default=2048, help="tokens per forward below which ReaLB does nothing"
    )
    parser.add_argument("--seed", type=int, default=0, help="held-out set number")
    parser.add_argument(
        "--batching",
        nargs="+",
        choices=BATCHINGS,
        default=list(BATCHINGS),
        help="what shares a forward (one table each)",
    )
    parser.add_argument(
        "--tasks", help="task generator (.py path or module name; default: the bundled demo's tasks.py)"
    )
    parser.add_argument("--out", help="write the Markdown report here and the JSON next to it")
    parser.add_argument("--date", default=_dt.date.today().isoformat(), help="date printed in the report")
    parser.add_argument("--notes", help="Markdown file appended to the report (hand-written notes)")
    args = parser.parse_args(argv)
    model_dir = Path(args.model) if args.model else bundled_model_dir()
    if not (model_dir / "config.json").is_file():
        parser.error(f"--model {model_dir}: not a model folder (no config.json)")
    try:
        tasks = load_tasks(args.tasks)  # fail before loading the model
    except (ImportError, OSError) as err:
        parser.error(f"--tasks: {err}" if args.tasks else f"no task generator: {err}; pass --tasks PATH/TO/tasks.py")

    report = run(
        model_dir,
        n=args.n,
        batch_size=args.batch_size,
        ep_size=args.ep_size,
        batch_threshold=args.batch_threshold,
        seed=args.seed,
        tasks=tasks,
        batchings=tuple(args.batching),
    )
    report["date"] = args.date
    command = "python -m realb_hf.accuracy " + " ".join(argv if argv is not None else sys.argv[1:])
    text = to_markdown(report, command.strip(), args.date)
    if args.notes:
        text += "\n" + Path(args.notes).read_text()
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
        out.with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n")
        print(f"wrote {out} and {out.with_suffix('.json')}")
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
