"""One MoE experts layer of a real model, under virtual expert parallelism: stock bf16 vs ReaLB vs all-low.

Latency model (printed with every result):

- The layer's E experts are split into `ep` contiguous blocks, exactly as transformers' EP shards them.
  Rank r is a separate experts module holding only its block (weight slices, `num_experts` = local count)
  and is called on exactly the rows a real EP rank's experts compute:
  * `all_to_all` (default; transformers' `AllToAllEP`): one row per (token, expert) pair routed to rank r,
    sorted by local expert id, top-1 with unit weights (routing weights are applied at combine, outside).
  * `all_reduce` (transformers' `AllReduceEP`, inference default when the EP group shares the batch): all T
    tokens, top-k local ids with other ranks' experts as the sentinel id and weight 0.
  With ep=1 the single module gets the layer's own (T, k) routing.
- Per-rank time = the median time of that module call (the whole experts forward: sort, gather, GEMMs,
  activation, and for ReaLB its routing statistics, decision and, with `on_the_fly`, the conversion of the
  lowered experts' weights). Layer EP latency = max over ranks: the slowest rank decides when the combine can
  finish. Not included: router, dispatch/combine communication, shared experts. Real EP can hide on-the-fly
  conversion behind the dispatch; here it is counted in full on the rank (`convert_ms` reports its share, so it
  can be subtracted where the dispatch is long enough to hide it).
- A ReaLB rank is what one rank of real EP holds: experts [lo, hi) of the layer, converted with the variant's
  config for the EP size planned, with `realb_placement` naming its experts in the layer. Its timed call is what
  the all-reduce EP runs per layer (`realb_hf.ep.RealbAllReduceEP`): `realb_plan` from the global routing (every
  rank plans from the same global ids, so every rank reaches the same decision), then `realb_run` on the rank's
  rows with local ids. The plan decides where the decision is made (config alone, on the device, or on the host)
  and which executor runs, exactly as in a model.
- oracle_bf16: the same total pairs spread perfectly evenly over ranks and experts, stock bf16: the bound
  any load balancer could reach without lowering precision.

GPU timing: CUDA events around each call (no synchronisation between calls, so the stock path's launches
overlap as they do inside a model), warmup, median of `repeats`, rotating among `input_sets` different
hidden-state tensors. CPU: time.perf_counter with the same structure (a smoke test only).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from typing import Any

import torch

from ..config import RealbConfig
from ..experts import RealbExperts
from ..experts.weights import convert
from ..layer_record import make_record
from ..policy import Decision, PolicyParams, decide, expert_ranges
from ..runtime import RealbRuntime
from .compiled import (
    EAGER,
    CompileSettings,
    compile_callable,
    compiled_subset,
    dynamo_counts,
    failure,
    mode_label,
    ratio,
    reset,
    warm_up,
)
from .layer_presets import build_experts, get_preset, rank_module
from .rank_inputs import MODALITY_SOURCE, RANK_CALL, oracle_inputs, rank_inputs, realb_rank_call, routing_stats
from .timing import PeakMemory, time_calls
from .variants import DEFAULT_COMPILE_VARIANTS, DEFAULT_VARIANTS, VARIANTS, Variant
from .workload import Workload

LATENCY_MODEL = (
    "Virtual EP on one device: the experts are split into `ep` contiguous blocks (as transformers' EP shards "
    "them); each rank is a separate experts module holding only its block, called on exactly the rows a real EP "
    "rank computes ({form}). Per-rank time = median of that call (ReaLB's routing stats, decision and "
    "on-the-fly weight conversion included). Layer EP latency = max over ranks. Excluded: router, dispatch/combine "
    "communication, shared experts. oracle_bf16 = the same total work spread perfectly evenly over ranks and "
    "experts in bf16 (the best any load balancer could do without lowering precision)."
)
EP_FORMS = ("all_to_all", "all_reduce")


@dataclass
class LayerBenchSettings:
    preset: str = "qwen3-vl-30b-a3b"
    ep_sizes: Sequence[int] = (1, 2, 4, 8)
    variants: Sequence[str] = DEFAULT_VARIANTS
    ep_form: str = "all_to_all"
    low_precision: str = "auto"
    modality_threshold: float = 0.7
    batch_threshold: int = 2048
    imbalance_threshold: float = 0.1
    low_cost_ratio: float | None = None
    warmup: int = 5
    repeats: int = 20
    input_sets: int = 3
    seed: int = 0
    dtype: str = "bfloat16"
    device: str | None = None  # None: cuda if available
    progress: bool = True
    compile: CompileSettings = field(default_factory=CompileSettings)
    compile_variants: Sequence[str] = DEFAULT_COMPILE_VARIANTS  # timed compiled too, in every mode of `compile`

    def __post_init__(self) -> None:
        unknown = [v for v in self.variants if v not in VARIANTS]
        if unknown:
            raise ValueError(f"unknown variant(s) {unknown}; choose from {list(VARIANTS)}")
        if self.ep_form not in EP_FORMS:
            raise ValueError(f"ep_form must be one of {EP_FORMS}, got {self.ep_form!r}")
        if self.repeats < 1 or self.warmup < 0 or self.input_sets < 1:
            raise ValueError("repeats >= 1, warmup >= 0 and input_sets >= 1 are required")
        if "stock_bf16" not in self.variants:
            self.variants = ("stock_bf16", *self.variants)  # every speedup is relative to it
        compilable = [v for v in VARIANTS if VARIANTS[v].kind != "oracle"]
        self.compile_variants = compiled_subset(self.compile_variants, self.variants, compilable)

    def realb_config(self, variant: Variant, ep_size: int) -> RealbConfig:
        return RealbConfig(
            policy=variant.policy,
            granularity=variant.granularity,
            weight_cache=variant.weight_cache,
            ep_size=ep_size,
            low_precision=self.low_precision,
            modality_threshold=self.modality_threshold,
            batch_threshold=self.batch_threshold,
            imbalance_threshold=(
                self.imbalance_threshold if variant.imbalance_threshold is None else variant.imbalance_threshold
            ),
            low_cost_ratio=self.low_cost_ratio,
        )

    def timed_rows(self, variant: Variant) -> list[tuple[str, str]]:
        """(row key, compile mode or EAGER) of every row `variant` gets: eager, then one per compile mode."""
        rows = [(variant.name, EAGER)]
        if variant.name in self.compile_variants:
            rows += [(row_key(variant.name, m), m) for m in self.compile.modes]
        return rows


def row_key(variant: str, mode: str) -> str:
    """A row's name in results: the variant's, with the compile mode in brackets for a compiled row."""
    return variant if mode == EAGER else f"{variant} [{mode_label(mode)}]"


def resolve_device(name: str | None) -> torch.device:
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


# ---- the benchmark -------------------------------------------------------------------------------


@dataclass
class RankResult:
    rank: int
    pairs: int
    vision_share: float
    precision: str
    ms: float
    min_ms: float
    max_ms: float
    first_ms: float
    convert_ms: float | None = None
    peak_mem_bytes: int = 0
    cache_bytes: int = 0
    compile_s: float | None = None  # compiled rows: seconds of the first (compiling) call
    graph_breaks: int | None = None  # compiled rows: dynamo's graph breaks while compiling


@dataclass
class VariantResult:
    variant: str
    description: str
    layer_ms: float
    slowest_rank: int
    mean_rank_ms: float
    speedup_vs_stock: float | None = 1.0  # None: stock of this mode failed to compile
    lowered_fraction: float = 0.0
    reason: str = ""
    predicted_speedup: float | None = None
    rank_precision: list[str] = field(default_factory=list)
    peak_mem_bytes: int = 0  # max over ranks
    cache_bytes_per_rank: int = 0  # max over ranks (persistent low-precision weight copies)
    ranks: list[RankResult] = field(default_factory=list)
    base_variant: str = ""  # the variant's name (`variant` also names a compiled row's mode)
    mode: str = EAGER  # "eager" or the compiled row's mode label
    compiled: bool = False
    speedup_vs_nothing_lowered: float | None = None  # the precision lever's own gain, same mode
    compile_s: float = 0.0  # sum over ranks of the first (compiling) call
    graph_breaks: int = 0  # max over ranks


def _variant_result(variant: Variant, ranks: list[RankResult], key: str | None = None) -> VariantResult:
    slowest = max(ranks, key=lambda r: r.ms)
    return VariantResult(
        variant=key or variant.name,
        base_variant=variant.name,
        description=variant.description,
        layer_ms=slowest.ms,
        slowest_rank=slowest.rank,
        mean_rank_ms=sum(r.ms for r in ranks) / len(ranks),
        rank_precision=[r.precision for r in ranks],
        peak_mem_bytes=max(r.peak_mem_bytes for r in ranks),
        cache_bytes_per_rank=max(r.cache_bytes for r in ranks),
        ranks=ranks,
    )


def run_layer_bench(
    workloads: Sequence[tuple[str, Workload, dict[str, Any]]], settings: LayerBenchSettings
) -> dict[str, Any]:
    """Time every variant at every EP size for every (label, workload, info) and return a JSON-ready dict."""
    from tqdm.auto import tqdm

    preset = get_preset(settings.preset)
    device = resolve_device(settings.device)
    dtype = DTYPES[settings.dtype]
    for ep in settings.ep_sizes:
        expert_ranges(preset.num_experts, ep)  # raises if ep does not divide the expert count
    for label, wl, _ in workloads:
        if wl.num_experts != preset.num_experts:
            raise ValueError(
                f"workload {label!r} routes to {wl.num_experts} experts; preset {preset.name} has {preset.num_experts}"
            )
    experts = build_experts(preset, device, dtype, settings.seed)
    variants = [VARIANTS[v] for v in settings.variants]
    timed = [v for v in variants if v.kind != "oracle"]
    oracle = any(v.kind == "oracle" for v in variants)
    steps = len(workloads) * sum(ep * len(timed) + oracle for ep in settings.ep_sizes)
    bar = tqdm(total=steps, desc=f"layer {preset.name}", disable=not settings.progress, leave=False)
    out_workloads = []
    with torch.no_grad():
        for label, workload, info in workloads:
            wl = workload.to(device)
            gen = torch.Generator(device=device).manual_seed(settings.seed + 1)
            hidden_sets = [
                torch.randn(wl.tokens, preset.hidden, device=device, dtype=dtype, generator=gen)
                for _ in range(settings.input_sets)
            ]
            stats = routing_stats(wl)
            eps = []
            for ep in settings.ep_sizes:
                eps.append(_bench_ep(experts, wl, hidden_sets, stats, ep, variants, settings, device, bar))
            out_workloads.append(
                {
                    "label": label,
                    **info,
                    "workload": workload.describe(),
                    "max_over_mean": {
                        str(ep): round(workload.rank_load(ep).max_over_mean, 6) for ep in settings.ep_sizes
                    },
                    "eps": eps,
                }
            )
            del hidden_sets
            if device.type == "cuda":
                torch.cuda.empty_cache()
    bar.close()
    return {
        "kind": "layer",
        "preset": asdict(preset),
        "settings": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(settings).items()},
        "device": str(device),
        "latency_model": LATENCY_MODEL.format(form=settings.ep_form),
        "realb_rank_call": RANK_CALL,
        "variants": {v.name: v.description for v in variants},
        "workloads": out_workloads,
    }


def _bench_ep(experts, wl, hidden_sets, stats, ep, variants, settings, device, bar) -> dict[str, Any]:
    e_local = wl.num_experts // ep
    decisions: dict[str, tuple[Decision, PolicyParams, Any]] = {}
    for v in variants:
        if v.kind == "realb":
            params = RealbRuntime(config=settings.realb_config(v, ep)).params(device)
            decision = decide(stats, params)  # what every rank's plan decides: reported per variant
            record = make_record(0, "bench", stats, decision, params, MODALITY_SOURCE)
            decisions[v.name] = (decision, params, record)
    load = wl.rank_load(ep)
    timed = [v for v in variants if v.kind != "oracle"]
    rank_results: dict[str, list[RankResult | str]] = {k: [] for v in timed for k, _ in settings.timed_rows(v)}
    for r in range(ep):
        lo, hi = r * e_local, (r + 1) * e_local
        inputs = rank_inputs(wl, hidden_sets, r, ep, settings.ep_form)
        vision_share = inputs.vision_pairs / inputs.pairs if inputs.pairs else 0.0
        for v in timed:
            bar.set_postfix_str(f"ep={ep} rank={r} {v.name}")
            rows = _bench_rank(
                experts, wl, v, decisions.get(v.name), inputs, lo, hi, ep, r, vision_share, settings, device
            )
            for key, result in rows.items():
                rank_results[key].append(result)
            bar.update(1)
        del inputs
    results: dict[str, VariantResult | dict[str, Any]] = {}
    for v in variants:
        if v.kind == "oracle":
            bar.set_postfix_str(f"ep={ep} oracle")
            results[v.name] = _oracle(experts, wl, hidden_sets, v, ep, e_local, settings, device)
            bar.update(1)
            continue
        for key, mode in settings.timed_rows(v):
            ranks = rank_results[key]
            errors = [r for r in ranks if isinstance(r, str)]
            if errors:  # a rank whose compile failed: the row reports the error instead of a time
                results[key] = {"variant": key, "mode": mode_label(mode), "compiled": True, "error": errors[0]}
                continue
            res = _variant_result(v, ranks, key)
            res.mode, res.compiled = mode_label(mode), mode != EAGER
            if res.compiled:
                res.compile_s = sum(r.compile_s or 0.0 for r in ranks)
                res.graph_breaks = max(r.graph_breaks or 0 for r in ranks)
            if v.name in decisions:
                decision, params, record = decisions[v.name]
                res.lowered_fraction = record.lowered_fraction
                res.reason = record.reason
                res.predicted_speedup = record.predicted_speedup
            results[key] = res
    _add_ratios(results)
    return {
        "ep": ep,
        "local_experts": e_local,
        "rank_pairs": load.pairs,
        "rank_vision_share": [round(s, 6) for s in load.vision_share],
        "max_over_mean": round(load.max_over_mean, 6),
        "variants": {name: res if isinstance(res, dict) else asdict(res) for name, res in results.items()},
    }


def _add_ratios(results: dict[str, VariantResult | dict[str, Any]]) -> None:
    """Against stock and against ReaLB's bf16 pipeline (nothing lowered) of the same mode: a compiled row is
    compared with compiled rows of its mode, an eager one (and the oracle) with eager rows."""
    rows = [r for r in results.values() if isinstance(r, VariantResult)]
    for res in rows:
        same = {r.base_variant: r.layer_ms for r in rows if r.mode == res.mode}
        res.speedup_vs_stock = ratio(same.get("stock_bf16"), res.layer_ms)
        res.speedup_vs_nothing_lowered = ratio(same.get("realb_nothing_lowered"), res.layer_ms)


def _oracle(experts, wl, hidden_sets, v: Variant, ep: int, e_local: int, settings, device) -> VariantResult:
    module = rank_module(experts, 0, e_local, ep > 1)
    calls = oracle_inputs(wl, hidden_sets, ep, settings.ep_form)
    with PeakMemory(device) as mem:
        t = time_calls(module, calls, settings.warmup, settings.repeats, device)
    pairs = -(-wl.tokens * wl.top_k // ep)
    ranks = [
        RankResult(
            0, pairs, wl.vision_share, "bf16", t.median_ms, t.min_ms, t.max_ms, t.first_ms, peak_mem_bytes=mem.peak
        )
    ]
    res = _variant_result(v, ranks)
    res.rank_precision = ["bf16"] * ep
    return res


def _convert_ms(module: RealbExperts, fmt: str, experts: list[int], settings, device: torch.device) -> float:
    """What on_the_fly converts on a rank per call (its lowered experts with rows), timed alone."""
    t = time_calls(lambda: convert(module, fmt, experts), [()], 1, max(3, settings.repeats // 4), device)
    return t.median_ms


def _bench_rank(
    experts, wl, variant, decided, inputs, lo, hi, ep, rank, vision_share, settings, device
) -> dict[str, RankResult | str]:
    """This rank's result for every row of `variant` (eager, then compiled in each mode): the same module, rows and
    input sets for all of them; a compiled row whose compile fails holds the error instead."""
    rows = settings.timed_rows(variant)
    if inputs.pairs == 0 and ep > 1 and settings.ep_form == "all_to_all":
        return {key: RankResult(rank, 0, 0.0, "idle", 0.0, 0.0, 0.0, 0.0) for key, _ in rows}
    precision, convert_ms, cache = "bf16", None, 0
    if variant.kind == "realb":
        decision, params, _ = decided
        module = rank_module(experts, lo, hi, ep > 1, settings.realb_config(variant, ep))
        call, calls = realb_rank_call(module, wl), inputs.realb_calls()
        kinds = set(decision.expert_precision[lo:hi])
        precision = kinds.pop() if len(kinds) == 1 else "mixed"
        lowered = [j for j in range(hi - lo) if decision.expert_precision[lo + j] != params.high]
        with_rows = [j for j in lowered if int(inputs.expert_rows[j]) > 0]
        if variant.weight_cache == "on_the_fly" and with_rows:
            convert_ms = _convert_ms(module, params.low, with_rows, settings, device)
    else:
        module = rank_module(experts, lo, hi, ep > 1)
        call, calls = module, inputs.calls
    out: dict[str, RankResult | str] = {}
    for key, mode in rows:
        compile_s = graph_breaks = None
        try:
            fn = call if mode == EAGER else compile_callable(call, mode, settings.compile.backend)
            if mode != EAGER:
                compile_s = warm_up(partial(fn, *calls[0]))
            with PeakMemory(device) as mem:
                t = time_calls(fn, calls, settings.warmup, settings.repeats, device)
            if mode != EAGER:
                graph_breaks = dynamo_counts()["graph_breaks"]
        except Exception as err:
            if mode == EAGER:
                raise
            out[key] = failure(err)
            continue
        if variant.kind == "realb":
            cache = module.realb_runtime.telemetry.extra_memory_bytes
        out[key] = RankResult(
            rank,
            inputs.pairs,
            vision_share,
            precision,
            t.median_ms,
            t.min_ms,
            t.max_ms,
            t.first_ms,
            convert_ms=convert_ms,
            peak_mem_bytes=mem.peak,
            cache_bytes=cache,
            compile_s=compile_s,
            graph_breaks=graph_breaks,
        )
    if len(rows) > 1:
        reset()  # frees the compiled rank's graphs (and CUDA-graph pools) before the next rank
    del module, call
    return out


__all__ = [
    "DTYPES",
    "EP_FORMS",
    "LATENCY_MODEL",
    "LayerBenchSettings",
    "RankResult",
    "VariantResult",
    "resolve_device",
    "row_key",
    "run_layer_bench",
]
