"""What logged production calls prove about a model: enough calls, and a test, before any action.

A rollback, an abort or a stage advance on production calls needs a minimum number of calls in the
window and an exact one-sided binomial test of the success rate against `degradation.min_success_rate`.
p95 latency is computed exactly as in the evaluation (successful calls only), and judged only on
enough successful calls. User ratings (the gateway's POST /v1/feedback, in [0, 1]) are compared
between a model and the one it replaced with a one-sided Mann-Whitney U test, on at least
`degradation.min_rated_calls` rated calls on each side (docs/decisions.md, section 11). Pure functions over the warehouse's `production_calls` table.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import duckdb

from model_eval.deployment import Degradation, Rollout
from model_eval.duckdb_files import table_exists
from model_eval.stats import binomial_test, mann_whitney_u


@dataclass(frozen=True)
class ProductionWindow:
    model: str
    since: datetime
    calls: int
    successes: int
    p95_latency_ms: float | None      # over successful calls; None below the minimum count

    @property
    def success_rate(self) -> float:
        return self.successes / self.calls if self.calls else float("nan")


def production_window(conn: duckdb.DuckDBPyConnection, model: str, task: str, since: datetime,
                      min_latency_calls: int) -> ProductionWindow:
    """The model's logged calls on the task since `since` (no table yet: no calls)."""
    if not table_exists(conn, "production_calls"):
        return ProductionWindow(model, since, 0, 0, None)
    calls, successes, p95 = conn.execute("""
        SELECT count(*), count(*) FILTER (WHERE success),
               CASE WHEN count(*) FILTER (WHERE success) >= ? THEN quantile_cont(latency_ms, 0.95) FILTER (WHERE success) END
        FROM production_calls WHERE model = ? AND task = ? AND ts >= ?""", [min_latency_calls, model, task, since]).fetchall()[0]
    return ProductionWindow(model, since, int(calls), int(successes), p95)


def degradation_problems(window: ProductionWindow, limits: Degradation, baseline_p95_ms: float | None) -> list[str]:
    """Why these calls show the model degraded (empty: no evidence of it)."""
    problems = []
    if window.calls >= max(1, limits.min_production_calls):
        test = binomial_test(window.successes, window.calls, limits.min_success_rate, "less")
        if test.p_value < limits.significance:
            problems.append(f"{window.calls} logged production calls succeeded at {window.success_rate:.2f}, below "
                            f"{limits.min_success_rate:.2f} (exact one-sided binomial p={test.p_value:.2g} < {limits.significance:g})")
    if (baseline_p95_ms and window.p95_latency_ms is not None
            and window.p95_latency_ms > limits.max_p95_latency_ratio * baseline_p95_ms):
        problems.append(f"production p95 latency {window.p95_latency_ms:.0f} ms over {window.successes} successful calls is over "
                        f"{limits.max_p95_latency_ratio:g}x the {baseline_p95_ms:.0f} ms measured in evaluation")
    return problems


def advance_waits_for(window: ProductionWindow, rollout: Rollout, limits: Degradation) -> str | None:
    """What the candidate's calls still lack before it may advance a stage; None when they suffice.

    With `rollout.min_production_calls: 0` production evidence is not required (a demo setting);
    otherwise the calls must show the success rate at or above `min_success_rate`.
    """
    if rollout.min_production_calls == 0:
        return None
    if window.calls < rollout.min_production_calls:
        return f"{window.calls} of {rollout.min_production_calls} logged production calls"
    test = binomial_test(window.successes, window.calls, limits.min_success_rate, "greater")
    if test.p_value >= limits.significance:
        return (f"evidence that its success rate is at least {limits.min_success_rate:.2f}: {window.successes}/{window.calls} "
                f"succeeded (exact one-sided binomial p={test.p_value:.2g}, needs < {limits.significance:g})")
    return None


def ratings(conn: duckdb.DuckDBPyConnection, model: str, task: str, since: datetime, until: datetime) -> list[float]:
    """Ratings of the model's answers shown to users (role primary) on the task, for calls made in [since, until)."""
    if not table_exists(conn, "production_calls"):
        return []
    rows = conn.execute("""SELECT rating FROM production_calls
                           WHERE model = ? AND task = ? AND role = 'primary' AND rating IS NOT NULL AND ts >= ? AND ts < ?""",
                        [model, task, since, until]).fetchall()
    return [r[0] for r in rows]


@dataclass(frozen=True)
class RatingWindows:
    """Which calls' ratings are compared: the model's, and the model it replaced (the baseline)."""

    model: str
    since: datetime
    until: datetime
    baseline_model: str
    baseline_since: datetime
    baseline_until: datetime


def rating_drop(conn: duckdb.DuckDBPyConnection, task: str, windows: RatingWindows, limits: Degradation) -> str | None:
    """Why the model's ratings show it worse than its baseline's (None: not enough ratings, or no evidence)."""
    mine = ratings(conn, windows.model, task, windows.since, windows.until)
    theirs = ratings(conn, windows.baseline_model, task, windows.baseline_since, windows.baseline_until)
    if min(len(mine), len(theirs)) < max(1, limits.min_rated_calls):
        return None
    test = mann_whitney_u(mine, theirs, "less")
    if test.p_value >= limits.significance:
        return None
    mean_mine, mean_theirs = sum(mine) / len(mine), sum(theirs) / len(theirs)
    return (f"user ratings fell: mean {mean_mine:.2f} over {len(mine)} rated calls against {mean_theirs:.2f} over "
            f"{len(theirs)} for {windows.baseline_model} (one-sided Mann-Whitney U p={test.p_value:.2g} < {limits.significance:g})")
