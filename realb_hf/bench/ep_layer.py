"""One MoE layer under real expert parallelism, timed per token movement; launched by torchrun (NCCL on GPUs).

    torchrun --nproc_per_node 4 -m realb_hf.bench.ep_layer --out ep_layer.json             # 2-8 GPUs
    torchrun --nproc_per_node 2 -m realb_hf.bench.ep_layer --tiny --out ep_layer.json      # CPU smoke (gloo)

One MoE layer at Qwen3-VL-30B-A3B text dims (hidden 2048, moe_intermediate 768, 128 experts, top-8; `--tokens`
16384 tokens, 70% vision, routing skewed so that EP rank 0 holds `--skew` times the mean load), rank 0 lowered to
fp8, in each token movement: transformers' stock layer, ReaLB with policy off, ReaLB fp8 with the weight
conversion on a side stream, the same converting inline, without fp8 dispatch, and with persistent fp8 copies (no
conversion); plus the conversion alone and a bf16 all-to-all of the dispatch's size; the dynamic policy (decided
from the routing, on the device where the device executor runs), with persistent copies, converting on the fly,
and converting on the fly with the conversion counted by its cost model (`RealbConfig.conversion_cost`); and the
oracle bound (stock on routing with the same pairs spread evenly over the ranks). CUDA events; the slowest rank's
median of isolated calls, and the time per call of calls queued back to back (how a layer runs inside a model).
`--profile N` also profiles N calls of every variant on every rank (`realb_hf.bench.profiling`: GPU compute /
communication / idle time, top kernels and host ops, the host time of ReaLB's labelled stages).

Rank 0 prints a table and writes everything (with the gathered ReaLB report of every rank) as JSON to --out. On
CPU only `--tiny` runs (a smoke test: no side stream, and the timings are noise). The equality of real EP with one
process is checked by the harness in the repository's tests (`tests/ep_check.py`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
import torch.distributed as dist

from .. import RealbConfig, get_runtime, get_telemetry
from ..ep import configure_ep, gather_report, init_distributed, save_for_expert_parallel
from ..experts import Prefetch
from ..policy import DEFAULT_CONVERSION_COST
from .profiling import profile_calls

MODES = ("all_reduce", "all_to_all")
CONVERSION_COUNTED = f"ReaLB policy realb, on_the_fly, conversion counted ({DEFAULT_CONVERSION_COST:g})"


def log(msg: str) -> None:
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(msg, flush=True)


def shared_dir(prefix: str) -> str:
    """A fresh directory made by rank 0, its path given to every rank (one machine)."""
    path = [tempfile.mkdtemp(prefix=prefix) if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(path, src=0)
    return path[0]


def skewed_routing(tokens, num_experts, top_k, ep_size, vision_share, skew, seed=0):
    """(top_k_index, top_k_weights, modality codes): vision tokens lean towards EP rank 0's experts so that rank 0
    holds about `skew` times the mean load (bisection on the bias)."""
    gen = torch.Generator().manual_seed(seed)
    noise = -torch.log(-torch.log(torch.rand(tokens, num_experts, generator=gen).clamp(1e-9, 1 - 1e-9)))
    vision = torch.zeros(tokens, dtype=torch.bool)
    vision[: round(tokens * vision_share)] = True
    vision = vision[torch.randperm(tokens, generator=gen)]
    hot = torch.zeros(num_experts)
    hot[: num_experts // ep_size] = 1.0

    def route(bias):
        logits = noise + bias * hot * vision[:, None].float()
        values, ids = torch.topk(logits, top_k, dim=-1)
        loads = torch.bincount(ids.reshape(-1), minlength=num_experts).view(ep_size, -1).sum(-1).float()
        return ids, values, (loads.max() / loads.mean()).item()

    lo, hi = 0.0, 20.0
    for _ in range(30):
        mid = (lo + hi) / 2
        if route(mid)[2] < skew:
            lo = mid
        else:
            hi = mid
    ids, values, achieved = route(hi)
    weights = torch.softmax(values, dim=-1)
    codes = vision.to(torch.int8)
    return ids, weights, codes, achieved


def local_shards(module: torch.nn.Module):
    """Inside: the module's EP-sharded parameters read as this rank's local tensors, as its EP forward reads them
    (transformers' `ep_dispatch_experts` style puts this context around the experts; the style does not use the
    mesh argument for it)."""
    from transformers.distributed.parallel_utils import ALL_PARALLEL_STYLES

    return ALL_PARALLEL_STYLES["ep_dispatch_experts"].context_around_forward(module, None)


def _layer_call(module, hidden, ids, weights) -> None:
    with torch.no_grad():
        module(hidden, ids, weights)


class Timer:
    """Slowest rank's median of isolated calls ("ms"), this rank's ("rank_ms"), and the slowest rank's time per
    call of calls queued back to back ("back_to_back_ms"); with `profiled_calls`, a profile of that many calls per
    rank ("profile_per_rank")."""

    def __init__(self, device, profiled_calls: int = 0):
        self.cuda = device.type == "cuda"
        self.profiled_calls = profiled_calls

    def __call__(self, fn, iters: int, warmup: int) -> dict:
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(iters):
            if self.cuda:
                torch.cuda.synchronize()
            dist.barrier()
            if self.cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e3)
        local = statistics.median(times)
        # back to back: `iters` calls queued without a sync between them, as layers run inside a model (host
        # work of a call overlaps the GPU work of the previous one unless the code waits for the GPU)
        if self.cuda:
            torch.cuda.synchronize()
        dist.barrier()
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        if self.cuda:
            torch.cuda.synchronize()
        back_to_back = (time.perf_counter() - t0) * 1e3 / iters
        slowest = torch.tensor([local, back_to_back], dtype=torch.float64, device="cuda" if self.cuda else "cpu")
        dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
        result = {"ms": slowest[0].item(), "rank_ms": local, "back_to_back_ms": slowest[1].item()}
        if self.profiled_calls:
            dist.barrier()
            per_rank = [None] * dist.get_world_size()
            dist.all_gather_object(per_rank, profile_calls(fn, self.profiled_calls, before=dist.barrier))
            result["profile_per_rank"] = per_rank
        return result


def build_timing_checkpoint(workdir: str, dims: dict, device: torch.device) -> str:
    from transformers import AutoModelForCausalLM, Qwen3MoeConfig

    path = os.path.join(workdir, "qwen3_moe_layer")
    if dist.get_rank() == 0:
        config = Qwen3MoeConfig(
            vocab_size=256,
            hidden_size=dims["hidden"],
            intermediate_size=dims["inter"] * 2,
            moe_intermediate_size=dims["inter"],
            num_experts=dims["experts"],
            num_experts_per_tok=dims["top_k"],
            num_hidden_layers=1,
            num_attention_heads=max(1, dims["hidden"] // 128),
            num_key_value_heads=max(1, dims["hidden"] // 512),
            head_dim=min(128, dims["hidden"]),
            decoder_sparse_step=1,
            mlp_only_layers=[],
            norm_topk_prob=True,
        )
        torch.manual_seed(0)
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        save_for_expert_parallel(model, path)
        del model
    dist.barrier()
    return path


def run_timing(args, device: torch.device) -> dict:
    from transformers import AutoModelForCausalLM
    from transformers.distributed import DistributedConfig

    world = dist.get_world_size()
    if args.tiny:
        dims = dict(hidden=64, inter=96, experts=8 * world, top_k=2, tokens=args.tokens or 512)
    else:
        dims = dict(hidden=2048, inter=768, experts=128, top_k=8, tokens=args.tokens or 16384)
    workdir = args.workdir or shared_dir("realb_ep_timing_")
    path = build_timing_checkpoint(workdir, dims, device)
    ids, weights, codes, achieved = skewed_routing(
        dims["tokens"], dims["experts"], dims["top_k"], world, args.vision_share, args.skew
    )
    balanced_ids = skewed_routing(dims["tokens"], dims["experts"], dims["top_k"], world, args.vision_share, 1.0)[0]
    balanced_ids = balanced_ids.to(device)
    gen = torch.Generator().manual_seed(1)
    hidden = (torch.randn(dims["tokens"], dims["hidden"], generator=gen) * 0.5).to(torch.bfloat16).to(device)
    ids, weights, codes = ids.to(device), weights.to(torch.bfloat16).to(device), codes.to(device)
    loads = torch.bincount(ids.reshape(-1).cpu(), minlength=dims["experts"]).view(world, -1).sum(-1).tolist()
    log(f"timing: {dims}, EP={world}, vision {args.vision_share:.0%}, pairs per rank {loads} (max/mean {achieved:.2f})")
    rows = []
    out = {"dims": dims, "ep_size": world, "pairs_per_rank": loads, "max_over_mean": achieved, "device": device.type}
    timer = Timer(device, args.profile)
    for mode in args.modes:
        dc = DistributedConfig(tp_size=world, ep_size=world, ep_implementation=mode)
        stock = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, distributed_config=dc).eval()
        realb = AutoModelForCausalLM.from_pretrained(
            path,
            dtype=torch.bfloat16,
            distributed_config=DistributedConfig(tp_size=world, ep_size=world, ep_implementation=mode),
            quantization_config=RealbConfig(
                policy="static", rank_precisions={0: "low"}, low_precision="fp8", ep_size=world
            ),
        ).eval()
        runtime = get_runtime(realb)
        runtime.modality.codes, runtime.modality.source = codes, "mm_token_type_ids"
        stock_layer, layer = stock.model.layers[0].mlp.experts, realb.model.layers[0].mlp.experts

        def call(module, hidden=hidden, ids=ids, weights=weights):
            return lambda: _layer_call(module, hidden, ids, weights)

        variants = [
            ("stock transformers bf16", None, call(stock_layer)),
            # the same pairs spread evenly over the ranks: what moving or replicating experts could at best reach
            ("oracle: stock bf16 on balanced routing", None, call(stock_layer, ids=balanced_ids)),
        ]
        settings = [
            ("ReaLB policy off (bf16)", dict(policy="off", rank_precisions=None), {}),
            # ReaLB's own experts path (device-side decision, no count read-back), nothing lowered: what the path
            # gains or costs before any precision change
            (
                "ReaLB policy realb, nothing lowered",
                dict(policy="realb", imbalance_threshold=100.0, weight_cache="persistent"),
                {},
            ),
            (
                "ReaLB fp8 rank 0, side stream",
                dict(policy="static", rank_precisions={0: "low"}, imbalance_threshold=0.1, weight_cache="on_the_fly"),
                dict(side_stream=True),
            ),
            ("ReaLB fp8 rank 0, inline conversion", {}, dict(side_stream=False)),
        ]
        if mode == "all_to_all":
            settings.append(
                ("ReaLB fp8 rank 0, side stream, bf16 dispatch", {}, dict(side_stream=True, fp8_dispatch=False))
            )
        settings.append(
            ("ReaLB fp8 rank 0, persistent copies", dict(weight_cache="persistent"), dict(fp8_dispatch=True))
        )
        dynamic = dict(policy="realb", granularity="rank", batch_threshold=2048, rank_precisions=None)
        settings.append(("ReaLB policy realb, persistent copies", dynamic, dict(side_stream=True)))
        settings.append(("ReaLB policy realb, on_the_fly", dict(weight_cache="on_the_fly"), dict(side_stream=True)))
        # the cost model counting each lowered expert's conversion: a rank whose conversion outweighs its saving
        # stays bf16, so this row should never be slower than "nothing lowered"
        settings.append((CONVERSION_COUNTED, dict(conversion_cost=DEFAULT_CONVERSION_COST), dict(side_stream=True)))
        results = {}
        for name, _, fn in variants:
            results[name] = timer(fn, args.iters, args.warmup)
        for name, knobs, ep_knobs in settings:
            if knobs:
                runtime.reconfigure(**knobs)
            configure_ep(realb, **ep_knobs)
            runtime.telemetry.reset()
            results[name] = timer(call(layer), args.iters, args.warmup)
            results[name]["precision_per_rank"] = get_telemetry(realb).records[-1].precision_per_rank
        # the hot rank's conversion alone (every local expert to fp8), and a bf16 all-to-all of the dispatch's size
        runtime.reconfigure(weight_cache="on_the_fly")
        with local_shards(layer):
            requests = {"fp8": list(range(layer.num_experts))}
            results["conversion alone (all local experts -> fp8)"] = timer(
                lambda layer=layer, requests=requests: Prefetch.start(layer, requests, side_stream=False),
                args.iters,
                args.warmup,
            )
        pairs = dims["tokens"] // world * dims["top_k"] // world * world  # this rank's pairs, split evenly
        buf = torch.empty(pairs, dims["hidden"], dtype=torch.bfloat16, device=device)
        recv = torch.empty_like(buf)
        results["bf16 all-to-all of the dispatch size"] = timer(
            lambda recv=recv, buf=buf: dist.all_to_all_single(recv, buf), args.iters, args.warmup
        )
        report = gather_report(realb)
        extra_bytes = report["per_rank_extra_memory_bytes"] if report else None
        for name, r in results.items():
            rows.append({"mode": mode, "variant": name, **r})
        inline = results["ReaLB fp8 rank 0, inline conversion"]["ms"]
        side = results["ReaLB fp8 rank 0, side stream"]["ms"]
        convert = results["conversion alone (all local experts -> fp8)"]["ms"]
        out[mode] = {
            "results": results,
            "hidden_conversion_ms": inline - side,
            "hidden_fraction": (inline - side) / convert if convert > 0 else None,
            "persistent_extra_memory_bytes_per_rank": extra_bytes,
            "count_exchange_bytes_per_rank_per_layer": (2 * dims["experts"] + 2) * 8 * world,
            "stock_count_exchange_bytes_per_rank_per_layer": dims["experts"] * 8,
        }
        del stock, realb
        if device.type == "cuda":
            torch.cuda.empty_cache()
    out["rows"] = rows
    if not args.workdir and dist.get_rank() == 0:
        shutil.rmtree(workdir, ignore_errors=True)
    return out


def print_timing(timing: dict) -> None:
    if timing.get("device") != "cuda":
        log("(CPU: there is no side stream, both fp8 rows convert inline, and the timings are noise: a smoke test)")
    width = max(len(row["variant"]) for row in timing["rows"])
    log(
        f"\n{'mode':<11} {'variant':<{width}} {'slowest rank ms':>15} {'back to back':>12} {'rank0 ms':>9}  "
        "precision per rank"
    )
    for row in timing["rows"]:
        precision = row.get("precision_per_rank", "")
        log(
            f"{row['mode']:<11} {row['variant']:<{width}} {row['ms']:>15.3f} {row['back_to_back_ms']:>12.3f} "
            f"{row['rank_ms']:>9.3f}  {precision}"
        )
    profiled = [row for row in timing["rows"] if row.get("profile_per_rank")]
    if profiled:
        log(
            f"\nprofile (ms per call): {'mode':<11} {'variant':<{width}} rank {'wall':>7} {'compute':>8} {'comm':>7} {'idle':>7}  host sections"
        )
        for row in profiled:
            for rank, p in enumerate(row["profile_per_rank"]):
                gpu = [
                    "-" if p[k] is None else f"{p[k]:.3f}"
                    for k in ("gpu_compute_ms", "gpu_communication_ms", "gpu_idle_ms")
                ]
                sections = " ".join(f"{k.removeprefix('realb::')}={v:.3f}" for k, v in p["sections_host_ms"].items())
                log(
                    f"{'':<23}{row['mode']:<11} {row['variant']:<{width}} {rank:>4} {p['wall_ms']:>7.3f} "
                    f"{gpu[0]:>8} {gpu[1]:>7} {gpu[2]:>7}  {sections}"
                )
    for mode in MODES:
        if mode in timing:
            t = timing[mode]
            frac = t["hidden_fraction"]
            log(
                f"{mode}: side stream hides {t['hidden_conversion_ms']:.3f} ms of conversion"
                + (f" ({frac:.0%} of the conversion alone)" if frac is not None else "")
            )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="ep_layer.json", help="JSON report (written by rank 0)")
    parser.add_argument("--tiny", action="store_true", help="tiny dims (CPU smoke test)")
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--workdir", default=None, help="where the checkpoint goes (default: a temporary directory)")
    parser.add_argument("--tokens", type=int, default=None)
    parser.add_argument("--vision-share", type=float, default=0.7)
    parser.add_argument("--skew", type=float, default=1.6, help="rank 0's load over the mean load")
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--timeout", type=float, default=900.0, help="process-group timeout (s)")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads per process")
    parser.add_argument(
        "--profile",
        type=int,
        default=0,
        metavar="CALLS",
        help="also profile CALLS calls of every timed variant (torch.profiler): GPU busy/idle, top kernels and host "
        "ops, ReaLB's sections, per rank; a table is printed and everything goes into the JSON",
    )
    args = parser.parse_args(argv)
    if not torch.cuda.is_available() and not args.tiny:
        parser.error("timing one layer at real dims needs CUDA GPUs (NCCL); on CPU pass --tiny for a smoke test")
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    _, world, device = init_distributed(timeout_s=args.timeout)
    log(f"ep_layer: world {world}, backend {dist.get_backend()}, device {device}, torch {torch.__version__}")
    report: dict = {"world_size": world, "backend": dist.get_backend(), "torch": torch.__version__}
    if device.type == "cuda":
        report["gpu"] = torch.cuda.get_device_name(device)
    report["timing"] = run_timing(args, device)
    print_timing(report["timing"])
    if dist.get_rank() == 0:
        Path(args.out).write_text(json.dumps(report, indent=1, default=str))
        log(f"wrote {args.out}")
    with contextlib.suppress(Exception):
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
