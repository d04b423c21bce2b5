"""`realb-hf` command line.

`realb-hf run` (the README's first command) builds a tiny Qwen3-VL-MoE from its config, sends one image+text
batch through it with ReaLB under virtual EP, and prints what every MoE layer saw and decided.
"""

from __future__ import annotations

import argparse
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
    return parser


def main(argv: list[str] | None = None) -> int:
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
