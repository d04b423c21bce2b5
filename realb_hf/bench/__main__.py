"""`python -m realb_hf.bench {layer,model,trace-info} ...`: ReaLB's layer and model benchmarks.

    python -m realb_hf.bench layer --preset qwen3-vl-30b-a3b --tokens 16384 --vision-share 0.7 \
        --skew 1.3 1.6 1.95 --ep 1 2 4 8 --out out/
    python -m realb_hf.bench model --preset qwen3-vl-30b-a3b --layers 24 --skew 1.6 --ep 8 --out out/
    python -m realb_hf.bench trace-info my.trace.pt

`--compile` (layer, model) adds compiled rows next to the eager ones: torch.compile of stock and of ReaLB, each on
its own, compared with compiled stock (see `realb_hf.bench.compiled`).

Every run writes <name>.json (with GPU name, versions, date and the exact command line), <name>.md and,
with matplotlib installed, <name>.png into --out, and prints the markdown table last.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace

from ..config import LOW_PRECISION_CHOICES


def _add_realb_knobs(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("ReaLB knobs (RealbConfig)")
    g.add_argument("--low-precision", choices=LOW_PRECISION_CHOICES, default="auto")
    g.add_argument("--modality-threshold", type=float, default=0.7)
    g.add_argument("--batch-threshold", type=int, default=2048, help="tokens below which ReaLB lowers nothing")
    g.add_argument("--imbalance-threshold", type=float, default=0.1)
    g.add_argument("--low-cost-ratio", type=float, default=None, help="policy cost model (default: per format)")


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="out", help="directory for <name>.json / .md / .png")
    p.add_argument("--name", help="file stem (default: <kind>-<preset>)")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cuda, cuda:1, cpu")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--no-plot", action="store_true", help="do not draw <name>.png even if matplotlib is installed")


def build_parser() -> argparse.ArgumentParser:
    from .compiled import add_compile_arguments
    from .layer import EP_FORMS
    from .layer_presets import ALIASES, PRESETS
    from .model import MODEL_DEFAULT_COMPILE_VARIANTS, MODEL_DEFAULT_VARIANTS, MODEL_PRESETS, MODEL_VARIANTS
    from .variants import DEFAULT_COMPILE_VARIANTS, DEFAULT_VARIANTS, VARIANTS
    from .workload import HOT_LAYOUTS

    parser = argparse.ArgumentParser(prog="python -m realb_hf.bench", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    layer = sub.add_parser("layer", help="one MoE experts layer under virtual EP: per-rank times, max over ranks")
    layer.add_argument("--preset", choices=sorted(PRESETS) + sorted(ALIASES), default="qwen3-vl-30b-a3b")
    layer.add_argument("--tokens", type=int, default=16384)
    layer.add_argument("--vision-share", type=float, default=0.7)
    layer.add_argument(
        "--skew",
        type=float,
        nargs="+",
        default=[1.6],
        help="target max/mean rank load(s) at --skew-ep; one workload per value (default 1.6)",
    )
    layer.add_argument(
        "--skew-ep", type=int, help="EP size the skew target refers to (default: largest --ep > 1, else 4)"
    )
    layer.add_argument(
        "--concentration", type=float, nargs="+", help="use these vision concentrations instead of --skew"
    )
    layer.add_argument(
        "--hot-experts", type=int, help="size of the vision-hot expert subset (default max(top_k, E/16))"
    )
    layer.add_argument("--hot-offset", type=int, default=0)
    layer.add_argument("--hot-layout", choices=HOT_LAYOUTS, default="block")
    layer.add_argument("--text-spread", type=float, default=20.0, help="Dirichlet concentration of expert popularity")
    layer.add_argument("--request-tokens", type=int, default=1024)
    layer.add_argument("--trace", help="benchmark a recorded trace's routing instead of a synthetic workload")
    layer.add_argument(
        "--trace-layer", action="append", help="layer name or index in the trace (repeatable; default 0)"
    )
    layer.add_argument("--trace-forward", type=int, default=0)
    layer.add_argument("--ep", type=int, nargs="+", default=[1, 2, 4, 8])
    layer.add_argument("--ep-form", choices=EP_FORMS, default="all_to_all")
    layer.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(DEFAULT_VARIANTS))
    layer.add_argument("--warmup", type=int, default=5)
    layer.add_argument("--repeats", type=int, default=20)
    layer.add_argument("--input-sets", type=int, default=3, help="hidden-state tensors rotated between calls")
    add_compile_arguments(layer, several_modes=True)
    layer.add_argument(
        "--compile-variants",
        nargs="+",
        choices=[v for v in VARIANTS if VARIANTS[v].kind != "oracle"],
        default=list(DEFAULT_COMPILE_VARIANTS),
        help="the --variants also timed compiled with --compile (every rank compiles its own call; stock always)",
    )
    _add_realb_knobs(layer)
    _add_common(layer)
    layer.set_defaults(func=cmd_layer)

    model = sub.add_parser("model", help="end-to-end prefill of a whole model (single process, virtual EP)")
    model.add_argument("--preset", choices=MODEL_PRESETS, default="qwen3-vl-30b-a3b")
    model.add_argument("--layers", type=int, help="decoder layers (default: the preset's; 48 for Qwen3-VL-30B-A3B)")
    model.add_argument("--requests", type=int, default=16)
    model.add_argument("--request-tokens", type=int, default=1024)
    model.add_argument("--vision-share", type=float, default=0.7)
    model.add_argument("--skew", type=float, default=1.6, help="target mean max/mean rank load at --ep (router bias)")
    model.add_argument("--router-bias", type=float, help="BENCHMARK-ONLY vision router bias; skips calibration")
    model.add_argument("--hot-experts", type=int)
    model.add_argument("--hot-offset", type=int, default=0)
    model.add_argument("--trace", help="replay a recorded trace instead of the router bias")
    model.add_argument("--ep", type=int, default=8, help="virtual EP size ReaLB plans for")
    model.add_argument("--variants", nargs="+", choices=list(MODEL_VARIANTS), default=list(MODEL_DEFAULT_VARIANTS))
    model.add_argument("--warmup", type=int, default=2)
    model.add_argument("--repeats", type=int, default=5)
    add_compile_arguments(model, several_modes=True)
    model.add_argument(
        "--compile-variants",
        nargs="+",
        choices=list(MODEL_VARIANTS),
        default=list(MODEL_DEFAULT_COMPILE_VARIANTS),
        help="the --variants also timed compiled with --compile (torch.compile of the whole model; stock always)",
    )
    _add_realb_knobs(model)
    _add_common(model)
    model.set_defaults(func=cmd_model)

    info = sub.add_parser("trace-info", help="summarise a recorded routing trace")
    info.add_argument("path")
    info.add_argument("--ep", type=int, nargs="+", default=[2, 4, 8])
    info.set_defaults(func=cmd_trace_info)
    return parser


def _finish(result: dict, args: argparse.Namespace, argv: list[str] | None, stem: str) -> int:
    from .report import environment, layer_markdown, model_markdown, save

    result["env"] = environment(result["device"], argv)
    paths = save(result, args.out, args.name or stem, plot_png=not args.no_plot)
    for kind, path in paths.items():
        print(f"wrote {kind}: {path}")
    print()
    print(layer_markdown(result) if result["kind"] == "layer" else model_markdown(result))
    return 0


def _layer_workloads(args: argparse.Namespace, preset) -> list[tuple[str, object, dict]]:
    from .trace import Trace
    from .workload import WorkloadSpec, generate, workload_for_skew

    if args.trace:
        trace = Trace.load(args.trace)
        layers = args.trace_layer or [None]
        out = []
        for layer in layers:
            name = trace.resolve_layer(layer)
            out.append((f"trace {name} forward {args.trace_forward}", trace.workload(name, args.trace_forward), {}))
        return out
    spec = WorkloadSpec(
        tokens=args.tokens,
        num_experts=preset.num_experts,
        top_k=preset.top_k,
        vision_share=args.vision_share,
        hot_experts=args.hot_experts,
        hot_offset=args.hot_offset,
        hot_layout=args.hot_layout,
        text_spread=args.text_spread,
        request_tokens=args.request_tokens,
        seed=args.seed,
    )
    if args.concentration:
        out = []
        for c in args.concentration:
            out.append((f"concentration {c}", generate(replace(spec, concentration=c)), {"concentration": c}))
        return out
    skew_ep = args.skew_ep or max([e for e in args.ep if e > 1], default=4)
    out = []
    for target in args.skew:
        workload, search = workload_for_skew(spec, target, skew_ep)
        info = {
            "skew_target": target,
            "skew_ep": skew_ep,
            "concentration": search.concentration,
            "skew_achieved": search.achieved,
        }
        out.append((f"max/mean {target} at EP={skew_ep}", workload, info))
    return out


def cmd_layer(args: argparse.Namespace, argv: list[str] | None) -> int:
    from .layer import LayerBenchSettings, run_layer_bench
    from .layer_presets import get_preset

    preset = get_preset(args.preset)
    settings = LayerBenchSettings(
        preset=preset.name,
        ep_sizes=tuple(args.ep),
        variants=tuple(args.variants),
        ep_form=args.ep_form,
        input_sets=args.input_sets,
        compile_variants=tuple(args.compile_variants),
        **_shared_settings(args),
    )
    workloads = _layer_workloads(args, preset)
    if workloads and workloads[0][1].tokens < args.batch_threshold:
        print(f"note: {workloads[0][1].tokens} tokens < --batch-threshold {args.batch_threshold}: ReaLB lowers nothing")
    result = run_layer_bench(workloads, settings)
    return _finish(result, args, argv, f"layer-{preset.name}")


def _shared_settings(args: argparse.Namespace) -> dict:
    """The settings every benchmark kind takes from the common arguments (ReaLB knobs, timing, device, compile)."""
    from .compiled import settings_from_args

    return dict(
        compile=settings_from_args(args),
        low_precision=args.low_precision,
        modality_threshold=args.modality_threshold,
        batch_threshold=args.batch_threshold,
        imbalance_threshold=args.imbalance_threshold,
        low_cost_ratio=args.low_cost_ratio,
        warmup=args.warmup,
        repeats=args.repeats,
        seed=args.seed,
        dtype=args.dtype,
        device=args.device,
        progress=not args.no_progress,
    )


def cmd_model(args: argparse.Namespace, argv: list[str] | None) -> int:
    from .model import ModelBenchSettings, run_model_bench

    settings = ModelBenchSettings(
        preset=args.preset,
        layers=args.layers,
        requests=args.requests,
        request_tokens=args.request_tokens,
        vision_share=args.vision_share,
        skew=args.skew,
        router_bias=args.router_bias,
        hot_experts=args.hot_experts,
        hot_offset=args.hot_offset,
        ep=args.ep,
        trace=args.trace,
        variants=tuple(args.variants),
        compile_variants=tuple(args.compile_variants),
        **_shared_settings(args),
    )
    result = run_model_bench(settings)
    return _finish(result, args, argv, f"model-{args.preset}")


def cmd_trace_info(args: argparse.Namespace, argv: list[str] | None) -> int:
    from .trace import Trace

    trace = Trace.load(args.path)
    summary = trace.summary()
    skew = {}
    for name in trace.layers:
        w = trace.workload(name, 0)
        skew[name] = {str(ep): round(w.rank_load(ep).max_over_mean, 4) for ep in args.ep if w.num_experts % ep == 0}
    summary["max_over_mean_forward0"] = skew
    print(json.dumps(summary, indent=1, default=str))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args, argv)
    except ValueError as err:
        print(f"python -m realb_hf.bench: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
