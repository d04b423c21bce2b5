"""Paired bootstrap over questions: 95% confidence intervals for a configuration's difference from a baseline.

Method: both configurations answer the same questions, so the per-question differences `d_i = x_i - base_i` are
paired. `n_resamples` times, draw len(d) question indices with replacement (numpy `default_rng(seed)`), and take the
mean of `d` over the draw; the interval is the (1 - confidence) / 2 and (1 + confidence) / 2 percentiles of those
means (the percentile bootstrap). The same seed and inputs give the same interval.

An interval that contains 0 cannot tell the two configurations apart: `verdict` reports it as "no measurable
difference", never as a win or a loss.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

NO_DIFFERENCE = "no measurable difference"
BETTER = "measurably better"
WORSE = "measurably worse"


@dataclass(frozen=True)
class Interval:
    """The observed mean difference and its bootstrap interval."""

    diff: float
    low: float
    high: float
    confidence: float
    n: int  # questions (pairs)

    def contains_zero(self) -> bool:
        return self.low <= 0.0 <= self.high

    def to_dict(self) -> dict:
        return asdict(self)


def paired_bootstrap(
    values: Sequence[float],
    baseline: Sequence[float],
    n_resamples: int = 2000,
    seed: int = 0,
    confidence: float = 0.95,
) -> Interval:
    """Interval of mean(values - baseline), resampling questions (pairs) with replacement."""
    x = np.asarray(values, dtype=np.float64)
    b = np.asarray(baseline, dtype=np.float64)
    if x.shape != b.shape or x.ndim != 1:
        raise ValueError(f"paired bootstrap needs two 1-D sequences of one length, got {x.shape} and {b.shape}")
    if x.size == 0:
        raise ValueError("paired bootstrap needs at least one question")
    if not np.isfinite(x).all() or not np.isfinite(b).all():
        raise ValueError("paired bootstrap got a non-finite value (inf or NaN)")
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be >= 1, got {n_resamples}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must lie strictly between 0 and 1, got {confidence}")
    d = x - b
    rng = np.random.default_rng(seed)
    means = np.empty(n_resamples)
    chunk = max(1, 2_000_000 // d.size)  # bounds the index matrix's memory
    for start in range(0, n_resamples, chunk):
        stop = min(n_resamples, start + chunk)
        means[start:stop] = d[rng.integers(0, d.size, size=(stop - start, d.size))].mean(axis=1)
    tail = (1.0 - confidence) / 2.0
    low, high = np.quantile(means, [tail, 1.0 - tail])
    return Interval(float(d.mean()), float(low), float(high), confidence, int(d.size))


def verdict(interval: Interval, higher_is_better: bool) -> str:
    """Returns "no measurable difference" when the interval contains 0; otherwise better or worse than the baseline."""
    if interval.contains_zero():
        return NO_DIFFERENCE
    return BETTER if (interval.diff > 0) == higher_is_better else WORSE


def format_interval(interval: Interval, scale: float = 1.0, digits: int = 1) -> str:
    """`+1.2 [-0.3, +2.7]` with values multiplied by `scale` (100 for exact match in points). A value that is not 0
    but too small for `digits` decimals is written in scientific notation, so that a bound that excludes 0 never
    reads as 0."""

    def text(v: float) -> str:
        return format(v, "+.1e" if v != 0 and abs(v) < 0.5 * 10**-digits else f"+.{digits}f")

    d, lo, hi = (text(v * scale) for v in (interval.diff, interval.low, interval.high))
    return f"{d} [{lo}, {hi}]"


MARKS = {BETTER: " better", WORSE: " **worse**", NO_DIFFERENCE: ""}


def describe(entry: dict, scale: float = 1.0, digits: int = 1) -> str:
    """A result of `compare` (the interval's fields and its verdict) as Markdown: the interval, then **worse** or
    better when it excludes 0; nothing more when it holds 0 (no measurable difference)."""
    fields = {k: entry[k] for k in ("diff", "low", "high", "confidence", "n")}
    return format_interval(Interval(**fields), scale, digits) + MARKS[entry["verdict"]]


def compare(
    correct: Sequence[float],
    nll: Sequence[float],
    base_correct: Sequence[float],
    base_nll: Sequence[float],
    n_resamples: int = 2000,
    seed: int = 0,
) -> dict:
    """Exact-match and answer-NLL intervals against the baseline, with their verdicts (JSON values)."""
    em = paired_bootstrap(correct, base_correct, n_resamples, seed)
    loss = paired_bootstrap(nll, base_nll, n_resamples, seed)
    return {
        "exact_match": {**em.to_dict(), "verdict": verdict(em, higher_is_better=True)},
        "answer_nll": {**loss.to_dict(), "verdict": verdict(loss, higher_is_better=False)},
    }


def intervals(result, base, examples: Sequence, n_resamples: int = 2000, seed: int = 0) -> dict:
    """`compare` of two scored runs of the same `examples` (same order), overall and per modality. `result` and
    `base` carry `answers` and `question_nll` (an `accuracy.AccuracyResult`); exact match is 0/1 per question."""
    hits = [float(a == ex.answer) for a, ex in zip(result.answers, examples)]
    base_hits = [float(a == ex.answer) for a, ex in zip(base.answers, examples)]
    out = {}
    for key in ("overall", *sorted({ex.modality for ex in examples})):
        keep = [i for i, ex in enumerate(examples) if key in ("overall", ex.modality)]
        picked = [[values[i] for i in keep] for values in (hits, result.question_nll, base_hits, base.question_nll)]
        out[key] = compare(*picked, n_resamples, seed)
    return out


__all__ = [
    "BETTER",
    "NO_DIFFERENCE",
    "WORSE",
    "Interval",
    "compare",
    "format_interval",
    "intervals",
    "paired_bootstrap",
    "verdict",
]
