"""Run a model with expert parallelism (transformers' DistributedConfig) and ReaLB; every rank's ReaLB telemetry is
gathered on rank 0, printed, and saved as one JSON report.

    # the tiny Qwen3-VL-MoE of realb_hf.tiny (no download; CPU: gloo, GPU: NCCL)
    torchrun --nproc_per_node 2 integrations/torchrun/run_ep.py
    # a local checkpoint or Hub id, an image+text prompt, all-to-all token movement
    torchrun --nproc_per_node 8 integrations/torchrun/run_ep.py --model Qwen/Qwen3-VL-30B-A3B-Instruct \\
        --image photo.jpg --prompt "Describe this image." --ep-implementation all_to_all --out realb_ep.json
    # two nodes of 8 GPUs, one EP group of 16 (run the same line on both nodes)
    torchrun --nnodes 2 --nproc_per_node 8 --rdzv-backend c10d --rdzv-endpoint NODE0_HOST:29500 --rdzv-id realb \\
        integrations/torchrun/run_ep.py --model ... --ep-implementation all_to_all

`accelerate launch --num_processes N integrations/torchrun/run_ep.py ...` starts the same processes (accelerate
sets the same RANK / WORLD_SIZE / LOCAL_RANK / MASTER_* variables); see docs/distributed.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

try:
    import realb_hf
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    import realb_hf

import torch
import torch.distributed as dist

from realb_hf.config import GRANULARITIES, LOW_PRECISION_CHOICES, POLICIES, WEIGHT_CACHES
from realb_hf.ep import configure_ep, gather_report, init_distributed, save_for_expert_parallel


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help="local path or Hub id (default: the tiny Qwen3-VL-MoE, built locally)")
    p.add_argument(
        "--layout",
        choices=("tp", "fsdp"),
        default="tp",
        help="tp: DistributedConfig(tp_size=N, ep_size=N) (one shared batch); "
        "fsdp: DistributedConfig(fsdp_size=N, ep_size=N) (a batch per rank, all-to-all only)",
    )
    p.add_argument("--ep-implementation", default="auto", choices=("auto", "all_reduce", "all_to_all"))
    p.add_argument(
        "--replicate-dense",
        action="store_true",
        help="tp layout: keep attention/dense layers whole on every rank (only the experts are split)",
    )
    p.add_argument("--policy", default="realb", choices=POLICIES)
    p.add_argument("--rank-precisions", default=None, help='policy=static: e.g. "0=low,3=nvfp4" (others high)')
    p.add_argument("--low-precision", default="auto", choices=LOW_PRECISION_CHOICES)
    p.add_argument("--granularity", default="rank", choices=GRANULARITIES)
    p.add_argument("--weight-cache", default="on_the_fly", choices=WEIGHT_CACHES)
    p.add_argument("--modality-threshold", type=float, default=0.7)
    p.add_argument("--batch-threshold", type=int, default=None, help="default: 2048 (0 for the tiny model)")
    p.add_argument("--imbalance-threshold", type=float, default=0.1)
    p.add_argument("--no-side-stream", action="store_true", help="convert lowered weights inline (no CUDA side stream)")
    p.add_argument("--no-fp8-dispatch", action="store_true", help="all-to-all: send bf16 rows to fp8 ranks too")
    p.add_argument("--prompt", default="Describe this image.", help="text prompt (models other than the tiny one)")
    p.add_argument("--image", default=None, help="image file for a multimodal model (through its processor)")
    p.add_argument("--batch", type=int, default=4, help="tiny model: image+text requests per batch")
    p.add_argument("--grid", type=int, default=16, help="tiny model: image patch grid (grid x grid)")
    p.add_argument("--max-new-tokens", type=int, default=0, help="0: one prefill forward; >0: generate")
    p.add_argument("--timeout", type=float, default=600.0, help="collective timeout in seconds (a dead rank -> error)")
    p.add_argument("--out", default="realb_ep_report.json", help="JSON report written by rank 0")
    return p.parse_args(argv)


def _rank_precisions(text: str | None) -> dict[int, str] | None:
    if not text:
        return None
    return {int(k): v for k, v in (item.split("=") for item in text.split(","))}


def _tiny_checkpoint() -> str:
    from realb_hf.tiny import build_tiny_model, tiny_qwen3_vl_moe_config

    path = [None]
    if dist.get_rank() == 0:
        path[0] = tempfile.mkdtemp(prefix="realb_tiny_qwen3_vl_moe_")
        save_for_expert_parallel(build_tiny_model(tiny_qwen3_vl_moe_config(), seed=0), path[0])
    dist.broadcast_object_list(path, src=0)
    return path[0]


def _distributed_config(args, world: int, model_class, path: str):
    from transformers import AutoConfig
    from transformers.distributed import DistributedConfig

    if args.layout == "fsdp":
        return DistributedConfig(fsdp_size=world, ep_size=world, ep_implementation=args.ep_implementation)
    extra = {}
    if args.replicate_dense:
        with torch.device("meta"):
            meta = model_class.from_config(AutoConfig.from_pretrained(path))
        extra["tp_plan"] = {key: "replicate" for key in meta.tp_plan}
    return DistributedConfig(tp_size=world, ep_size=world, ep_implementation=args.ep_implementation, **extra)


def _inputs(args, model, path: str, tiny: bool, rank: int) -> dict:
    if tiny:
        from realb_hf.tiny import qwen3_vl_image_batch

        seed = rank if args.layout == "fsdp" else 0  # fsdp: every rank its own batch
        return qwen3_vl_image_batch(
            batch=args.batch, grid=(args.grid, args.grid), seed=seed, config=model.config
        ).kwargs
    if args.image is not None:
        from transformers import AutoProcessor

        processor = AutoProcessor.from_pretrained(path)
        messages = [
            {"role": "user", "content": [{"type": "image", "image": args.image}, {"type": "text", "text": args.prompt}]}
        ]
        return dict(
            processor.apply_chat_template(
                messages, tokenize=True, add_generation_prompt=True, return_dict=True, return_tensors="pt"
            )
        )
    from transformers import AutoTokenizer

    return dict(AutoTokenizer.from_pretrained(path)(args.prompt, return_tensors="pt"))


def _print_report(report: dict) -> None:
    ranks = report["ranks"]
    records = ranks[0]["telemetry"]["records"]
    ran = [{(a["forward"], a["layer"]): a for a in r["applied"]} for r in ranks]
    print(
        f"\nReaLB under EP={report['ep_size']} ({report['implementation']}), world {report['world_size']}: "
        f"{len(records)} layer records, decisions identical on every rank: {report['decisions_agree']}"
    )
    for rec in records:
        key = (rec["forward"], rec["layer"])
        per_rank = "  ".join(
            f"r{i}:{t:>5} pairs {s * 100:>3.0f}% vis {p:<6}{'*' if ran[i].get(key, {}).get('fp8_dispatch') else ' '}"
            for i, (t, s, p) in enumerate(
                zip(rec["tokens_per_rank"], rec["vision_share_per_rank"], rec["precision_per_rank"])
            )
        )
        print(
            f"fwd {rec['forward']} {rec['layer']}  ({rec['reason']}, predicted x{rec['predicted_speedup']:.2f})\n    {per_rank}"
        )
    s = report["summary"]
    print(
        f"summary: {s['layers_lowered']}/{s['records']} layer records lowered, "
        f"{s['lowered_token_fraction'] * 100:.1f}% of token-expert pairs in low precision, "
        f"mean predicted layer speedup x{s['predicted_speedup']:.2f}; * = received fp8 tokens"
    )
    print(f"persistent low-precision copies per rank (bytes): {report['per_rank_extra_memory_bytes']}")
    print(f"bytes moved by ReaLB's EP path per rank: {report['per_rank_comm_bytes']}")


def main(argv=None) -> int:
    args = parse_args(argv)
    warnings.filterwarnings("ignore")
    rank, world, device = init_distributed(timeout_s=args.timeout)
    if world < 2:
        print("run_ep.py needs at least 2 processes: torchrun --nproc_per_node N ...", file=sys.stderr)
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

    tiny = args.model is None
    path = _tiny_checkpoint() if tiny else args.model
    config = AutoConfig.from_pretrained(path)
    model_class = AutoModelForImageTextToText if hasattr(config, "vision_config") else AutoModelForCausalLM
    batch_threshold = args.batch_threshold if args.batch_threshold is not None else (0 if tiny else 2048)
    realb_config = realb_hf.RealbConfig(
        policy=args.policy,
        rank_precisions=_rank_precisions(args.rank_precisions),
        ep_size=world if args.rank_precisions else 1,  # 1: taken from the EP world
        low_precision=args.low_precision,
        granularity=args.granularity,
        weight_cache=args.weight_cache,
        modality_threshold=args.modality_threshold,
        batch_threshold=batch_threshold,
        imbalance_threshold=args.imbalance_threshold,
    )
    t0 = time.perf_counter()
    model = model_class.from_pretrained(
        path,
        dtype=torch.bfloat16,
        quantization_config=realb_config,
        distributed_config=_distributed_config(args, world, model_class, path),
    ).eval()
    configure_ep(model, side_stream=not args.no_side_stream, fp8_dispatch=not args.no_fp8_dispatch)
    load_s = time.perf_counter() - t0
    inputs = {
        k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in _inputs(args, model, path, tiny, rank).items()
    }
    t0 = time.perf_counter()
    with torch.no_grad():
        if args.max_new_tokens > 0:
            model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False)
        else:
            model(**inputs)
    run_s = time.perf_counter() - t0
    report = gather_report(model)
    if rank == 0:
        report["run"] = {
            "model": args.model or "tiny qwen3_vl_moe",
            "layout": args.layout,
            "load_s": load_s,
            "run_s": run_s,
            "realb_config": realb_config.to_dict(),
            "device": str(device),
        }
        _print_report(report)
        Path(args.out).write_text(json.dumps(report, indent=1, default=str))
        print(f"report: {args.out} (load {load_s:.1f} s, run {run_s:.2f} s)")
    dist.barrier()
    if tiny and rank == 0:
        shutil.rmtree(path, ignore_errors=True)
    with contextlib.suppress(Exception):
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
