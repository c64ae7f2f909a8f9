"""Small, dependency-free statistics for the pipeline's decisions (docs/decisions.md explains each choice).

The case is the unit of evidence: a model's result on a case is the mean of its repeats, and every
interval and test here runs over cases. Repeats only measure consistency; counting them as separate
samples would shrink every interval by a factor of about sqrt(repeats) for no new information.

Pure Python on purpose (the core has no numeric dependency); the tests check every function against
scipy and statsmodels.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from statistics import NormalDist

POWER = 0.80  # the power at which a gate's minimum detectable difference is quoted


def normal_cdf(z: float) -> float:
    """P(Z <= z) for a standard normal Z."""
    return 0.5 * (1.0 + math.erf(z / math.sqrt(2.0)))


def _z_for(confidence: float) -> float:
    """Two-sided critical value: 1.959964 for 95%."""
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be strictly between 0 and 1, got {confidence!r}")
    return NormalDist().inv_cdf(1.0 - (1.0 - confidence) / 2.0)


def _check_level(alpha: float, name: str = "alpha") -> float:
    if isinstance(alpha, bool) or not 0.0 < alpha < 1.0:
        raise ValueError(f"{name} must be strictly between 0 and 1, got {alpha!r}")
    return float(alpha)


# ---------------------------------------------------------------- proportions
def wilson_interval(successes: float, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for a proportion.

    Chosen over the textbook p +/- z*sqrt(p(1-p)/n) interval because that one collapses to a
    zero-width interval at 0/n and n/n and can leave 0..1, exactly the cases a small golden set
    produces. With p = successes/n:

        centre = (p + z^2/2n) / (1 + z^2/n)
        half   = z * sqrt(p(1-p)/n + z^2/4n^2) / (1 + z^2/n)

    n == 0 means no evidence at all, so the interval is the whole (0, 1). `successes` may be
    fractional: over n cases, the sum of per-case accuracies (each the mean of the case's repeats).
    A per-case value in [0, 1] with mean p has variance at most p(1-p), so the interval stays valid
    (and is conservative when repeats disagree).
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n!r}")
    # A little slack: callers pass sums of floats, which rounding can push a hair outside 0..n.
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

    Returns (smoothed proportion, its variance). Without it a model with 10/10 has zero variance and
    every comparison becomes a certainty; the pseudo-observations keep the variance positive and make
    the normal approximation behave at small n (Agresti & Caffo, 2000).
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n!r}")
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"proportion must be within 0..1, got {p!r}")
    adjusted_n = n + 2.0
    adjusted_p = (p * n + 1.0) / adjusted_n
    return adjusted_p, adjusted_p * (1.0 - adjusted_p) / adjusted_n


def prob_a_beats_b(p_a: float, n_a: float, p_b: float, n_b: float) -> float:
    """Approximate confidence that A's true accuracy exceeds B's, for two INDEPENDENT samples
    (n = cases). Only a fallback: models answering the same cases are compared with
    `paired_confidence`, which uses the pairing."""
    pa, var_a = _smoothed(p_a, n_a)
    pb, var_b = _smoothed(p_b, n_b)
    return normal_cdf((pa - pb) / math.sqrt(var_a + var_b))


def prob_at_least(p: float, n: float, threshold: float) -> float:
    """Approximate confidence that the true accuracy is >= threshold, from accuracy p over n cases."""
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be within 0..1, got {threshold!r}")
    smoothed, variance = _smoothed(p, n)
    return normal_cdf((smoothed - threshold) / math.sqrt(variance))


# ---------------------------------------------------------------- incomplete beta, Student t, binomial
def _beta_continued_fraction(a: float, b: float, x: float) -> float:
    """Continued fraction of the regularized incomplete beta (DLMF 8.17.22), evaluated by modified Lentz."""
    tiny, eps = 1e-300, 1e-15
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    result = d
    for m in range(1, 10_000):
        # even step d_{2m}, then odd step d_{2m+1}
        for numerator in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                          -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            step = c * d
            result *= step
        if abs(step - 1.0) < eps:
            return result
    raise ArithmeticError(f"incomplete beta did not converge for a={a}, b={b}, x={x}")


def regularized_beta(a: float, b: float, x: float) -> float:
    """I_x(a, b), the regularized incomplete beta function."""
    if a <= 0 or b <= 0:
        raise ValueError(f"a and b must be positive, got {a}, {b}")
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    # The fraction converges fast on one side of the mean; use the symmetry I_x(a,b) = 1 - I_{1-x}(b,a) on the other.
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _beta_continued_fraction(a, b, x) / a
    return 1.0 - math.exp(log_front) * _beta_continued_fraction(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with `df` degrees of freedom."""
    if df <= 0:
        raise ValueError(f"degrees of freedom must be positive, got {df}")
    if math.isinf(t):
        return 1.0 if t > 0 else 0.0
    squared = t * t
    if squared < df:
        # Near 0: P(|T| < |t|) = I_{t^2/(df+t^2)}(1/2, df/2) keeps full precision where the tail form would round.
        central = regularized_beta(0.5, df / 2.0, squared / (df + squared))
        return 0.5 + 0.5 * central if t >= 0 else 0.5 - 0.5 * central
    tail = 0.5 * regularized_beta(df / 2.0, 0.5, df / (df + squared))
    return 1.0 - tail if t >= 0 else tail


def t_quantile(p: float, df: float) -> float:
    """The t with P(T <= t) = p (bisection on `t_cdf`; monotone, so it cannot miss)."""
    _check_level(p, "p")
    low, high = -1.0, 1.0
    while t_cdf(low, df) > p:
        low *= 2.0
    while t_cdf(high, df) < p:
        high *= 2.0
    for _ in range(200):
        middle = 0.5 * (low + high)
        if t_cdf(middle, df) < p:
            low = middle
        else:
            high = middle
        if high - low < 1e-12 * max(1.0, abs(middle)):
            break
    return 0.5 * (low + high)


def binomial_cdf(k: int, n: int, p: float) -> float:
    """P(X <= k) for X ~ Binomial(n, p), exact (through the incomplete beta)."""
    if n < 0 or not 0.0 <= p <= 1.0:
        raise ValueError(f"need n >= 0 and 0 <= p <= 1, got n={n}, p={p}")
    if k < 0:
        return 0.0
    if k >= n:
        return 1.0
    if p == 0.0:
        return 1.0
    if p == 1.0:
        return 0.0
    return regularized_beta(n - k, k + 1, 1.0 - p)


@dataclass(frozen=True)
class BinomialTest:
    """One-sided exact binomial test of a success rate against a fixed rate p0."""

    successes: int
    n: int
    p0: float
    alternative: str     # "less": evidence the rate is below p0; "greater": evidence it is above
    p_value: float

    @property
    def rate(self) -> float:
        return self.successes / self.n if self.n else float("nan")


def binomial_test(successes: int, n: int, p0: float, alternative: str) -> BinomialTest:
    """Exact one-sided binomial test: "less" gives P(X <= k | p0), "greater" gives P(X >= k | p0)."""
    if not 0 <= successes <= n:
        raise ValueError(f"successes must be between 0 and n={n}, got {successes}")
    if alternative == "less":
        p_value = binomial_cdf(successes, n, p0)
    elif alternative == "greater":
        p_value = 1.0 - binomial_cdf(successes - 1, n, p0)
    else:
        raise ValueError(f"alternative must be 'less' or 'greater', got {alternative!r}")
    return BinomialTest(successes, n, p0, alternative, min(1.0, max(0.0, p_value)))


# ---------------------------------------------------------------- paired comparisons over cases
@dataclass(frozen=True)
class PairedBound:
    """A one-sided test on the mean of paired per-case differences.

    `estimate` is the plain mean difference; `low`..`high` is the two-sided 1 - 2*alpha interval, so
    `high` is the one-sided 1 - alpha upper bound the non-inferiority gate compares with its margin.
    """

    n: int                    # paired cases
    estimate: float
    low: float
    high: float
    p_value: float            # one-sided: H0 mean >= margin against H1 mean < margin
    margin: float
    alpha: float
    detectable: float         # minimum detectable difference at POWER, one-sided level alpha
    method: str = "paired t on per-case differences, +1/-1 pseudo-cases"


PSEUDO_CASES = (1.0, -1.0)


def _augmented(differences: Sequence[float]) -> tuple[int, float, float]:
    """(n, mean, standard deviation) of the differences plus one pseudo-case at +1 and one at -1.

    Like Agresti-Min's pseudo-counts for matched proportions: with no discordant case the plain
    t interval has zero width and claims certainty from a handful of cases; the two pseudo-cases
    keep it honest and pull the mean slightly toward 0, and their effect fades as cases grow.
    """
    values = [float(d) for d in differences] + list(PSEUDO_CASES)
    n = len(values)
    mean = sum(values) / n
    variance = sum((v - mean) ** 2 for v in values) / (n - 1)
    return n, mean, math.sqrt(variance)


def minimum_detectable_difference(sd: float, n: int, alpha: float, power: float = POWER) -> float:
    """Smallest true difference (beyond the tested value) a one-sided t test at level alpha detects
    with the given power: (t_{1-alpha, n-1} + t_{power, n-1}) * sd / sqrt(n)."""
    if n < 2:
        return float("inf")
    df = n - 1
    return (t_quantile(1.0 - alpha, df) + t_quantile(power, df)) * sd / math.sqrt(n)


def paired_upper_bound(differences: Sequence[float], margin: float, alpha: float) -> PairedBound:
    """Non-inferiority of paired per-case differences d = assigned - challenger (each in -1..1).

    H0: mean(d) >= margin (the challenger is worse by the margin or more); H1: mean(d) < margin.
    The test is Student's t over cases with two pseudo-cases (see `_augmented`); it rejects H0
    exactly when the one-sided 1 - alpha upper bound is below the margin.
    """
    alpha = _check_level(alpha)
    if not differences:
        return PairedBound(0, float("nan"), -1.0, 1.0, 1.0, margin, alpha, float("inf"))
    n, mean, sd = _augmented(differences)
    se = sd / math.sqrt(n)
    critical = t_quantile(1.0 - alpha, n - 1)
    p_value = t_cdf((mean - margin) / se, n - 1)
    estimate = sum(differences) / len(differences)
    return PairedBound(
        n=len(differences), estimate=estimate, low=max(-1.0, mean - critical * se), high=min(1.0, mean + critical * se),
        p_value=p_value, margin=margin, alpha=alpha, detectable=minimum_detectable_difference(sd, n, alpha))


def paired_confidence(differences: Sequence[float]) -> float:
    """Confidence that the first model is truly more accurate than the second, from paired per-case
    differences d = first - second: one minus the one-sided paired p-value of H0 mean(d) <= 0.
    0.5 when there is no evidence either way."""
    if not differences:
        return 0.5
    n, mean, sd = _augmented(differences)
    return t_cdf(mean / (sd / math.sqrt(n)), n - 1)


# ---------------------------------------------------------------- multiplicity
def holm_adjust(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values, in the input order.

    Sorted ascending, the i-th of m p-values is multiplied by (m - i) (i from 0), and the adjusted
    values are made non-decreasing; rejecting where adjusted p < alpha controls the family-wise
    error at alpha. Unlike Bonferroni it does not charge the full factor m to every hypothesis.
    """
    m = len(p_values)
    order = sorted(range(m), key=lambda i: p_values[i])
    adjusted = [0.0] * m
    running = 0.0
    for rank, index in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p_values[index]))
        adjusted[index] = running
    return adjusted


# ---------------------------------------------------------------- two independent samples of ratings
@dataclass(frozen=True)
class RankTest:
    """One-sided Mann-Whitney U test of sample x against sample y."""

    u: float             # U of x: pairs (x_i, y_j) with x_i > y_j, ties counted one half
    n_x: int
    n_y: int
    alternative: str     # "less": evidence x tends to be lower than y; "greater": higher
    p_value: float


def mann_whitney_u(x: Sequence[float], y: Sequence[float], alternative: str) -> RankTest:
    """Normal approximation with the tie correction and a continuity correction of 1/2.

    Ratings are few distinct values (thumbs are 0 and 1), so ties are the rule, not the exception;
    the tie-corrected variance keeps the test exact in level for large samples of either kind.
    Matches scipy.stats.mannwhitneyu(x, y, alternative=..., method="asymptotic", use_continuity=True).
    """
    if alternative not in ("less", "greater"):
        raise ValueError(f"alternative must be 'less' or 'greater', got {alternative!r}")
    n_x, n_y = len(x), len(y)
    if n_x == 0 or n_y == 0:
        raise ValueError("both samples need at least one value")
    pooled = sorted([(float(v), 0) for v in x] + [(float(v), 1) for v in y])
    n = n_x + n_y
    rank_sum_x = 0.0
    tie_term = 0.0
    i = 0
    while i < n:
        j = i
        while j + 1 < n and pooled[j + 1][0] == pooled[i][0]:
            j += 1
        mid_rank = (i + j) / 2 + 1          # ranks are 1-based; tied values share their mean rank
        rank_sum_x += mid_rank * sum(1 for k in range(i, j + 1) if pooled[k][1] == 0)
        t = j - i + 1
        tie_term += t ** 3 - t
        i = j + 1
    u_x = rank_sum_x - n_x * (n_x + 1) / 2
    mean = n_x * n_y / 2
    variance = n_x * n_y / 12 * ((n + 1) - tie_term / (n * (n - 1))) if n > 1 else 0.0
    if variance <= 0:
        return RankTest(u_x, n_x, n_y, alternative, 1.0)   # every value tied: no evidence either way
    u = u_x if alternative == "greater" else n_x * n_y - u_x
    z = (u - mean - 0.5) / math.sqrt(variance)
    return RankTest(u_x, n_x, n_y, alternative, min(1.0, max(0.0, 1.0 - normal_cdf(z))))
