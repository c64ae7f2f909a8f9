"""Accuracy intervals and comparison probabilities.

Expected values were worked out by hand from the formulas in the docstrings
(z = 1.959964 for 95%, z = 1.644854 for 90%), not by calling the code.
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


# ---------------------------------------------------------------- paired comparisons
from model_eval.stats import mcnemar_exact, paired_bootstrap  # noqa: E402


def test_mcnemar_exact_matches_the_binomial_by_hand():
    # 1 vs 9 discordant pairs: 2 * (C(10,0) + C(10,1)) / 2^10 = 22/1024
    assert mcnemar_exact(1, 9) == pytest.approx(22 / 1024)
    assert mcnemar_exact(9, 1) == pytest.approx(22 / 1024)  # symmetric: direction is read from the counts
    assert mcnemar_exact(5, 5) == 1.0
    assert mcnemar_exact(0, 0) == 1.0
    assert mcnemar_exact(0, 6) == pytest.approx(2 / 64)


def test_paired_bootstrap_flags_a_clearly_worse_champion_only():
    worse = [-0.5] * 15 + [0.0] * 5
    mean, p_not_worse, (low, high) = paired_bootstrap(worse)
    assert mean == pytest.approx(-0.375) and p_not_worse < 0.01 and high < 0
    mixed = [0.2, -0.2] * 10
    _, p_mixed, (low_m, high_m) = paired_bootstrap(mixed)
    assert p_mixed > 0.3 and low_m < 0 < high_m
    assert paired_bootstrap(mixed) == paired_bootstrap(mixed)  # seeded
    assert paired_bootstrap([]) == (0.0, 1.0, (0.0, 0.0))
