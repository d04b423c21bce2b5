"""ReaLB under real expert parallelism, checked and timed; launched by torchrun (NCCL on GPUs, gloo on CPU).

    torchrun --nproc_per_node 4 realb_hf/bench/ep_gpu_check.py --out ep_check.json        # 2-8 GPUs
    torchrun --nproc_per_node 2 realb_hf/bench/ep_gpu_check.py --tiny --out ep_check.json # CPU smoke (gloo)

Part 1, equality (`--skip-check` leaves it out): tiny Qwen3-VL-MoE and DeepSeek-V3-style models
(`realb_hf.tiny`), loaded with `distributed_config=DistributedConfig(...)` and ReaLB, against the same checkpoint
in one process with virtual EP of the same size, for every layout in `--forms` and token movement in `--modes`
and several policies (static per-rank precisions incl. nvfp4, the ReaLB policy at rank and expert granularity,
all-low with persistent copies). Per case: logits within bf16 tolerance of the one-process run, the same on
every rank, every rank recorded the same decisions, and they equal the one-process decisions; each rank ran
its own experts at the precision the decision gives its rank; fp8 dispatch happened where a rank was lowered
to fp8 (all-to-all); persistent copies per rank sum to the one-process copies.

Part 2, timing (`--skip-timing` leaves it out; on CPU only with `--tiny`): one MoE layer at Qwen3-VL-30B-A3B
text dims (hidden 2048, moe_intermediate 768, 128 experts, top-8; `--tokens` 16384 tokens, 70% vision, routing
skewed so that EP rank 0 holds `--skew` times the mean load), rank 0 lowered to fp8, in each token movement:
transformers' stock layer, ReaLB with policy off, ReaLB fp8 with the weight conversion on a side stream, the
same converting inline, without fp8 dispatch, and with persistent fp8 copies (no conversion); plus the
conversion alone and a bf16 all-to-all of the dispatch's size; the dynamic policy (decided from the routing, on
the device where the sync-free path runs); and the oracle bound (stock on routing with the same pairs spread
evenly over the ranks). CUDA events; the slowest rank's median of isolated calls, and the time per call of calls
queued back to back (how a layer runs inside a model). `--profile N` also profiles N calls of every variant on
every rank (`realb_hf.bench.profiling`: GPU compute / communication / idle time, top kernels and host ops, the
host time of ReaLB's labelled stages).

Rank 0 prints a table and writes everything (with the gathered ReaLB report of every rank) as JSON to --out.
The exit code is 1 when an equality check failed.
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
import traceback
import warnings
from pathlib import Path

try:
    import realb_hf  # noqa: F401
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    import realb_hf  # noqa: F401

import torch
import torch.distributed as dist

from realb_hf import RealbConfig, get_runtime, get_telemetry
from realb_hf.bench.profiling import profile_calls
from realb_hf.ep import configure_ep, gather_report, init_distributed, save_for_expert_parallel
from realb_hf.experts import Prefetch
from realb_hf.tiny import TINY_FAMILIES

FAMILIES = ("qwen3_vl_moe", "deepseek_v3")
MODES = ("all_reduce", "all_to_all")
# tp_replicated: DistributedConfig(tp_size=N, ep_size=N) with every dense TP rule set to "replicate" (dense layers
#   whole on every rank, so outputs match one process to the bit on CPU); tp: the model's own TP plan (attention
#   sharded: outputs differ from one process by bf16 reduction order); fsdp: DistributedConfig(fsdp_size=N,
#   ep_size=N), each rank its own batch (all-to-all only), compared with one process on the concatenated batch.
FORMS = ("tp_replicated", "tp", "fsdp")
TOLERANCE = {"tp_replicated": 1e-2, "tp": 3e-2, "fsdp": 1e-2}
GPU_TOLERANCE = 2e-2  # GPU kernels (grouped GEMMs) may group rows differently in EP and in one process


def log(msg: str) -> None:
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(msg, flush=True)


def policy_cases(ep_size: int) -> dict[str, dict]:
    """Runtime knobs of each case (every knob given, so reconfiguring between cases leaves nothing behind)."""
    base = dict(
        policy="realb",
        rank_precisions=None,
        low_precision="fp8",
        granularity="rank",
        weight_cache="on_the_fly",
        batch_threshold=0,
        modality_threshold=0.0,
        imbalance_threshold=0.0,
    )
    static = {0: "low"}
    if ep_size > 1:
        static[ep_size - 1] = "nvfp4"
    return {
        "static": base | dict(policy="static", rank_precisions=static),
        "realb_rank": dict(base),
        "realb_expert": base | dict(granularity="expert"),
        "all_low_persistent": base | dict(policy="all_low", weight_cache="persistent"),
    }


def _auto_class(family: str):
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    return AutoModelForImageTextToText if TINY_FAMILIES[family].is_vlm else AutoModelForCausalLM


def replicated_tp_plan(path: str, family: str) -> dict[str, str]:
    """The model's TP plan with every rule set to "replicate" (a no-op style): dense layers stay whole."""
    from transformers import AutoConfig

    with torch.device("meta"):
        meta = _auto_class(family).from_config(AutoConfig.from_pretrained(path))
    return {key: "replicate" for key in meta.tp_plan}


def distributed_config(form: str, mode: str, world: int, path: str, family: str):
    from transformers.distributed import DistributedConfig

    if form == "fsdp":
        return DistributedConfig(fsdp_size=world, ep_size=world, ep_implementation=mode)
    extra = {"tp_plan": replicated_tp_plan(path, family)} if form == "tp_replicated" else {}
    return DistributedConfig(tp_size=world, ep_size=world, ep_implementation=mode, **extra)


def shared_dir(prefix: str) -> str:
    """A fresh directory made by rank 0, its path given to every rank (one machine)."""
    path = [tempfile.mkdtemp(prefix=prefix) if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(path, src=0)
    return path[0]


def prepare_checkpoints(workdir: str, families) -> dict[str, str]:
    paths = {name: os.path.join(workdir, name) for name in families}
    if dist.get_rank() == 0:
        for name, path in paths.items():
            if not os.path.exists(os.path.join(path, "config.json")):
                save_for_expert_parallel(TINY_FAMILIES[name].build(seed=0), path)
    dist.barrier()
    return paths


def _batch(family: str, config, form: str, rank: int, world: int):
    """(this rank's inputs, the one-process inputs, the rows of the one-process output that are this rank's)."""
    fam = TINY_FAMILIES[family]
    if form != "fsdp":
        kwargs = fam.batch(config, batch=2, seed=0).kwargs
        return kwargs, kwargs, None
    per_rank = [fam.batch(config, batch=1, seed=r).kwargs for r in range(world)]
    full = {}
    for key in per_rank[0]:
        values = [b[key] for b in per_rank]
        full[key] = torch.cat(values) if isinstance(values[0], torch.Tensor) else values[0]
    return per_rank[rank], full, slice(rank, rank + 1)


def _to(kwargs: dict, device: torch.device) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp(min=1e-30)).item()


def _reconfigure(model, knobs: dict) -> None:
    runtime = get_runtime(model)
    runtime.reconfigure(**knobs)
    runtime.telemetry.reset()
    if runtime.ep is not None:
        runtime.ep.reset()


def check_case(model, ref, family, form, mode, case, knobs, world, device, tolerance) -> dict | None:
    """One forward under EP and (rank 0) in one process; every rank takes part, rank 0 returns the verdict."""
    rank = dist.get_rank()
    _reconfigure(model, knobs)
    mine, full, rows = _batch(family, model.config, form, rank, world)
    with torch.no_grad():
        out = model(**_to(mine, device)).logits.float().cpu()
    report = gather_report(model)
    outs = [None] * world if rank == 0 else None
    dist.gather_object(out, outs, dst=0)
    if rank != 0:
        return None
    _reconfigure(ref, knobs)
    with torch.no_grad():
        expected = ref(**_to(full, device)).logits.float().cpu()
    failures = []
    ref_records = [r for r in get_telemetry(ref).to_dict()["records"]]
    records = report["ranks"][0]["telemetry"]["records"]
    if form == "fsdp":
        rel = max(_rel(o, expected[r : r + 1]) for r, o in enumerate(outs))
        same_on_ranks = True
    else:
        rel = _rel(outs[0], expected)
        if device.type == "cuda":  # every rank runs the same kernels, but allow for GPU nondeterminism
            same_on_ranks = all(_rel(o, outs[0]) <= tolerance for o in outs)
        else:
            same_on_ranks = all(torch.equal(o, outs[0]) for o in outs)
        if not same_on_ranks:
            failures.append("logits differ between ranks")
    if not rel <= tolerance:
        failures.append(f"logits relative error {rel:.2e} > {tolerance:.0e}")
    if not report["decisions_agree"]:
        failures.append("ranks recorded different decisions")
    # Exact telemetry equality where the inputs of every layer are provably identical (CPU, dense layers whole on
    # every rank). Elsewhere (TP attention; GPU kernels that group rows differently) a near-tie in the routing of a
    # later layer may flip: then the first layer must still match exactly, static precisions everywhere, and the
    # number of other differing records is reported.
    differing = sum(a != b for a, b in zip(records, ref_records)) + abs(len(records) - len(ref_records))
    if device.type == "cpu" and form != "tp":
        if differing:
            failures.append("telemetry differs from the one-process telemetry")
    else:
        if form != "tp" and records[:1] != ref_records[:1]:
            failures.append("first layer's telemetry differs from the one-process telemetry")
        precisions = [r["precision_per_rank"] for r in records]
        if case == "static" and precisions != [r["precision_per_rank"] for r in ref_records]:
            failures.append("static precisions differ from the one-process run")
    per_rank = []
    for r, rank_report in enumerate(report["ranks"]):
        by_layer = {(rec["forward"], rec["layer"]): rec["precision_per_rank"] for rec in records}
        ran = [a["precision"] for a in rank_report["applied"]]
        per_rank.append(ran)
        ep_rank = rank_report["ep_rank"]
        for entry in rank_report["applied"]:
            decided = by_layer[(entry["forward"], entry["layer"])][ep_rank]
            if entry["precision"] != decided:
                failures.append(f"rank {r} ran {entry['precision']} in {entry['layer']} where {decided} was decided")
    if case == "static":
        want = ["fp8"] + ["bf16"] * (world - 2) + ["nvfp4"] if world > 1 else ["fp8"]
        got = [sorted(set(p)) for p in per_rank]
        if got != [[w] for w in want]:
            failures.append(f"static precisions per rank {got}, expected {want}")
        fp8_sent = [any(a["fp8_dispatch"] for a in rr["applied"]) for rr in report["ranks"]]
        if mode == "all_to_all" and not fp8_sent[0]:
            failures.append("rank 0 (fp8) received no fp8 dispatch")
    if case.startswith("realb") and not any(r["lowered_experts"] for r in records):
        failures.append("the ReaLB policy lowered nothing: the case does not exercise it")
    extra = report["per_rank_extra_memory_bytes"]
    ref_extra = get_telemetry(ref).extra_memory_bytes
    if case == "all_low_persistent" and sum(extra) != ref_extra:
        failures.append(f"persistent copies per rank {extra} do not sum to the one-process {ref_extra}")
    return {
        "family": family,
        "form": form,
        "mode": mode,
        "case": case,
        "ok": not failures,
        "failures": failures,
        "rel_error": rel,
        "same_logits_on_all_ranks": same_on_ranks,
        "decisions_agree": report["decisions_agree"],
        "precision_per_rank_per_layer": per_rank,
        "fp8_dispatch_per_rank": [sum(a["fp8_dispatch"] for a in rr["applied"]) for rr in report["ranks"]],
        "extra_memory_bytes_per_rank": extra,
        "comm_bytes_per_rank": report["per_rank_comm_bytes"],
        "layers_lowered": report["summary"]["layers_lowered"],
        "records_differing_from_one_process": differing,
    }


def run_checks(args, device: torch.device, results: list[dict]) -> list[dict]:
    from transformers import AutoConfig

    world = dist.get_world_size()
    workdir = args.workdir or shared_dir("realb_ep_check_")
    paths = prepare_checkpoints(workdir, args.families)
    tolerance_scale = GPU_TOLERANCE if device.type == "cuda" else None
    for family in args.families:
        path = paths[family]
        auto = _auto_class(family)
        cases = policy_cases(world)
        if args.cases:
            cases = {k: v for k, v in cases.items() if k in args.cases}
        ref = None
        ref_config = AutoConfig.from_pretrained(path)
        if dist.get_rank() == 0:
            ref = auto.from_pretrained(
                path, dtype=torch.bfloat16, quantization_config=RealbConfig(ep_size=world, policy="off")
            ).to(device)
            ref.eval()
        for form in args.forms:
            if form != "tp_replicated" and family != "qwen3_vl_moe":
                continue  # the other layouts once, on the multimodal model
            heads = getattr(getattr(ref_config, "text_config", ref_config), "num_key_value_heads", world)
            if form == "tp" and heads % world:
                log(f"skip {family} tp: {heads} key/value heads cannot be split over TP={world} (a tiny-model limit)")
                continue
            modes = ("all_to_all",) if form == "fsdp" else args.modes
            for mode in modes:
                t0 = time.perf_counter()
                dc = distributed_config(form, mode, world, path, family)
                model = auto.from_pretrained(
                    path, dtype=torch.bfloat16, distributed_config=dc, quantization_config=RealbConfig(policy="off")
                ).eval()
                for case, knobs in cases.items():
                    if form != "tp_replicated" and case not in ("static", "realb_rank"):
                        continue
                    tolerance = tolerance_scale or TOLERANCE[form]
                    result = check_case(model, ref, family, form, mode, case, knobs, world, device, tolerance)
                    if result is not None:
                        results.append(result)
                        flag = "ok  " if result["ok"] else "FAIL"
                        log(
                            f"{flag} {family:<13} {form:<13} {mode:<10} {case:<18} rel {result.get('rel_error', float('nan')):.1e} "
                            f"ranks ran {[sorted(set(p)) for p in result.get('precision_per_rank_per_layer', [])]} "
                            f"{'; '.join(result['failures'])}"
                        )
                del model
                log(f"     ({family} {form} {mode}: {time.perf_counter() - t0:.1f} s)")
        del ref
    if not args.workdir and dist.get_rank() == 0:
        shutil.rmtree(workdir, ignore_errors=True)
    return results


# ---- timing --------------------------------------------------------------------------------------------------


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


def _layer_call(module, hidden, ids, weights) -> None:
    with torch.no_grad():
        module(hidden, ids, weights)


class Timer:
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
    from transformers.distributed.parallel_utils import _use_local_dtensor_params

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
        with _use_local_dtensor_params(layer):
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
    log(f"\n{'mode':<11} {'variant':<48} {'slowest rank ms':>15} {'back to back':>12} {'rank0 ms':>9}  precision per rank")
    for row in timing["rows"]:
        precision = row.get("precision_per_rank", "")
        log(
            f"{row['mode']:<11} {row['variant']:<48} {row['ms']:>15.3f} {row['back_to_back_ms']:>12.3f} "
            f"{row['rank_ms']:>9.3f}  {precision}"
        )
    profiled = [row for row in timing["rows"] if row.get("profile_per_rank")]
    if profiled:
        log(f"\nprofile (ms per call): {'mode':<11} {'variant':<48} rank {'wall':>7} {'compute':>8} {'comm':>7} {'idle':>7}  host sections")
        for row in profiled:
            for rank, p in enumerate(row["profile_per_rank"]):
                gpu = ["-" if p[k] is None else f"{p[k]:.3f}" for k in ("gpu_compute_ms", "gpu_communication_ms", "gpu_idle_ms")]
                sections = " ".join(f"{k.removeprefix('realb::')}={v:.3f}" for k, v in p["sections_host_ms"].items())
                log(
                    f"{'':<23}{row['mode']:<11} {row['variant']:<48} {rank:>4} {p['wall_ms']:>7.3f} "
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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="ep_gpu_check.json", help="JSON report (written by rank 0)")
    parser.add_argument("--tiny", action="store_true", help="tiny timing dims (CPU smoke test)")
    parser.add_argument("--skip-check", action="store_true")
    parser.add_argument("--skip-timing", action="store_true")
    parser.add_argument("--families", nargs="+", default=list(FAMILIES), choices=sorted(TINY_FAMILIES))
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--forms", nargs="+", default=list(FORMS), choices=FORMS)
    parser.add_argument("--cases", nargs="+", default=None, help="subset of the policy cases")
    parser.add_argument("--workdir", default=None, help="where checkpoints go (default: a temporary directory)")
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
    parser.add_argument(
        "--sync-free-on-cpu", action="store_true", help="run the CUDA sync-free experts path on CPU too (tests it under gloo)"
    )
    args = parser.parse_args(argv)
    if args.sync_free_on_cpu:
        from realb_hf.experts import RealbExperts

        RealbExperts.realb_device_path = "always"
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    rank, world, device = init_distributed(timeout_s=args.timeout)
    log(f"ep_gpu_check: world {world}, backend {dist.get_backend()}, device {device}, torch {torch.__version__}")
    report: dict = {"world_size": world, "backend": dist.get_backend(), "torch": torch.__version__}
    if device.type == "cuda":
        report["gpu"] = torch.cuda.get_device_name(device)
    ok = True
    if not args.skip_check:
        t0 = time.perf_counter()
        report["checks"] = []
        try:
            run_checks(args, device, report["checks"])
        except Exception:
            if rank == 0:  # keep what passed so far, then fail loudly
                report["error"] = traceback.format_exc()
                Path(args.out).write_text(json.dumps(report, indent=1, default=str))
            raise
        report["check_seconds"] = time.perf_counter() - t0
        ok = all(r["ok"] for r in report["checks"]) if rank == 0 else True
        log(f"equality checks: {'all passed' if ok else 'FAILED'} ({report['check_seconds']:.1f} s)")
    if not args.skip_timing and (device.type == "cuda" or args.tiny):
        report["timing"] = run_timing(args, device)
        print_timing(report["timing"])
    if rank == 0:
        Path(args.out).write_text(json.dumps(report, indent=1, default=str))
        log(f"wrote {args.out}")
    status = torch.tensor([0 if ok else 1], device=device)
    dist.broadcast(status, src=0)
    with contextlib.suppress(Exception):
        dist.destroy_process_group()
    return int(status.item())


if __name__ == "__main__":
    sys.exit(main())
