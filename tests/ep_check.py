"""The EP correctness harness: ReaLB under real expert parallelism against one process with virtual EP of the same
size; launched by torchrun (NCCL on GPUs, gloo on CPU).

    torchrun --nproc_per_node 4 tests/ep_check.py --out ep_check.json        # 2-8 GPUs (NCCL)
    torchrun --nproc_per_node 2 tests/ep_check.py --out ep_check.json        # CPU (gloo), as tests/test_distributed.py

Tiny Qwen3-VL-MoE and DeepSeek-V3-style models (`realb_hf.tiny`), loaded with `distributed_config=
DistributedConfig(...)` and ReaLB, against the same checkpoint in one process with virtual EP of the same size, for
every layout in `--forms` and token movement in `--modes` and several policies (static per-rank precisions incl.
nvfp4, the ReaLB policy at rank and expert granularity, all-low with persistent copies). Per case: logits within
bf16 tolerance of the one-process run, the same on every rank, every rank recorded the same decisions, and they
equal the one-process decisions; each rank ran its own experts at the precision the decision gives its rank; fp8
dispatch happened where a rank was lowered to fp8 (all-to-all); persistent copies per rank sum to the one-process
copies. `--sync-free-on-cpu` runs the device executor on CPU too (`RealbExperts.realb_device_path = "always"`), so
gloo checks the path CUDA runs.

Rank 0 prints one `ok`/`FAIL` line per case and writes every result (with the gathered ReaLB report of every rank)
as JSON to --out. The exit code is 1 when a check failed. The world size must divide 8 (the tiny models' experts).
Timing under real EP is a benchmark: `python -m realb_hf.bench.ep_layer`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

try:
    import realb_hf  # noqa: F401
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import realb_hf  # noqa: F401

import torch
import torch.distributed as dist

from realb_hf import RealbConfig, get_runtime, get_telemetry
from realb_hf.ep import gather_report, init_distributed, save_for_expert_parallel
from realb_hf.experts import RealbExperts
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="ep_check.json", help="JSON report (written by rank 0)")
    parser.add_argument("--families", nargs="+", default=list(FAMILIES), choices=sorted(TINY_FAMILIES))
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--forms", nargs="+", default=list(FORMS), choices=FORMS)
    parser.add_argument("--cases", nargs="+", default=None, help="subset of the policy cases")
    parser.add_argument("--workdir", default=None, help="where checkpoints go (default: a temporary directory)")
    parser.add_argument("--timeout", type=float, default=900.0, help="process-group timeout (s)")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads per process")
    parser.add_argument(
        "--sync-free-on-cpu",
        action="store_true",
        help="run the device executor (CUDA's sync-free path) on CPU too: RealbExperts.realb_device_path = 'always'",
    )
    args = parser.parse_args(argv)
    if args.sync_free_on_cpu:
        RealbExperts.realb_device_path = "always"
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    rank, world, device = init_distributed(timeout_s=args.timeout)
    log(f"ep_check: world {world}, backend {dist.get_backend()}, device {device}, torch {torch.__version__}")
    report: dict = {"world_size": world, "backend": dist.get_backend(), "torch": torch.__version__}
    if device.type == "cuda":
        report["gpu"] = torch.cuda.get_device_name(device)
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
