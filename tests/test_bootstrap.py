"""The paired bootstrap: seeded, paired, and "no measurable difference" whenever the interval holds 0."""

import numpy as np
import pytest

from realb_hf.bootstrap import (
    BETTER,
    NO_DIFFERENCE,
    WORSE,
    compare,
    format_interval,
    paired_bootstrap,
    verdict,
)


def test_identical_configurations_show_no_measurable_difference():
    hits = [1, 0, 1, 1, 0, 1] * 20
    interval = paired_bootstrap(hits, hits)
    assert (interval.diff, interval.low, interval.high) == (0.0, 0.0, 0.0)
    assert verdict(interval, higher_is_better=True) == NO_DIFFERENCE


def test_a_clear_loss_is_worse_and_the_interval_brackets_the_mean():
    base = [1] * 200
    worse = [1] * 150 + [0] * 50  # 25 points lost
    interval = paired_bootstrap(worse, base, seed=3)
    assert interval.diff == pytest.approx(-0.25)
    assert interval.low < -0.25 < interval.high < 0
    assert verdict(interval, higher_is_better=True) == WORSE
    # the same drop in a loss is a gain
    assert verdict(interval, higher_is_better=False) == BETTER


def test_one_flip_in_many_questions_is_not_a_win():
    base = [0] * 100
    one_more = [1] + [0] * 99
    interval = paired_bootstrap(one_more, base)
    assert interval.diff > 0 and interval.contains_zero()
    assert verdict(interval, higher_is_better=True) == NO_DIFFERENCE


def test_pairing_removes_the_spread_shared_by_both_configurations():
    rng = np.random.default_rng(0)
    shared = rng.normal(0, 5, size=300)  # questions differ a lot; the configurations differ by a constant
    interval = paired_bootstrap(shared + 0.1, shared)
    assert interval.low == pytest.approx(0.1) and interval.high == pytest.approx(0.1)
    assert verdict(interval, higher_is_better=False) == WORSE


def test_seeded_and_reproducible():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=50), rng.normal(size=50)
    assert paired_bootstrap(a, b, seed=7) == paired_bootstrap(a, b, seed=7)
    assert paired_bootstrap(a, b, seed=7) != paired_bootstrap(a, b, seed=8)


def test_compare_reports_both_metrics_with_their_direction():
    out = compare([0, 0, 0, 0] * 25, [2.0] * 100, [1, 1, 1, 1] * 25, [1.0] * 100, n_resamples=200)
    assert out["exact_match"]["verdict"] == WORSE and out["exact_match"]["diff"] == -1.0
    assert out["answer_nll"]["verdict"] == WORSE and out["answer_nll"]["diff"] == 1.0
    assert out["answer_nll"]["n"] == 100


def test_format_interval():
    interval = paired_bootstrap([1, 0] * 10, [1, 1] * 10, n_resamples=500)
    text = format_interval(interval, scale=100)
    assert text.startswith("-50.0 [") and text.count(",") == 1
    tiny = paired_bootstrap([1e-6, 2e-6, 3e-6], [0.0, 0.0, 0.0], n_resamples=200)
    assert verdict(tiny, higher_is_better=False) == WORSE
    assert format_interval(tiny, digits=4).startswith("+2.0e-06 [+1.")  # not "+0.0000 [+0.0000, +0.0000]"
    same = paired_bootstrap([1.0, 2.0], [1.0, 2.0])
    assert format_interval(same, digits=4) == "+0.0000 [+0.0000, +0.0000]"


@pytest.mark.parametrize(
    ("values", "baseline", "kwargs", "message"),
    [
        ([1, 2], [1], {}, "one length"),
        ([], [], {}, "at least one question"),
        ([1, float("nan")], [1, 1], {}, "non-finite"),
        ([1], [1], {"n_resamples": 0}, "n_resamples"),
        ([1], [1], {"confidence": 1.0}, "confidence"),
    ],
)
def test_bad_input_is_named(values, baseline, kwargs, message):
    with pytest.raises(ValueError, match=message):
        paired_bootstrap(values, baseline, **kwargs)
