"""The Markdown report of `realb_hf.accuracy`: per-run tables and the findings the numbers support."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .accuracy_setup import realb_setting
from .bootstrap import describe
from .bundled import bundled_model_dir
from .premise import findings as premise_findings
from .premise import to_markdown as premise_markdown

MODALITIES = ("image", "text")


def model_label(model_dir: str | Path) -> str:
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
        "| configuration | image | text | overall | Δ overall vs bf16 [95% CI] | answer NLL image / text | "
        "Δ answer NLL [95% CI] | lowered pairs, prefill | prefill layers lowered | predicted MoE speedup |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        acc = r["accuracy"]
        overall = r.get("vs_bf16", {}).get("overall")
        if overall is None:  # a report written before intervals existed
            em_cell, nll_cell = f"{(acc['overall'] - base['accuracy']['overall']) * 100:+.1f}", "-"
        else:
            em_cell = describe(overall["exact_match"], scale=100)
            nll_cell = describe(overall["answer_nll"], digits=4)
        cells = [r["name"], _pct(acc.get("image", 0)), _pct(acc.get("text", 0)), _pct(acc["overall"]), em_cell]
        nll = r.get("answer_nll", {})
        cells += [f"{nll.get('image', 0):.4f} / {nll.get('text', 0):.4f}", nll_cell]
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
    kinds = list(dict.fromkeys(k for r in rows for k in r["accuracy"] if k not in ("overall", *MODALITIES)))
    lines.append("| configuration | " + " | ".join(kinds) + " |")
    lines.append("| --- |" + " ---: |" * len(kinds))
    for r in rows:
        lines.append(f"| {r['name']} | " + " | ".join(_pct(r["accuracy"].get(k, 0)) for k in kinds) + " |")
    lines += ["", f"Findings ({run['batching']}, computed from the rows above):", ""]
    lines += _findings(rows, base, ep_sizes(report))
    lines.append("")
    return lines


def ep_sizes(report: dict[str, Any]) -> list[int]:
    """The report's virtual EP sizes (a report written before several sizes existed holds one `ep_size`)."""
    return list(report.get("ep_sizes") or [report["ep_size"]])


def _model_sentence(report: dict[str, Any]) -> str:
    kind = ", ".join(x for x in (report.get("model_type"), report.get("architecture")) if x)
    layers = f"{report['moe_layers']} MoE layers" + (
        f" of {report['layers']}" if report.get("layers", report["moe_layers"]) != report["moe_layers"] else ""
    )
    shape = f"{layers}, {report['num_experts']} experts, top-{report['top_k']}"
    tasks = report.get("tasks") or {"module": "demo.tasks", "path": "demo/tasks.py", "bundled_demo": True}
    module, path = tasks.get("module"), tasks.get("path")
    where = f"`{module}` ({path})" if module and path else f"`{module or path}`"
    if tasks.get("bundled_demo") and report["model"] == "demo/model":
        where += ", which `demo/train.py` trained it on"
    return (
        f"Model: `{report['model']}` ({kind + ': ' if kind else ''}{shape}). Questions: `heldout_set({report['n']}, "
        f"seed={report['held_out_seed']})` of the task module {where}: {report['counts']['image']} image and "
        f"{report['counts']['text']} text questions, exact match of the greedy answer."
    )


def _ep_sentence(report: dict[str, Any]) -> str:
    sizes = ep_sizes(report)
    per = ", ".join(f"EP={ep} ({report['num_experts'] // ep} experts per rank)" for ep in sizes)
    every = (
        "every ReaLB configuration runs once per EP size (its name says which); policy=off and the X-everywhere rows, "
        f"whose result does not depend on it, run at EP={sizes[0]}"
        if len(sizes) > 1
        else "every ReaLB row runs at it"
    )
    return (
        f"One loaded model: the stock rows run first, then `realb_hf.apply_realb(model, RealbConfig(ep_size="
        f"{sizes[0]}))` converts it and every other row is `realb_hf.get_runtime(model).reconfigure(...)` from the "
        f"default config with its own `ep_size` pinned. Virtual EP: {per}; {every}. ReaLB rows use "
        f"batch_threshold={report['batch_threshold']} tokens per forward (the default). Decode steps (one token per "
        "question) stay under it and run bf16 except in the X-everywhere rows."
    )


def _caveats(report: dict[str, Any]) -> list[str]:
    device = report.get("device", "cpu")
    emulated = (report.get("formats") or {"emulated": ["fp8", "nvfp4", "mxfp4"]})["emulated"]
    native = (report.get("formats") or {}).get("native", [])
    out = []
    if device == "cpu":
        out.append(
            "- CPU run: fp8 (e4m3, rowwise scales), nvfp4 and mxfp4 are emulated (quantize, dequantize, bf16 grouped "
            "GEMM), so the table is about accuracy only; CPU timings mean nothing for the GPU kernels."
        )
    else:
        real = f"{', '.join(native)} ran real low-precision kernels; " if native else ""
        fake = (
            f"{', '.join(emulated)} ran emulated on this GPU (quantize, dequantize, bf16 grouped GEMM: the format's "
            "rounding, not its speed); "
            if emulated
            else ""
        )
        out.append(
            f"- {device} run: {real}{fake}timings are one GPU running virtual EP, not expert-parallel time; the speedup "
            "column is the cost model's."
        )
    if (report.get("tasks") or {"bundled_demo": True}).get("bundled_demo"):
        out += [
            "- Tiny model on procedural tasks: the text tasks' question spaces are small (one-digit sums and "
            "differences, 26 letters) and are memorised, while every held-out image is a new drawing. Absolute numbers "
            "say little about a real VLM; what carries over is the comparison between rows on one model and one "
            "question set.",
            "- Small perturbations rarely flip an answer of a model this confident: compare the answer-NLL column, "
            "which moves with every precision change even where exact match does not.",
        ]
    else:
        out.append(
            "- Procedural tasks: absolute numbers say little about a real VLM; what carries over is the comparison "
            "between rows on one model and one question set. The answer-NLL column moves with every precision change "
            "even where exact match does not."
        )
    return out


def to_markdown(report: dict[str, Any], command: str, date: str) -> str:
    lines = [
        f"# Accuracy of `{report['model']}` under ReaLB",
        "",
        f"Date: {date}. Machine: {report['machine']}.",
        "",
        "Command (from the repository root):",
        "",
        "```",
        command,
        "```",
        "",
        _model_sentence(report),
        "",
        _ep_sentence(report),
        "",
        "Columns: accuracy in % (image questions / text questions / all). *lowered pairs, prefill*: share of "
        "token-expert pairs of the prefill forwards computed in low precision (from `get_telemetry(model)`). "
        "*answer NLL*: mean negative log-likelihood (nats) of the right answer's first token under the prefill "
        "logits, per modality: it moves when a configuration perturbs the model even if no answer flips. "
        "*prefill layers lowered*: share of (prefill forward, MoE layer) pairs in which ReaLB lowered at least one "
        "rank or expert. *predicted MoE speedup*: mean over prefill layers of slowest-rank time before / after from "
        "ReaLB's cost model of the target GPU (fp8 0.78, fp4 0.6 of bf16 time), not a measurement on this machine.",
        "",
        *_bootstrap_text(report),
    ]
    for run in report["runs"]:
        lines += _run_section(report, run)
    if report.get("premise"):
        lines += _premise_section(report["premise"])
    lines += ["## Caveats", "", *_caveats(report)]
    lines += [
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


def _premise_section(premises: list[dict[str, Any]]) -> list[str]:
    lines = [
        "## Premise test: vision rows vs text rows",
        "",
        "`realb_hf.premise.RowLowering` forces rows to a low format outside ReaLB's policy: in every prefill MoE "
        "layer call it lowers the given share of the real (non-padding) tokens' rows, all drawn from vision tokens, "
        f"all from text tokens, or at random from both (seed {premises[0]['seed']}), on mixed batches; decode steps "
        "stay bf16. Intervals against bf16 on the same batches, as above; the findings compare vision rows with "
        "text rows directly (paired bootstrap of the two runs).",
        "",
    ]
    for premise in premises:
        lines += [*premise_markdown(premise), "", *premise_findings(premise), ""]
    return lines


def _bootstrap_text(report: dict[str, Any]) -> list[str]:
    boot = report.get("bootstrap")
    if not boot:
        return []
    return [
        "Intervals: paired bootstrap over questions (`realb_hf.bootstrap`): the per-question differences from the "
        f"stock bf16 row of the same batching are resampled with replacement {boot['n_resamples']} times (seed "
        f"{boot['seed']}) and the 2.5th / 97.5th percentiles of their mean bound the 95% interval. Δ exact match in "
        "points, Δ NLL in nats. An interval that contains 0 is *no measurable difference*; a row marked **worse** or "
        "better is one whose interval excludes 0.",
        "",
    ]


def _find(rows: list[dict], **want: Any) -> dict | None:
    """The first ReaLB row whose settings (what it sets, else the defaults) are `want`: rows are found by their
    configuration, whatever they are called."""
    return next(
        (r for r in rows if r["realb"] is not None and all(realb_setting(r["realb"], k) == v for k, v in want.items())),
        None,
    )


def _findings(rows: list[dict], base: dict, sizes: list[int]) -> list[str]:
    """Plain-language comparisons of the rows that answer the usual questions (target: within 1 point of bf16),
    per EP size."""
    out = []
    b = base["accuracy"]["overall"]

    def delta(r: dict) -> float:
        return (r["accuracy"]["overall"] - b) * 100

    def points(r: dict) -> str:
        """Δ overall exact match, with its interval and verdict when the row has them."""
        overall = r.get("vs_bf16", {}).get("overall")
        if overall is None:
            return f"{delta(r):+.1f} points"
        em = overall["exact_match"]
        return f"{describe(em, scale=100)} points, {em['verdict']}"

    off = _find(rows, policy="off")
    if off is not None:
        same = off["answers"] == base["answers"]
        out.append(
            f"- policy=off gives {'exactly the same answers as' if same else 'DIFFERENT answers from'} the stock model "
            "(the ReaLB experts module computes what the stock one does when it lowers nothing)."
        )

    def realb(ep: int, gran: str, md: float, low: str) -> dict | None:
        return _find(rows, policy="realb", ep_size=ep, granularity=gran, modality_threshold=md, low_precision=low)

    picks = [("bf16", base)]
    for ep in sizes:
        at = f"EP={ep}, " if len(sizes) > 1 else ""
        for low in ("fp8", "nvfp4"):
            for gran in ("rank", "expert"):
                r = realb(ep, gran, 0.7, low)
                if r is None:
                    continue
                verdict = "within" if abs(delta(r)) <= 1.0 else "NOT within"
                out.append(
                    f"- ReaLB {at}{gran} granularity, M_d=0.7, {low}: {r['accuracy']['overall'] * 100:.1f}% vs bf16 "
                    f"{b * 100:.1f}% ({points(r)}; {verdict} the 1-point target), with "
                    f"{r['prefill_lowered_token_fraction'] * 100:.1f}% of prefill token-expert pairs in {low} and "
                    f"{r['prefill_layers_lowered'] * 100:.0f}% of prefill MoE layers lowering something."
                )
        for low in ("fp8", "nvfp4"):
            r0, r9 = realb(ep, "rank", 0.0, low), realb(ep, "rank", 0.9, low)
            if r0 is not None and r9 is not None:
                out.append(
                    f"- Modality threshold, {at}rank granularity, {low}: M_d=0.0 lowers "
                    f"{r0['prefill_lowered_token_fraction'] * 100:.1f}% of prefill pairs ({points(r0)}), "
                    f"M_d=0.9 lowers {r9['prefill_lowered_token_fraction'] * 100:.1f}% ({points(r9)})."
                )
        for md, low in ((0.7, "fp8"), (0.7, "nvfp4"), (0.0, "nvfp4")):
            picks.append((f"ReaLB {at}rank M_d={md} {low}", realb(ep, "rank", md, low)))
    everywhere = [r for low in ("fp8", "nvfp4", "mxfp4") if (r := _find(rows, policy="all_low", low_precision=low))]
    picks += [(f"{r['realb']['low_precision']} everywhere", r) for r in everywhere]
    picks = [(label, r) for label, r in picks if r is not None and r.get("answer_nll")]
    if len(picks) > 1:
        out.append(
            "- Mean NLL of the right answer, image / text questions (nats): "
            + "; ".join(f"{label} {r['answer_nll']['image']:.4f} / {r['answer_nll']['text']:.4f}" for label, r in picks)
            + "."
        )
    if everywhere:
        out.append(
            "- Everything low (the FP4/FP8-everywhere baselines): "
            + "; ".join(f"{r['realb']['low_precision']} {points(r)}" for r in everywhere)
            + "."
        )
    return out
