"""Small, dependency-free statistics for accuracy estimates.

Golden sets are small (tens of cases), so a raw accuracy such as 8/10 says
little on its own. The pipeline reports a Wilson score interval for every
accuracy and a probability that one model is truly more accurate than another,
so a recommendation can say how sure it is.
"""

from __future__ import annotations

import math
from statistics import NormalDist


def normal_cdf(z: float) -> float:
    """P(Z <= z) for a standard normal Z."""
    return 0.5 * (1.0 + math.erf(z / math.sqrt(2.0)))


def _z_for(confidence: float) -> float:
    """Two-sided critical value: 1.959964 for 95%."""
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be strictly between 0 and 1, got {confidence!r}")
    return NormalDist().inv_cdf(1.0 - (1.0 - confidence) / 2.0)


def wilson_interval(successes: float, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for a proportion.

    Chosen over the textbook p +/- z*sqrt(p(1-p)/n) interval because that one
    collapses to a zero-width interval at 0/n and n/n and can leave 0..1,
    exactly the cases a small golden set produces. With p = successes/n:

        centre = (p + z^2/2n) / (1 + z^2/n)
        half   = z * sqrt(p(1-p)/n + z^2/4n^2) / (1 + z^2/n)

    n == 0 means no evidence at all, so the interval is the whole (0, 1).
    `successes` may be fractional (e.g. accuracy * calls).
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n!r}")
    # A little slack: callers pass accuracy * n, which float rounding can push
    # a hair outside 0..n.
    if not -1e-9 <= successes <= n + 1e-9:
        raise ValueError(f"successes must be between 0 and n={n}, got {successes!r}")
    successes = min(max(successes, 0.0), float(n))
    z = _z_for(confidence)
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    z2 = z * z
    denominator = 1.0 + z2 / n
    centre = (p + z2 / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / denominator
    low, high = max(0.0, centre - half), min(1.0, centre + half)
    # At 0/n and n/n the bound is exactly 0 or 1 in theory; pin it so float
    # rounding cannot report 0.9999999999999999 for a perfect score.
    if successes == 0:
        low = 0.0
    if successes == n:
        high = 1.0
    return low, high


def _smoothed(p: float, n: float) -> tuple[float, float]:
    """Agresti-Caffo smoothing: one extra success and one extra failure.

    Returns (smoothed proportion, variance of it). Without smoothing a model
    with 10/10 has zero variance and every comparison becomes a certainty
    (or a division by zero); adding a pseudo-success and a pseudo-failure keeps
    the variance positive, shrinks extreme estimates slightly toward 1/2, and
    is the standard adjustment that makes the normal approximation for a
    difference of proportions behave at small n (Agresti & Caffo, 2000).
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n!r}")
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"proportion must be within 0..1, got {p!r}")
    adjusted_n = n + 2.0
    adjusted_p = (p * n + 1.0) / adjusted_n
    return adjusted_p, adjusted_p * (1.0 - adjusted_p) / adjusted_n


def prob_a_beats_b(p_a: float, n_a: float, p_b: float, n_b: float) -> float:
    """Approximate P(true accuracy of A > true accuracy of B).

    Normal approximation to the difference of two independent proportions,
    each Agresti-Caffo smoothed (see `_smoothed`): equal evidence gives 0.5,
    and the value moves toward 1 (or 0) as the gap grows relative to the
    combined standard error. Zero variance cannot occur thanks to smoothing.
    """
    pa, var_a = _smoothed(p_a, n_a)
    pb, var_b = _smoothed(p_b, n_b)
    return normal_cdf((pa - pb) / math.sqrt(var_a + var_b))


def prob_at_least(p: float, n: float, threshold: float) -> float:
    """Approximate P(true accuracy >= threshold) for an observed p over n trials.

    Same smoothing and normal approximation as `prob_a_beats_b`, comparing
    against a fixed threshold instead of a second model.
    """
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be within 0..1, got {threshold!r}")
    smoothed, variance = _smoothed(p, n)
    return normal_cdf((smoothed - threshold) / math.sqrt(variance))


# ---------------------------------------------------------------- paired comparisons (promotion gates)
def mcnemar_exact(champion_only: int, incumbent_only: int) -> float:
    """Two-sided exact McNemar p-value from the discordant pairs.

    champion_only: pairs the champion got right and the incumbent wrong; incumbent_only: the reverse.
    Pairs both got right (or both wrong) say nothing about which is better, so they do not enter.
    Under "equally good" each discordant pair is a fair coin, so the count is Binomial(n, 1/2).
    """
    n = champion_only + incumbent_only
    if n == 0:
        return 1.0
    k = min(champion_only, incumbent_only)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def paired_bootstrap(differences: list[float], resamples: int = 4000, seed: int = 0) -> tuple[float, float, tuple[float, float]]:
    """Mean of per-case differences (champion - incumbent), the one-sided p-value that the champion
    is NOT worse (share of resampled means >= 0), and a 95% percentile interval of the mean.

    A small p-value means the champion is significantly worse. Seeded: the same data gives the same answer.
    """
    if not differences:
        return 0.0, 1.0, (0.0, 0.0)
    import random

    rng = random.Random(seed)
    n = len(differences)
    observed = sum(differences) / n
    means = sorted(sum(differences[rng.randrange(n)] for _ in range(n)) / n for _ in range(resamples))
    p_not_worse = sum(1 for m in means if m >= 0) / resamples
    return observed, p_not_worse, (means[int(0.025 * resamples)], means[int(0.975 * resamples) - 1])
