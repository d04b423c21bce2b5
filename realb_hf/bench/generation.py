"""Decode time of `generate`, stock vs ReaLB, with a static cache (which transformers compiles) and a dynamic one.

A Qwen3-VL-30B-A3B-shaped model (`bench.model`, random weights, `--layers` decoder layers) generates
`--new-tokens` greedy tokens for `--requests` text prompts of `--prompt-tokens` tokens; no end-of-sequence token
is set, so every run generates exactly that many. Each variant is a fresh model from the same seed, after a dynamo
reset, so a compiled decode step belongs to the variant that is timed.

Decode time per step, and where it goes (the decomposition of docs/benchmarks.md: equal GPU time, host time
measured):
- wall: the same `generate` run twice, once stopped after its first new token (prefill and the first step) and
  once to the end, both with the same cache size; (full - first) / (new_tokens - 1) is one decode step. Median of
  `--repeats`, synchronized wall clock, after warm-up calls that compile.
- GPU busy: the same difference of the GPU-busy time of each run under torch.profiler (CUDA only).
- host: wall - GPU busy per step, the time the GPU waits for the host (launches, Python, the per-step sync).
A ReaLB row whose GPU time equals stock's and whose wall time is higher loses that difference on the host.

generate's own loop moves the wall time of a step by more between runs than a few percent, so a compiled decode
step is also timed alone ("step alone"): in `--repeats` more generate runs, every call of the compiled step that
transformers hands its loop runs between two device syncs (wall: median over the steps; GPU busy: from
torch.profiler over one run; host = wall - GPU busy). That is what the model itself costs per step, without the
loop around it. `--compile-backend eager` or `aot_eager` (smoke tests) also compile the step on a CPU.

    python -m realb_hf.bench.generation --layers 4 --requests 16 --prompt-tokens 32 --new-tokens 32 --out gen.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable

import torch
from transformers import CompileConfig, StoppingCriteria, StoppingCriteriaList

from .compiled import COMPILE_BACKENDS, dynamo_counts, failure, ratio, reset
from .hot_rank import finish
from .model import MODEL_PRESETS, build_model, model_config
from .profiling import CALL_LABEL, profile_calls, profile_marked

CACHES = ("static", "dynamic")
VARIANTS: dict[str, dict | None] = {
    "stock": None,  # the unconverted model
    "realb default config": {},
    "realb policy=off": {"policy": "off"},
    "realb default config, telemetry off": {},  # what telemetry's hand-offs cost a compiled decode step
}
TELEMETRY_OFF = {"realb default config, telemetry off"}


class StopAfter(StoppingCriteria):
    """Stop once sequences reach `length` tokens: both runs of a measurement keep the same cache size."""

    def __init__(self, length: int):
        self.length = length

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        done = input_ids.shape[1] >= self.length
        return torch.full((input_ids.shape[0],), done, dtype=torch.bool, device=input_ids.device)


def generate_call(model, input_ids: torch.Tensor, new_tokens: int, cache: str, stop_at: int, backend: str):
    """`model.generate` as a user calls it: greedy, `new_tokens` at most, the static cache compiled by transformers
    with `backend`; stopped once sequences reach `stop_at` tokens."""
    kwargs = {}
    if cache == "static":
        # transformers' default mode (reduce-overhead) is an inductor mode; other backends take none
        mode = {} if backend == "inductor" else {"mode": None}
        config = CompileConfig(backend=backend, **mode)
        config._compile_all_devices = backend != "inductor"  # the smoke-test backends compile on a CPU too
        kwargs = dict(cache_implementation="static", compile_config=config)
    return model.generate(
        input_ids=input_ids,
        attention_mask=torch.ones_like(input_ids),
        max_new_tokens=new_tokens,
        do_sample=False,
        stopping_criteria=StoppingCriteriaList([StopAfter(stop_at)]),
        **kwargs,
    )


def wall_ms(fn: Callable[[], object], repeats: int) -> float:
    """Median synchronized wall-clock ms of `fn`."""
    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    times = []
    for _ in range(repeats):
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


class StepAlone:
    """While active, every call of the compiled decode step that `get_compiled_call` hands generate's loop runs
    between two device syncs and is marked for torch.profiler: the step's own time, without the loop around it."""

    def __init__(self, model):
        self.model = model
        self.walls: list[float] = []  # ms, one per step

    def __enter__(self) -> StepAlone:
        original = self.model.get_compiled_call

        def get_compiled_call(compile_config):
            compiled = original(compile_config)
            return lambda *args, **kwargs: self._call(compiled, args, kwargs)

        self.model.get_compiled_call = get_compiled_call
        return self

    def __exit__(self, *exc) -> None:
        del self.model.get_compiled_call  # the class's method again

    def _call(self, compiled: Callable, args: tuple, kwargs: dict):
        cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
        if cuda:
            torch.cuda.synchronize()
        with torch.profiler.record_function(CALL_LABEL):
            start = time.perf_counter()
            out = compiled(*args, **kwargs)
            if cuda:
                torch.cuda.synchronize()
            self.walls.append((time.perf_counter() - start) * 1e3)
        return out


def measure(model, input_ids, new_tokens: int, cache: str, repeats: int, backend: str) -> dict:
    """One row: decode step wall, GPU-busy and host ms (see the module docstring), and whether the decode compiled."""
    prompt = input_ids.shape[1]

    def run(stop_at: int):
        return lambda: generate_call(model, input_ids, new_tokens, cache, stop_at, backend)

    full, first = run(prompt + new_tokens), run(prompt + 1)
    with torch.no_grad():
        out = full()  # the first call compiles (static cache); its output is checked
        generated = out.shape[1] - prompt
        for fn in (first, full, first):
            fn()
        row = dict(cache=cache, generated_tokens=generated, decode_compiled=dynamo_counts()["graphs"] > 0)
        row.update(dynamo_counts())
        row["full_ms"], row["first_token_ms"] = wall_ms(full, repeats), wall_ms(first, repeats)
        steps = new_tokens - 1
        row["decode_step_ms"] = (row["full_ms"] - row["first_token_ms"]) / steps
        try:
            busy = [profile_calls(fn, calls=2)["gpu_busy_ms"] for fn in (full, first)]
        except Exception as err:  # the wall-clock row stands without the split; the reason is kept
            row["profile_error"] = failure(err)
            busy = [None]
    if None in busy:
        row["gpu_busy_step_ms"] = row["host_step_ms"] = None  # no GPU (or no profile): nothing to split
    else:
        row["gpu_busy_step_ms"] = (busy[0] - busy[1]) / steps
        row["host_step_ms"] = row["decode_step_ms"] - row["gpu_busy_step_ms"]
    row["step_alone_wall_ms"] = row["step_alone_gpu_ms"] = row["step_alone_host_ms"] = None  # not compiled
    if row["decode_compiled"]:
        with StepAlone(model) as alone, torch.no_grad():
            for _ in range(repeats):
                full()
            if alone.walls:  # generate ran its compiled decode step
                row["step_alone_wall_ms"] = statistics.median(alone.walls)
                try:
                    row["step_alone_gpu_ms"] = profile_marked(full, lambda: len(alone.walls))["gpu_busy_ms"]
                except Exception as err:
                    row["profile_error"] = failure(err)
    if row["step_alone_gpu_ms"] is not None:
        row["step_alone_host_ms"] = row["step_alone_wall_ms"] - row["step_alone_gpu_ms"]
    return row


def run(
    preset: str,
    layers: int,
    requests: int,
    prompt_tokens: int,
    new_tokens: int,
    variants: list[str],
    caches: list[str],
    ep: int,
    repeats: int,
    device: torch.device,
    backend: str = "inductor",
    rounds: int = 1,
    seed: int = 0,
) -> dict:
    from .. import RealbConfig, apply_realb, get_telemetry

    config = model_config(preset, layers)
    vocab = min(config.text_config.vocab_size, 150000)
    gen = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(10, vocab, (requests, prompt_tokens), generator=gen).to(device)
    rows = []
    for name in [v for _ in range(rounds) for v in variants]:  # rounds alternate the variants: drift hits all
        reset()
        model = build_model(config, device, torch.bfloat16 if device.type == "cuda" else torch.float32, seed)
        model.generation_config.eos_token_id = None  # every run generates exactly new_tokens
        model.generation_config.pad_token_id = 0
        if VARIANTS[name] is not None:
            apply_realb(model, RealbConfig(ep_size=ep, **VARIANTS[name]))
            get_telemetry(model).enabled = name not in TELEMETRY_OFF
        for cache in caches:
            reset()
            row = dict(variant=name, round=sum(r["variant"] == name and r["cache"] == cache for r in rows) + 1)
            row.update(measure(model, input_ids, new_tokens, cache, repeats, backend))
            rows.append(row)
            print(
                f"{cache:<8} {name:<22} decode step {row['decode_step_ms']:8.3f} ms  first token "
                f"{row['first_token_ms']:8.2f} ms  compiled {row['decode_compiled']}",
                flush=True,
            )
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    per_round, rows = rows, median_rows(rows)
    for row in rows:
        stock = next((r for r in rows if r["variant"] == "stock" and r["cache"] == row["cache"]), None)
        row["vs_stock"] = ratio(stock and stock["decode_step_ms"], row["decode_step_ms"])
        for key in ("decode_step_ms", "gpu_busy_step_ms", "host_step_ms", *STEP_ALONE_KEYS):
            theirs = stock and stock[key]
            row[f"extra_{key}"] = None if theirs is None or row[key] is None else row[key] - theirs
        # what the model adds to a step, timed alone, against stock's whole decode step in generate
        extra, step = row["extra_step_alone_wall_ms"], stock and stock["decode_step_ms"]
        row["step_alone_extra_share"] = None if extra is None or not step or step <= 0 else extra / step
    return dict(
        preset=preset,
        layers=layers,
        requests=requests,
        prompt_tokens=prompt_tokens,
        new_tokens=new_tokens,
        ep_size=ep,
        compile_backend=backend,
        rounds=rounds,
        results=rows,
        per_round=per_round,
    )


STEP_ALONE_KEYS = ("step_alone_wall_ms", "step_alone_gpu_ms", "step_alone_host_ms")
MEDIAN_KEYS = ("decode_step_ms", "gpu_busy_step_ms", "host_step_ms", "first_token_ms", "full_ms", *STEP_ALONE_KEYS)


def median_rows(rows: list[dict]) -> list[dict]:
    """One row per (variant, cache): the median over rounds of every timing, the rest from the first round."""
    out = []
    for key in dict.fromkeys((r["variant"], r["cache"]) for r in rows):
        group = [r for r in rows if (r["variant"], r["cache"]) == key]
        row = {k: v for k, v in group[0].items() if k != "round"}
        for name in MEDIAN_KEYS:
            values = [r[name] for r in group if r.get(name) is not None]
            row[name] = statistics.median(values) if values else None
        row["rounds"] = len(group)
        out.append(row)
    return out


def _x(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}x"


def _ms(x: float | None, signed: bool = False) -> str:
    return "-" if x is None else f"{x:+.3f}" if signed else f"{x:.3f}"


def _compiled(row: dict) -> str:
    if not row["decode_compiled"]:
        return "no"
    skips = row.get("cudagraph_skips", 0)
    return f"yes, {skips} graph(s) without CUDA graphs" if skips else "yes"


def _share(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:+.1f}%"


def table(rows: list[dict]) -> tuple[str, list[str]]:
    header = (
        "| cache | variant | decode compiled | decode step ms | vs stock | GPU busy ms/step | host ms/step "
        "| extra ms/step vs stock: wall / GPU / host | step alone ms: wall / GPU / host "
        "| step alone, extra vs stock: wall / host (share of stock's step) | first token ms |"
        "\n|---|---|---|---|---|---|---|---|---|---|---|"
    )
    lines = [
        f"| {r['cache']} | {r['variant']} | {_compiled(r)} | {r['decode_step_ms']:.3f} | "
        f"{_x(r['vs_stock'])} | {_ms(r['gpu_busy_step_ms'])} | "
        f"{_ms(r['host_step_ms'])} | {_ms(r['extra_decode_step_ms'], True)} / {_ms(r['extra_gpu_busy_step_ms'], True)}"
        f" / {_ms(r['extra_host_step_ms'], True)} | {_ms(r['step_alone_wall_ms'])} / {_ms(r['step_alone_gpu_ms'])} / "
        f"{_ms(r['step_alone_host_ms'])} | {_ms(r['extra_step_alone_wall_ms'], True)} / "
        f"{_ms(r['extra_step_alone_host_ms'], True)} ({_share(r['step_alone_extra_share'])}) | "
        f"{r['first_token_ms']:.2f} |"
        for r in rows
    ]
    return header, lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=MODEL_PRESETS, default="qwen3-vl-30b-a3b")
    parser.add_argument("--layers", type=int, default=4, help="decoder layers")
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=["stock", "realb default config"])
    parser.add_argument("--caches", nargs="+", choices=CACHES, default=list(CACHES))
    parser.add_argument("--ep", type=int, default=4, help="RealbConfig.ep_size of the ReaLB variants")
    parser.add_argument("--repeats", type=int, default=5, help="timed generate calls per measurement (median)")
    parser.add_argument("--rounds", type=int, default=1, help="times every variant is measured, alternating (median)")
    parser.add_argument(
        "--compile-backend", choices=COMPILE_BACKENDS, default="inductor", help="backend of the static-cache compile"
    )
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args(argv)
    for name in ("layers", "requests", "prompt_tokens", "repeats", "ep", "rounds"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.new_tokens < 2:
        parser.error(f"--new-tokens must be at least 2 (a decode step after the first token), got {args.new_tokens}")
    experts = model_config(args.preset, args.layers).text_config.num_experts
    if experts % args.ep:
        parser.error(f"--ep {args.ep} must divide the model's {experts} experts per layer")
    variants = list(dict.fromkeys(["stock", *args.variants]))  # every ratio is against stock
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    result = run(
        args.preset, args.layers, args.requests, args.prompt_tokens, args.new_tokens, variants,
        list(dict.fromkeys(args.caches)), args.ep, args.repeats, device, args.compile_backend, args.rounds,
    )  # fmt: skip
    header, lines = table(result["results"])
    lines += [
        "",
        "decode step = (full generate - generate stopped after its first new token) / (new tokens - 1); GPU busy "
        "from torch.profiler the same way; host = wall - GPU busy. Step alone: each compiled decode step between "
        "two device syncs inside generate (median over the steps of --repeats runs). Ratios and extras are "
        "against stock with the same cache.",
    ]
    finish(result, device, "realb_hf.bench.generation", argv, header, lines, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
