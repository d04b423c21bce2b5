"""BENCHMARK-ONLY vision-skewed routing: a bias on the routers' logits that crowds vision tokens onto a hot
expert subset, calibrated to a target max/mean rank load. Random-weight routers route almost uniformly; trained
multimodal models do not, and the benchmarks need their skew."""

from __future__ import annotations

import torch

from .prefill_batch import PrefillBatch, prefill_forward
from .workload import rank_load


class VisionRouterBias:
    """BENCHMARK-ONLY: makes vision tokens crowd onto a hot expert subset by biasing the routers' logits.

    NEVER use this for anything but timing: it changes which experts every vision token runs, so model outputs
    are meaningless while attached. A forward hook on each Qwen3-VL-MoE router adds `bias` to the logits of
    `hot_experts` for the rows whose modality code is vision, then recomputes exactly what
    `Qwen3VLMoeTextTopKRouter.forward` returns (softmax in fp32, top-k, renormalise, cast to the logits' dtype).
    With `record=True` it also keeps every router call's top-k ids (for calibration and reporting).
    """

    ROUTER_CLASSES = ("Qwen3VLMoeTextTopKRouter",)

    def __init__(self, model: torch.nn.Module, hot_experts: list[int], bias: float = 0.0):
        self.routers = [m for m in model.modules() if type(m).__name__ in self.ROUTER_CLASSES]
        if not self.routers:
            raise ValueError(
                f"VisionRouterBias supports {self.ROUTER_CLASSES} routers only; use --trace to replay recorded routing"
            )
        self.num_experts = self.routers[0].num_experts
        outside = [e for e in hot_experts if not 0 <= e < self.num_experts]
        if outside or not hot_experts:
            raise ValueError(
                f"hot experts must be ids of the model's {self.num_experts} experts, in [0, {self.num_experts}): "
                + (f"{outside} are not" if outside else "none was given")
            )
        self.hot = torch.zeros(self.num_experts, dtype=torch.bool)
        self.hot[hot_experts] = True
        self.hot_experts = list(hot_experts)
        self.bias = bias
        self.codes: torch.Tensor | None = None
        self.record = False
        self.recorded: list[torch.Tensor] = []
        self._handles = [r.register_forward_hook(self._hook) for r in self.routers]

    def _hook(self, module, args, output):
        logits, scores, index = output
        vision = None if self.codes is None or self.codes.numel() != logits.shape[0] else self.codes != 0
        if vision is not None and self.bias != 0.0:
            if self.hot.device != logits.device:
                self.hot = self.hot.to(logits.device)
            hot = self.hot
            logits = logits + (vision[:, None] & hot[None, :]).to(logits.dtype) * self.bias
            probs = torch.nn.functional.softmax(logits, dtype=torch.float, dim=-1)
            top_v, index = torch.topk(probs, module.top_k, dim=-1)
            top_v = top_v / top_v.sum(dim=-1, keepdim=True)
            scores = top_v.to(logits.dtype)
        if self.record:
            self.recorded.append(index.detach())
        return logits, scores, index

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def layer_skew(self, ep_size: int) -> list[float]:
        """max/mean rank load at `ep_size` of every recorded router call."""
        return [rank_load(idx, self.num_experts, ep_size).max_over_mean for idx in self.recorded]


def measure_skew(model, batch: PrefillBatch, biaser: VisionRouterBias, bias: float, ep_size: int) -> list[float]:
    biaser.bias = bias
    biaser.record, biaser.recorded = True, []
    with torch.no_grad():
        prefill_forward(model, batch)
    biaser.record = False
    skew = biaser.layer_skew(ep_size)
    biaser.recorded = []
    return skew


def calibrate_bias(
    model, batch: PrefillBatch, biaser: VisionRouterBias, target: float, ep_size: int, iters: int = 8
) -> tuple[float, float]:
    """Bias whose mean-over-layers max/mean rank load at `ep_size` is closest to `target`.

    Doubles the bias from 0.25 until the target is passed (at most 64), then bisects `iters` times: about
    `iters + 10` forwards in all.
    """

    def mean_skew(b: float) -> float:
        s = measure_skew(model, batch, biaser, b, ep_size)
        return sum(s) / len(s)

    best = (0.0, mean_skew(0.0))
    if best[1] >= target:
        return best
    lo, hi = 0.0, 0.25
    while True:
        value = mean_skew(hi)
        if abs(value - target) < abs(best[1] - target):
            best = (hi, value)
        if value >= target or hi >= 64.0:
            break
        lo, hi = hi, hi * 2
    if value < target:
        return best  # unreachable: the largest bias tried
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        value = mean_skew(mid)
        if abs(value - target) < abs(best[1] - target):
            best = (mid, value)
        if value < target:
            lo = mid
        else:
            hi = mid
    return best


__all__ = ["VisionRouterBias", "calibrate_bias", "measure_skew"]
