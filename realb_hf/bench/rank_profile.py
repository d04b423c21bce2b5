"""Single ranks of the virtual EP layer, variant by variant, eager and compiled: is a rank bound by its GPU work or
by the host?

`bench.layer` reports the slowest rank of a layer. This takes ranks of the same workload one at a time (a
`--preset`-shaped layer, `--tokens` tokens, 70% vision, routing skewed so that rank 0 holds `--skew` times the
mean load, the all-to-all form: each rank gets only its own pairs) and measures per variant and mode:
- event ms: CUDA-event median of calls back to back (`bench.timing.time_calls`), as the layer benchmark times;
- issue ms: host time from the call to its return, without a sync (median of isolated calls);
- synced wall ms: the same call between two device syncs;
- GPU busy ms: kernel time per call under torch.profiler, with the top kernels and host operators in the JSON;
- device allocations made while timed (cudaMalloc; 0 once the caching allocator holds what a call needs).
A rank whose issue time exceeds its GPU busy time is bound by the host, and back-to-back calls then run at the
host's pace. Every variant runs one eager call before it is compiled (plans and weight caches made eagerly).

    python -m realb_hf.bench.rank_profile --tokens 16384 --ranks 0 1 --modes eager default reduce-overhead \
        --out ranks.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable, Sequence

import torch

from .compiled import compile_callable, dynamo_counts, reset, warm_up
from .hot_rank import finish
from .layer import LayerBenchSettings
from .layer_presets import PRESETS, build_experts, get_preset, rank_module
from .profiling import profile_calls
from .rank_inputs import rank_inputs, realb_rank_call
from .timing import time_calls
from .variants import VARIANTS
from .workload import WorkloadSpec, workload_for_skew

PROFILED_VARIANTS = ("stock_bf16", "realb_nothing_lowered", "realb_rank_otf", "realb_rank_persistent", "all_low")
MODES = ("eager", "default", "reduce-overhead")
DEFAULT_VARIANTS = ("stock_bf16", "realb_nothing_lowered", "realb_rank_persistent")


def _allocations(device: torch.device) -> int:
    return torch.cuda.memory_stats(device).get("num_device_alloc", 0) if device.type == "cuda" else 0


def isolated_ms(fn: Callable, args: tuple, repeats: int, device: torch.device) -> tuple[float, float]:
    """(issue ms, synced wall ms): medians over `repeats` calls, each started on an idle device."""
    cuda = device.type == "cuda"
    issue, wall = [], []
    for _ in range(repeats):
        if cuda:
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn(*args)
        issued = time.perf_counter()
        if cuda:
            torch.cuda.synchronize(device)
        issue.append((issued - start) * 1e3)
        wall.append((time.perf_counter() - start) * 1e3)
    return statistics.median(issue), statistics.median(wall)


def profile_rank(
    fn: Callable, calls: list[tuple], device: torch.device, warmup: int, repeats: int, profiled: int
) -> dict:
    """One row's measurements (see the module docstring) of `fn` over the input sets `calls`."""
    before = _allocations(device)
    timing = time_calls(fn, calls, warmup, repeats, device)
    row = {"event_ms": timing.median_ms, "device_allocations_timed": _allocations(device) - before}
    row["issue_ms"], row["synced_wall_ms"] = isolated_ms(fn, calls[0], repeats, device)
    row.update(profile_calls(lambda: fn(*calls[0]), calls=profiled))
    return row


def run(
    preset: str = "qwen3-vl-30b-a3b",
    tokens: int = 16384,
    ep_size: int = 4,
    skew: float = 1.6,
    ranks: Sequence[int] = (0, 1),
    variants: Sequence[str] = DEFAULT_VARIANTS,
    modes: Sequence[str] = ("eager", "default"),
    warmup: int = 5,
    repeats: int = 30,
    profiled: int = 5,
    device: torch.device | None = None,
    seed: int = 0,
) -> dict:
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    spec = get_preset(preset)
    if ep_size < 2 or spec.num_experts % ep_size:
        raise ValueError(f"--ep must be >= 2 and divide the preset's {spec.num_experts} experts, got {ep_size}")
    if bad := [r for r in ranks if not 0 <= r < ep_size]:
        raise ValueError(f"--ranks must lie in 0..{ep_size - 1} (EP size {ep_size}), got {bad}")
    if bad := [v for v in variants if v not in PROFILED_VARIANTS]:
        raise ValueError(f"--variants must be among {PROFILED_VARIANTS}, got {bad}")
    if bad := [m for m in modes if m not in MODES]:
        raise ValueError(f"--modes must be among {MODES}, got {bad}")
    if "reduce-overhead" in modes and device.type != "cuda":
        raise ValueError("mode reduce-overhead records CUDA graphs: it needs a CUDA device")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    work = WorkloadSpec(tokens=tokens, num_experts=spec.num_experts, top_k=spec.top_k, vision_share=0.7, seed=seed)
    workload, _ = workload_for_skew(work, skew, ep_size)
    workload = workload.to(device)
    experts = build_experts(spec, device, dtype, seed)
    gen = torch.Generator(device=device).manual_seed(seed + 1)
    hidden = [torch.randn(tokens, spec.hidden, device=device, dtype=dtype, generator=gen) for _ in range(3)]
    settings = LayerBenchSettings(ep_sizes=(ep_size,), variants=tuple(variants), progress=False)
    e_local = spec.num_experts // ep_size
    rows = []
    with torch.no_grad():
        for rank in ranks:
            inputs = rank_inputs(workload, hidden, rank, ep_size, "all_to_all")
            for name in variants:
                variant = VARIANTS[name]
                lo, hi = rank * e_local, (rank + 1) * e_local
                if variant.kind == "stock":
                    call, calls = rank_module(experts, lo, hi, True), inputs.calls
                else:
                    module = rank_module(experts, lo, hi, True, settings.realb_config(variant, ep_size))
                    call, calls = realb_rank_call(module, workload), inputs.realb_calls()
                call(*calls[0])  # eager first: plans and weight caches are made outside compiled code
                for mode in modes:
                    fn = call if mode == "eager" else compile_callable(call, mode, "inductor")
                    if mode != "eager":
                        warm_up(lambda fn=fn, args=calls[0]: fn(*args))
                    row = dict(rank=rank, pairs=inputs.pairs, variant=name, mode=mode)
                    row.update(profile_rank(fn, calls, device, warmup, repeats, profiled))
                    if mode != "eager":
                        row.update(dynamo_counts())
                    rows.append(row)
                    print(table([row])[1][0], flush=True)  # progress: one line per row
                reset()
    load = workload.rank_load(ep_size)
    return dict(
        preset=preset, tokens=tokens, ep_size=ep_size, skew=skew, rank_pairs=list(load.pairs), rows=rows
    )  # fmt: skip


def table(rows: list[dict]) -> tuple[str, list[str]]:
    header = (
        "| rank | pairs | variant | mode | event ms | issue ms | synced wall ms | GPU busy ms | bound by |"
        " allocations while timed | graph breaks |\n|---|---|---|---|---|---|---|---|---|---|---|"
    )
    lines = []
    for r in rows:
        busy = r.get("gpu_busy_ms")
        bound = "-" if busy is None else "host" if r["issue_ms"] > busy else "GPU"
        lines.append(
            f"| {r['rank']} | {r['pairs']} | {r['variant']} | {r['mode']} | {r['event_ms']:.3f} | {r['issue_ms']:.3f}"
            f" | {r['synced_wall_ms']:.3f} | {'-' if busy is None else f'{busy:.3f}'} | {bound} |"
            f" {r['device_allocations_timed']} | {r.get('graph_breaks', '-')} |"
        )
    return header, lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="qwen3-vl-30b-a3b")
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--ep", type=int, default=4)
    parser.add_argument("--skew", type=float, default=1.6, help="max/mean rank load (rank 0 the hot one)")
    parser.add_argument("--ranks", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--variants", nargs="+", choices=PROFILED_VARIANTS, default=list(DEFAULT_VARIANTS))
    parser.add_argument("--modes", nargs="+", choices=MODES, default=["eager", "default"])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--profiled-calls", type=int, default=5)
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args(argv)
    for flag in ("tokens", "repeats", "profiled_calls"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be at least 1, got {getattr(args, flag)}")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        result = run(
            args.preset, args.tokens, args.ep, args.skew, args.ranks, args.variants, args.modes,
            repeats=args.repeats, profiled=args.profiled_calls, device=device,
        )  # fmt: skip
    except ValueError as err:
        parser.error(str(err))
    header, lines = table(result["rows"])
    finish(result, device, "realb_hf.bench.rank_profile", argv, header, lines, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
