"""`realb-hf` command line.

`realb-hf run` (the README's first command) builds a tiny Qwen3-VL-MoE from its config, sends one image+text
batch through it with ReaLB under virtual EP, and prints what every MoE layer saw and decided.
`realb-hf demo` serves the Gradio demo (realb_hf/bundled.py finds it); `realb-hf save` / `realb-hf push` load a
model with ReaLB and save or upload it with a model card (realb_hf/hub.py). `realb-hf serve` serves a model with
ReaLB through transformers' OpenAI-compatible server (realb_hf/serve.py). `realb-hf calibrate` reports each MoE
layer's sensitivity to each low format on the user's data (realb_hf/calibrate.py).

Every argument is checked before anything is loaded or written; a mistake ends with one line naming the flag.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
from pathlib import Path

from .calibrate import add_calibrate_parser
from .card_inputs import CardInputError
from .config import GRANULARITIES, LOW_PRECISION_CHOICES, POLICIES, WEIGHT_CACHES

RUN_TOP_K = 2  # experts per token of the tiny model `realb-hf run` builds
MERGE = 2  # its vision tower merges 2x2 patches into one token


def _whole(minimum: int, multiple: int = 1):
    """An argparse type: a whole number >= `minimum` (and a multiple of `multiple`)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a whole number, got {text!r}") from None
        if value < minimum or value % multiple:
            even = f" and a multiple of {multiple}" if multiple > 1 else ""
            raise argparse.ArgumentTypeError(f"must be a whole number >= {minimum}{even}, got {value}")
        return value

    return parse


def _number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _realb_config(knobs: dict):
    """RealbConfig(**knobs); an invalid value is reported under its flag (--ep-size), not its field name."""
    from . import RealbConfig

    try:
        return RealbConfig(**knobs)
    except ValueError as err:
        field = re.match(r"RealbConfig\.(\w+)", str(err))
        if field and field.group(1) in knobs:
            raise ValueError(f"{_flag(field.group(1))}: {err}") from None
        raise


def _check_output_file(flag: str, value: str | None) -> None:
    if value is None:
        return
    path = Path(value)
    if path.is_dir() or not path.parent.is_dir():
        raise ValueError(f"{flag} {value}: " + ("is a folder" if path.is_dir() else f"no folder {path.parent}"))


def _check_device(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise ValueError(f"--device {device}: torch sees no CUDA GPU here")


REPORT_KEY = (
    "pairs: token-expert pairs routed to the rank (top-k per token); vis: vision share of them.\n"
    "balancedness: mean/max over ranks (1 = balanced), of the load before ReaLB -> of the predicted time as decided\n"
    "(the cost model charges every bf16 pair the same, so before ReaLB the time balance is the load balance)."
)


def _format_report(records, summary: dict) -> str:
    lines = [REPORT_KEY]
    for r in records:
        ranks = "  ".join(
            f"r{i}:{t:>5} pairs {s * 100:>3.0f}% vis {p:<6}"
            for i, (t, s, p) in enumerate(zip(r.tokens_per_rank, r.vision_share_per_rank, r.precision_per_rank))
        )
        before = f"{r.balancedness_cost_before:.3f}"
        if not math.isclose(r.balancedness_tokens, r.balancedness_cost_before, abs_tol=1e-9):
            before += f" (load {r.balancedness_tokens:.3f})"  # only if a cost model ever breaks the identity
        lines.append(f"{r.layer}\n    {ranks}")
        lines.append(
            f"    balancedness {before} -> {r.balancedness_cost_after:.3f}  "
            f"lowered {r.lowered_fraction * 100:.1f}% of pairs  "
            f"predicted layer speedup {r.predicted_speedup:.2f}x  ({r.reason})"
        )
    lines.append(
        f"summary: {summary['records']} layer records, {summary['layers_lowered']} lowered, "
        f"{summary['lowered_token_fraction'] * 100:.1f}% of token-expert pairs in low precision, "
        f"mean predicted layer speedup {summary['predicted_speedup']:.2f}x (target-hardware cost model)"
    )
    return "\n".join(lines)


def cmd_run(args: argparse.Namespace) -> int:
    if args.num_experts % args.ep_size:
        raise ValueError(f"--ep-size {args.ep_size} must divide --num-experts {args.num_experts}")
    _check_output_file("--json", args.json)
    config = _realb_config(
        dict(
            low_precision=args.low_precision,
            policy=args.policy,
            ep_size=args.ep_size,
            batch_threshold=args.batch_threshold,
            modality_threshold=args.modality_threshold,
            imbalance_threshold=args.imbalance_threshold,
            granularity=args.granularity,
            weight_cache=args.weight_cache,
        )
    )
    import torch

    from . import apply_realb, get_telemetry
    from .card_inputs import save_telemetry
    from .tiny import build_tiny_model, qwen3_vl_image_batch, tiny_qwen3_vl_moe_config

    model_config = tiny_qwen3_vl_moe_config(num_experts=args.num_experts, top_k=RUN_TOP_K)
    model = apply_realb(build_tiny_model(model_config, seed=args.seed), config)
    batch = qwen3_vl_image_batch(batch=args.batch, grid=(args.grid, args.grid), seed=args.seed, config=model_config)
    tokens = batch.kwargs["input_ids"].numel()
    print(
        f"tiny Qwen3-VL-MoE ({model_config.text_config.num_experts} experts, top-"
        f"{model_config.text_config.num_experts_per_tok}), batch of {args.batch} image+text requests = {tokens} tokens "
        f"({batch.num_image_tokens} image), virtual EP={args.ep_size}, policy={args.policy}"
    )
    with torch.no_grad():
        model(**batch.kwargs)
    telemetry = get_telemetry(model)
    print(_format_report(telemetry.last_forward(), telemetry.summary()))
    if args.json:
        save_telemetry(model, args.json)
        print(f"telemetry of this tiny model written to {args.json}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    demo_args = args.demo_args[1:] if args.demo_args[:1] == ["--"] else args.demo_args
    from .bundled import demo_module

    return demo_module("app").main(demo_args, prog="realb-hf demo")


KNOBS = (
    "policy",
    "low_precision",
    "granularity",
    "weight_cache",
    "ep_size",
    "batch_threshold",
    "modality_threshold",
    "imbalance_threshold",
    "conversion_cost",
)


def _checked_hub_args(args: argparse.Namespace) -> tuple:
    """(source, RealbConfig or None, card kwargs): everything `save`/`push` can check before loading the model.

    Checks that need the model (base model architecture, telemetry provenance) run in `build_model_card`, which
    `save_with_card` calls before writing anything."""
    from .card_inputs import looks_like_hub_id, read_accuracy_file, read_telemetry_file
    from .hub import check_source

    source = check_source(args.source)
    knobs = {n: getattr(args, n) for n in KNOBS if getattr(args, n) is not None}
    config = _realb_config(knobs) if knobs else None  # only the knobs given: the rest keep the saved values
    if args.base_model is not None and not looks_like_hub_id(args.base_model):
        raise CardInputError("base_model", f"{args.base_model!r} is not a Hub repo id like 'org/name'")
    _check_device(args.device)
    card = dict(
        base_model=args.base_model,
        telemetry=read_telemetry_file(args.telemetry) if args.telemetry else None,
        accuracy_table=read_accuracy_file(args.accuracy_table) if args.accuracy_table else None,
        license=args.license,
    )
    return source, config, card


def _load(source: str, config, args: argparse.Namespace):
    """`load_with_realb`; a knob the model refuses (e.g. --ep-size that does not divide its experts) is named."""
    from .hub import load_with_realb

    try:
        return load_with_realb(source, config, device=args.device)
    except ValueError as err:
        raise _under_knob_flag(err, args) from None


def _under_knob_flag(err: ValueError, args: argparse.Namespace) -> ValueError:
    """`err` reported under the knob flag it is about (a model refusing --ep-size names it), else as it is."""
    given = [n for n in KNOBS if getattr(args, n) is not None and re.search(rf"\b{n}\b", str(err))]
    return ValueError(f"{_flag(given[0])} {getattr(args, given[0])}: {err}") if given else err


def cmd_save(args: argparse.Namespace) -> int:
    from .hub import save_with_card

    source, config, card = _checked_hub_args(args)
    out = Path(args.out).expanduser()
    if out.exists() and not out.is_dir():
        raise ValueError(f"OUT {args.out} is a file, not a folder")
    if Path(source).is_dir() and out.resolve() == Path(source).resolve():
        raise ValueError(f"OUT {args.out} is the source folder; save into another folder")
    model, processor = _load(source, config, args)
    path = save_with_card(model, processor, out, **card)
    print(f"saved {args.source} with ReaLB and a model card to {path}")
    return 0


def cmd_push(args: argparse.Namespace) -> int:
    from .hub import push_with_card

    if not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", args.repo_id):
        raise ValueError(f"REPO_ID {args.repo_id!r} is not a Hub repo id like 'me/name'")
    source, config, card = _checked_hub_args(args)
    model, processor = _load(source, config, args)
    info = push_with_card(
        model,
        args.repo_id,
        processor,
        private=args.private or None,
        revision=args.revision,
        create_pr=args.create_pr,
        commit_message=args.commit_message,
        **card,
    )
    print(f"pushed {args.source} with ReaLB and a model card to {args.repo_id}: {getattr(info, 'commit_url', info)}")
    return 0


def _port(text: str) -> int:
    value = _whole(1)(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"must be a TCP port between 1 and 65535, got {value}")
    return value


def cmd_serve(args: argparse.Namespace) -> int:
    import logging

    from .hub import check_source
    from .serve import build_server, check_address, run

    world = os.environ.get("WORLD_SIZE", "1")
    if world != "1":
        raise ValueError(
            f"realb-hf serve runs in one process, but WORLD_SIZE={world} (torchrun?): transformers' server loads no "
            "DistributedConfig and does not share requests between ranks, so it cannot serve under expert "
            "parallelism; --ep-size plans a virtual EP in one process. For EP batch work use "
            "integrations/torchrun/run_ep.py (docs/serving.md)"
        )
    source = check_source(args.model)
    if "@" in source and Path(source).exists():  # transformers' server reads `@` as the start of a revision
        raise ValueError(f"MODEL {args.model}: transformers' server cannot load a folder whose path contains '@'")
    knobs = {n: getattr(args, n) for n in KNOBS if getattr(args, n) is not None}
    config = _realb_config(knobs)  # no knob given: a saved ReaLB model keeps its settings, others get the defaults
    _check_device(args.device)
    check_address(args.host, args.port)
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("realb_hf.serve").setLevel(args.log_level.upper())

    try:
        served = build_server(
            source,
            config,
            device=args.device,
            allow_model_loading=args.allow_model_loading,
            continuous_batching=args.continuous_batching,
        )
    except ValueError as err:
        raise _under_knob_flag(err, args) from None
    print(f"serving {args.model} with ReaLB on http://{args.host}:{args.port} (OpenAI API under /v1, /metrics)")
    run(served, host=args.host, port=args.port, log_level=args.log_level)
    return 0


def _add_serve_parser(sub) -> None:
    from .serve import DEFAULT_HOST, DEFAULT_PORT

    serve = sub.add_parser(
        "serve",
        help="serve a model with ReaLB through transformers' OpenAI-compatible server, with /metrics",
        description="Serve MODEL with ReaLB through transformers' OpenAI-compatible server (docs/serving.md).",
    )
    serve.add_argument("model", metavar="MODEL", help="local model folder or Hub id")
    serve.add_argument("--host", default=DEFAULT_HOST, help=f"address to listen on (default {DEFAULT_HOST})")
    serve.add_argument("--port", type=_port, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT})")
    serve.add_argument("--device", default="auto", help="device_map of the model: auto (default), cpu, cuda, ...")
    serve.add_argument(
        "--allow-model-loading",
        action="store_true",
        help="let clients load other models (/load_model; each with these ReaLB settings); off: MODEL is pinned",
    )
    serve.add_argument(
        "--continuous-batching",
        action="store_true",
        help="transformers' continuous batching where it supports the model (text-only models); said at start-up",
    )
    serve.add_argument(
        "--log-level",
        choices=("debug", "info", "warning", "error"),
        default="info",
        help="debug: one line per request with its ReaLB decision summary",
    )
    _add_knobs(serve, "ReaLB settings (default: the model's saved values, else the defaults)")
    serve.set_defaults(func=cmd_serve)


def _add_hub_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--base-model",
        help="Hub id of the model these weights come from, for the card (checked against its config; "
        "default: the source if a Hub id)",
    )
    p.add_argument(
        "--telemetry",
        help="telemetry JSON recorded on this model with these settings (realb_hf.hub.save_telemetry(model, path)); "
        "a file from another model is refused",
    )
    p.add_argument(
        "--accuracy-table", help="accuracy table for the card: .json rows or {row: {column: value}}, or a .md file"
    )
    p.add_argument("--license", help="license id for the card metadata")
    p.add_argument("--device", default="cpu", help="where to load the model (default cpu)")
    _add_knobs(p, "ReaLB settings to save (default: the source's saved values, else the defaults)")


def _add_knobs(p: argparse.ArgumentParser, title: str) -> None:
    knobs = p.add_argument_group(title)
    knobs.add_argument("--policy", choices=POLICIES)
    knobs.add_argument("--low-precision", choices=LOW_PRECISION_CHOICES)
    knobs.add_argument("--granularity", choices=GRANULARITIES)
    knobs.add_argument("--weight-cache", choices=WEIGHT_CACHES)
    knobs.add_argument("--ep-size", type=_whole(1))
    knobs.add_argument("--batch-threshold", type=_whole(0))
    knobs.add_argument("--modality-threshold", type=_number)
    knobs.add_argument("--imbalance-threshold", type=_number)
    knobs.add_argument("--conversion-cost", type=_number, help="pairs per lowered expert converted per call")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="realb-hf", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run a tiny image+text batch through a ReaLB model and print the report")
    run.add_argument("--policy", choices=POLICIES, default="realb")
    run.add_argument("--low-precision", choices=LOW_PRECISION_CHOICES, default="auto")
    run.add_argument("--granularity", choices=GRANULARITIES, default="rank")
    run.add_argument("--weight-cache", choices=WEIGHT_CACHES, default="on_the_fly")
    run.add_argument("--ep-size", type=_whole(1), default=4)
    run.add_argument("--num-experts", type=_whole(RUN_TOP_K), default=16, help="experts per MoE layer (top-2)")
    run.add_argument("--batch", type=_whole(1), default=8, help="image+text requests in the batch")
    run.add_argument(
        "--grid", type=_whole(MERGE, MERGE), default=16, help="image patch grid side, even (tokens per image = grid^2/4)"
    )
    run.add_argument("--batch-threshold", type=_whole(0), default=256, help="tokens below which nothing is lowered")
    run.add_argument("--modality-threshold", type=_number, default=0.7)
    run.add_argument("--imbalance-threshold", type=_number, default=0.1)
    run.add_argument("--seed", type=_whole(0), default=0)
    run.add_argument("--json", help="also write the telemetry (with the tiny model's provenance) to this JSON file")
    run.set_defaults(func=cmd_run)

    demo = sub.add_parser(
        "demo",
        add_help=False,
        help="serve the Gradio demo on 127.0.0.1 (options: realb-hf demo --help)",
    )
    demo.add_argument("demo_args", nargs=argparse.REMAINDER)
    demo.set_defaults(func=cmd_demo)

    save = sub.add_parser("save", help="load a model with ReaLB and save it with a model card (README.md)")
    save.add_argument("source", help="local model folder or Hub id")
    save.add_argument("out", help="folder to write")
    _add_hub_options(save)
    save.set_defaults(func=cmd_save)

    push = sub.add_parser(
        "push",
        help="load a model with ReaLB and upload it with a model card; token from HF_TOKEN or `hf auth login`",
    )
    push.add_argument("source", help="local model folder or Hub id")
    push.add_argument("repo_id", help="target repo, e.g. me/qwen3-vl-realb (created if missing)")
    push.add_argument("--private", action="store_true", help="create the repo private (if it does not exist yet)")
    push.add_argument("--revision", help="branch to push to")
    push.add_argument("--create-pr", action="store_true", help="open a pull request instead of committing")
    push.add_argument("--commit-message", default="Upload ReaLB model with realb_hf")
    _add_hub_options(push)
    push.set_defaults(func=cmd_push)

    _add_serve_parser(sub)
    add_calibrate_parser(sub)

    # Forwarded whole to `python -m realb_hf.bench` (see main), listed here for --help.
    sub.add_parser(
        "bench", add_help=False, help="layer/model benchmarks: realb-hf bench {layer,model,trace-info} --help"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["bench"]:
        from .bench.__main__ import main as bench_main

        return bench_main(argv[1:])
    if argv[:1] == ["demo"]:  # everything after `demo` (including --help) belongs to the demo's own parser
        argv = ["demo", "--", *argv[1:]]
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except CardInputError as err:  # reported under the flag that gave the input
        message = f"{_flag(err.field)}: {err.reason}"
    except (ValueError, OSError) as err:  # ordinary mistakes (bad values, missing files, offline): one line
        message = str(err)
    print(f"realb-hf {args.command}: error: {message}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["build_parser", "main"]
