"""Hot-rank expert compute: one EP rank's whole experts forward, stock bf16 vs ReaLB fp8, side by side.

The rank holds `local_experts` experts of a real model's dimensions and receives `tokens` tokens, each
routed to `top_k` of its experts (the straggler of a vision-skewed batch). Every variant runs the full
experts forward (sort, gather, both GEMMs, activation, weighted combine), quantization included.
With `--compile` the paths a compile user runs are also timed under `torch.compile` (each mode of
`--compile-mode`), stock and ReaLB compiled separately on the same inputs (see `realb_hf.bench.compiled`).

    python -m realb_hf.bench.hot_rank --out out/hot_rank.json
    python -m realb_hf.bench.hot_rank --tokens 8192 16384 --graphs --compile --compile-mode default reduce-overhead
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys

import torch

from .compiled import (
    EAGER,
    NOTHING_LOWERED,
    CompileSettings,
    add_compile_arguments,
    compile_callable,
    compiled_subset,
    dynamo_counts,
    failure,
    mode_label,
    ratio,
    reset,
    settings_from_args,
    warm_up,
)

PRESETS = {
    # Qwen3-VL-30B-A3B: hidden 2048, moe_intermediate 768, 128 experts, top-8; EP=4 -> 32 experts per rank.
    "qwen3-vl-30b-a3b": dict(hidden=2048, inter=768, local_experts=32, top_k=8),
    # DeepSeek-VL2 (DeepSeek-V2-style MoE: hidden 2560, moe_intermediate 1536, 72 routed experts, top-6); EP=4.
    "deepseek-vl2": dict(hidden=2560, inter=1536, local_experts=18, top_k=6),
}


def build_experts(
    hidden: int, inter: int, local_experts: int, device: torch.device, implementation: str = "grouped_mm"
) -> torch.nn.Module:
    """A stock Qwen3-VL-MoE experts module with random weights, running transformers' `implementation` (its
    registered experts forward; grouped_mm is the default inside a model)."""
    from transformers import Qwen3VLMoeTextConfig
    from transformers.models.qwen3_vl_moe.modeling_qwen3_vl_moe import Qwen3VLMoeTextExperts

    config = Qwen3VLMoeTextConfig(
        hidden_size=hidden,
        moe_intermediate_size=inter,
        num_experts=local_experts,
        experts_implementation=implementation,
    )
    module = Qwen3VLMoeTextExperts(config).to(device=device, dtype=torch.bfloat16)
    with torch.no_grad():
        module.gate_up_proj.normal_(0, hidden**-0.5)
        module.down_proj.normal_(0, inter**-0.5)
    return module.eval()


def routing(tokens: int, local_experts: int, top_k: int, hidden: int, device: torch.device, seed: int):
    gen = torch.Generator(device="cpu").manual_seed(seed)
    scores = torch.rand(tokens, local_experts, generator=gen)
    index = scores.topk(top_k, dim=-1).indices.to(device)
    weights = torch.softmax(torch.randn(tokens, top_k, generator=gen), -1).to(device, torch.bfloat16)
    x = torch.randn(tokens, hidden, generator=gen).to(device, torch.bfloat16)
    return x, index, weights


def time_ms(fn, inputs: list, warmup: int = 5, repeats: int = 30) -> float:
    """Median milliseconds over `repeats` calls, rotating through `inputs` (CUDA events, or wall clock)."""
    cuda = torch.cuda.is_available()
    for i in range(warmup):
        fn(*inputs[i % len(inputs)])
    times = []
    for i in range(repeats):
        args = inputs[i % len(inputs)]
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            fn(*args)
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            import time

            t0 = time.perf_counter()
            fn(*args)
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def realb_variant(module, **config_kwargs):
    """A copy of `module` converted to ReaLB with its own runtime (no model around it), telemetry off."""
    import copy

    from realb_hf import RealbConfig, apply_realb_to_experts

    clone = apply_realb_to_experts(copy.deepcopy(module), RealbConfig(**config_kwargs))
    clone.realb_runtime.telemetry.enabled = False
    return clone


def graph_ms(module, args, repeats: int = 50) -> float | None:
    """Median ms of one CUDA-graph replay of `module(*args)`: the forward without host (launch, Python) cost.
    None when the forward cannot be captured (it reads a count back to the host)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            module(*args)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            module(*args)
    except RuntimeError:
        torch.cuda.synchronize()
        return None
    return time_ms(lambda: graph.replay(), [()], warmup=3, repeats=repeats)


STOCK = "stock bf16 (grouped_mm)"
NOTHING_LOWERED_VARIANT = "realb policy=realb, nothing lowered"
# the variants also timed compiled: the paths a compile user runs (the host-sync and unfused paths are references)
COMPILED_VARIANTS = (
    STOCK,
    "realb policy=off",
    "realb fp8 persistent (fused kernels)",
    "realb fp8 on_the_fly (conversion included)",
    NOTHING_LOWERED_VARIANT,
)


def make_variants(stock: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """Stock and every ReaLB variant of the table, each its own module on the same weights."""
    variants = {
        STOCK: stock,
        "realb policy=off": realb_variant(stock, policy="off"),
        "realb fp8 persistent (fused kernels)": realb_variant(
            stock, policy="all_low", low_precision="fp8", weight_cache="persistent"
        ),
        "realb fp8 on_the_fly (conversion included)": realb_variant(stock, policy="all_low", low_precision="fp8"),
    }
    host_sync = realb_variant(stock, policy="all_low", low_precision="fp8", weight_cache="persistent")
    host_sync.realb_device_path = "never"  # the host path: group sizes read back to the host
    variants["realb fp8 persistent (host-sync path)"] = host_sync
    unfused = realb_variant(stock, policy="all_low", low_precision="fp8", weight_cache="persistent")
    unfused.realb_fuse_swiglu = False  # composed path: separate quant kernels, eager SwiGLU
    variants["realb fp8 persistent (unfused reference path)"] = unfused
    # the dynamic policy with nothing to lower: ReaLB's bf16 pipeline (decided on the device where it runs)
    variants[NOTHING_LOWERED_VARIANT] = realb_variant(stock, **NOTHING_LOWERED, batch_threshold=0)
    return variants


def rel_err(out: torch.Tensor, reference: torch.Tensor) -> float:
    return ((out.float() - reference).norm() / reference.norm()).item()


def compiled_row(
    module: torch.nn.Module, mode: str, backend: str, inputs: list, reference: torch.Tensor, repeats: int
) -> dict:
    """`torch.compile(module)` in `mode`, warmed up, checked against `reference` and timed like the eager rows; a
    compile that fails is a result of its own (the row names the error) rather than the end of the run."""
    row: dict = {"compiled": True}
    try:
        compiled = compile_callable(module, mode, backend)
        row["compile_s"] = warm_up(lambda: compiled(*inputs[0]))
        row["rel_err"] = rel_err(compiled(*inputs[0]), reference)
        row["ms"] = time_ms(compiled, inputs, repeats=repeats)
        row.update(dynamo_counts())
    except Exception as err:
        row["error"] = failure(err)
    return row


def _add_ratios(rows: list[dict]) -> None:
    """`speedup`: against stock of the same mode (compiled against compiled); `vs_nothing_lowered`: against ReaLB's
    bf16 pipeline of the same mode, the precision lever's own gain."""
    for row in rows:
        same = {r["variant"]: r.get("ms") for r in rows if r["tokens"] == row["tokens"] and r["mode"] == row["mode"]}
        row["speedup"] = ratio(same.get(STOCK), row.get("ms"))
        row["vs_nothing_lowered"] = ratio(same.get(NOTHING_LOWERED_VARIANT), row.get("ms"))


def run(
    preset: str,
    tokens_list: list[int],
    device: torch.device,
    seed: int = 0,
    graphs: bool = False,
    repeats: int = 30,
    compile_settings: CompileSettings | None = None,
    compile_variants: tuple[str, ...] = COMPILED_VARIANTS,
) -> dict:
    """Every variant eager (and as a CUDA graph with `graphs`), then `compile_variants` (stock always) compiled in
    each mode of `compile_settings`, on the same inputs."""
    compile_variants = compiled_subset(compile_variants, COMPILED_VARIANTS, COMPILED_VARIANTS, STOCK)
    compile_settings = compile_settings or CompileSettings()
    dims = PRESETS[preset]
    stock = build_experts(dims["hidden"], dims["inter"], dims["local_experts"], device)
    variants = make_variants(stock)
    rows = []
    for tokens in tokens_list:
        inputs = [
            routing(tokens, dims["local_experts"], dims["top_k"], dims["hidden"], device, seed + i) for i in range(3)
        ]
        with torch.no_grad():
            reference = stock(*inputs[0]).float()
            for name, module in variants.items():
                err = rel_err(module(*inputs[0]), reference)
                ms = time_ms(module, inputs, repeats=repeats)
                row = dict(
                    tokens=tokens, rows=tokens * dims["top_k"], variant=name, mode=EAGER, compiled=False, ms=ms,
                    rel_err=err,
                )  # fmt: skip
                if graphs and device.type == "cuda":
                    row["graph_ms"] = graph_ms(module, inputs[0])
                rows.append(row)
                extra = f"  graph {row['graph_ms'] or float('nan'):.3f} ms" if "graph_ms" in row else ""
                print(f"{tokens:>6} tok  eager     {name:<48} {ms:8.3f} ms  err {err:.4f}{extra}", flush=True)
            for mode in compile_settings.modes:
                for name in compile_variants:
                    row = dict(tokens=tokens, rows=tokens * dims["top_k"], variant=name, mode=mode_label(mode))
                    row.update(compiled_row(variants[name], mode, compile_settings.backend, inputs, reference, repeats))
                    rows.append(row)
                    note = (
                        f"FAILED {row['error']}"
                        if "error" in row
                        else f"{row['ms']:8.3f} ms  err {row['rel_err']:.4f}  compile {row['compile_s']:.1f} s"
                    )
                    print(f"{tokens:>6} tok  {row['mode']:<9} {name:<48} {note}", flush=True)
            reset()
    _add_ratios(rows)
    return dict(preset=preset, dims=dims, compile_backend=compile_settings.backend, results=rows)


def _x(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def table(rows: list[dict]) -> tuple[str, list[str]]:
    """The markdown table: every row's ratios are against stock and against ReaLB's bf16 pipeline of its own mode."""
    lines = []
    for r in rows:
        graph = "-" if "graph_ms" not in r else "not capturable" if r["graph_ms"] is None else f"{r['graph_ms']:.3f}"
        if "error" in r:
            lines.append(f"| {r['tokens']} | {r['mode']} | {r['variant']} | failed: {r['error']} | - | - | - | - |")
            continue
        lines.append(
            f"| {r['tokens']} | {r['mode']} | {r['variant']} | {r['ms']:.3f} | {_x(r['speedup'])} "
            f"| {_x(r['vs_nothing_lowered'])} | {r['rel_err']:.4f} | {graph} |"
        )
    header = (
        "| tokens | mode | variant | ms | vs stock (same mode) | vs ReaLB nothing lowered (same mode) | rel. error "
        "| CUDA graph ms |\n|---|---|---|---|---|---|---|---|"
    )
    return header, lines


def finish(
    result: dict,
    device: torch.device,
    module: str,
    argv: list[str] | None,
    header: str,
    lines: list[str],
    out: str | None,
) -> None:
    """Stamp `result` with the card, versions, date and command; print the markdown table; write the JSON."""
    result.update(
        device=torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        torch=torch.__version__,
        date=datetime.date.today().isoformat(),
        command=" ".join([sys.executable, "-m", module, *(argv if argv is not None else sys.argv[1:])]),
    )
    print("\n" + header)
    print("\n".join(lines))
    print(f"\n{result['device']}, torch {result['torch']}, {result['date']}")
    if out:
        with open(out, "w") as f:
            json.dump(result, f, indent=1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="qwen3-vl-30b-a3b")
    parser.add_argument("--tokens", type=int, nargs="+", default=[256, 2048, 8192])
    parser.add_argument("--out", help="write the results as JSON here")
    parser.add_argument("--graphs", action="store_true", help="also time each variant as a CUDA graph replay")
    parser.add_argument("--repeats", type=int, default=30, help="timed calls per variant (the median is reported)")
    add_compile_arguments(parser, several_modes=True)
    parser.add_argument(
        "--compile-variants",
        nargs="+",
        choices=COMPILED_VARIANTS,
        default=list(COMPILED_VARIANTS),
        metavar="VARIANT",
        help=f"variants timed compiled with --compile (stock always; default all: {list(COMPILED_VARIANTS)})",
    )
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.repeats < 1:
        parser.error(f"--repeats must be at least 1, got {args.repeats}")
    if min(args.tokens) < 1:
        parser.error(f"--tokens must all be at least 1, got {args.tokens}")
    try:
        compile_settings = settings_from_args(args)
    except ValueError as err:
        parser.error(str(err))
    result = run(args.preset, args.tokens, device, graphs=args.graphs, repeats=args.repeats,
                 compile_settings=compile_settings, compile_variants=tuple(args.compile_variants))  # fmt: skip
    header, lines = table(result["results"])
    lines.append("")
    lines.append(
        "Ratios compare like with like: an eager row against eager stock, a compiled row against compiled stock of "
        "its mode. 'ReaLB nothing lowered' is ReaLB's own bf16 pipeline: the ratio against it is the precision "
        "lever's own gain, the ratio against stock the total."
    )
    finish(result, device, "realb_hf.bench.hot_rank", argv, header, lines, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
