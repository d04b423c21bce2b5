"""What ReaLB costs a decode-sized batch, where it lowers nothing: stock vs ReaLB experts, timed interleaved.

Below `batch_threshold` ReaLB decides from the config alone and calls the stock forward; what remains is Python
around that call and, with telemetry on, keeping the routing to count later. An isolated call of this size is
bound by the host, whose speed drifts over seconds, so the variants are timed in alternating blocks and the
median of the blocks is reported. A second, sustained measurement runs each variant for many calls back to back
(past `telemetry.MAX_PENDING`, so the periodic counting and copy of the deferred routing is inside the time),
and a third repeats it on modules whose stock experts computation is a no-op (an experts implementation registered
with transformers for this), which leaves only host Python.

    python -m realb_hf.bench.decode_overhead --tokens 64 256 --out out/decode.json
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from functools import partial

import torch

from ..telemetry import MAX_PENDING
from .hot_rank import PRESETS, build_experts, finish, realb_variant, routing, time_ms

NOOP_IMPLEMENTATION = "realb_bench_noop"  # transformers experts implementation that computes nothing


def noop_experts(module, hidden_states, top_k_index, top_k_weights):
    """An experts forward that returns its input: what is left of a call is the host work around it."""
    return hidden_states


def register_noop_implementation() -> None:
    from transformers.integrations.moe import ExpertsInterface

    ExpertsInterface.register(NOOP_IMPLEMENTATION, noop_experts)


def variants(stock: torch.nn.Module) -> dict[str, torch.nn.Module]:
    with_telemetry = realb_variant(stock)
    with_telemetry.realb_runtime.telemetry.enabled = True
    control = copy.deepcopy(stock)  # a second stock module: its ratio shows the measurement's own noise
    return {
        "stock bf16": stock,
        "stock bf16 (second copy, noise control)": control,
        "realb policy=off": realb_variant(stock, policy="off"),
        "realb default config, telemetry off": realb_variant(stock),
        "realb default config, telemetry on": with_telemetry,
    }


def sustained_ms(module: torch.nn.Module, inputs: list, calls: int) -> float:
    """Wall-clock ms per call over `calls` back-to-back calls, synchronized only at both ends."""
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    for i in range(calls):
        module(*inputs[i % len(inputs)])
    if cuda:
        torch.cuda.synchronize()
    return (time.perf_counter() - start) * 1e3 / calls


def host_only(modules: dict, inputs: list, calls: int, rounds: int) -> dict[str, list[float]]:
    """The sustained measurement on `variants` of a stock module built with `NOOP_IMPLEMENTATION`: what is left
    is the host time of each variant's own Python (ReaLB's decision and telemetry, the stock implementation
    dispatch)."""
    return alternating(modules, rounds, partial(sustained_ms, inputs=inputs, calls=calls))


def alternating(modules: dict, blocks: int, measure) -> dict[str, list[float]]:
    """`measure(module)` of every variant in each of `blocks` blocks; the order starts one further each block,
    so no variant always runs first after a switch."""
    times: dict[str, list[float]] = {name: [] for name in modules}
    order = list(modules)
    for block in range(blocks):
        shift = block % len(order)
        for name in order[shift:] + order[:shift]:
            times[name].append(measure(modules[name]))
    return times


def run(
    preset: str,
    tokens_list: list[int],
    device: torch.device,
    blocks: int,
    repeats: int,
    sustained: int,
    sustained_rounds: int = 4,
) -> list[dict]:
    dims = PRESETS[preset]
    modules = variants(build_experts(dims["hidden"], dims["inter"], dims["local_experts"], device))
    if sustained:
        register_noop_implementation()
        stock_noop = build_experts(dims["hidden"], dims["inter"], dims["local_experts"], device, NOOP_IMPLEMENTATION)
        noop_modules = variants(stock_noop)
    rows = []
    with torch.no_grad():
        for tokens in tokens_list:
            inputs = [
                routing(tokens, dims["local_experts"], dims["top_k"], dims["hidden"], device, s) for s in range(3)
            ]
            measured = {"interleaved": alternating(modules, blocks, partial(time_ms, inputs=inputs, repeats=repeats))}
            if sustained:
                sustained_call = partial(sustained_ms, inputs=inputs, calls=sustained)
                measured["sustained"] = alternating(modules, sustained_rounds, sustained_call)
                measured["host only"] = host_only(noop_modules, inputs, sustained, sustained_rounds)
            for mode, per_variant in measured.items():
                base = statistics.median(per_variant["stock bf16"])
                for name, samples in per_variant.items():
                    ms = statistics.median(samples)
                    extra_us = (ms - base) * 1e3
                    rows.append(
                        dict(tokens=tokens, mode=mode, variant=name, ms=ms, vs_stock=base / ms,
                             extra_us_vs_stock=extra_us, samples_ms=samples)
                    )  # fmt: skip
                    print(
                        f"{tokens:>5} tok  {mode:<11} {name:<40} {ms:8.4f} ms  {base / ms:6.3f}x  {extra_us:+6.1f} us"
                    )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="qwen3-vl-30b-a3b")
    parser.add_argument("--tokens", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--blocks", type=int, default=10, help="alternating blocks per variant")
    parser.add_argument("--repeats", type=int, default=40, help="timed calls per block")
    parser.add_argument(
        "--sustained",
        type=int,
        default=MAX_PENDING + 1000,
        help="back-to-back calls per variant and round in the sustained measurement (4 rounds; 0: skip it)",
    )
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args(argv)
    for name in ("blocks", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.sustained < 0:
        parser.error(f"--sustained must be 0 or more, got {args.sustained}")
    if any(t < 1 for t in args.tokens):
        parser.error(f"--tokens must all be at least 1, got {args.tokens}")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rows = run(args.preset, args.tokens, device, args.blocks, args.repeats, args.sustained)
    lines = [
        f"| {r['tokens']} | {r['mode']} | {r['variant']} | {r['ms']:.4f} | {r['vs_stock']:.3f}x | {r['extra_us_vs_stock']:+.1f} |"
        for r in rows
    ]
    header = (
        "| tokens | mode | variant | ms per call (median) | vs stock | extra µs per call |\n|---|---|---|---|---|---|"
    )
    finish(
        dict(preset=args.preset, results=rows), device, "realb_hf.bench.decode_overhead", argv, header, lines, args.out
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
