"""Promotion gates: the evidence a champion needs before it may replace a task's assigned model.

Pure functions over the warehouse. The Dagster asset checks (blocking, for the UI) and the promotion
step itself (so a gate keeps blocking across separate runs) both call `evaluate_gates`.
"""

from __future__ import annotations

from dataclasses import dataclass

import duckdb

from model_eval.deployment import Gates
from model_eval.golden import TaskSpec
from model_eval.metrics import latest_metrics
from model_eval.stats import mcnemar_exact, paired_bootstrap

GATE_NAMES = ("threshold", "sample_size", "not_worse", "costs_known")
BINARY_KINDS = ("verdict", "label")  # one right answer per case: paired right/wrong -> McNemar


@dataclass(frozen=True)
class GateResult:
    gate: str
    passed: bool
    detail: str
    test: str | None = None
    p_value: float | None = None
    effect_size: float | None = None


def _latest_metrics(conn, model: str, task: TaskSpec) -> dict | None:
    return latest_metrics(conn, model, task.name, task.dataset_version)


def _scores(conn, model: str, task: TaskSpec, eval_run_id: str):
    return conn.sql("""
        SELECT case_id, repeat, correct, score FROM scores
        WHERE model = $model AND task = $task AND dataset_version = $version AND eval_run_id = $run""",
                    params={"model": model, "task": task.name, "version": task.dataset_version, "run": eval_run_id}).pl()


def evaluate_gates(conn: duckdb.DuckDBPyConnection, task: TaskSpec, champion: str, incumbent: str | None,
                   gates: Gates) -> list[GateResult]:
    """Every gate for promoting `champion` over `incumbent` on the task's current golden version."""
    metrics = _latest_metrics(conn, champion, task)
    if metrics is None:
        reason = f"{champion} has no metrics on {task.name} {task.dataset_version}"
        return [GateResult(gate, False, reason) for gate in GATE_NAMES]
    return [
        _threshold(task, champion, metrics),
        _sample_size(conn, task, champion, metrics, gates),
        _not_worse(conn, task, champion, incumbent, metrics, gates),
        _costs_known(conn, champion, metrics),
    ]


def _threshold(task: TaskSpec, champion: str, metrics: dict) -> GateResult:
    passed = metrics["accuracy"] >= task.qualification_threshold - 1e-9
    return GateResult("threshold", passed,
                      f"{champion} accuracy {metrics['accuracy']:.3f} {'meets' if passed else 'is below'} the threshold "
                      f"{task.qualification_threshold:.2f} on {task.dataset_version}")


def _sample_size(conn, task: TaskSpec, champion: str, metrics: dict, gates: Gates) -> GateResult:
    per_case = _scores(conn, champion, task, metrics["eval_run_id"]).group_by("case_id").len()
    repeats = int(per_case["len"].min()) if per_case.height else 0
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
    return GateResult("sample_size", not problems, detail)


def _not_worse(conn, task: TaskSpec, champion: str, incumbent: str | None, metrics: dict, gates: Gates) -> GateResult:
    if incumbent is None or incumbent == champion:
        return GateResult("not_worse", True, "no other assigned model to compare against")
    incumbent_metrics = _latest_metrics(conn, incumbent, task)
    if incumbent_metrics is None:
        return GateResult("not_worse", False, f"assigned model {incumbent} has no results on {task.dataset_version}; evaluate it first")
    mine = _scores(conn, champion, task, metrics["eval_run_id"])
    theirs = _scores(conn, incumbent, task, incumbent_metrics["eval_run_id"])
    if task.output_kind in BINARY_KINDS:
        pairs = mine.join(theirs, on=["case_id", "repeat"], suffix="_inc")
        if pairs.height == 0:
            return GateResult("not_worse", False, f"no paired results with {incumbent}")
        champion_only = pairs.filter(pairs["correct"] & ~pairs["correct_inc"]).height
        incumbent_only = pairs.filter(~pairs["correct"] & pairs["correct_inc"]).height
        p_value = mcnemar_exact(champion_only, incumbent_only)
        effect = (champion_only - incumbent_only) / pairs.height
        worse = incumbent_only > champion_only and p_value < gates.significance
        detail = (f"McNemar on {pairs.height} paired calls: {champion} alone right {champion_only}, {incumbent} alone right "
                  f"{incumbent_only}, p={p_value:.4f}, accuracy difference {effect:+.3f}")
        return GateResult("not_worse", not worse, detail, "mcnemar", p_value, effect)
    mine_case = mine.group_by("case_id").agg(mine["score"].mean().alias("mine"))
    theirs_case = theirs.group_by("case_id").agg(theirs["score"].mean().alias("theirs"))
    paired = mine_case.join(theirs_case, on="case_id").sort("case_id")
    if paired.height == 0:
        return GateResult("not_worse", False, f"no paired cases with {incumbent}")
    differences = (paired["mine"] - paired["theirs"]).to_list()
    mean, p_not_worse, (low, high) = paired_bootstrap(differences)
    worse = p_not_worse < gates.significance
    detail = (f"paired bootstrap over {paired.height} cases: mean score difference {mean:+.3f} "
              f"(95% interval {low:+.3f} to {high:+.3f}), p(not worse)={p_not_worse:.4f}")
    return GateResult("not_worse", not worse, detail, "paired_bootstrap", p_not_worse, mean)


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
