"""The decision statistics, checked by hand and against independent implementations (scipy, statsmodels).

Hand-worked values use z = 1.959964 for 95% and z = 1.644854 for 90%.
"""

from __future__ import annotations

import pytest

from model_eval.stats import normal_cdf, prob_a_beats_b, prob_at_least, wilson_interval


@pytest.mark.parametrize(
    ("successes", "n", "low", "high"),
    [
        # p = 0.8, z^2 = 3.841459: centre 0.716742, half-width 0.226568
        (8, 10, 0.4902, 0.9433),
        # p = 0: centre = half-width = (z^2/20) / 1.384146 = 0.138767
        (0, 10, 0.0, 0.2775),
        (10, 10, 0.7225, 1.0),
        # p = 0.5: half-width = 1.96 * sqrt(0.0025 + z^2/40000) / 1.038415 = 0.0962
        (50, 100, 0.4038, 0.5962),
    ],
)
def test_wilson_interval_matches_hand_computation(successes, n, low, high):
    got_low, got_high = wilson_interval(successes, n)
    assert round(got_low, 4) == low
    assert round(got_high, 4) == high


def test_wilson_interval_other_confidence():
    # 8/10 at 90%: z^2 = 2.705543, centre 0.736117, half-width 0.195324
    low, high = wilson_interval(8, 10, confidence=0.90)
    assert (round(low, 4), round(high, 4)) == (0.5408, 0.9314)


def test_wilson_interval_no_evidence_is_everything():
    assert wilson_interval(0, 0) == (0.0, 1.0)


def test_wilson_interval_is_never_degenerate_at_the_extremes():
    # The naive normal interval would be (1, 1) here; Wilson keeps real width.
    low, high = wilson_interval(5, 5)
    assert 0.5 < low < 0.6 and high == 1.0


def test_wilson_interval_accepts_fractional_successes_from_accuracy_times_n():
    assert wilson_interval(0.7 * 10, 10) == pytest.approx(wilson_interval(7, 10))
    low, high = wilson_interval(1.0 * 3, 3)
    assert high == 1.0


@pytest.mark.parametrize(("successes", "n", "confidence"), [(11, 10, 0.95), (-1, 10, 0.95), (1, -1, 0.95), (1, 2, 1.0), (1, 2, 0)])
def test_wilson_interval_rejects_impossible_inputs(successes, n, confidence):
    with pytest.raises(ValueError):
        wilson_interval(successes, n, confidence)


def test_normal_cdf_known_points():
    assert normal_cdf(0) == 0.5
    assert normal_cdf(1.959964) == pytest.approx(0.975, abs=1e-6)
    assert normal_cdf(-1.959964) == pytest.approx(0.025, abs=1e-6)
    assert normal_cdf(40) == 1.0 and normal_cdf(-40) == 0.0


def test_prob_a_beats_b_hand_computed():
    # Smoothed: a = 28/32 = 0.875 (var 0.0034180), b = 25/32 = 0.78125 (var 0.0053406)
    # z = 0.09375 / sqrt(0.0087586) = 1.00174 -> Phi(z) = 0.8418
    assert prob_a_beats_b(0.9, 30, 0.8, 30) == pytest.approx(0.8418, abs=1e-4)


def test_prob_a_beats_b_is_symmetric_and_even_for_equal_evidence():
    assert prob_a_beats_b(0.7, 20, 0.7, 20) == pytest.approx(0.5)
    assert prob_a_beats_b(0.9, 30, 0.6, 10) + prob_a_beats_b(0.6, 10, 0.9, 30) == pytest.approx(1.0)


def test_prob_a_beats_b_handles_zero_variance():
    # 10/10 vs 10/10 would divide by zero without smoothing
    assert prob_a_beats_b(1.0, 10, 1.0, 10) == pytest.approx(0.5)
    # perfect vs hopeless is very likely but never a certainty
    assert 0.99 < prob_a_beats_b(1.0, 10, 0.0, 10) < 1.0
    # no evidence at all says nothing
    assert prob_a_beats_b(0.0, 0, 0.0, 0) == pytest.approx(0.5)


def test_prob_a_beats_b_grows_with_evidence():
    small = prob_a_beats_b(0.8, 10, 0.6, 10)
    large = prob_a_beats_b(0.8, 1000, 0.6, 1000)
    assert 0.5 < small < large and large > 0.999


def test_prob_at_least_threshold():
    # 10/10 smoothed to 11/12; sd = sqrt(11/12 * 1/12 / 12) = 0.079786; z = 1.46225
    assert prob_at_least(1.0, 10, 0.8) == pytest.approx(0.9282, abs=1e-4)
    assert prob_at_least(0.5, 100, 0.8) < 0.001
    with pytest.raises(ValueError):
        prob_at_least(0.5, 10, 1.5)


# ---------------------------------------------------------------- against scipy and statsmodels
import math  # noqa: E402
import random  # noqa: E402

import numpy as np  # noqa: E402
from scipy import stats as sps  # noqa: E402

from model_eval.stats import (  # noqa: E402
    PSEUDO_CASES,
    binomial_cdf,
    binomial_test,
    holm_adjust,
    minimum_detectable_difference,
    paired_confidence,
    paired_upper_bound,
    t_cdf,
    t_quantile,
)


@pytest.mark.parametrize("n", [1, 5, 14, 20, 60, 1000])
def test_wilson_matches_statsmodels(n):
    from statsmodels.stats.proportion import proportion_confint

    for k in sorted({0, 1, n // 3, n // 2, n - 1, n} - {-1}):
        for confidence in (0.90, 0.95):
            expected = proportion_confint(k, n, alpha=1 - confidence, method="wilson")
            assert wilson_interval(k, n, confidence) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("df", [1, 2, 5, 13, 21, 99, 1000])
def test_student_t_matches_scipy(df):
    for t in (-40.0, -3.2, -1.0, -0.1, 0.0, 0.5, 1.771, 2.5, 12.0):
        assert t_cdf(t, df) == pytest.approx(sps.t.cdf(t, df), abs=1e-12)
    for p in (0.001, 0.025, 0.05, 0.2, 0.5, 0.8, 0.95, 0.975, 0.999):
        assert t_quantile(p, df) == pytest.approx(sps.t.ppf(p, df), rel=1e-9, abs=1e-9)


def test_binomial_matches_scipy():
    for n, p in ((1, 0.9), (10, 0.5), (30, 0.9), (100, 0.9), (2000, 0.95)):
        for k in sorted({0, 1, n // 2, int(n * p) - 2, int(n * p), n - 1, n}):
            if not 0 <= k <= n:
                continue
            assert binomial_cdf(k, n, p) == pytest.approx(sps.binom.cdf(k, n, p), abs=1e-12)
            for alternative in ("less", "greater"):
                expected = sps.binomtest(k, n, p, alternative=alternative).pvalue
                assert binomial_test(k, n, p, alternative).p_value == pytest.approx(expected, abs=1e-12)


def _augmented(differences):
    return np.array(list(differences) + list(PSEUDO_CASES))


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("margin,alpha", [(0.05, 0.05), (0.10, 0.025), (0.0, 0.10)])
def test_paired_upper_bound_matches_scipy_one_sample_t(seed, margin, alpha):
    rng = random.Random(seed)
    n = rng.choice([8, 14, 20, 44])
    # Per-case differences of shares of right repeats out of 3: multiples of 1/3 in -1..1.
    differences = [(rng.randint(0, 3) - rng.randint(0, 3)) / 3 for _ in range(n)]
    bound = paired_upper_bound(differences, margin, alpha)
    sample = _augmented(differences)
    test = sps.ttest_1samp(sample, popmean=margin, alternative="less")
    low, high = sps.ttest_1samp(sample, popmean=0).confidence_interval(confidence_level=1 - 2 * alpha)
    assert bound.p_value == pytest.approx(test.pvalue, rel=1e-9)
    assert (bound.low, bound.high) == pytest.approx((max(-1, low), min(1, high)), abs=1e-9)
    assert bound.estimate == pytest.approx(sum(differences) / n) and bound.n == n
    # The decision and the interval agree: H0 is rejected exactly when the upper bound is below the margin.
    assert (bound.p_value < alpha) == (bound.high < margin)


def test_minimum_detectable_difference_has_the_stated_power():
    from statsmodels.stats.power import TTestPower

    for n, sd, alpha in ((14, 0.6, 0.05), (20, 0.3, 0.05), (44, 0.5, 0.025), (200, 0.2, 0.05)):
        mdd = minimum_detectable_difference(sd, n, alpha)
        # Exact power of the one-sided t test at that difference (noncentral t): about 80%.
        noncentrality = mdd / (sd / math.sqrt(n))
        power = sps.nct.sf(sps.t.ppf(1 - alpha, n - 1), n - 1, noncentrality)
        assert 0.78 <= power <= 0.82
        exact = TTestPower().solve_power(nobs=n, alpha=alpha, power=0.8, alternative="larger") * sd
        assert mdd == pytest.approx(exact, rel=0.03)


def test_holm_matches_statsmodels():
    from statsmodels.stats.multitest import multipletests

    rng = random.Random(3)
    for m in (1, 2, 3, 5, 8):
        p_values = [rng.random() ** 3 for _ in range(m)]
        assert holm_adjust(p_values) == pytest.approx(list(multipletests(p_values, method="holm")[1]), abs=1e-12)


def test_paired_confidence_matches_scipy():
    differences = [1, 0, 0, 1, -1, 0, 1, 0, 0, 0.5]
    expected = 1 - sps.ttest_1samp(_augmented(differences), 0, alternative="greater").pvalue
    assert paired_confidence(differences) == pytest.approx(expected, rel=1e-9)
    assert paired_confidence([]) == 0.5 and paired_confidence([0, 0, 0]) == pytest.approx(0.5)


# ---------------------------------------------------------------- what the non-inferiority test decides
def test_a_champion_wrong_on_five_more_of_ten_cases_is_not_non_inferior():
    # assigned minus champion: +1 on five cases, 0 on the other five
    bound = paired_upper_bound([1.0] * 5 + [0.0] * 5, margin=0.05, alpha=0.05)
    assert bound.high > 0.5 and bound.p_value > 0.9
    # the old two-sided exact McNemar test let this through at p = 0.0625
    assert sps.binomtest(0, 5, 0.5).pvalue == pytest.approx(0.0625)


def test_both_directions_of_the_paired_test():
    better = paired_upper_bound([-1.0] * 5 + [0.0] * 15, margin=0.05, alpha=0.05)    # champion right on 5 more of 20
    worse = paired_upper_bound([1.0] * 5 + [0.0] * 15, margin=0.05, alpha=0.05)
    assert better.high < 0.05 and better.p_value < 0.05
    assert worse.low > 0 and worse.p_value > 0.5   # significantly worse: far from non-inferior


def test_no_discordant_case_still_leaves_an_honest_interval():
    # 20 cases answered identically: without the pseudo-cases the bound would be exactly 0 (certainty).
    bound = paired_upper_bound([0.0] * 20, margin=0.05, alpha=0.05)
    assert 0.05 < bound.high < 0.2 and bound.p_value > 0.05
    assert paired_upper_bound([0.0] * 60, margin=0.05, alpha=0.05).high < 0.05  # enough cases do show it


def _exact_coverage(n: int, p_plus: float, p_minus: float, alpha: float) -> float:
    """P(upper bound >= true mean) for binary per-case differences, by enumerating every outcome."""
    truth = p_plus - p_minus
    covered = 0.0
    for plus in range(n + 1):
        for minus in range(n + 1 - plus):
            probability = (math.comb(n, plus) * math.comb(n - plus, minus) * p_plus ** plus * p_minus ** minus
                           * (1 - p_plus - p_minus) ** (n - plus - minus))
            if probability < 1e-12:
                continue
            differences = [1.0] * plus + [-1.0] * minus + [0.0] * (n - plus - minus)
            if paired_upper_bound(differences, 0.0, alpha).high >= truth - 1e-12:
                covered += probability
    return covered


@pytest.mark.parametrize("n,p_plus,p_minus", [(10, 0.05, 0.0), (14, 0.1, 0.1), (20, 0.2, 0.05), (20, 0.05, 0.2),
                                              (30, 0.3, 0.3), (20, 0.5, 0.0)])
def test_the_one_sided_bound_keeps_about_its_level(n, p_plus, p_minus):
    # Exact coverage (not simulated) of the 95% upper bound where the champion is truly worse or equal.
    # The plain t bound covers only 41% at n=10 with 5% one-way discordance; see docs/decisions.md.
    assert _exact_coverage(n, p_plus, p_minus, 0.05) >= 0.93
