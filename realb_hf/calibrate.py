"""`realb-hf calibrate MODEL --data ...`: how much each MoE layer (and expert) loses in each low format.

For a few batches of the user's data it runs the model in bf16 once, then
- per MoE layer and format: the relative error of the layer's experts output (all its rows lowered) against the
  bf16 output, on real (non-padding) rows; and per expert, the relative error of that expert's own output on the
  rows routed to it (experts with no routed rows are left out);
- per MoE layer and format: the NLL cost of lowering that layer alone (every other layer bf16), and of lowering
  every layer, as the mean per-sample NLL difference with a paired-bootstrap 95% interval (`realb_hf.bootstrap`).

NLL: with the bundled tasks, of the right answer's first token after the generation prompt (the accuracy table's
answer NLL); with a folder of prompts, teacher-forced over each prompt's text tokens.

Lowering a layer replaces its experts module's `forward` on the instance with the reference executor
(`experts.host_path.run`) in the low format, on a model converted with `apply_realb` under policy "off".
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .bootstrap import describe, paired_bootstrap, verdict
from .formats import LOW_PRECISIONS

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
BUNDLED = "bundled"


@dataclass
class Sample:
    """One calibration input: chat messages, and the answer when the NLL is of an answer (else of the prompt)."""

    messages: list[dict]
    answer: str | None = None


# ---- data ------------------------------------------------------------------------------------------------


def load_samples(data: str | None, limit: int, seed: int = 0, tasks: str | None = None) -> list[Sample]:
    """`limit` samples from `data`: None or "bundled" (held-out questions of the task module `tasks`, a module
    name or .py path, default the bundled demo's; image and text questions mixed), or a folder of `NAME.txt`
    prompts, each with an optional image `NAME.png` (.jpg, .jpeg, .webp, .bmp)."""
    if data is None or data == BUNDLED:
        from .accuracy_setup import load_tasks

        try:
            module = load_tasks(tasks)
        except ImportError as err:
            raise ValueError(f"--tasks {tasks}: {err} (give a module name on the path or a .py file)") from err
        return [Sample(ex.messages(), ex.answer) for ex in module.heldout_set(limit, seed=seed)]
    if tasks is not None:
        raise ValueError(f"--tasks {tasks} chooses held-out questions; it cannot go with --data {data} (a folder)")
    folder = Path(data)
    if not folder.is_dir():
        raise FileNotFoundError(f"--data {data}: no such folder (pass a folder of NAME.txt prompts, or 'bundled')")
    prompts = sorted(folder.glob("*.txt"))
    images = {p.stem: p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES}
    orphans = sorted(set(images) - {p.stem for p in prompts})
    if orphans:
        raise ValueError(f"--data {data}: image {images[orphans[0]].name} has no prompt {orphans[0]}.txt next to it")
    samples = []
    for path in prompts[:limit]:
        text = path.read_text().strip()
        if not text:
            raise ValueError(f"--data {data}: {path.name} is empty")
        content: list[dict] = []
        if path.stem in images:
            from PIL import Image

            content.append({"type": "image", "image": Image.open(images[path.stem]).convert("RGB")})
        content.append({"type": "text", "text": text})
        samples.append(Sample([{"role": "user", "content": content}]))
    if not samples:
        raise ValueError(f"--data {data}: no prompts (NAME.txt files) in this folder")
    return samples


# ---- model -----------------------------------------------------------------------------------------------


def load_model(model_dir: str | Path):
    """(model, processor) of a local Hub-format folder, in bf16, converted with ReaLB under policy "off"."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, AutoProcessor, AutoTokenizer

    from . import RealbConfig, apply_realb

    path = Path(model_dir)
    if not path.is_dir():
        raise FileNotFoundError(f"{model_dir}: no such model folder")
    if not (path / "config.json").is_file():
        raise ValueError(f"{model_dir}: not a model folder (no config.json)")
    try:
        model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.bfloat16)
        reader = AutoProcessor
    except ValueError:  # not an image-text model: a text-only MoE reads its data with its tokenizer
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
        reader = AutoTokenizer
    model.eval()
    try:
        processor = reader.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise ValueError(f"{model_dir}: no processor or tokenizer to read the data with ({err})") from None
    if getattr(model, "realb", None) is None:
        # persistent: each format converts every layer once, not at every lowered forward
        apply_realb(model, RealbConfig(policy="off", weight_cache="persistent"))
    else:
        model.realb.reconfigure(policy="off", weight_cache="persistent")
    return model, processor


def experts_modules(model) -> list[tuple[str, torch.nn.Module]]:
    from .experts import RealbExperts

    found = [(name, m) for name, m in model.named_modules() if isinstance(m, RealbExperts)]
    if not found:
        raise ValueError("the model has no MoE experts layers ReaLB converts: nothing to calibrate")
    return found


def encode(processor, samples: list[Sample]) -> dict:
    """Chat template, left padding; the generation prompt only when the NLL is of an answer."""
    if any(_has_image(s) for s in samples) and not hasattr(processor, "image_processor"):
        raise ValueError("the data holds images but the model folder has no image processor")
    return processor.apply_chat_template(
        [s.messages for s in samples],
        add_generation_prompt=samples[0].answer is not None,
        tokenize=True,
        return_dict=True,
        return_tensors="pt",
        **_padding(processor),
    )


def _has_image(sample: Sample) -> bool:
    return any(part.get("type") == "image" for m in sample.messages for part in m["content"])


def _padding(processor) -> dict:
    if hasattr(processor, "tokenizer"):  # a multimodal processor
        return {"processor_kwargs": {"padding": True, "padding_side": "left"}}
    return {"padding": True, "padding_side": "left"}


def sample_nll(model, processor, samples: list[Sample], inputs: dict) -> torch.Tensor:
    """(len(samples),) NLL in nats: of the answer's first token, or the mean over the prompt's text tokens."""
    from .modality import TEXT, modality_from_inputs, placeholder_ids

    logits = model(**inputs).logits.float()
    logp = torch.log_softmax(logits, dim=-1)
    if samples[0].answer is not None:
        tokenizer = getattr(processor, "tokenizer", processor)
        right = torch.tensor([tokenizer(s.answer, add_special_tokens=False)["input_ids"][0] for s in samples])
        return -logp[torch.arange(len(samples)), -1, right]
    ids = inputs["input_ids"]
    codes, _ = modality_from_inputs(ids, inputs.get("mm_token_type_ids"), *placeholder_ids(model.config))
    target = inputs["attention_mask"].bool() & (codes == TEXT)
    target = target[:, 1:] & inputs["attention_mask"].bool()[:, :-1]
    token_nll = -logp[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1)
    return (token_nll * target).sum(1) / target.sum(1).clamp(min=1)


# ---- measurement ---------------------------------------------------------------------------------------


def _lowered(module: torch.nn.Module, fmt: str) -> Callable:
    from .experts import host_path

    high = module.realb_runtime.settings.config.high_precision
    return lambda h, i, w: host_path.run(module, h, i, w, (fmt,) * module.num_experts, high)


def _relative(diff: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    """(squared error, squared reference norm) of finite rows, summed, for a ratio over batches."""
    keep = torch.isfinite(ref).all(-1) & torch.isfinite(diff).all(-1)
    return float(diff[keep].float().pow(2).sum()), float(ref[keep].float().pow(2).sum())


def _errors(module, fmt: str, args: tuple, out: torch.Tensor, real: torch.Tensor, acc: dict) -> None:
    """Add one call's squared errors to `acc`: the layer's output, and every expert's output on its own rows."""
    from .experts import host_path

    hidden, index, weights = (a.detach() for a in args)
    hidden, index, weights, out = hidden[real], index[real], weights[real], out.detach()[real]
    high = module.realb_runtime.settings.config.high_precision
    num_experts = module.num_experts
    layer = _lowered(module, fmt)(hidden, index, weights)
    err, norm = _relative(layer - out, out)
    acc["layer"][0] += err
    acc["layer"][1] += norm
    # one row per token-expert pair, unit weight: each row of the output is one expert's output on one token
    pairs = hidden.repeat_interleave(index.shape[1], dim=0)
    ids = index.reshape(-1, 1)
    ones = torch.ones_like(ids, dtype=weights.dtype)
    pair_high = host_path.run(module, pairs, ids, ones, (high,) * num_experts, high)
    pair_low = host_path.run(module, pairs, ids, ones, (fmt,) * num_experts, high)
    for e in ids.flatten().unique().tolist():
        rows = ids.flatten() == e
        err, norm = _relative(pair_low[rows] - pair_high[rows], pair_high[rows])
        slot = acc["experts"].setdefault(e, [0.0, 0.0, 0])
        slot[0] += err
        slot[1] += norm
        slot[2] += int(rows.sum())


def _recorder(seen: dict, name: str) -> Callable:
    """A forward hook keeping the experts module's (args, output) under `name`."""

    def hook(module, args, out):
        seen[name] = (args, out)

    return hook


@torch.no_grad()
def calibrate(
    model,
    processor,
    samples: list[Sample],
    formats: tuple[str, ...] = LOW_PRECISIONS,
    batch_size: int = 16,
    progress: bool = True,
    n_resamples: int = 2000,
    seed: int = 0,
) -> dict[str, Any]:
    """The sensitivity report (JSON values) of `model` (converted with ReaLB, policy "off") on `samples`."""
    from tqdm.auto import tqdm

    unknown = [f for f in formats if f not in LOW_PRECISIONS]
    if unknown:
        raise ValueError(f"unknown low format {unknown[0]!r}; choose from {list(LOW_PRECISIONS)}")
    if not samples:
        raise ValueError("no calibration samples")
    layers = experts_modules(model)
    batches = [samples[i : i + batch_size] for i in range(0, len(samples), batch_size)]
    variants = [(None, None)] + [(name, f) for name, _ in layers for f in formats] + [("all", f) for f in formats]
    acc = {(name, f): {"layer": [0.0, 0.0], "experts": {}} for name, _ in layers for f in formats}
    nll: dict[tuple, list[float]] = {v: [] for v in variants}
    bar = tqdm(total=len(batches) * len(variants), desc="calibrate", leave=False, disable=not progress)
    for batch in batches:
        inputs = encode(processor, batch)
        real = inputs["attention_mask"].reshape(-1).bool()
        seen: dict[str, tuple] = {}
        hooks = [m.register_forward_hook(_recorder(seen, name)) for name, m in layers]
        try:
            nll[(None, None)] += sample_nll(model, processor, batch, inputs).tolist()
        finally:
            for hook in hooks:
                hook.remove()
        bar.update()
        for name, module in layers:
            args, out = seen[name]
            for f in formats:
                _errors(module, f, args, out, real, acc[(name, f)])
        for target, f in variants[1:]:
            lowered = [m for name, m in layers if target in ("all", name)]
            for m in lowered:
                m.forward = _lowered(m, f)
            try:
                nll[(target, f)] += sample_nll(model, processor, batch, inputs).tolist()
            finally:
                for m in lowered:
                    del m.forward
            bar.update()
    bar.close()
    return _report(layers, formats, acc, nll, n_resamples, seed, len(samples))


def _ratio(err: float, norm: float) -> float:
    return (err / norm) ** 0.5 if norm > 0 else 0.0


def _cost(nll: dict, key: tuple, n_resamples: int, seed: int) -> dict[str, Any]:
    interval = paired_bootstrap(nll[key], nll[(None, None)], n_resamples, seed)
    return {**interval.to_dict(), "verdict": verdict(interval, higher_is_better=False)}


def _report(layers, formats, acc, nll, n_resamples, seed, n) -> dict[str, Any]:
    rows = []
    for name, _ in layers:
        row: dict[str, Any] = {"layer": name}
        for f in formats:
            a = acc[(name, f)]
            experts = {
                str(e): {"relative_error": _ratio(err, norm), "rows": count}
                for e, (err, norm, count) in sorted(a["experts"].items())
            }
            row[f] = {
                "relative_error": _ratio(*a["layer"]),
                "nll_cost": _cost(nll, (name, f), n_resamples, seed),
                "experts": experts,
            }
        rows.append(row)
    return {
        "samples": n,
        "bf16_nll": sum(nll[(None, None)]) / n,
        "formats": list(formats),
        "layers": rows,
        "all_layers": {f: _cost(nll, ("all", f), n_resamples, seed) for f in formats},
        "bootstrap": {"n_resamples": n_resamples, "seed": seed, "confidence": 0.95},
    }


def table(report: dict[str, Any]) -> str:
    """The printed table: per layer and format, output error and NLL cost with its interval."""
    formats = report["formats"]
    head = "| layer | " + " | ".join(f"{f} error | {f} Δ NLL [95% CI] | {f} worst expert" for f in formats) + " |"
    lines = [
        f"{report['samples']} samples, bf16 NLL {report['bf16_nll']:.4f} nats. Error: relative L2 of the experts "
        "output against bf16. Δ NLL: lowering that layer alone (mean over samples, nats).",
        "",
        head,
        "| --- |" + " ---: | ---: | --- |" * len(formats),
    ]

    for row in report["layers"]:
        cells = [row["layer"]]
        for f in formats:
            cell = row[f]
            worst = max(cell["experts"].items(), key=lambda kv: kv[1]["relative_error"], default=None)
            worst_text = f"e{worst[0]}: {worst[1]['relative_error']:.4f}" if worst else "-"
            cells += [f"{cell['relative_error']:.4f}", describe(cell["nll_cost"], digits=4), worst_text]
        lines.append("| " + " | ".join(cells) + " |")
    cells = ["all layers"]
    for f in formats:
        cells += ["", describe(report["all_layers"][f], digits=4), ""]
    lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ---- command line ----------------------------------------------------------------------------------------


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1, got {value}")
    return value


def cmd_calibrate(args: argparse.Namespace) -> int:
    if args.out and Path(args.out).is_dir():
        raise ValueError(f"--out {args.out}: is a folder, not a file")
    samples = load_samples(args.data, args.batches * args.batch_size, args.seed, args.tasks)  # before loading
    model, processor = load_model(args.model)
    report = calibrate(
        model, processor, samples, tuple(args.formats), args.batch_size, not args.no_progress, seed=args.seed
    )
    report["model"] = str(args.model)
    report["data"] = args.data or BUNDLED
    if args.tasks:
        report["tasks"] = args.tasks
    print(table(report))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
        print(f"wrote {args.out}")
    return 0


def add_calibrate_parser(sub) -> None:
    """`realb-hf calibrate` (registered on `sub`, the CLI's subparsers)."""
    p = sub.add_parser(
        "calibrate",
        help="per MoE layer and expert: each low format's output error and NLL cost on your data",
        description=__doc__.splitlines()[0],
    )
    p.add_argument("model", help="local Hub-format model folder (e.g. the bundled demo/model)")
    p.add_argument(
        "--data",
        help="folder of NAME.txt prompts, each with an optional image NAME.png; 'bundled' or omitted: the bundled "
        "demo's held-out tasks",
    )
    p.add_argument(
        "--tasks",
        help="with no --data: held-out questions of this task module (module name or .py path, e.g. "
        "demo.sensitive.tasks) instead of the bundled demo's",
    )
    p.add_argument("--formats", nargs="+", choices=LOW_PRECISIONS, default=list(LOW_PRECISIONS))
    p.add_argument("--batches", type=_positive, default=4, help="batches to run")
    p.add_argument("--batch-size", type=_positive, default=16, help="samples per batch")
    p.add_argument("--seed", type=int, default=0, help="held-out set number (bundled data) and bootstrap seed")
    p.add_argument("--out", help="write the full report (per expert too) as JSON here")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_calibrate)


__all__ = ["Sample", "add_calibrate_parser", "calibrate", "load_model", "load_samples", "table"]
