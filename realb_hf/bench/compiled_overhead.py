"""What a compiled ReaLB model forward adds on the host where it lowers nothing, against compiled stock.

A decode-sized text forward (`--requests` rows of `--tokens` tokens, no cache) of the bench model (`bench.model`,
random weights), every variant compiled with `torch.compile(model, mode=--mode, fullgraph=True)`. At this size
ReaLB decides from the config alone and runs the stock experts forward, so what it adds is host work around the
compiled graph: guards, telemetry's one operator per forward and the copy of the device log. The variants are timed
in alternating blocks of back-to-back calls (synchronized at both ends of a block), median over the blocks; a
second stock model shows the measurement's own noise.

    python -m realb_hf.bench.compiled_overhead --preset tiny --layers 4 --out overhead.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
from functools import partial

import torch

from .compiled import COMPILE_BACKENDS, reset
from .decode_overhead import alternating, sustained_ms
from .hot_rank import finish
from .model import MODEL_PRESETS, build_model, model_config

# name -> telemetry on (True) or off (False) for a ReaLB model with the default config; None: stock
VARIANTS: dict[str, bool | None] = {
    "stock": None,
    "stock (second copy, noise control)": None,
    "realb default config, telemetry off": False,
    "realb default config, telemetry on": True,
}


def compiled_variants(preset: str, layers: int, device: torch.device, mode: str, backend: str) -> dict:
    """Each variant's model, compiled (nothing run yet): {name: (model, compiled forward of input ids)}."""
    from .. import RealbConfig, apply_realb, get_telemetry

    config = model_config(preset, layers)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    built = {}
    for name, telemetry in VARIANTS.items():
        model = build_model(config, device, dtype)
        if telemetry is not None:
            apply_realb(model, RealbConfig(ep_size=4))
            get_telemetry(model).enabled = telemetry
        options = {} if backend != "inductor" or mode == "default" else {"mode": mode}
        compiled = torch.compile(model, fullgraph=True, backend=backend, **options)
        built[name] = (model, partial(_text_forward, compiled))
    return built


def _text_forward(compiled, input_ids: torch.Tensor) -> torch.Tensor:
    return compiled(input_ids=input_ids, use_cache=False).logits


def run(
    preset: str, layers: int, requests: int, tokens: int, device: torch.device, mode: str, backend: str,
    blocks: int, calls: int,
) -> list[dict]:  # fmt: skip
    from .. import get_telemetry

    reset()
    built = compiled_variants(preset, layers, device, mode, backend)
    vocab = min(model_config(preset, layers).text_config.vocab_size, 150000)
    gen = torch.Generator().manual_seed(0)
    inputs = [(torch.randint(10, vocab, (requests, tokens), generator=gen).to(device),) for _ in range(3)]
    forwards = {name: fn for name, (_, fn) in built.items()}
    with torch.no_grad():
        for fn in forwards.values():  # compile (and record CUDA graphs) outside the timing
            for ids in inputs * 2:
                fn(*ids)
        per_variant = alternating(forwards, blocks, partial(sustained_ms, inputs=inputs, calls=calls))
    base = statistics.median(per_variant["stock"])
    rows = []
    for name, samples in per_variant.items():
        ms = statistics.median(samples)
        model = built[name][0]
        recorded = len(get_telemetry(model).records) if VARIANTS[name] is not None else None
        rows.append(dict(variant=name, ms=ms, vs_stock=base / ms, extra_us_vs_stock=(ms - base) * 1e3,
                         samples_ms=samples, records=recorded))  # fmt: skip
        print(f"{name:<40} {ms:8.4f} ms  {base / ms:6.3f}x  {(ms - base) * 1e3:+7.1f} us", flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=MODEL_PRESETS, default="tiny")
    parser.add_argument("--layers", type=int, default=4, help="decoder layers")
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=1, help="tokens per request (1: a decode step's size)")
    parser.add_argument("--mode", choices=["default", "reduce-overhead"], default="default")
    parser.add_argument("--compile-backend", choices=COMPILE_BACKENDS, default="inductor")
    parser.add_argument("--blocks", type=int, default=8, help="alternating blocks per variant")
    parser.add_argument("--calls", type=int, default=300, help="back-to-back calls per block")
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args(argv)
    for name in ("layers", "requests", "tokens", "blocks", "calls"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.mode != "default" and args.compile_backend != "inductor":
        parser.error(f"--mode {args.mode} is an inductor mode; --compile-backend {args.compile_backend} takes none")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rows = run(args.preset, args.layers, args.requests, args.tokens, device, args.mode, args.compile_backend,
               args.blocks, args.calls)  # fmt: skip
    header = "| variant | ms per call (median) | vs stock | extra µs per call | layer records |\n|---|---|---|---|---|"
    lines = [
        f"| {r['variant']} | {r['ms']:.4f} | {r['vs_stock']:.3f}x | {r['extra_us_vs_stock']:+.1f} | "
        f"{'-' if r['records'] is None else r['records']} |"
        for r in rows
    ]
    lines += ["", f"torch.compile(mode={args.mode!r}, backend={args.compile_backend!r}, fullgraph=True); "
              f"{args.requests} x {args.tokens} tokens, {args.layers} layers of preset {args.preset}"]  # fmt: skip
    result = dict(preset=args.preset, layers=args.layers, requests=args.requests, tokens=args.tokens,
                  mode=args.mode, backend=args.compile_backend, results=rows)  # fmt: skip
    finish(result, device, "realb_hf.bench.compiled_overhead", argv, header, lines, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
