"""The premise test: do vision-token rows tolerate low precision better than text-token rows?

ReaLB lowers the ranks or experts whose rows are mostly vision tokens (the modality threshold M_d), on the premise
that vision tokens lose less to low precision. This module tests that premise directly, outside the policy: at one
share of token-expert pairs, it lowers
- only vision-token rows (`"vision"`),
- only text-token rows (`"text"`, padding excluded),
- rows drawn at random from all real tokens (`"random"`),
and scores each against bf16 with paired-bootstrap intervals.

How rows are forced low: `RowLowering` replaces the `forward` of every ReaLB experts module (on the instance) for
the duration of a `with` block. In a prefill forward (more than one position per sequence) it picks
`round(share * real tokens)` tokens of the strategy's pool, seeded, independently in every MoE layer, and returns
`stock(rows kept high) + host_path(rows lowered, all experts in the low format)`. The split is exact: a token's
output is the weighted sum of its own token-expert pairs, each depending only on its own row and precision, and each
token is computed by exactly one of the two calls (the stock call gives its pairs weight 0; the low call sends the
other tokens' pairs to the sentinel id `num_experts`, which contributes nothing). One format reads other rows:
nvfp4 takes a per-tensor activation scale, here over the rows lowered in the call, as ReaLB's own host path takes
it over the rows of its lowered experts. Decode steps (one position per sequence) stay bf16 in every strategy, as ReaLB's batch
threshold keeps them in the accuracy table.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from .bootstrap import describe, intervals
from .experts import RealbExperts, host_path
from .formats import LOW_PRECISIONS
from .modality import TEXT, modality_from_inputs, placeholder_ids

STRATEGIES = ("vision", "text", "random")


@dataclass
class LoweringStats:
    """What a `RowLowering` block lowered: token-expert pairs of prefill forwards (padding excluded)."""

    lowered_pairs: int = 0
    real_pairs: int = 0
    calls: int = 0

    @property
    def share(self) -> float:
        return self.lowered_pairs / self.real_pairs if self.real_pairs else 0.0


@dataclass
class _Rows:
    """Modality codes and the real-token mask of the forward in flight, flattened like the experts' rows."""

    codes: torch.Tensor | None = None
    real: torch.Tensor | None = None
    prefill: bool = False


def pool(strategy: str, codes: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """Indices of the rows `strategy` may lower: vision rows, real text rows, or every real row."""
    if strategy == "vision":
        keep = real & (codes != TEXT)
    elif strategy == "text":
        keep = real & (codes == TEXT)
    elif strategy == "random":
        keep = real
    else:
        raise ValueError(f"strategy={strategy!r}; choose one of {list(STRATEGIES)}")
    return keep.nonzero().flatten()


def forward_rows(input_ids: torch.Tensor | None, kwargs: dict, image_id: int | None, video_id: int | None) -> _Rows:
    """The modality code and real-token flag of every row of a forward called with `input_ids` and `kwargs`."""
    codes, _ = modality_from_inputs(input_ids, kwargs.get("mm_token_type_ids"), image_id, video_id)
    mask = kwargs.get("attention_mask")
    rows = _Rows()
    if codes is not None:
        rows.codes = codes.reshape(-1)
        real = torch.ones_like(rows.codes, dtype=torch.bool)
        if mask is not None and mask.shape == codes.shape:  # left padding: the mask lines up with the rows
            real = mask.reshape(-1).bool()
        rows.real = real
        rows.prefill = codes.shape[-1] > 1
    return rows


def _shortfall(strategy: str, share: float, rows: _Rows, where: str) -> str:
    real = int(rows.real.sum())
    held = pool(strategy, rows.codes.cpu(), rows.real.cpu()).numel()
    return (
        f"share {share} needs {round(share * real)} of {real} real tokens from the {strategy!r} pool, which holds "
        f"{held} in {where} (at most {held / real:.3f} fits): lower the share or batch image and text questions "
        "together"
    )


def check_shares(model: torch.nn.Module, forwards: list[dict], shares: tuple[float, ...]) -> None:
    """Raise before anything is scored when a share cannot be drawn from every strategy's pool in every prefill
    forward (`forwards`: each forward's inputs, as the processor returns them)."""
    image_id, video_id = placeholder_ids(model.config)
    for i, inputs in enumerate(forwards):
        rows = forward_rows(inputs["input_ids"], inputs, image_id, video_id)
        if rows.codes is None or not rows.prefill:
            continue
        for share in shares:
            for strategy in STRATEGIES:
                if pool(strategy, rows.codes, rows.real).numel() < round(share * int(rows.real.sum())):
                    raise ValueError("premise test: " + _shortfall(strategy, share, rows, f"forward {i}"))


@dataclass
class RowLowering:
    """`with RowLowering(model, "vision", 0.2, "nvfp4"):` runs the model's prefill forwards with that share of real
    tokens' rows in `low`, chosen from `strategy`'s pool. The model must carry ReaLB (`apply_realb`); its policy is
    "off" inside the block, so that nothing but this selection is lowered, and back to what it was after it."""

    model: torch.nn.Module
    strategy: str
    share: float
    low: str
    seed: int = 0
    stats: LoweringStats = field(default_factory=LoweringStats)

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy={self.strategy!r}; choose one of {list(STRATEGIES)}")
        if not 0.0 <= self.share <= 1.0:
            raise ValueError(f"share must lie in [0, 1], got {self.share}")
        if self.low not in LOW_PRECISIONS:
            raise ValueError(f"low={self.low!r}; choose one of {list(LOW_PRECISIONS)}")
        self.experts = [m for m in self.model.modules() if isinstance(m, RealbExperts)]
        if not self.experts or getattr(self.model, "realb", None) is None:
            raise ValueError("RowLowering needs a model converted with realb_hf.apply_realb (no ReaLB experts found)")

    def __enter__(self) -> RowLowering:
        self._policy = self.model.realb.settings.config.policy  # given back on exit
        self.model.realb.reconfigure(policy="off")
        self._rows = _Rows()
        self.last_lowered: torch.Tensor | None = None
        self._generator = torch.Generator().manual_seed(self.seed)
        self._image_id, self._video_id = placeholder_ids(self.model.config)
        self._hook = self.model.register_forward_pre_hook(self._capture, with_kwargs=True)
        for module in self.experts:
            module.forward = self._wrap(module)
        return self

    def __exit__(self, *exc) -> None:
        self._hook.remove()
        for module in self.experts:
            del module.forward  # the class's forward again
        self.model.realb.reconfigure(policy=self._policy)

    def _capture(self, module, args, kwargs):
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        self._rows = forward_rows(input_ids, kwargs, self._image_id, self._video_id)

    def select(self, num_rows: int) -> torch.Tensor | None:
        """Bool (num_rows,) of the rows to lower in this layer call; None in decode steps."""
        rows = self._rows
        if not rows.prefill or rows.codes is None or rows.codes.numel() != num_rows:
            return None
        k = round(self.share * int(rows.real.sum()))
        candidates = pool(self.strategy, rows.codes.cpu(), rows.real.cpu())
        if candidates.numel() < k:
            raise ValueError(_shortfall(self.strategy, self.share, rows, "this forward"))
        chosen = candidates[torch.randperm(candidates.numel(), generator=self._generator)[:k]]
        lowered = torch.zeros(num_rows, dtype=torch.bool)
        lowered[chosen] = True
        self.last_lowered = lowered  # kept for inspection: which rows the latest layer call lowered
        return lowered

    def _wrap(self, module: RealbExperts):
        stock = type(module).forward.__get__(module)

        def forward(hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
            lowered = self.select(hidden_states.shape[0])
            if lowered is not None:
                top_k = top_k_index.shape[-1]
                self.stats.calls += 1
                self.stats.lowered_pairs += int(lowered.sum()) * top_k
                self.stats.real_pairs += int(self._rows.real.sum()) * top_k
            if lowered is None or not lowered.any():
                return stock(hidden_states, top_k_index, top_k_weights)
            lowered = lowered.to(top_k_index.device).unsqueeze(-1)
            sentinel = torch.full_like(top_k_index, module.num_experts)
            high = module.realb_runtime.settings.config.high_precision
            # the stock forward's own ids stay (its implementations differ on sentinel ids); a zero weight drops
            # a lowered token's pairs from it exactly, as their rows are finite
            kept = stock(hidden_states, top_k_index, top_k_weights.masked_fill(lowered, 0))
            low = host_path.run(
                module,
                hidden_states,
                torch.where(lowered, top_k_index, sentinel),
                top_k_weights,
                (self.low,) * module.num_experts,
                high,
            )
            return kept + low

        return forward


def run_premise(
    model: torch.nn.Module,
    score: Callable[[str], Any],
    examples: list,
    base,
    shares: tuple[float, ...] = (0.15,),
    low: str = "nvfp4",
    seed: int = 0,
    n_resamples: int = 2000,
    bootstrap_seed: int = 0,
    strategies: tuple[str, ...] = STRATEGIES,
) -> dict[str, Any]:
    """Every (share, strategy) against `base`, the bf16 result of `examples`. `score(name)` answers `examples` (in
    that order) with the model as it is and returns an `accuracy.AccuracyResult` (`accuracy.evaluate` of a stock
    row); it runs inside each `RowLowering` block. The model must carry ReaLB. Returns JSON values."""
    rows, head_to_head = [], []
    for share in shares:
        by_strategy = {}
        for strategy in strategies:
            name = f"{strategy} rows, share {share:g}, {low}"
            with RowLowering(model, strategy, share, low, seed) as lowering:
                result = score(name)
            result.vs_bf16 = intervals(result, base, examples, n_resamples, bootstrap_seed)
            by_strategy[strategy] = result
            row = asdict(result)
            row.update(strategy=strategy, share=share, low=low, lowered_share=lowering.stats.share)
            rows.append(row)
        if "vision" in by_strategy and "text" in by_strategy:  # the premise itself: vision rows cost less
            diff = intervals(by_strategy["vision"], by_strategy["text"], examples, n_resamples, bootstrap_seed)
            head_to_head.append({"share": share, "vision_minus_text": diff})
    return {"low": low, "shares": list(shares), "seed": seed, "rows": rows, "vision_vs_text": head_to_head}


def findings(premise: dict[str, Any]) -> list[str]:
    """What the premise rows support, in words: lowering vision rows against lowering text rows, per share."""
    out = []
    for item in premise.get("vision_vs_text", []):
        overall = item["vision_minus_text"]["overall"]
        nll, em = overall["answer_nll"], overall["exact_match"]
        if nll["verdict"] == "no measurable difference":
            nll_text = "no measurable difference in answer NLL"
        else:
            cheaper = "less" if nll["diff"] < 0 else "more"
            nll_text = f"lowering vision rows costs measurably {cheaper} answer NLL than lowering text rows"
        out.append(
            f"- Share {item['share']:g}, {premise['low']}: {nll_text} (vision minus text {nll['diff']:+.4f} nats, "
            f"95% CI [{nll['low']:+.4f}, {nll['high']:+.4f}]); exact match vision minus text "
            f"{em['diff'] * 100:+.1f} points [{em['low'] * 100:+.1f}, {em['high'] * 100:+.1f}] ({em['verdict']})."
        )
    return out


def to_markdown(premise: dict[str, Any]) -> list[str]:
    """The premise section of the accuracy report."""
    def cell(row: dict, key: str, metric: str, scale: float, digits: int) -> str:
        entry = row["vs_bf16"].get(key)
        return describe(entry[metric], scale, digits) if entry else "-"

    lines = [
        "| lowered rows | share asked | pairs lowered, prefill | image | text | Δ exact match image | "
        "Δ exact match text | Δ answer NLL image | Δ answer NLL text |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in premise["rows"]:
        acc = r["accuracy"]
        lines.append(
            "| "
            + " | ".join(
                [
                    f"{r['strategy']} ({r['low']})",
                    f"{r['share'] * 100:.0f}%",
                    f"{r['lowered_share'] * 100:.1f}%",
                    f"{acc.get('image', 0) * 100:.1f}",
                    f"{acc.get('text', 0) * 100:.1f}",
                    cell(r, "image", "exact_match", 100, 1),
                    cell(r, "text", "exact_match", 100, 1),
                    cell(r, "image", "answer_nll", 1, 4),
                    cell(r, "text", "answer_nll", 1, 4),
                ]
            )
            + " |"
        )
    return lines


__all__ = [
    "STRATEGIES",
    "LoweringStats",
    "RowLowering",
    "check_shares",
    "findings",
    "forward_rows",
    "pool",
    "run_premise",
    "to_markdown",
]
