"""Seed statistics against SciPy and hand-worked cases."""

from __future__ import annotations

import math

import pytest
from scipy import stats as sps

from pisa.core.stats import paired, summarize, t_cdf, t_quantile, within_noise


@pytest.mark.parametrize("df", [1, 2, 3, 4, 5, 7, 10, 29])
def test_t_distribution_matches_scipy(df):
    for p in (0.55, 0.9, 0.95, 0.975, 0.995, 0.025):
        assert t_quantile(p, df) == pytest.approx(sps.t.ppf(p, df), rel=1e-9)
    for t in (-4.0, -1.3, 0.0, 0.7, 2.5):
        assert t_cdf(t, df) == pytest.approx(sps.t.cdf(t, df), abs=1e-12)


def test_interval_hand_worked():
    # values 0.30, 0.32, 0.34: mean 0.32, s = 0.02, t(0.975, 2) = 4.302653, half = 4.302653 * 0.02 / sqrt(3)
    s = summarize([0.30, 0.32, 0.34])
    assert s.n == 3 and s.mean == pytest.approx(0.32) and s.std == pytest.approx(0.02)
    assert s.half_width == pytest.approx(4.302653 * 0.02 / math.sqrt(3), rel=1e-6)
    assert (s.ci_low, s.ci_high) == pytest.approx((0.32 - 0.049683, 0.32 + 0.049683), abs=1e-6)


def test_interval_matches_scipy():
    values = [0.331, 0.287, 0.305, 0.352, 0.298]
    s = summarize(values)
    low, high = sps.t.interval(0.95, len(values) - 1, loc=sps.tmean(values), scale=sps.sem(values))
    assert (s.ci_low, s.ci_high) == pytest.approx((low, high), rel=1e-9)
    s90 = summarize(values, confidence=0.9)
    assert s90.half_width < s.half_width


def test_one_value_has_no_interval_and_none_has_no_mean():
    assert summarize([0.3]).ci_low is None and summarize([0.3]).mean == 0.3
    assert summarize([]).mean is None


def test_paired_difference_uses_common_seeds_and_counts_wins():
    base = {0: 0.30, 1: 0.25, 2: 0.33, 3: 0.40}
    variant = {0: 0.32, 1: 0.26, 2: 0.33, 5: 0.99}  # seed 3 missing, seed 5 has no partner
    p = paired(variant, base)
    assert p.seeds == (0, 1, 2)
    assert (p.wins, p.losses, p.ties) == (2, 0, 1)
    diffs = [0.02, 0.01, 0.0]
    low, high = sps.t.interval(0.95, 2, loc=sum(diffs) / 3, scale=sps.sem(diffs))
    assert p.difference.mean == pytest.approx(0.01)
    assert (p.difference.ci_low, p.difference.ci_high) == pytest.approx((low, high), rel=1e-9)
    assert not p.significant  # the interval holds 0
    # mode 'min': a lower value wins
    assert paired(variant, base, mode="min").losses == 2


def test_paired_removes_the_seed_effect():
    # the seed moves both variants a lot; the variant is always 0.01 ahead (+- 0.001)
    base = {0: 0.20, 1: 0.35, 2: 0.28, 3: 0.31}
    variant = {0: 0.211, 1: 0.359, 2: 0.290, 3: 0.321}
    p = paired(variant, base)
    assert p.significant and p.difference.ci_low > 0 and p.wins == 4
    unpaired = summarize(list(variant.values()))
    assert unpaired.ci_low < summarize(list(base.values())).mean  # unpaired, the means overlap
    assert within_noise(variant, base) is False
    assert within_noise({0: 0.3}, {0: 0.2}) is None


def test_the_objective_decides_better_and_best_in_both_directions():
    from pisa.core.objective import Objective

    up, down = Objective("bbox_mAP", "max"), Objective("loss", "min")
    assert up.better(0.3, 0.2) and not up.better(0.2, 0.2) and up.better(0.1, None)
    assert down.better(0.2, 0.3) and not down.better(0.3, 0.2)
    values = [0.2, float("nan"), 0.5, 0.1]
    assert up.best(values) == 0.5 and down.best(values) == 0.1 and up.best([float("nan")]) is None
    pairs = [("a", 0.5), ("b", 0.5), ("c", 0.1)]  # a tie goes to the first
    assert up.best_of(pairs, lambda p: p[1]) == ("a", 0.5) and down.best_of(pairs, lambda p: p[1]) == ("c", 0.1)
    assert sorted([0.2, None, 0.5], key=up.rank_key) == [0.5, 0.2, None]
    assert sorted([0.2, None, 0.5], key=down.rank_key) == [0.2, 0.5, None]
    assert (up.direction, down.direction) == ("maximize", "minimize")
