"""`realb-hf` command line.

`realb-hf run` (the README's first command) builds a tiny Qwen3-VL-MoE from its config, sends one image+text
batch through it with ReaLB under virtual EP, and prints what every MoE layer saw and decided.
`realb-hf demo` serves the Gradio demo (demo/app.py, in a source checkout); `realb-hf save` / `realb-hf push` load a
model with ReaLB and save or upload it with a model card (realb_hf/hub.py).
"""

from __future__ import annotations

import argparse
import json
import sys

from .config import GRANULARITIES, LOW_PRECISION_CHOICES, POLICIES, WEIGHT_CACHES


def _format_report(records, summary: dict) -> str:
    lines = []
    for r in records:
        ranks = "  ".join(
            f"r{i}:{t:>4} tok {s * 100:>3.0f}% vis {p:<6}"
            for i, (t, s, p) in enumerate(zip(r.tokens_per_rank, r.vision_share_per_rank, r.precision_per_rank))
        )
        lines.append(f"{r.layer}\n    {ranks}")
        lines.append(
            f"    balancedness tokens {r.balancedness_tokens:.3f}  cost {r.balancedness_cost_before:.3f}"
            f" -> {r.balancedness_cost_after:.3f}  lowered {r.lowered_fraction * 100:.1f}% of tokens  "
            f"predicted layer speedup {r.predicted_speedup:.2f}x  ({r.reason})"
        )
    lines.append(
        f"summary: {summary['records']} layer records, {summary['layers_lowered']} lowered, "
        f"{summary['lowered_token_fraction'] * 100:.1f}% of token-expert pairs in low precision, "
        f"mean predicted layer speedup {summary['predicted_speedup']:.2f}x (target-hardware cost model)"
    )
    return "\n".join(lines)


def cmd_run(args: argparse.Namespace) -> int:
    import torch

    from . import RealbConfig, apply_realb, get_telemetry
    from .tiny import build_tiny_model, qwen3_vl_image_batch, tiny_qwen3_vl_moe_config

    config = RealbConfig(
        low_precision=args.low_precision,
        policy=args.policy,
        ep_size=args.ep_size,
        batch_threshold=args.batch_threshold,
        modality_threshold=args.modality_threshold,
        imbalance_threshold=args.imbalance_threshold,
        granularity=args.granularity,
        weight_cache=args.weight_cache,
    )
    model_config = tiny_qwen3_vl_moe_config(num_experts=args.num_experts)
    model = apply_realb(build_tiny_model(model_config, seed=args.seed), config)
    batch = qwen3_vl_image_batch(batch=args.batch, grid=(args.grid, args.grid), seed=args.seed, config=model_config)
    tokens = batch.kwargs["input_ids"].numel()
    print(
        f"tiny Qwen3-VL-MoE ({model_config.text_config.num_experts} experts, top-"
        f"{model_config.text_config.num_experts_per_tok}), batch of {args.batch} image+text requests = {tokens} tokens "
        f"({batch.num_image_tokens} image), virtual EP={args.ep_size}, policy={args.policy}"
    )
    with torch.no_grad():
        model(**batch.kwargs)
    telemetry = get_telemetry(model)
    print(_format_report(telemetry.last_forward(), telemetry.summary()))
    if args.json:
        telemetry.to_json(args.json)
        print(f"telemetry written to {args.json}")
    return 0


def _find_demo():
    """`demo.app.main`, importable from a source checkout (the demo is not part of the installed package)."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    if not (root / "demo" / "app.py").is_file():
        raise ValueError("the demo ships with the source checkout (demo/app.py); run it from a clone of the repository")
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    from demo.app import main as demo_main

    return demo_main


def cmd_demo(args: argparse.Namespace) -> int:
    demo_args = args.demo_args[1:] if args.demo_args[:1] == ["--"] else args.demo_args
    return _find_demo()(demo_args, prog="realb-hf demo")


def _realb_config_from_args(args: argparse.Namespace):
    """A RealbConfig with only the knobs given on the command line (the rest keep the saved values)."""
    from . import RealbConfig

    names = (
        "policy",
        "low_precision",
        "granularity",
        "weight_cache",
        "ep_size",
        "batch_threshold",
        "modality_threshold",
        "imbalance_threshold",
    )
    return RealbConfig(**{n: getattr(args, n) for n in names if getattr(args, n) is not None})


def _accuracy_arg(value: str | None):
    """--accuracy-table: a .json file (rows or {row: {col: value}}) or a markdown file, inserted as is."""
    if value is None:
        return None
    from pathlib import Path

    path = Path(value)
    text = path.read_text()
    return json.loads(text) if path.suffix == ".json" else text


def _card_kwargs(args: argparse.Namespace) -> dict:
    return dict(
        base_model=args.base_model,
        telemetry=args.telemetry,
        accuracy_table=_accuracy_arg(args.accuracy_table),
        license=args.license,
    )


def cmd_save(args: argparse.Namespace) -> int:
    from .hub import load_with_realb, save_with_card

    model, processor = load_with_realb(args.source, _realb_config_from_args(args), device=args.device)
    path = save_with_card(model, processor, args.out, **_card_kwargs(args))
    print(f"saved {args.source} with ReaLB and a model card to {path}")
    return 0


def cmd_push(args: argparse.Namespace) -> int:
    from .hub import load_with_realb, push_with_card

    model, processor = load_with_realb(args.source, _realb_config_from_args(args), device=args.device)
    info = push_with_card(
        model,
        args.repo_id,
        processor,
        private=args.private or None,
        revision=args.revision,
        create_pr=args.create_pr,
        commit_message=args.commit_message,
        **_card_kwargs(args),
    )
    print(f"pushed {args.source} with ReaLB and a model card to {args.repo_id}: {getattr(info, 'commit_url', info)}")
    return 0


def _add_hub_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base-model", help="Hub id of the base model, for the card (default: the source if a Hub id)")
    p.add_argument("--telemetry", help="telemetry JSON (realb-hf run --json, Telemetry.to_json) summarised in the card")
    p.add_argument("--accuracy-table", help="accuracy table for the card: .json rows, or a markdown file")
    p.add_argument("--license", help="license id for the card metadata")
    p.add_argument("--device", default="cpu", help="where to load the model (default cpu)")
    knobs = p.add_argument_group("ReaLB settings to save (default: the source's saved values, else the defaults)")
    knobs.add_argument("--policy", choices=POLICIES)
    knobs.add_argument("--low-precision", choices=LOW_PRECISION_CHOICES)
    knobs.add_argument("--granularity", choices=GRANULARITIES)
    knobs.add_argument("--weight-cache", choices=WEIGHT_CACHES)
    knobs.add_argument("--ep-size", type=int)
    knobs.add_argument("--batch-threshold", type=int)
    knobs.add_argument("--modality-threshold", type=float)
    knobs.add_argument("--imbalance-threshold", type=float)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="realb-hf", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run a tiny image+text batch through a ReaLB model and print the report")
    run.add_argument("--policy", choices=POLICIES, default="realb")
    run.add_argument("--low-precision", choices=LOW_PRECISION_CHOICES, default="auto")
    run.add_argument("--granularity", choices=GRANULARITIES, default="rank")
    run.add_argument("--weight-cache", choices=WEIGHT_CACHES, default="on_the_fly")
    run.add_argument("--ep-size", type=int, default=4)
    run.add_argument("--num-experts", type=int, default=16)
    run.add_argument("--batch", type=int, default=8, help="image+text requests in the batch")
    run.add_argument("--grid", type=int, default=16, help="image patch grid side (tokens per image = grid^2 / 4)")
    run.add_argument("--batch-threshold", type=int, default=256, help="tokens below which nothing is lowered")
    run.add_argument("--modality-threshold", type=float, default=0.7)
    run.add_argument("--imbalance-threshold", type=float, default=0.1)
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--json", help="also write the telemetry to this JSON file")
    run.set_defaults(func=cmd_run)

    demo = sub.add_parser(
        "demo",
        add_help=False,
        help="serve the Gradio demo on 127.0.0.1 (options: realb-hf demo --help)",
    )
    demo.add_argument("demo_args", nargs=argparse.REMAINDER)
    demo.set_defaults(func=cmd_demo)

    save = sub.add_parser("save", help="load a model with ReaLB and save it with a model card (README.md)")
    save.add_argument("source", help="local model folder or Hub id")
    save.add_argument("out", help="folder to write")
    _add_hub_options(save)
    save.set_defaults(func=cmd_save)

    push = sub.add_parser(
        "push",
        help="load a model with ReaLB and upload it with a model card; token from HF_TOKEN or `hf auth login`",
    )
    push.add_argument("source", help="local model folder or Hub id")
    push.add_argument("repo_id", help="target repo, e.g. me/qwen3-vl-realb (created if missing)")
    push.add_argument("--private", action="store_true", help="create the repo private (if it does not exist yet)")
    push.add_argument("--revision", help="branch to push to")
    push.add_argument("--create-pr", action="store_true", help="open a pull request instead of committing")
    push.add_argument("--commit-message", default="Upload ReaLB model with realb_hf")
    _add_hub_options(push)
    push.set_defaults(func=cmd_push)

    # Forwarded whole to `python -m realb_hf.bench` (see main), listed here for --help.
    sub.add_parser(
        "bench", add_help=False, help="layer/model benchmarks: realb-hf bench {layer,model,trace-info} --help"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["bench"]:
        from .bench.__main__ import main as bench_main

        return bench_main(argv[1:])
    if argv[:1] == ["demo"]:  # everything after `demo` (including --help) belongs to the demo's own parser
        argv = ["demo", "--", *argv[1:]]
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except ValueError as err:  # bad option combinations are reported, not dumped as tracebacks
        print(f"realb-hf: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["build_parser", "main"]
