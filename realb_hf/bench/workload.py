"""Synthetic multimodal routing: the (top-k ids, weights, modality) one MoE layer sees for one batch.

Model of a vision-skewed batch (all of it drawn from `seed`, on the CPU, so a spec gives the same tensors
on every machine):

- Modality: `tokens` split into requests of `request_tokens`; each request is an image block followed by
  text, so exactly `round(tokens * vision_share)` tokens are vision (code 1) and the rest text (code 0).
- Text tokens route by a background popularity over all experts, drawn from a symmetric Dirichlet with
  concentration `text_spread` (large: nearly uniform, as a load-balanced router gives; small: uneven).
- Vision tokens route by `(1 - concentration) * background' + concentration * hot`, where `background'`
  is a second Dirichlet draw and `hot` puts Zipf(`hot_zipf`) weights on a "hot" subset of `hot_experts`
  experts. With `hot_layout="block"` the hot experts are contiguous ids starting at `hot_offset`, so they sit
  on one EP rank (or a few) and that rank becomes the straggler; `"random"` scatters them over all ranks.
  `concentration` in [0, 1] is the share of a vision token's routing probability on the hot subset.
- Every token picks `top_k` distinct experts by sampling without replacement from its popularity (Gumbel
  top-k); its weights are the softmax of the selected perturbed log-probabilities (they sum to 1, like a
  router with `norm_topk_prob`).

`workload_for_skew` searches `concentration` so that the busiest EP rank's load over the mean load
(max/mean of token-expert pairs per rank) hits a target.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np
import torch

from ..modality import IMAGE, TEXT
from ..policy import expert_ranges

HOT_LAYOUTS = ("block", "random")
_MIN_PROB = 1e-12  # floor on a popularity before taking its log (concentration=1 leaves zeros)


@dataclass(frozen=True)
class WorkloadSpec:
    """Parameters of one synthetic batch; see the module docstring for the model."""

    tokens: int = 16384
    num_experts: int = 128
    top_k: int = 8
    vision_share: float = 0.7
    concentration: float = 0.0
    hot_experts: int | None = None  # default: max(top_k, num_experts // 16)
    hot_offset: int = 0  # first hot expert id for hot_layout="block"
    hot_layout: str = "block"
    hot_zipf: float = 1.0
    text_spread: float = 20.0
    request_tokens: int = 1024
    seed: int = 0

    def __post_init__(self) -> None:
        if self.tokens < 1:
            raise ValueError(f"tokens must be >= 1, got {self.tokens}")
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"top_k={self.top_k} must lie in [1, num_experts={self.num_experts}]")
        if not 0.0 <= self.vision_share <= 1.0:
            raise ValueError(f"vision_share must lie in [0, 1], got {self.vision_share}")
        if not 0.0 <= self.concentration <= 1.0:
            raise ValueError(f"concentration must lie in [0, 1], got {self.concentration}")
        if self.hot_layout not in HOT_LAYOUTS:
            raise ValueError(f"hot_layout must be one of {HOT_LAYOUTS}, got {self.hot_layout!r}")
        hot = self.num_hot
        if not 1 <= hot <= self.num_experts:
            raise ValueError(f"hot_experts={hot} must lie in [1, num_experts={self.num_experts}]")
        if self.hot_layout == "block" and not 0 <= self.hot_offset <= self.num_experts - hot:
            raise ValueError(f"hot_offset={self.hot_offset} leaves no room for {hot} hot experts of {self.num_experts}")
        if self.text_spread <= 0 or self.request_tokens < 1:
            raise ValueError("text_spread must be > 0 and request_tokens >= 1")

    @property
    def num_hot(self) -> int:
        return self.hot_experts if self.hot_experts is not None else max(self.top_k, self.num_experts // 16)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "hot_experts": self.num_hot}


@dataclass
class Workload:
    """Routing of one MoE layer for one batch: what the experts module's forward receives (plus modality)."""

    top_k_index: torch.Tensor  # (T, k) int64, distinct ids per row
    top_k_weights: torch.Tensor  # (T, k) float
    modality: torch.Tensor  # (T,) int8: 0 text, 1 image (2 video counts as vision too)
    num_experts: int
    source: str = "synthetic"
    spec: WorkloadSpec | None = None

    @property
    def tokens(self) -> int:
        return int(self.top_k_index.shape[0])

    @property
    def top_k(self) -> int:
        return int(self.top_k_index.shape[1])

    @property
    def vision_share(self) -> float:
        return float((self.modality != TEXT).float().mean()) if self.tokens else 0.0

    def to(self, device: torch.device | str, weight_dtype: torch.dtype | None = None) -> Workload:
        weights = self.top_k_weights.to(device=device, dtype=weight_dtype or self.top_k_weights.dtype)
        return replace(
            self, top_k_index=self.top_k_index.to(device), top_k_weights=weights, modality=self.modality.to(device)
        )

    def rank_load(self, ep_size: int) -> RankLoad:
        return rank_load(self.top_k_index, self.num_experts, ep_size, self.modality)

    def describe(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "tokens": self.tokens,
            "top_k": self.top_k,
            "num_experts": self.num_experts,
            "vision_share": round(self.vision_share, 6),
            "spec": self.spec.to_dict() if self.spec is not None else None,
        }


@dataclass(frozen=True)
class RankLoad:
    """Token-expert pairs per EP rank (contiguous expert blocks, as transformers' EP shards them)."""

    ep_size: int
    pairs: list[int]
    vision_share: list[float]

    @property
    def max_over_mean(self) -> float:
        mean = sum(self.pairs) / len(self.pairs)
        return max(self.pairs) / mean if mean else 1.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "ep_size": self.ep_size,
            "pairs": self.pairs,
            "vision_share": [round(v, 6) for v in self.vision_share],
            "max_over_mean": round(self.max_over_mean, 6),
        }


def rank_load(
    top_k_index: torch.Tensor, num_experts: int, ep_size: int, modality: torch.Tensor | None = None
) -> RankLoad:
    """Pairs per rank, and the vision share of each rank's pairs, for `ep_size` ranks."""
    ids = top_k_index.reshape(-1).cpu()
    ids = ids[ids < num_experts]
    per_expert = torch.bincount(ids, minlength=num_experts)
    if modality is not None:
        vision_rows = (modality.cpu() != TEXT).repeat_interleave(top_k_index.shape[-1])
        flat = top_k_index.reshape(-1).cpu()
        keep = flat < num_experts
        per_expert_vision = torch.bincount(flat[keep & vision_rows], minlength=num_experts)
    else:
        per_expert_vision = torch.zeros_like(per_expert)
    pairs, vision = [], []
    for r in expert_ranges(num_experts, ep_size):
        pairs.append(int(per_expert[r.start : r.stop].sum()))
        vision.append(int(per_expert_vision[r.start : r.stop].sum()))
    return RankLoad(ep_size, pairs, [v / p if p else 0.0 for p, v in zip(pairs, vision)])


def modality_codes(tokens: int, vision_share: float, request_tokens: int) -> torch.Tensor:
    """(tokens,) int8: requests of `request_tokens`, each an image block then text; exact total vision count."""
    codes = torch.full((tokens,), TEXT, dtype=torch.int8)
    for start in range(0, tokens, request_tokens):
        end = min(start + request_tokens, tokens)
        vision = round(end * vision_share) - round(start * vision_share)
        codes[start : start + vision] = IMAGE
    return codes


class _Sampler:
    """Everything of a spec that does not depend on `concentration`, drawn once (the search reuses it)."""

    def __init__(self, spec: WorkloadSpec):
        self.spec = spec
        rng = np.random.default_rng(spec.seed)
        e = spec.num_experts
        self.text_pop = torch.from_numpy(rng.dirichlet(np.full(e, spec.text_spread)))
        self.vision_background = torch.from_numpy(rng.dirichlet(np.full(e, spec.text_spread)))
        hot_ids = (
            np.arange(spec.hot_offset, spec.hot_offset + spec.num_hot)
            if spec.hot_layout == "block"
            else np.sort(rng.permutation(e)[: spec.num_hot])
        )
        zipf = 1.0 / np.arange(1, spec.num_hot + 1, dtype=np.float64) ** spec.hot_zipf
        hot = np.zeros(e)
        hot[hot_ids] = zipf / zipf.sum()
        self.hot_ids = hot_ids.tolist()
        self.hot = torch.from_numpy(hot)
        self.modality = modality_codes(spec.tokens, spec.vision_share, spec.request_tokens)
        self.vision_rows = (self.modality != TEXT).nonzero().squeeze(1)
        self.text_rows = (self.modality == TEXT).nonzero().squeeze(1)
        gen = torch.Generator().manual_seed(spec.seed)
        # Gumbel(0, 1) noise, one per (token, expert): -log(Exp(1))
        self.gumbel = -torch.empty(spec.tokens, e, dtype=torch.float32).exponential_(generator=gen).log()
        self.index = torch.empty(spec.tokens, spec.top_k, dtype=torch.int64)
        self.weights = torch.empty(spec.tokens, spec.top_k, dtype=torch.float32)
        self._fill(self.text_rows, self.text_pop)

    def _fill(self, rows: torch.Tensor, popularity: torch.Tensor) -> None:
        if rows.numel() == 0:
            return
        logp = popularity.clamp(min=_MIN_PROB).log().float()
        scores = self.gumbel[rows] + logp
        top = scores.topk(self.spec.top_k, dim=-1)  # distinct columns per row by construction
        self.index[rows] = top.indices
        self.weights[rows] = torch.softmax(top.values, dim=-1)

    def vision_popularity(self, concentration: float) -> torch.Tensor:
        return (1.0 - concentration) * self.vision_background + concentration * self.hot

    def route(self, concentration: float) -> Workload:
        self._fill(self.vision_rows, self.vision_popularity(concentration))
        spec = replace(self.spec, concentration=concentration)
        return Workload(self.index.clone(), self.weights.clone(), self.modality.clone(), spec.num_experts, spec=spec)


def generate(spec: WorkloadSpec) -> Workload:
    """The routing of `spec` (deterministic per spec, seed included)."""
    return _Sampler(spec).route(spec.concentration)


@dataclass(frozen=True)
class SkewSearch:
    target: float
    ep_size: int
    concentration: float
    achieved: float
    reachable: bool


def workload_for_skew(
    spec: WorkloadSpec, target: float, ep_size: int, tol: float = 0.005, max_iter: int = 40
) -> tuple[Workload, SkewSearch]:
    """The workload of `spec` with `concentration` chosen so that max/mean rank load at `ep_size` ~= `target`.

    Bisection on concentration in [0, 1] (max/mean grows with it while the hot experts sit on one rank).
    Raises ValueError, naming the reachable range, when `target` is out of reach for this spec.
    """
    if ep_size < 2:
        raise ValueError("max/mean rank load is only defined for ep_size >= 2 (with one rank it is always 1)")
    if target < 1.0:
        raise ValueError(f"max/mean rank load is >= 1 by definition, got target {target}")
    sampler = _Sampler(spec)

    def skew(c: float) -> tuple[Workload, float]:
        w = sampler.route(c)
        return w, w.rank_load(ep_size).max_over_mean

    lo_w, lo = skew(0.0)
    if lo >= target - tol:
        if lo > target + tol:
            raise ValueError(
                f"max/mean {target} at EP={ep_size} is below this spec's floor {lo:.3f} (concentration 0); "
                "raise text_spread or lower the target"
            )
        return lo_w, SkewSearch(target, ep_size, 0.0, lo, True)
    hi_w, hi = skew(1.0)
    if hi < target - tol:
        raise ValueError(
            f"max/mean {target} at EP={ep_size} is out of reach: this spec spans [{lo:.3f}, {hi:.3f}] "
            f"(vision_share={spec.vision_share}, hot_experts={spec.num_hot}, hot_layout={spec.hot_layout!r}); "
            "raise vision_share or use a smaller target"
        )
    a, b = 0.0, 1.0
    best_w, best_c, best = hi_w, 1.0, hi
    for _ in range(max_iter):
        mid = 0.5 * (a + b)
        w, value = skew(mid)
        if abs(value - target) < abs(best - target):
            best_w, best_c, best = w, mid, value
        if abs(value - target) <= tol:
            break
        if value < target:
            a = mid
        else:
            b = mid
    return best_w, SkewSearch(target, ep_size, best_c, best, abs(best - target) <= max(tol, 0.02))


def uniform_pairs(pairs: int, num_experts: int) -> torch.Tensor:
    """(pairs,) local expert ids sorted, spread as evenly as possible (the oracle-balanced bound's rows)."""
    return (torch.arange(pairs, dtype=torch.int64) * num_experts) // max(pairs, 1)


def describe_skew(workload: Workload, ep_sizes: list[int]) -> dict[int, float]:
    """max/mean rank load of `workload` at each EP size (1.0 at EP=1)."""
    return {ep: round(workload.rank_load(ep).max_over_mean, 6) for ep in ep_sizes}


__all__ = [
    "HOT_LAYOUTS",
    "RankLoad",
    "SkewSearch",
    "Workload",
    "WorkloadSpec",
    "describe_skew",
    "generate",
    "modality_codes",
    "rank_load",
    "uniform_pairs",
    "workload_for_skew",
]
