"""Agreement between a judge and human raters on PASS/FAIL verdicts: the confusion matrix and Cohen's kappa.

A judge's verdict on a calibration case is PASS, FAIL or none (no parseable verdict after its retries).
A missing verdict is a failure of the judge, so it counts as a disagreement: kappa is computed on the
2x2 table where it stands for the opposite of the human's verdict. Not answering a case therefore never
scores better than answering it wrong (a third "none" category would reward it: it lowers the chance
agreement as well as the observed one), and a judge that never answers has kappa -1 on a balanced set.
Pure Python; `model_eval_tests/test_judge_calibration.py` checks the figures against
statsmodels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist

VERDICTS = ("PASS", "FAIL")


@dataclass(frozen=True)
class Confusion:
    """Human verdict (rows) x judge verdict (columns), with the judge's unparseable answers kept apart."""

    pass_pass: int = 0      # human PASS, judge PASS
    pass_fail: int = 0      # human PASS, judge FAIL
    pass_none: int = 0      # human PASS, judge gave no verdict
    fail_pass: int = 0
    fail_fail: int = 0
    fail_none: int = 0

    @classmethod
    def of(cls, pairs: list[tuple[str, str | None]]) -> "Confusion":
        """From (human verdict, judge verdict or None) pairs."""
        counts = {f"{h}_{j}": 0 for h in ("pass", "fail") for j in ("pass", "fail", "none")}
        for human, judge in pairs:
            if human not in VERDICTS or judge not in (*VERDICTS, None):
                raise ValueError(f"verdicts must be PASS, FAIL (or None for the judge), got {human!r}, {judge!r}")
            counts[f"{human.lower()}_{(judge or 'none').lower()}"] += 1
        return cls(**counts)

    @property
    def cases(self) -> int:
        return self.pass_pass + self.pass_fail + self.pass_none + self.fail_pass + self.fail_fail + self.fail_none

    @property
    def unparseable(self) -> int:
        return self.pass_none + self.fail_none

    @property
    def agreement(self) -> float:
        """Share of cases where the judge gave the human's verdict (an unparseable verdict never agrees)."""
        return (self.pass_pass + self.fail_fail) / self.cases if self.cases else float("nan")

    def kappa_table(self) -> list[list[int]]:
        """The 2x2 table kappa is computed on (rows human PASS/FAIL, columns judge PASS/FAIL), a missing
        verdict counted as the opposite of the human's."""
        return [[self.pass_pass, self.pass_fail + self.pass_none],
                [self.fail_pass + self.fail_none, self.fail_fail]]


@dataclass(frozen=True)
class Kappa:
    kappa: float
    std: float          # asymptotic standard error (Fleiss, Cohen & Everitt 1969)
    low: float          # two-sided 95% interval from it, within [-1, 1]
    high: float


def cohens_kappa(table: list[list[int]], confidence: float = 0.95) -> Kappa:
    """Cohen's kappa of a square table of counts (rows: one rater, columns: the other).

    kappa = (p_o - p_e) / (1 - p_e), with p_o the observed agreement and p_e the agreement expected
    from the two raters' marginal shares alone. When both raters give one verdict only, p_e = 1 and
    kappa is undefined: NaN, which no bar passes.
    """
    k = len(table)
    if k < 2 or any(len(row) != k for row in table):
        raise ValueError("table must be square, at least 2x2")
    n = sum(sum(row) for row in table)
    if n <= 0:
        nan = float("nan")
        return Kappa(nan, nan, nan, nan)
    p = [[cell / n for cell in row] for row in table]
    rows = [sum(row) for row in p]
    cols = [sum(p[i][j] for i in range(k)) for j in range(k)]
    observed = sum(p[i][i] for i in range(k))
    expected = sum(rows[i] * cols[i] for i in range(k))
    if math.isclose(expected, 1.0):
        nan = float("nan")
        return Kappa(nan, nan, nan, nan)
    kappa = (observed - expected) / (1 - expected)
    # Large-sample variance of kappa when agreement is not just chance (Fleiss, Cohen & Everitt 1969).
    term_a = sum(p[i][i] * (1 - (rows[i] + cols[i]) * (1 - kappa)) ** 2 for i in range(k))
    term_b = (1 - kappa) ** 2 * sum(p[i][j] * (cols[i] + rows[j]) ** 2 for i in range(k) for j in range(k) if i != j)
    term_c = (kappa - expected * (1 - kappa)) ** 2
    variance = max(0.0, (term_a + term_b - term_c) / (1 - expected) ** 2 / n)
    std = math.sqrt(variance)
    z = NormalDist().inv_cdf(1 - (1 - confidence) / 2)
    # Kappa lies in [-1, 1]; the normal approximation's interval is cut to that range.
    return Kappa(kappa, std, max(-1.0, kappa - z * std), min(1.0, kappa + z * std))
