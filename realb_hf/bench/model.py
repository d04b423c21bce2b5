"""End-to-end prefill of a whole model with Qwen3-VL-30B-A3B's real configuration (random weights, no download).

Stock bf16, ReaLB variants and all-low (fp8 everywhere on Hopper) run on the same model object and the same
batch in one process: the model is timed unconverted first (stock), then converted once with
`realb_hf.apply_realb` and re-timed under each ReaLB configuration (`runtime.reconfigure`).

What single-process numbers mean: all experts live on one GPU, so a forward costs the SUM of every virtual
rank's work; the EP straggler effect (the layer waits for its slowest rank) is not present. ReaLB's gain
here is only the lowered work running faster, minus its bookkeeping. The EP latency effect is measured by
the layer benchmark (max over ranks) or under real EP (`realb_hf.bench.ep_prefill` under torchrun).

Vision-skewed routing, two ways:
1. `VisionRouterBias` (`realb_hf.bench.router_bias`; BENCHMARK-ONLY, changes the model's routing): a forward
   hook on every router adds `bias` to the router logits of a hot expert subset for vision rows, then redoes the
   router's own softmax -> top-k -> renormalisation. Random-weight routers route almost uniformly; this makes vision
   tokens crowd onto the hot experts' EP rank as the paper observes in trained models. The bias is
   calibrated so that the mean over layers of the max/mean rank load at EP=`ep` hits `--skew`.
2. Replaying a recorded trace (`--trace`, see `realb_hf.bench.trace`): the recorded routing of a real model
   replaces every experts module's routing; the batch is text-only tokens of the recorded shape with the
   recorded modality as `mm_token_type_ids` (the vision tower does not run in this mode).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import torch

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
from .layer import DTYPES, resolve_device, row_key
from .prefill_batch import PrefillBatch, image_text_batch, prefill_forward, trace_batch
from .router_bias import VisionRouterBias, calibrate_bias, measure_skew
from .timing import time_calls
from .variants import VARIANTS

MEASURES = (
    "Wall time of one prefill forward of the whole model (vision tower, attention, routers, experts; "
    "use_cache=False, logits of the last position only), CUDA events, median of repeats. Single process: every "
    "expert on one GPU, so this is the SUM of all virtual EP ranks' work, not EP latency. ReaLB decides per layer "
    "for virtual EP=`ep` and lowers the experts of the overloaded vision ranks; stock_bf16 is the unconverted "
    "model, realb_off the converted model with policy=off (ReaLB's bookkeeping only), realb_nothing_lowered ReaLB's own "
    "bf16 pipeline (the dynamic policy lowering nothing). Compiled rows: torch.compile(model, dynamic=False) of the "
    "same model in the same configuration, compiled stock before the conversion."
)

# Qwen/Qwen3-VL-30B-A3B-Instruct config.json (public): text 48 layers, hidden 2048, 32 heads / 4 KV heads of 128,
# 128 experts top-8 with moe_intermediate 768; vision 27 layers, hidden 1152, patch 16, merge 2.
QWEN3_VL_30B_A3B: dict[str, Any] = dict(
    text_config=dict(
        vocab_size=151936,
        hidden_size=2048,
        intermediate_size=6144,
        num_hidden_layers=48,
        num_attention_heads=32,
        num_key_value_heads=4,
        head_dim=128,
        hidden_act="silu",
        max_position_embeddings=262144,
        rms_norm_eps=1e-6,
        rope_parameters={
            "rope_type": "default",
            "rope_theta": 5000000.0,
            "mrope_section": [24, 20, 20],
            "mrope_interleaved": True,
        },
        attention_bias=False,
        decoder_sparse_step=1,
        moe_intermediate_size=768,
        num_experts_per_tok=8,
        num_experts=128,
        norm_topk_prob=True,
        tie_word_embeddings=False,
        bos_token_id=151643,
        eos_token_id=151645,
    ),
    vision_config=dict(
        depth=27,
        hidden_size=1152,
        hidden_act="gelu_pytorch_tanh",
        intermediate_size=4304,
        num_heads=16,
        in_channels=3,
        patch_size=16,
        spatial_merge_size=2,
        temporal_patch_size=2,
        out_hidden_size=2048,
        num_position_embeddings=2304,
        deepstack_visual_indexes=[8, 16, 24],
    ),
    image_token_id=151655,
    video_token_id=151656,
    vision_start_token_id=151652,
    vision_end_token_id=151653,
    tie_word_embeddings=False,
)
MODEL_PRESETS = ("qwen3-vl-30b-a3b", "tiny")
MODEL_DEFAULT_VARIANTS = (
    "stock_bf16",
    "realb_off",
    "realb_nothing_lowered",
    "realb_rank_otf",
    "realb_expert_otf",
    "realb_rank_persistent",
    "all_low",
)
MODEL_VARIANTS = ("stock_bf16", "realb_off", *[v for v in VARIANTS if VARIANTS[v].kind == "realb"])
MODEL_DEFAULT_COMPILE_VARIANTS = ("stock_bf16", "realb_nothing_lowered", "realb_rank_otf")


def model_config(preset: str, layers: int | None = None):
    """The transformers config of `preset`, optionally cut to `layers` decoder layers."""
    if preset == "qwen3-vl-30b-a3b":
        from transformers import Qwen3VLMoeConfig

        kwargs = {**QWEN3_VL_30B_A3B, "text_config": dict(QWEN3_VL_30B_A3B["text_config"])}
        if layers is not None:
            kwargs["text_config"]["num_hidden_layers"] = layers
        return Qwen3VLMoeConfig(**kwargs)
    if preset == "tiny":
        from ..tiny import tiny_qwen3_vl_moe_config

        return tiny_qwen3_vl_moe_config(num_experts=16, top_k=4, layers=layers or 2)
    raise ValueError(f"unknown model preset {preset!r}; choose one of {list(MODEL_PRESETS)}")


def build_model(config, device: torch.device, dtype: torch.dtype = torch.bfloat16, seed: int = 0) -> torch.nn.Module:
    """Random weights allocated directly on `device` (no download, no CPU copy)."""
    from transformers import AutoModelForImageTextToText

    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForImageTextToText.from_config(config, dtype=dtype)
    return model.eval()


# ---- the benchmark -------------------------------------------------------------------------------


@dataclass
class ModelBenchSettings:
    preset: str = "qwen3-vl-30b-a3b"
    layers: int | None = None
    requests: int = 16
    request_tokens: int = 1024
    vision_share: float = 0.7
    skew: float | None = 1.6
    router_bias: float | None = None  # set: skip calibration
    hot_experts: int | None = None
    hot_offset: int = 0
    ep: int = 8
    trace: str | None = None
    variants: tuple[str, ...] = MODEL_DEFAULT_VARIANTS
    low_precision: str = "auto"
    modality_threshold: float = 0.7
    batch_threshold: int = 2048
    imbalance_threshold: float = 0.1
    low_cost_ratio: float | None = None
    warmup: int = 2
    repeats: int = 5
    seed: int = 0
    dtype: str = "bfloat16"
    device: str | None = None
    progress: bool = True
    compile: CompileSettings = field(default_factory=CompileSettings)
    compile_variants: tuple[str, ...] = MODEL_DEFAULT_COMPILE_VARIANTS  # timed compiled too, in every mode

    def __post_init__(self) -> None:
        unknown = [v for v in self.variants if v not in MODEL_VARIANTS]
        if unknown:
            raise ValueError(f"unknown model variant(s) {unknown}; choose from {list(MODEL_VARIANTS)}")
        at_least = {"requests": 1, "request_tokens": 1, "ep": 1, "repeats": 1, "warmup": 0, "hot_offset": 0}
        at_least |= {k: 1 for k in ("layers", "hot_experts") if getattr(self, k) is not None}
        for name, low in at_least.items():
            if getattr(self, name) < low:
                raise ValueError(f"{name} must be >= {low}, got {getattr(self, name)}")
        if not 0.0 <= self.vision_share <= 1.0:
            raise ValueError(f"vision_share must lie in [0, 1], got {self.vision_share}")
        if self.skew is not None and self.router_bias is None and self.trace is None:
            if self.skew < 1.0:
                raise ValueError(f"max/mean rank load is >= 1 by definition, got skew {self.skew}")
            if self.ep < 2:
                raise ValueError(
                    "the router bias is calibrated to a max/mean rank load, which needs ep >= 2 (with one rank it is "
                    "always 1); give ep >= 2 or a fixed router bias"
                )
        if "stock_bf16" not in self.variants:
            self.variants = ("stock_bf16", *self.variants)
        order = {name: i for i, name in enumerate(MODEL_VARIANTS)}
        self.variants = tuple(sorted(dict.fromkeys(self.variants), key=lambda v: order[v]))  # stock first
        self.compile_variants = compiled_subset(self.compile_variants, self.variants, MODEL_VARIANTS)

    def modes(self, variant: str) -> tuple[str, ...]:
        """EAGER, then every compile mode where `variant` is compiled."""
        return (EAGER, *(self.compile.modes if variant in self.compile_variants else ()))


def _persistent_bytes(model, low: str) -> int:
    from ..quantizer import realb_modules

    params = sum(
        m.gate_up_proj.numel() + m.down_proj.numel() for m in realb_modules(model) if hasattr(m, "gate_up_proj")
    )
    return int(params * (1.02 if low == "fp8" else 0.57))


def _time_prefill(model, batch: PrefillBatch, mode: str, settings: ModelBenchSettings, device, runtime) -> dict:
    """One row: the prefill of `model` as it is configured now, eager or compiled in `mode` (a failed compile is
    reported in the row, not raised)."""
    entry: dict[str, Any] = {"mode": mode_label(mode), "compiled": mode != EAGER, "compile_mode": mode}
    try:
        forward = model if mode == EAGER else compile_callable(model, mode, settings.compile.backend)
        if mode != EAGER:
            entry["compile_s"] = warm_up(lambda: prefill_forward(forward, batch))
            entry.update(dynamo_counts())
        t = time_calls(lambda: prefill_forward(forward, batch), [()], settings.warmup, settings.repeats, device)
    except Exception as err:
        if mode == EAGER:
            raise
        entry["error"] = failure(err)
        return entry
    finally:
        if mode != EAGER:
            reset()  # the next configuration compiles afresh; frees this one's graphs
    entry.update(
        ms=t.median_ms,
        min_ms=t.min_ms,
        max_ms=t.max_ms,
        first_ms=t.first_ms,
        tokens_per_s=batch.tokens / (t.median_ms / 1e3),
    )
    if runtime is not None:
        summary = runtime.telemetry.summary()
        entry.update(
            lowered_fraction=summary["lowered_token_fraction"],
            layers_lowered=summary["layers_lowered"] / max(1, summary["forwards"]),
            predicted_layer_speedup=summary["predicted_speedup"],
            extra_memory_bytes=runtime.telemetry.extra_memory_bytes,
        )
    return entry


def _add_ratios(results: dict[str, dict[str, Any]]) -> None:
    """Against stock and against ReaLB's bf16 pipeline (nothing lowered) of the same mode."""
    for entry in results.values():
        if "ms" not in entry:
            continue
        mode = entry["compile_mode"]
        stock, nothing = (
            results.get(row_key("stock_bf16", mode), {}),
            results.get(row_key("realb_nothing_lowered", mode), {}),
        )
        entry["speedup_vs_stock"] = ratio(stock.get("ms"), entry["ms"])
        entry["speedup_vs_nothing_lowered"] = ratio(nothing.get("ms"), entry["ms"])


def run_model_bench(settings: ModelBenchSettings) -> dict[str, Any]:
    from tqdm.auto import tqdm

    from .. import RealbConfig, apply_realb, get_runtime
    from ..quantizer import realb_modules
    from .trace import RoutingReplayer, Trace

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError(
            "the model benchmark runs in one process (virtual EP); under torchrun use the real-EP prefill "
            "benchmark: torchrun --nproc_per_node N -m realb_hf.bench.ep_prefill ..."
        )
    device = resolve_device(settings.device)
    dtype = DTYPES[settings.dtype]
    config = model_config(settings.preset, settings.layers)
    text = config.text_config
    model = build_model(config, device, dtype, settings.seed)
    num_experts, top_k = text.num_experts, text.num_experts_per_tok
    hot = settings.hot_experts or max(top_k, num_experts // 16)
    hot_ids = list(range(settings.hot_offset, settings.hot_offset + hot))

    routing: dict[str, Any] = {"ep": settings.ep}
    biaser = replayer = None
    if settings.trace:
        trace = Trace.load(settings.trace)
        rows = trace.forwards[0].routing[trace.layers[0]].top_k_index.shape[0]
        # replay cycles through the recorded forwards of the first forward's size (one batch shape per run)
        trace.forwards = [f for f in trace.forwards if all(r.top_k_index.shape[0] == rows for r in f.routing.values())]
        batch = trace_batch(config, trace, device, settings.seed)
        replayer = RoutingReplayer(model, trace).attach()
        routing["description"] = f"replayed from trace {settings.trace} (text-only tokens, recorded modality)"
        routing["mean_max_over_mean"] = float(
            sum(trace.workload(name, 0).rank_load(settings.ep).max_over_mean for name in trace.layers)
            / len(trace.layers)
        )
    else:
        batch = image_text_batch(
            config, settings.requests, settings.request_tokens, settings.vision_share, device, dtype, settings.seed
        )
        biaser = VisionRouterBias(model, hot_ids)
        biaser.codes = batch.codes
        if settings.router_bias is not None:
            bias = settings.router_bias
        elif settings.skew is not None:
            bias, _ = calibrate_bias(model, batch, biaser, settings.skew, settings.ep)
        else:
            bias = 0.0
        per_layer = measure_skew(model, batch, biaser, bias, settings.ep)
        biaser.bias = bias
        routing.update(
            description=(
                f"BENCHMARK-ONLY router bias {bias:.4f} on the logits of experts {hot_ids[0]}..{hot_ids[-1]} for vision "
                f"rows (calibrated to max/mean {settings.skew} at EP={settings.ep})"
                if settings.router_bias is None and settings.skew is not None
                else f"BENCHMARK-ONLY router bias {bias:.4f} on experts {hot_ids[0]}..{hot_ids[-1]} for vision rows"
            ),
            bias=bias,
            hot_experts=hot_ids,
            skew_target=settings.skew,
            mean_max_over_mean=sum(per_layer) / len(per_layer),
            max_over_mean_per_layer=[round(s, 4) for s in per_layer],
        )

    results: dict[str, dict[str, Any]] = {}
    runtime = None
    bar = tqdm(settings.variants, desc="model variants", leave=False, disable=not settings.progress)
    with torch.no_grad():
        for name in bar:
            bar.set_postfix_str(name)
            if name != "stock_bf16" and runtime is None:
                apply_realb(
                    model,
                    RealbConfig(
                        policy="off",
                        ep_size=settings.ep,
                        low_precision=settings.low_precision,
                        modality_threshold=settings.modality_threshold,
                        batch_threshold=settings.batch_threshold,
                        imbalance_threshold=settings.imbalance_threshold,
                        low_cost_ratio=settings.low_cost_ratio,
                    ),
                )
                runtime = get_runtime(model)
            if runtime is not None:
                for m in realb_modules(model):
                    m.realb_free_cache()
                runtime.telemetry.extra_memory_bytes = 0
                if name == "realb_off":
                    runtime.reconfigure(policy="off")
                else:
                    v = VARIANTS[name]
                    runtime.reconfigure(
                        policy=v.policy,
                        granularity=v.granularity,
                        weight_cache=v.weight_cache,
                        imbalance_threshold=(
                            settings.imbalance_threshold if v.imbalance_threshold is None else v.imbalance_threshold
                        ),
                    )
                    if v.weight_cache == "persistent" and device.type == "cuda":
                        torch.cuda.empty_cache()
                        need = _persistent_bytes(model, runtime.params(device).low)
                        free = torch.cuda.mem_get_info(device)[0]
                        if need + 3 * 2**30 > free:
                            results[name] = {
                                "skipped": f"persistent copies need {need / 2**30:.1f} GiB, {free / 2**30:.1f} GiB free "
                                "(use --layers to cut depth)"
                            }
                            continue
            for mode in settings.modes(name):
                if runtime is not None:
                    runtime.telemetry.reset()
                results[row_key(name, mode)] = _time_prefill(model, batch, mode, settings, device, runtime)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    _add_ratios(results)
    if replayer is not None:
        replayer.detach()
    if biaser is not None:
        biaser.remove()
    return {
        "kind": "model",
        "device": str(device),
        "measures": MEASURES,
        "model": {
            "preset": settings.preset,
            "layers": text.num_hidden_layers,
            "num_experts": num_experts,
            "top_k": top_k,
            "hidden": text.hidden_size,
            "moe_intermediate": text.moe_intermediate_size,
        },
        "settings": {k: (list(v) if isinstance(v, tuple) else v) for k, v in settings.__dict__.items()},
        "batch": {
            "requests": batch.requests,
            "request_tokens": batch.request_tokens,
            "tokens": batch.tokens,
            "image_tokens_per_request": batch.image_tokens_per_request,
            "vision_share": batch.vision_share,
        },
        "routing": routing,
        "variants": results,
    }


__all__ = [
    "MEASURES",
    "MODEL_DEFAULT_VARIANTS",
    "MODEL_PRESETS",
    "MODEL_VARIANTS",
    "QWEN3_VL_30B_A3B",
    "ModelBenchSettings",
    "build_model",
    "model_config",
    "run_model_bench",
]
