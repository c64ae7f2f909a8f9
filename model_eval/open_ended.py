"""What a leaderboard shows beside accuracy for open-ended tasks: the judge's calibration, pairwise win
rates against the reference model, and each model's agreement with the consensus. Read from the
warehouse; used by the CLI and the `recommendations` asset's leaderboard."""

from __future__ import annotations

import duckdb

NEWEST_CALIBRATION = """
SELECT reason FROM judge_calibrations WHERE task = $task ORDER BY calibrated_at DESC LIMIT 1"""

# Both from the newest computation for the task: the models compared then, scored or not.
NEWEST_WIN_RATES = """
SELECT model, reference_model, judge_model, cases, win_rate, win_rate_low, win_rate_high, wins, ties, losses, unresolved
FROM pairwise_win_rates WHERE task = $task AND dataset_version = $version AND eval_run_id = (
    SELECT eval_run_id FROM pairwise_win_rates WHERE task = $task AND dataset_version = $version ORDER BY judged_at DESC LIMIT 1)
ORDER BY win_rate DESC NULLS LAST, model"""

NEWEST_AGREEMENT = """
SELECT model, cases, agreement_rate, loo_cases, loo_agreement_rate FROM consensus_agreement
WHERE task = $task AND dataset_version = $version AND eval_run_id = (
    SELECT eval_run_id FROM consensus_agreement WHERE task = $task AND dataset_version = $version ORDER BY computed_at DESC LIMIT 1)
ORDER BY agreement_rate DESC NULLS LAST, model"""


def _rate(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def task_notes(conn: duckdb.DuckDBPyConnection, task: str, version: str, with_judge: bool = True) -> list[str]:
    """Lines for one task (none for a task that is neither judged nor compared by consensus). `with_judge=False`
    leaves out the judge's calibration, for reports that print the recommendation's reasoning (it says it)."""
    lines = []
    calibration = conn.sql(NEWEST_CALIBRATION, params={"task": task}).fetchall() if with_judge else []
    if calibration:
        lines.append(f"judge: {calibration[0][0]}")
    params = {"task": task, "version": version}
    for model, reference, judge, cases, rate, low, high, wins, ties, losses, unresolved in conn.sql(NEWEST_WIN_RATES, params=params).fetchall():
        interval = f" ({_rate(low)}-{_rate(high)})" if rate is not None else ""
        lines.append(f"win rate of {model} against {reference} (judge {judge}, not accuracy): {_rate(rate)}{interval} over n={cases} "
                     f"cases; {wins} wins, {ties} ties, {losses} losses, {unresolved} unresolved")
    agreement = conn.sql(NEWEST_AGREEMENT, params=params).fetchall()
    if agreement:
        lines.append("agreement with the consensus of the models (leave-one-out in brackets): " + ", ".join(
            f"{model} {_rate(rate)} of n={cases} ({_rate(loo)} of n={loo_cases})" for model, cases, rate, loo_cases, loo in agreement))
    return lines
