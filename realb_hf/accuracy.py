"""Held-out accuracy of a ReaLB model under many precision configurations, on one loaded model.

    python -m realb_hf.accuracy --model demo/model --n 300 --out docs/accuracy_bundled.md
    python -m realb_hf.accuracy --model demo/sensitive/model --tasks demo.sensitive.tasks --device cuda --ep-size 4 8

loads the model once in bf16 on `--device` (default cpu), scores the stock model, converts it with `apply_realb`
under virtual EP and switches configurations with `get_runtime(model).reconfigure(...)`; every ReaLB row pins its EP
size (`--ep-size`, one or more; default 4) and runs once per size. Every row answers the same held-out questions
(`heldout_set` of demo/tasks.py, or of `--tasks`) with greedy `generate`, many questions per forward (left padding),
so the prefill forward carries `batch_size x prompt length` tokens and crosses the batch threshold. Exact match is
scored per modality, and each row reports from telemetry how much ReaLB lowered.
Writes a Markdown report to `--out` and the full numbers as JSON next to it (same name, `.json`).

Library use: `evaluate(model, processor, examples, ...)` -> `AccuracyResult`, `run(model_dir, ...)` -> report dict,
`accuracy_report.to_markdown(report)`.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from .accuracy_report import MODALITIES, model_label, to_markdown
from .accuracy_setup import (
    EvalConfig,
    default_configs,
    describe_machine,
    ep_sizes_of,
    format_support,
    load_tasks,
    model_facts,
    parse_device,
    pin,
    tasks_facts,
)
from .apply import apply_realb, get_runtime, get_telemetry
from .bootstrap import intervals
from .bundled import bundled_model_dir
from .config import RealbConfig
from .formats import LOW_PRECISIONS
from .premise import check_shares, run_premise

PINNED = ("ep_size", "batch_threshold")  # a ReaLB row must set these: `reconfigure` would keep the last row's


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
    question_nll: list[float] = field(default_factory=list)  # that NLL per question, in `examples` order
    vs_bf16: dict[str, Any] = field(default_factory=dict)  # bootstrap intervals against the stock row (`intervals`)


# ---- evaluation ------------------------------------------------------------------------------------------


def _batches(examples: list, batch_size: int) -> list[list]:
    return [examples[i : i + batch_size] for i in range(0, len(examples), batch_size)]


def batch_inputs(processor, chunk: list) -> dict:
    """One forward's inputs for `chunk`: chat template -> processor, left padding (what `generate` takes)."""
    return processor.apply_chat_template(
        [ex.messages() for ex in chunk],
        add_generation_prompt=True,
        tokenize=True,
        return_dict=True,
        return_tensors="pt",
        processor_kwargs={"padding": True, "padding_side": "left"},
    )


@torch.no_grad()
def generate_answers(
    model, processor, examples: list, batch_size: int = 64, max_new_tokens: int = 4, on_prefill=None, nlls=None
) -> list[str]:
    """Greedy answers: chat template -> processor (left padding) -> `generate` -> decode, `batch_size` per forward,
    the inputs moved to the model's device.

    `on_prefill(input_ids)` is called before each batch (e.g. to note where its prefill forward starts). When `nlls`
    is a list, the negative log-likelihood (nats) of each right answer's first token under the prefill logits is
    appended to it: a finer measure of how far a configuration moved the model than exact match.
    """
    answers: list[str] = []
    tokenizer = processor.tokenizer
    for chunk in _batches(examples, batch_size):
        inputs = batch_inputs(processor, chunk).to(model.device)
        if on_prefill is not None:
            on_prefill(inputs["input_ids"])
        out = model.generate(
            **inputs, max_new_tokens=max_new_tokens, do_sample=False, output_logits=True, return_dict_in_generate=True
        )
        texts = processor.batch_decode(out.sequences[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        answers += [t.strip() for t in texts]
        if nlls is not None:
            logp = torch.log_softmax(out.logits[0].float(), dim=-1).cpu()
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
    """Score `examples` under `config` on `model` (converted with `apply_realb` unless `config.realb` is None).

    A ReaLB row starts from the default config and must set `ep_size` and `batch_threshold` itself (ValueError
    otherwise): `reconfigure` keeps what it is not given, so they would silently come from the previous row."""
    has_realb = getattr(model, "realb", None) is not None
    if config.realb is None and has_realb:
        get_runtime(model).reconfigure(policy="off")  # same computation as stock; measured on its own below
    prefill_forwards: list[int] = []
    telemetry = None
    if config.realb is not None:
        if not has_realb:
            raise ValueError("call apply_realb(model, ...) before evaluating a ReaLB configuration")
        missing = [k for k in PINNED if k not in config.realb]
        if missing:
            raise ValueError(
                f"row {config.name!r} does not set {missing}: every ReaLB row must, or it would run with the previous "
                "row's values (accuracy.pin(configs, ep_size, batch_threshold) sets them)"
            )
        defaults = RealbConfig().to_dict()  # every row starts from the defaults, not from the previous row
        reset = {k: defaults[k] for k in RealbConfig.get_runtime_fields() if k not in PINNED}
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
        question_nll=nlls,
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
    ep_size: int | Sequence[int] = 4,
    batch_threshold: int = 2048,
    seed: int = 0,
    tasks: str | Path | ModuleType | None = None,
    configs: list[EvalConfig] | None = None,
    progress: bool = True,
    batchings: tuple[str, ...] = BATCHINGS,
    n_resamples: int = 2000,
    bootstrap_seed: int = 0,
    premise_shares: tuple[float, ...] = (),
    premise_low: tuple[str, ...] = ("nvfp4",),
    device: str | torch.device = "cpu",
) -> dict[str, Any]:
    """Load `model_dir` once on `device` and score every configuration under every batching; returns the report
    (JSON values).

    `ep_size`: one virtual EP size or several; the default rows run every ReaLB configuration once per size, and
    a given `configs` row that sets no `ep_size` (or `batch_threshold`) gets the first size (and `batch_threshold`).
    The stock rows (`realb=None`) of every batching run first, on the untouched model; then `apply_realb` converts
    it once and every other row is a `reconfigure(...)`. Every row gets paired-bootstrap intervals against the
    first stock row of its batching (`n_resamples` draws, `bootstrap_seed`). With `premise_shares`, the premise
    test (`realb_hf.premise`) runs last, on mixed batches, once per format in `premise_low`.
    """
    from transformers import AutoModelForImageTextToText, AutoProcessor

    sizes = ep_sizes_of(ep_size)
    device = parse_device(str(device))
    task_module = tasks if isinstance(tasks, ModuleType) else load_tasks(tasks)
    heldout = task_module.heldout_set(n, seed=seed)
    ordered = {b: order_for_batching(heldout, b) for b in batchings}
    processor = AutoProcessor.from_pretrained(model_dir)
    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.bfloat16).to(device).eval()
    facts = model_facts(model.config)
    uneven = [ep for ep in sizes if facts["num_experts"] and facts["num_experts"] % ep]
    if uneven:
        raise ValueError(f"ep_size {uneven}: {facts['num_experts']} experts do not split evenly over that many ranks")
    if configs is None:
        configs = default_configs(batch_threshold, sizes, device)
    configs = pin(configs, sizes[0], batch_threshold)

    if premise_shares:  # a share no forward can give fails now, not after the table
        mixed = order_for_batching(heldout, "mixed")
        check_shares(model, [batch_inputs(processor, chunk) for chunk in _batches(mixed, batch_size)], premise_shares)
    results: dict[tuple[str, int], AccuracyResult] = {}
    jobs = [(b, i) for b in batchings for i, c in enumerate(configs) if c.realb is None]
    jobs += [(b, i) for b in batchings for i, c in enumerate(configs) if c.realb is not None]
    for batching, i in jobs:
        config = configs[i]
        if config.realb is not None and getattr(model, "realb", None) is None:
            apply_realb(model, RealbConfig(ep_size=sizes[0], batch_threshold=batch_threshold))
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
    for batching in batchings:
        base = next((results[(batching, i)] for i, c in enumerate(configs) if c.realb is None), None)
        for i in range(len(configs)):
            if base is not None:
                results[(batching, i)].vs_bf16 = intervals(
                    results[(batching, i)], base, ordered[batching], n_resamples, bootstrap_seed
                )
    premise_report = None
    if premise_shares:
        # vision and text tokens share every forward only when questions are mixed
        mixed = ordered.get("mixed") or order_for_batching(heldout, "mixed")
        if getattr(model, "realb", None) is None:
            apply_realb(model, RealbConfig(ep_size=sizes[0], batch_threshold=batch_threshold))
        base = evaluate(model, processor, mixed, EvalConfig("bf16 (policy=off)", None), batch_size=batch_size)

        def score(name: str) -> AccuracyResult:
            return evaluate(model, processor, mixed, EvalConfig(name, None), batch_size=batch_size)

        premise_report = [
            run_premise(model, score, mixed, base, premise_shares, low, seed, n_resamples, bootstrap_seed)
            for low in premise_low
        ]
        if progress:
            for row in (row for part in premise_report for row in part["rows"]):
                print(f"[premise] {row['name']:<36} overall {row['accuracy']['overall'] * 100:5.1f}", flush=True)
    counts = {m: sum(1 for ex in heldout if ex.modality == m) for m in MODALITIES}
    return {
        "model": model_label(model_dir),
        **facts,
        "tasks": tasks_facts(task_module),
        "n": n,
        "held_out_seed": seed,
        "counts": counts,
        "batch_size": batch_size,
        "ep_sizes": list(sizes),
        "batch_threshold": batch_threshold,
        "bootstrap": {"n_resamples": n_resamples, "seed": bootstrap_seed, "confidence": 0.95},
        "device": str(device),
        "formats": format_support(device),
        "machine": describe_machine(device),
        "runs": [{"batching": b, "results": [asdict(results[(b, i)]) for i in range(len(configs))]} for b in batchings],
        "premise": premise_report,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m realb_hf.accuracy", description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="model directory (default: the bundled demo model, demo/model)")
    parser.add_argument("--n", type=int, default=300, help="held-out questions")
    parser.add_argument("--batch-size", type=int, default=64, help="questions per forward")
    parser.add_argument(
        "--ep-size",
        type=int,
        nargs="+",
        default=[4],
        metavar="EP",
        help="virtual expert-parallel size(s): every ReaLB row runs once per size (default 4)",
    )
    parser.add_argument(
        "--device", default="cpu", help="where the model runs: cpu (default), cuda, cuda:N, or auto (cuda if any)"
    )
    parser.add_argument(
        "--batch-threshold", type=int, default=2048, help="tokens per forward below which ReaLB does nothing"
    )
    parser.add_argument("--seed", type=int, default=0, help="held-out set number")
    parser.add_argument(
        "--batching",
        nargs="*",
        choices=BATCHINGS,
        default=list(BATCHINGS),
        help="what shares a forward (one table each; none: only the premise test)",
    )
    parser.add_argument("--tasks", help="task generator (.py path or module name; default: the bundled demo's tasks.py)")
    parser.add_argument(
        "--bootstrap", type=int, default=2000, help="paired-bootstrap resamples for the 95%% intervals"
    )
    parser.add_argument("--bootstrap-seed", type=int, default=0, help="seed of the bootstrap's resampling")
    parser.add_argument(
        "--premise",
        type=float,
        nargs="+",
        default=[],
        metavar="SHARE",
        help="also run the premise test (vision rows vs text rows vs random rows lowered) at these shares of "
        "token-expert pairs, in (0, 1]",
    )
    parser.add_argument(
        "--premise-low", nargs="+", default=["nvfp4"], help="the low formats of the premise test (one test each)"
    )
    parser.add_argument("--out", help="write the Markdown report here and the JSON next to it")
    parser.add_argument("--date", default=_dt.date.today().isoformat(), help="date printed in the report")
    parser.add_argument("--notes", help="Markdown file appended to the report (hand-written notes)")
    args = parser.parse_args(argv)
    model_dir = Path(args.model) if args.model else bundled_model_dir()
    if not (model_dir / "config.json").is_file():
        parser.error(f"--model {model_dir}: not a model folder (no config.json)")
    bad = [s for s in args.premise if not 0.0 < s <= 1.0]
    if bad:
        parser.error(f"--premise: shares must lie in (0, 1], got {bad}")
    unknown = [f for f in args.premise_low if f not in LOW_PRECISIONS]
    if unknown:
        parser.error(f"--premise-low {unknown[0]!r}: choose one of {list(LOW_PRECISIONS)}")
    if not args.batching and not args.premise:
        parser.error("--batching: give at least one of " + ", ".join(BATCHINGS) + " (none only with --premise)")
    if args.bootstrap < 1:
        parser.error(f"--bootstrap must be >= 1 resample, got {args.bootstrap}")
    for name, low in (("n", 1), ("batch_size", 1), ("batch_threshold", 0)):
        if getattr(args, name) < low:
            parser.error(f"--{name.replace('_', '-')} must be >= {low}, got {getattr(args, name)}")
    try:
        ep_sizes = ep_sizes_of(args.ep_size)
    except ValueError as err:
        parser.error(f"--ep-size: {err}")
    try:
        device = parse_device(args.device)
    except ValueError as err:
        parser.error(f"--{err}")
    try:
        tasks = load_tasks(args.tasks)  # fail before loading the model
    except (ImportError, OSError) as err:
        parser.error(f"--tasks: {err}" if args.tasks else f"no task generator: {err}; pass --tasks PATH/TO/tasks.py")
    from transformers import AutoConfig

    try:
        experts = model_facts(AutoConfig.from_pretrained(model_dir))["num_experts"]
    except (OSError, ValueError, AttributeError) as err:
        parser.error(f"--model {model_dir}: its config.json is not a model's ({str(err).splitlines()[0]})")
    if experts and [ep for ep in ep_sizes if experts % ep]:
        parser.error(f"--ep-size {' '.join(map(str, ep_sizes))}: each must divide the model's {experts} experts")

    report = run(
        model_dir,
        n=args.n,
        batch_size=args.batch_size,
        ep_size=ep_sizes,
        batch_threshold=args.batch_threshold,
        seed=args.seed,
        tasks=tasks,
        batchings=tuple(args.batching),
        n_resamples=args.bootstrap,
        bootstrap_seed=args.bootstrap_seed,
        premise_shares=tuple(args.premise),
        premise_low=tuple(args.premise_low),
        device=device,
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
