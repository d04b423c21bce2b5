"""Compiled rows for the benchmarks: `torch.compile` applied the way a user applies it, timed next to eager.

Stock and ReaLB are compiled separately (`torch.compile(module_or_model, dynamic=False)`: the benchmarks use fixed
shapes), each after a dynamo reset (`reset`), so no variant runs on another's cached graphs or hits the recompile
limit that the variants of one process would share. The first calls compile (and, with "reduce-overhead",
record the CUDA graphs); they are warm-up, never timed. Ratios compare like with like: a compiled row against
compiled stock of the same mode, an eager row against eager stock.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

EAGER = "eager"
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune-no-cudagraphs")
COMPILE_BACKENDS = ("inductor", "aot_eager", "eager")
# With this imbalance threshold no rank is ever overloaded, so the dynamic policy runs its own pipeline (the device
# decision and executor where they run) and lowers nothing: ReaLB's bf16 pipeline, without the precision lever.
NOTHING_LOWERED = dict(policy="realb", imbalance_threshold=1e9)


@dataclass(frozen=True)
class CompileSettings:
    """Which compiled rows a benchmark adds: one per mode in `modes` (none: eager rows only)."""

    modes: tuple[str, ...] = ()
    backend: str = "inductor"

    def __post_init__(self) -> None:
        bad = [m for m in self.modes if m not in COMPILE_MODES]
        if bad:
            raise ValueError(f"unknown compile mode(s) {bad}; allowed: {list(COMPILE_MODES)}")
        if self.backend not in COMPILE_BACKENDS:
            raise ValueError(f"unknown compile backend {self.backend!r}; allowed: {list(COMPILE_BACKENDS)}")
        if self.backend != "inductor" and any(m != "default" for m in self.modes):
            raise ValueError(f"compile modes other than 'default' need the inductor backend, not {self.backend!r}")

    @property
    def labels(self) -> tuple[str, ...]:
        """The timing labels of a benchmark run: eager first, then one per compile mode."""
        return (EAGER, *(mode_label(m) for m in self.modes))


def mode_label(mode: str) -> str:
    """How a row's timing mode is named in tables and JSON: "eager", "compiled", "compiled reduce-overhead"."""
    return EAGER if mode == EAGER else "compiled" if mode == "default" else f"compiled {mode}"


def add_compile_arguments(parser: argparse.ArgumentParser, several_modes: bool = False) -> None:
    """`--compile`, `--compile-mode` and `--compile-backend` (see `CompileSettings`)."""
    g = parser.add_argument_group("torch.compile rows")
    g.add_argument(
        "--compile",
        action="store_true",
        help="also time compiled stock and compiled ReaLB (torch.compile, dynamic=False) next to the eager rows",
    )
    g.add_argument(
        "--compile-mode",
        nargs="+" if several_modes else None,
        choices=COMPILE_MODES,
        default=["default"] if several_modes else "default",
        help="torch.compile mode(s) of the compiled rows" + (" (one set of rows per mode)" if several_modes else ""),
    )
    g.add_argument(
        "--compile-backend",
        choices=COMPILE_BACKENDS,
        default="inductor",
        help="torch.compile backend (aot_eager or eager: fast CPU smoke tests)",
    )


def settings_from_args(args: argparse.Namespace) -> CompileSettings:
    if not args.compile:
        return CompileSettings((), args.compile_backend)
    modes = args.compile_mode if isinstance(args.compile_mode, list) else [args.compile_mode]
    return CompileSettings(tuple(dict.fromkeys(modes)), args.compile_backend)


def compiled_subset(
    requested: Sequence[str], timed: Sequence[str], compilable: Sequence[str], stock: str = "stock_bf16"
) -> tuple[str, ...]:
    """The variants that get compiled rows: `requested` that this run times, with `stock` first, since every
    compiled row is compared with compiled stock. Names that cannot be compiled are refused."""
    bad = [v for v in requested if v not in compilable]
    if bad:
        raise ValueError(f"cannot compile {bad}; compile variants are {list(compilable)}")
    return tuple(v for v in dict.fromkeys((stock, *requested)) if v in (*timed, stock))


def reset() -> None:
    """`torch._dynamo.reset()`, and dynamo's counters with it (the reset keeps them), so `dynamo_counts` counts what
    compiles from here on, not what earlier rows compiled."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()


def compile_callable(fn: Callable, mode: str, backend: str) -> Callable:
    """`torch.compile(fn, dynamic=False)` after a dynamo reset; with "reduce-overhead" each call first marks a new
    step, as a serving loop does, so a replay may overwrite the previous call's outputs."""
    reset()
    compiled = torch.compile(fn, backend=backend, mode=None if mode == "default" else mode, dynamic=False)
    if mode != "reduce-overhead":
        return compiled

    def step(*args, **kwargs):
        torch.compiler.cudagraph_mark_step_begin()
        return compiled(*args, **kwargs)

    return step


def dynamo_counts() -> dict[str, int]:
    """Graph breaks, graphs compiled and graphs CUDA graphs skipped since the last `reset` (torch's counters)."""
    from torch._dynamo.utils import counters

    return {
        "graph_breaks": int(sum(counters["graph_break"].values())),
        "graphs": int(counters["stats"]["unique_graphs"]),
        "cudagraph_skips": int(counters["inductor"]["cudagraph_skips"]),  # reduce-overhead graphs run without
    }


def warm_up(fn: Callable[[], Any], calls: int = 3) -> float:
    """Call `fn` `calls` times (compilation and CUDA-graph recording happen here); seconds the first call took."""
    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    start = time.perf_counter()
    for i in range(calls):
        fn()
        if i == 0:
            if cuda:
                torch.cuda.synchronize()
            first = time.perf_counter() - start
    if cuda:
        torch.cuda.synchronize()
    return first


def failure(err: BaseException) -> str:
    """A failed compiled row's note: the exception type and its first line."""
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0][:300] if lines else ''}"


def ratio(base_ms: float | None, ms: float | None) -> float | None:
    """base / ms (a speedup), None when either is missing or not positive."""
    if base_ms is None or ms is None or base_ms <= 0 or ms <= 0:
        return None
    return base_ms / ms


__all__ = [
    "COMPILE_BACKENDS",
    "COMPILE_MODES",
    "EAGER",
    "NOTHING_LOWERED",
    "CompileSettings",
    "add_compile_arguments",
    "compile_callable",
    "compiled_subset",
    "dynamo_counts",
    "failure",
    "mode_label",
    "ratio",
    "reset",
    "settings_from_args",
    "warm_up",
]
