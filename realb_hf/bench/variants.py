"""The variants the layer and end-to-end benchmarks compare: stock, ReaLB's configurations, and the oracle."""

from __future__ import annotations

from dataclasses import dataclass

from .compiled import NOTHING_LOWERED


@dataclass(frozen=True)
class Variant:
    name: str
    kind: str  # "stock" | "realb" | "oracle"
    policy: str = "off"
    granularity: str = "rank"
    weight_cache: str = "on_the_fly"
    description: str = ""
    imbalance_threshold: float | None = None  # None: the benchmark's setting


VARIANTS: dict[str, Variant] = {
    v.name: v
    for v in (
        Variant("stock_bf16", "stock", description="transformers' own experts forward (grouped_mm) in bf16"),
        Variant(
            "realb_nothing_lowered",
            "realb",
            NOTHING_LOWERED["policy"],
            "rank",
            "on_the_fly",
            "ReaLB's own bf16 pipeline: the dynamic policy (decided on the device where it runs) lowering nothing",
            imbalance_threshold=NOTHING_LOWERED["imbalance_threshold"],
        ),
        Variant(
            "realb_rank_otf",
            "realb",
            "realb",
            "rank",
            "on_the_fly",
            "ReaLB, whole overloaded vision ranks lowered, weights converted every call",
        ),
        Variant(
            "realb_rank_persistent",
            "realb",
            "realb",
            "rank",
            "persistent",
            "ReaLB, whole ranks, low-precision weight copies kept (extra memory)",
        ),
        Variant(
            "realb_expert_otf",
            "realb",
            "realb",
            "expert",
            "on_the_fly",
            "ReaLB, hottest vision experts of overloaded ranks lowered, converted every call",
        ),
        Variant(
            "realb_expert_persistent",
            "realb",
            "realb",
            "expert",
            "persistent",
            "ReaLB, expert granularity, weight copies kept",
        ),
        Variant(
            "all_low",
            "realb",
            "all_low",
            "rank",
            "persistent",
            "every expert low (fp8 everywhere on Hopper), weights converted once: a pre-quantized model",
        ),
        Variant(
            "all_low_otf", "realb", "all_low", "rank", "on_the_fly", "every expert low, weights converted every call"
        ),
        Variant("oracle_bf16", "oracle", description="same total work spread perfectly evenly over ranks, bf16"),
    )
}
DEFAULT_VARIANTS = (
    "stock_bf16",
    "realb_nothing_lowered",
    "realb_rank_otf",
    "realb_rank_persistent",
    "realb_expert_otf",
    "realb_expert_persistent",
    "all_low",
    "oracle_bf16",
)
DEFAULT_COMPILE_VARIANTS = ("stock_bf16", "realb_nothing_lowered", "realb_rank_otf", "realb_rank_persistent")


__all__ = ["DEFAULT_COMPILE_VARIANTS", "DEFAULT_VARIANTS", "VARIANTS", "Variant"]
