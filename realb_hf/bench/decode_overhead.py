"""What ReaLB costs a decode-sized batch, where it lowers nothing: stock vs ReaLB experts, timed interleaved.

Below `batch_threshold` ReaLB decides from the config alone and calls the stock forward; what remains is Python
around that call and, with telemetry on, keeping the routing to count later. An isolated call of this size is
bound by the host, whose speed drifts over seconds, so the variants are timed in alternating blocks and the
median of the blocks is reported. A second, sustained measurement runs each variant for many calls back to back
(past `telemetry.MAX_PENDING`, so the periodic counting and copy of the deferred routing is inside the time).

    python -m realb_hf.bench.decode_overhead --tokens 64 256 --out out/decode.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from ..telemetry import MAX_PENDING
from .hot_rank import PRESETS, build_experts, finish, realb_variant, routing, time_ms


def variants(stock: torch.nn.Module) -> dict[str, torch.nn.Module]:
    with_telemetry = realb_variant(stock)
    with_telemetry.realb_runtime.telemetry.enabled = True
    return {
        "stock bf16": stock,
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


def run(
    preset: str, tokens_list: list[int], device: torch.device, blocks: int, repeats: int, sustained: int
) -> list[dict]:
    dims = PRESETS[preset]
    modules = variants(build_experts(dims["hidden"], dims["inter"], dims["local_experts"], device))
    rows = []
    with torch.no_grad():
        for tokens in tokens_list:
            inputs = [routing(tokens, dims["local_experts"], dims["top_k"], dims["hidden"], device, s) for s in range(3)]
            times: dict[str, list[float]] = {name: [] for name in modules}
            for _ in range(blocks):
                for name, module in modules.items():
                    times[name].append(time_ms(module, inputs, repeats=repeats))
            measured = {"interleaved": times}
            if sustained:
                rounds: dict[str, list[float]] = {name: [] for name in modules}
                for _ in range(2):  # two rounds, alternating, against host drift
                    for name, module in modules.items():
                        rounds[name].append(sustained_ms(module, inputs, sustained))
                measured["sustained"] = rounds
            for mode, per_variant in measured.items():
                base = statistics.median(per_variant["stock bf16"])
                for name, samples in per_variant.items():
                    ms = statistics.median(samples)
                    rows.append(dict(tokens=tokens, mode=mode, variant=name, ms=ms, vs_stock=base / ms, samples_ms=samples))
                    print(f"{tokens:>5} tok  {mode:<11} {name:<38} {ms:7.3f} ms  {base / ms:6.3f}x", flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="qwen3-vl-30b-a3b")
    parser.add_argument("--tokens", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--blocks", type=int, default=10, help="alternating blocks per variant")
    parser.add_argument("--repeats", type=int, default=40, help="timed calls per block")
    parser.add_argument(
        "--sustained", type=int, default=3 * MAX_PENDING,
        help="back-to-back calls per variant in the sustained measurement (0: skip it)",
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
    lines = [f"| {r['tokens']} | {r['mode']} | {r['variant']} | {r['ms']:.3f} | {r['vs_stock']:.3f}x |" for r in rows]
    header = "| tokens | mode | variant | ms per call (median) | vs stock |\n|---|---|---|---|---|"
    finish(dict(preset=args.preset, results=rows), device, "realb_hf.bench.decode_overhead", argv, header, lines, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
