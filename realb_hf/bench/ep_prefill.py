"""End-to-end prefill under real expert parallelism (torchrun, NCCL): stock bf16 EP vs ReaLB vs fp8 everywhere.

    torchrun --nproc_per_node 4 -m realb_hf.bench.ep_prefill --layers 8 --out ep_prefill.json
    torchrun --nproc_per_node 2 -m realb_hf.bench.ep_prefill --preset tiny --layers 2 --request-tokens 64  # CPU smoke

Qwen3-VL-30B-A3B's real configuration (`bench.model.QWEN3_VL_30B_A3B`; `--layers` cuts the 48 decoder layers to
keep the random-weight checkpoint small: every decoder layer costs the same, the vision tower is complete) with
random weights: rank 0 builds it on its GPU and writes a checkpoint, then every rank loads it with
`DistributedConfig(tp_size=N, ep_size=N, ep_implementation=--mode)`, once stock and once with ReaLB. The batch is
`--requests` image+text requests of `--request-tokens` tokens (`--vision-share` image tokens), identical on every
rank. Vision-skewed routing comes from the BENCHMARK-ONLY `VisionRouterBias` (calibrated on the stock model so that
the mean over layers of the max/mean EP rank load reaches `--skew`), applied identically to every variant.

Timed: one prefill forward (`use_cache=False`, logits of the last position), CUDA events, median of `--repeats`,
the slowest rank; prefill tokens/s = batch tokens / that time. Variants, same run, same batch: stock transformers
bf16 EP; ReaLB policy off; ReaLB's bf16 pipeline lowering nothing (the reference of the precision lever's own
gain); ReaLB (rank granularity) with on_the_fly weights (with and without the conversion counted by the cost
model) and persistent weights; fp8 everywhere
(ReaLB all_low, persistent). Rank 0 prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
import torch.distributed as dist

from ..policy import DEFAULT_CONVERSION_COST
from .compiled import NOTHING_LOWERED, ratio

NOTHING_LOWERED_VARIANT = "realb nothing lowered (bf16 pipeline)"
REALB_VARIANTS = {
    "realb policy off": dict(policy="off"),
    NOTHING_LOWERED_VARIANT: dict(NOTHING_LOWERED, weight_cache="on_the_fly"),
    "realb rank, on_the_fly": dict(policy="realb", weight_cache="on_the_fly"),
    # the cost model counting each lowered expert's conversion (RealbConfig.conversion_cost)
    "realb rank, on_the_fly, conversion counted": dict(
        policy="realb", weight_cache="on_the_fly", conversion_cost=DEFAULT_CONVERSION_COST
    ),
    "realb rank, persistent": dict(policy="realb", weight_cache="persistent"),
    "fp8 everywhere (all_low, persistent)": dict(policy="all_low", weight_cache="persistent"),
}


def log(msg: str) -> None:
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(msg, flush=True)


def build_checkpoint(path: str, preset: str, layers: int, device: torch.device) -> None:
    """Rank 0: the random-weight model in a checkpoint EP can load (`save_for_expert_parallel`)."""
    from ..ep import save_for_expert_parallel
    from .model import build_model, model_config

    if dist.get_rank() == 0 and not Path(path, "config.json").exists():
        t0 = time.perf_counter()
        model = build_model(model_config(preset, layers), device)
        save_for_expert_parallel(model, path)
        del model
        log(f"checkpoint: {layers} decoder layers written in {time.perf_counter() - t0:.0f} s")
    dist.barrier()


def load(path: str, mode: str, realb: dict | None, batch_threshold: int = 2048):
    from transformers import AutoModelForImageTextToText
    from transformers.distributed import DistributedConfig

    from .. import RealbConfig

    world = dist.get_world_size()
    extra = {}
    if realb is not None:
        extra["quantization_config"] = RealbConfig(
            low_precision="fp8", ep_size=world, batch_threshold=batch_threshold, **realb
        )
    dc = DistributedConfig(tp_size=world, ep_size=world, ep_implementation=mode)
    return AutoModelForImageTextToText.from_pretrained(
        path, dtype=torch.bfloat16, distributed_config=dc, **extra
    ).eval()


def time_prefill(model, batch, warmup: int, repeats: int, device: torch.device) -> dict:
    """Slowest rank's median ms of one prefill forward ("ms"), and back to back ("back_to_back_ms")."""
    from .ep_layer import Timer
    from .prefill_batch import prefill_forward

    with torch.no_grad():
        return Timer(device)(lambda: prefill_forward(model, batch), repeats, warmup)


def run(args) -> dict:
    from .. import get_runtime, get_telemetry
    from ..ep import init_distributed
    from .model import model_config
    from .prefill_batch import image_text_batch
    from .router_bias import VisionRouterBias, calibrate_bias, measure_skew

    rank, world, device = init_distributed(timeout_s=1800)
    workdir = args.workdir or os.path.join(tempfile.gettempdir(), "realb_ep_prefill")
    path = os.path.join(workdir, f"{args.preset}_{args.layers}l")
    build_checkpoint(path, args.preset, args.layers, device)
    config = model_config(args.preset, args.layers)
    batch = image_text_batch(
        config, args.requests, args.request_tokens, args.vision_share, device, torch.bfloat16, seed=args.seed
    )
    num_experts = config.text_config.num_experts
    hot = list(range(num_experts // world))  # the experts of EP rank 0

    out = {
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (gloo): a smoke test, not a timing",
        "preset": args.preset,
        "world_size": world,
        "mode": args.mode,
        "layers": args.layers,
        "batch_tokens": batch.tokens,
        "vision_share": batch.vision_share,
        "requests": args.requests,
        "torch": torch.__version__,
        "date": datetime.date.today().isoformat(),
        "variants": {},
    }
    stock = load(path, args.mode, None)
    biaser = VisionRouterBias(stock, hot)
    biaser.codes = batch.codes
    if args.router_bias is None:
        bias, skew = calibrate_bias(stock, batch, biaser, args.skew, world, iters=args.calibration_iters)
    else:
        bias = args.router_bias
        per_layer = measure_skew(stock, batch, biaser, bias, world)
        skew = sum(per_layer) / len(per_layer)
    biaser.bias = bias
    out.update(router_bias=bias, mean_max_over_mean=skew)
    log(f"batch {batch.tokens} tokens ({batch.vision_share:.0%} vision), router bias {bias:.3f} -> skew {skew:.2f}")
    timed = time_prefill(stock, batch, args.warmup, args.repeats, device)
    ms = timed["ms"]
    out["variants"]["stock bf16 EP"] = {
        "ms": ms, "back_to_back_ms": timed["back_to_back_ms"], "tokens_per_s": batch.tokens / ms * 1e3
    }
    log(f"stock bf16 EP: {ms:.1f} ms")
    biaser.remove()
    del stock

    realb = load(path, args.mode, dict(policy="off"), args.batch_threshold)
    biaser = VisionRouterBias(realb, hot, bias)
    biaser.codes = batch.codes
    runtime = get_runtime(realb)
    # what a variant does not set is the model's own (the nothing-lowered variant changes the imbalance threshold)
    base = {k: getattr(runtime.config, k) for k in ("imbalance_threshold", "conversion_cost")}
    for name in args.variants:
        runtime.reconfigure(**{**base, **REALB_VARIANTS[name]})
        for module in realb.modules():
            if hasattr(module, "realb_free_cache"):
                module.realb_free_cache()
        runtime.telemetry.extra_memory_bytes = 0
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        timed = time_prefill(realb, batch, args.warmup, args.repeats, device)
        ms = timed["ms"]
        summary = get_telemetry(realb).summary()
        out["variants"][name] = {
            "ms": ms,
            "back_to_back_ms": timed["back_to_back_ms"],
            "tokens_per_s": batch.tokens / ms * 1e3,
            "layers_lowered_per_forward": summary["layers_lowered"] / max(1, summary["forwards"]),
            "lowered_token_fraction": summary["lowered_token_fraction"],
            "extra_memory_gb_rank": runtime.telemetry.extra_memory_bytes / 1e9,
        }
        if device.type == "cuda":
            out["variants"][name]["peak_memory_gb_rank"] = torch.cuda.max_memory_allocated(device) / 1e9
        runtime.telemetry.reset()
        log(f"{name}: {ms:.1f} ms")
    base = out["variants"]["stock bf16 EP"]["ms"]
    nothing = out["variants"].get(NOTHING_LOWERED_VARIANT, {}).get("ms")
    for v in out["variants"].values():
        v["speedup_vs_stock"] = base / v["ms"]
        v["speedup_vs_nothing_lowered"] = ratio(nothing, v["ms"])  # the precision lever's own gain
    if not args.workdir and rank == 0:
        shutil.rmtree(workdir, ignore_errors=True)
    return out


def print_table(out: dict) -> None:
    log(
        f"\n{out['gpu']} x{out['world_size']}, {out['mode']}, {out['layers']} decoder layers, "
        f"{out['batch_tokens']} tokens ({out['vision_share']:.0%} vision), skew {out['mean_max_over_mean']:.2f}"
    )
    log(
        "| variant | prefill ms | back to back ms | tokens/s | vs stock | vs ReaLB nothing lowered |\n"
        "|---|---|---|---|---|---|"
    )
    for name, v in out["variants"].items():
        lever = "-" if v["speedup_vs_nothing_lowered"] is None else f"{v['speedup_vs_nothing_lowered']:.2f}x"
        log(
            f"| {name} | {v['ms']:.1f} | {v['back_to_back_ms']:.1f} | {v['tokens_per_s']:.0f} "
            f"| {v['speedup_vs_stock']:.2f}x | {lever} |"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", choices=["qwen3-vl-30b-a3b", "tiny"], default="qwen3-vl-30b-a3b")
    parser.add_argument("--layers", type=int, default=8, help="decoder layers (48 in the real model)")
    parser.add_argument("--mode", choices=["all_reduce", "all_to_all"], default="all_reduce")
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--request-tokens", type=int, default=1024)
    parser.add_argument("--vision-share", type=float, default=0.7)
    parser.add_argument("--skew", type=float, default=1.6, help="target mean max/mean EP rank load")
    parser.add_argument("--router-bias", type=float, help="BENCHMARK-ONLY vision router bias; skips calibration")
    parser.add_argument("--calibration-iters", type=int, default=4)
    parser.add_argument("--batch-threshold", type=int, default=2048, help="RealbConfig.batch_threshold")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", help="keep the checkpoint here (default: a temporary directory, removed)")
    parser.add_argument(
        "--variants", nargs="+", default=list(REALB_VARIANTS), choices=list(REALB_VARIANTS), metavar="VARIANT",
        help=f"ReaLB variants to time, in this order, after stock (default: all: {list(REALB_VARIANTS)})",
    )
    parser.add_argument("--out", help="JSON report (rank 0)")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    out = run(args)
    print_table(out)
    if args.out and dist.get_rank() == 0:
        Path(args.out).write_text(json.dumps(out, indent=1))
    with contextlib.suppress(Exception):
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
