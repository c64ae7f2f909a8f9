"""Promotion gates: the evidence a champion needs before it may replace a task's assigned model.

Pure functions over the warehouse. Every gate works on cases (each case's share of right repeats),
never on calls. The non-inferiority gate is a one-sided paired test against a stated margin,
corrected with Holm's method when several challengers competed on the same cases
(docs/decisions.md). `model_eval.gate_evaluation` runs them once per run and records every result
in `promotion_gates`; promotion reads those rows back.
"""

from __future__ import annotations

from dataclasses import dataclass

import duckdb

from model_eval.deployment import Gates
from model_eval.golden import TaskSpec
from model_eval.metrics import case_accuracies, latest_metrics, paired_differences
from model_eval.stats import POWER, holm_adjust, paired_upper_bound

GATE_NAMES = ("threshold", "sample_size", "non_inferiority", "costs_known")
NON_INFERIORITY_TEST = "paired_t_noninferiority_holm"


@dataclass(frozen=True)
class GateResult:
    gate: str
    passed: bool
    detail: str
    test: str | None = None
    p_value: float | None = None        # raw one-sided p-value
    effect_size: float | None = None    # the estimate: accuracy, or mean(assigned - champion) over paired cases
    n_cases: int | None = None          # cases behind the figure (paired cases for non-inferiority)
    ci_low: float | None = None
    ci_high: float | None = None
    p_adjusted: float | None = None     # Holm-adjusted across the challengers
    comparisons: int | None = None      # challengers in the Holm family
    margin: float | None = None
    alpha: float | None = None
    detectable_difference: float | None = None  # at 80% power, at this n

    @property
    def estimate(self) -> float | None:
        return self.effect_size


def _points(value: float) -> str:
    return f"{value * 100:.0f} points"


def evaluate_gates(conn: duckdb.DuckDBPyConnection, task: TaskSpec, champion: str, incumbent: str | None,
                   gates: Gates, challengers: tuple[str, ...] | list[str] = ()) -> list[GateResult]:
    """Every gate for promoting `champion` over `incumbent` on the task's current golden version.

    `challengers`: every model that competed for the task on these cases (the qualified ones);
    the champion's comparison is corrected for having been picked among them.
    """
    metrics = latest_metrics(conn, champion, task.name, task.dataset_version)
    if metrics is None:
        reason = f"{champion} has no metrics on {task.name} {task.dataset_version}"
        return [GateResult(gate, False, reason) for gate in GATE_NAMES]
    return [
        _threshold(task, champion, metrics),
        _sample_size(conn, task, champion, metrics, gates),
        _non_inferiority(conn, task, champion, incumbent, gates, challengers),
        _costs_known(conn, champion, metrics),
    ]


def _threshold(task: TaskSpec, champion: str, metrics: dict) -> GateResult:
    """Qualification is on the point accuracy over cases; the lower bound is shown, not gated."""
    accuracy, low, high, cases = metrics["accuracy"], metrics["accuracy_low"], metrics["accuracy_high"], int(metrics["cases"])
    passed = accuracy >= task.qualification_threshold - 1e-9
    return GateResult("threshold", passed,
                      f"{champion} accuracy {accuracy:.3f} over n={cases} cases (95% Wilson interval {low:.3f}-{high:.3f}) "
                      f"{'meets' if passed else 'is below'} the threshold {task.qualification_threshold:.2f} on {task.dataset_version}",
                      test="point_accuracy_vs_threshold", effect_size=accuracy, n_cases=cases, ci_low=low, ci_high=high)


def _sample_size(conn, task: TaskSpec, champion: str, metrics: dict, gates: Gates) -> GateResult:
    repeats = int(metrics.get("repeats") or 0)
    validated = conn.sql("""SELECT bool_and(validation_passed) FROM golden_versions
                            WHERE task = $task AND dataset_version = $version AND is_current""",
                         params={"task": task.name, "version": task.dataset_version}).fetchall()[0][0]
    problems = []
    if metrics["cases"] < gates.min_cases:
        problems.append(f"{metrics['cases']} cases < {gates.min_cases}")
    if repeats < gates.min_repeats:
        problems.append(f"{repeats} repeat(s) per case < {gates.min_repeats}")
    if not validated:
        problems.append(f"golden set {task.dataset_version} has not passed validation")
    detail = "; ".join(problems) or f"{metrics['cases']} cases x {repeats} repeats on a validated golden set"
    return GateResult("sample_size", not problems, detail, n_cases=int(metrics["cases"]))


def _differences(conn, task: TaskSpec, challenger: str, incumbent_cases: dict[str, float]) -> list[float] | None:
    """assigned - challenger per paired case, from the challenger's newest evaluation; None if it has none."""
    metrics = latest_metrics(conn, challenger, task.name, task.dataset_version)
    if metrics is None:
        return None
    mine = case_accuracies(conn, challenger, task.name, task.dataset_version, metrics["eval_run_id"])
    return paired_differences(incumbent_cases, mine)


def _non_inferiority(conn, task: TaskSpec, champion: str, incumbent: str | None, gates: Gates,
                     challengers) -> GateResult:
    margin, alpha = gates.non_inferiority_margin, gates.significance
    if incumbent is None or incumbent == champion:
        return GateResult("non_inferiority", True, "no other assigned model to compare against", margin=margin, alpha=alpha)
    incumbent_metrics = latest_metrics(conn, incumbent, task.name, task.dataset_version)
    if incumbent_metrics is None:
        return GateResult("non_inferiority", False,
                          f"assigned model {incumbent} has no results on {task.dataset_version}; evaluate it first",
                          margin=margin, alpha=alpha)
    theirs = case_accuracies(conn, incumbent, task.name, task.dataset_version, incumbent_metrics["eval_run_id"])
    # The Holm family: every challenger that competed on these cases (the champion always among them).
    family = sorted({*challengers, champion} - {incumbent})
    differences = {name: d for name in family if (d := _differences(conn, task, name, theirs)) is not None}
    bounds = {name: paired_upper_bound(d, margin, alpha) for name, d in differences.items()}
    mine = bounds.get(champion)
    if mine is None or mine.n == 0:
        return GateResult("non_inferiority", False, f"no cases answered by both {champion} and {incumbent}",
                          test=NON_INFERIORITY_TEST, n_cases=0, margin=margin, alpha=alpha)
    names = sorted(bounds)
    raw = [bounds[name].p_value for name in names]
    adjusted = dict(zip(names, holm_adjust(raw)))
    m = len(names)
    # Holm compares the champion's p-value with alpha / (m - rank); report the interval at that level.
    rank = sorted(raw).index(mine.p_value)
    level = alpha / (m - rank)
    shown = paired_upper_bound(differences[champion], margin, level) if m > 1 else mine
    passed = adjusted[champion] < alpha
    correction = (f"; Holm across {m} challengers: adjusted p={adjusted[champion]:.4f}, one-sided level {level:.4f}"
                  if m > 1 else "")
    verdict = "is below" if shown.high < margin else "is not below"
    detail = (f"{incumbent} minus {champion} over n={mine.n} paired cases: {mine.estimate:+.3f} "
              f"(one-sided {1 - level:.1%} upper bound {shown.high:+.3f}, which {verdict} the margin {margin:.2f}); "
              f"p={mine.p_value:.4f}{correction}; with {mine.n} cases this gate resolves only differences of "
              f"{_points(shown.detectable)} or more ({POWER:.0%} power)")
    if not passed:
        detail = f"{champion} not shown non-inferior to {incumbent}: " + detail
    return GateResult("non_inferiority", passed, detail, test=NON_INFERIORITY_TEST, p_value=mine.p_value,
                      effect_size=mine.estimate, n_cases=mine.n, ci_low=shown.low, ci_high=shown.high,
                      p_adjusted=adjusted[champion], comparisons=m, margin=margin, alpha=alpha,
                      detectable_difference=shown.detectable)


def _costs_known(conn, champion: str, metrics: dict) -> GateResult:
    if metrics["total_cost_usd"] is None:
        return GateResult("costs_known", False, f"{champion} has calls with no known price: its cost is unknown")
    declared = conn.sql("""SELECT price_input_per_million IS NOT NULL AND price_output_per_million IS NOT NULL
                           FROM models WHERE model = $model ORDER BY last_synced_at DESC LIMIT 1""",
                        params={"model": champion}).fetchall()
    if metrics["total_cost_usd"] == 0 and not (declared and declared[0][0]):
        return GateResult("costs_known", False, f"{champion} shows a zero cost that no registry price declares")
    return GateResult("costs_known", True, f"{champion} costs ${metrics['cost_per_case_usd']:.6f} per case"
                      + (" (declared price)" if declared and declared[0][0] else ""))


# ---------------------------------------------------------------- the recorded results (`promotion_gates`)
GATE_COLUMNS = ("eval_run_id", "task", "dataset_version", "champion", "incumbent", "gate", "passed", "detail", "test",
                "p_value", "effect_size", "estimate", "n_cases", "ci_low", "ci_high", "p_adjusted", "comparisons", "margin",
                "alpha", "detectable_difference", "checked_at")


def record_gate_results(conn, eval_run_id: str, task: TaskSpec, champion: str, incumbent: str | None,
                        results: list[GateResult], checked_at) -> None:
    """Append one row per gate result (the caller owns the transaction); one `checked_at` per evaluation."""
    for g in results:
        row = {"eval_run_id": eval_run_id, "task": task.name, "dataset_version": task.dataset_version, "champion": champion,
               "incumbent": incumbent, "checked_at": checked_at, "estimate": g.effect_size,
               **{name: getattr(g, name) for name in GATE_COLUMNS if hasattr(g, name) and name != "estimate"}}
        conn.execute(f"INSERT INTO promotion_gates ({', '.join(GATE_COLUMNS)}) VALUES ({', '.join('?' * len(GATE_COLUMNS))})",
                     [row[name] for name in GATE_COLUMNS])


def recorded_gates(conn, eval_run_id: str, task: str, champion: str, incumbent: str | None) -> list[GateResult]:
    """The newest evaluation of the gates for this pair in this eval run (empty if none was recorded)."""
    frame = conn.sql("""
        SELECT * FROM promotion_gates
        WHERE eval_run_id = $run AND task = $task AND champion = $champion AND incumbent IS NOT DISTINCT FROM $incumbent
        QUALIFY checked_at = max(checked_at) OVER ()""",
                     params={"run": eval_run_id, "task": task, "champion": champion, "incumbent": incumbent}).pl()
    fields = GateResult.__dataclass_fields__
    return [GateResult(**{k: v for k, v in row.items() if k in fields}) for row in frame.iter_rows(named=True)]


def gate_verdict(results: list[GateResult], eval_run_id: str | None) -> tuple[bool, str]:
    """(passed, why): every gate must have a recorded result and every result must pass."""
    missing = [gate for gate in GATE_NAMES if gate not in {g.gate for g in results}]
    if missing:
        return False, (f"no recorded result for gate(s) {', '.join(missing)} in eval run {eval_run_id or '(none)'}; "
                       "a missing gate result blocks (materialize `recommendations` with its checks in this run)")
    failed = [g for g in results if not g.passed]
    if failed:
        return False, "gate(s) failed: " + "; ".join(f"{g.gate}: {g.detail}" for g in failed)
    return True, "all gates passed"
