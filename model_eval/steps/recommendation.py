"""Steps `model_task_metrics`, `recommendations` and the promotion gates checked on them: figures per
(eval run, model, task), a champion and runner-up per task under every policy, then every task's gates
evaluated once and recorded."""

from __future__ import annotations

import json

import polars as pl

from model_eval import eval_runs, warehouse
from model_eval.adaptive import COMPLETE
from model_eval.crash_points import crash_point
from model_eval.judge_calibration import newest_calibrations
from model_eval.gate_evaluation import TaskGates, evaluate_all_tasks, record_all
from model_eval.metrics import LATEST_METRICS_SQL, case_accuracies_of, compute_metrics
from model_eval.policies import Anchors, recommend, registered_policies
from model_eval.project import Project
from model_eval.steps._common import Log, utc_now
from model_eval.warehouse_slices import mark_summarised, unsummarised_scores

RECOMMENDATION_COLUMN_TYPES = {"champion": pl.String, "runner_up": pl.String, "champion_score": pl.Float64,
                               "runner_up_score": pl.Float64, "confidence": pl.Float64,
                               "qualified": pl.List(pl.String), "candidates": pl.List(pl.String), "stopped": pl.List(pl.String),
                               "source_eval_runs": pl.List(pl.String)}


def refresh_metrics(project: Project, log: Log, completing: str | None = None) -> pl.DataFrame:
    """Bring `model_task_metrics` up to date with the scores of complete evaluations, in one transaction,
    and return the whole table. `completing` names an evaluation whose partitions have all finished: it
    is marked complete in that same transaction (unless it was found dead meanwhile).

    Metrics of one (eval run, model) depend on that slice's scores only, so only score slices written
    since the last refresh (of admitted evaluations) are computed: the work is the new slices', however
    many rows the warehouse already holds."""
    with warehouse.write_connection(project.paths.warehouse_file) as conn, warehouse.transaction(conn):
        if completing is not None and eval_runs.complete(conn, completing) == eval_runs.INCOMPLETE:
            log.warning(f"eval run {completing} is marked incomplete; its results do not feed metrics")
            completing = None
        admitted = eval_runs.admitted(conn, completing)
        conn.execute("DELETE FROM model_task_metrics WHERE NOT list_contains(?::VARCHAR[], eval_run_id)", [admitted])
        source = unsummarised_scores(conn, admitted)
        if source is not None:
            fresh = compute_metrics(conn, source=source)
            conn.execute("""DELETE FROM model_task_metrics m WHERE EXISTS (
                                SELECT 1 FROM warehouse_slices s WHERE s.table_name = 'scores' AND s.summarised_at IS NULL
                                AND s.eval_run_id = m.eval_run_id AND s.model = m.model)""")
            if fresh.height:
                conn.register("fresh_metrics", fresh.to_arrow())
                conn.execute("INSERT INTO model_task_metrics BY NAME SELECT * FROM fresh_metrics")
                conn.unregister("fresh_metrics")
            mark_summarised(conn, admitted)
        # Each evaluation's status beside its figures: a stopped one is shown, never ranked (adaptive_run.py).
        conn.execute("""UPDATE model_task_metrics m SET status = s.status, status_reason = s.reason FROM evaluation_status s
                        WHERE s.eval_run_id = m.eval_run_id AND s.model = m.model AND s.task = m.task
                          AND (m.status IS DISTINCT FROM s.status OR m.status_reason IS DISTINCT FROM s.reason)""")
        crash_point("metrics.write")
        metrics = conn.sql("SELECT * FROM model_task_metrics ORDER BY task, model, eval_run_id").pl()
    log.info(f"metrics: {metrics.height} (eval run, model, task) rows")
    return metrics


def recommend_tasks(project: Project, eval_run_id: str, log: Log, model_names: list[str] | None = None) -> pl.DataFrame:
    """Champion and runner-up per task and policy, from each enabled model's newest metrics on the current version.

    A model whose newest evaluation of a task was stopped by adaptive evaluation is not a candidate: it is
    listed in `stopped` and named in the reasoning with its reason, never ranked on its partial rows."""
    eligible = set(model_names) if model_names else {m.name for m in project.registry.models if m.enabled}
    rows = []
    with warehouse.read_connection(project.paths.warehouse_file) as conn:
        latest = conn.sql(LATEST_METRICS_SQL).pl()
        evaluated_by_task = {task.name: latest.filter(
            (pl.col("task") == task.name) & (pl.col("dataset_version") == task.dataset_version)
            & pl.col("model").is_in(sorted(eligible))) for task in project.tasks}
        candidates_by_task = {name: rows.filter(pl.col("status") == COMPLETE) for name, rows in evaluated_by_task.items()}
        stopped_by_task = {name: rows.filter(pl.col("status") != COMPLETE).sort("model") for name, rows in evaluated_by_task.items()}
        # Per-case accuracies make the runner-up comparison paired over the cases both answered.
        per_case = case_accuracies_of(conn, pl.concat(list(candidates_by_task.values())) if project.tasks else latest.clear())
        judges = newest_calibrations(conn, [t.name for t in project.tasks if t.is_judged])
    for task in project.tasks:
        candidates = candidates_by_task[task.name]
        stopped = stopped_by_task[task.name]
        judge_note = judges.get(task.name)
        if candidates.is_empty():
            why = f": {judge_note[1]}" if judge_note and not judge_note[0] else ""
            log.warning(f"task {task.name}: no evaluated model on version {task.dataset_version}; no recommendation{why}")
        anchors = Anchors(task.latency_target_ms, task.budget_per_case_usd)
        task_cases = {model: cases for (name, model), cases in per_case.items() if name == task.name}
        for policy in registered_policies():
            result = recommend(candidates.rename({"cost_per_case_usd": "cost_per_case"}),
                               policy, task.qualification_threshold, anchors, task_cases)
            rows.append({
                "eval_run_id": eval_run_id, "task": task.name, "dataset_version": task.dataset_version, "policy": policy,
                "is_task_policy": policy == task.policy, "champion": result.champion, "runner_up": result.runner_up,
                "champion_score": result.champion_score, "runner_up_score": result.runner_up_score,
                "confidence": result.confidence, "qualified": list(result.qualified),
                "candidates": sorted(candidates["model"].to_list()), "stopped": stopped["model"].to_list(),
                "ranking_json": json.dumps(result.ranking),
                "reasoning": _with_stopped_note(_with_judge_note(result.reasoning, candidates.is_empty(), judge_note), stopped),
                "source_eval_runs": sorted(set(candidates["eval_run_id"].to_list())),
                "created_at": utc_now(),
            })
    frame = pl.DataFrame(rows, schema_overrides=RECOMMENDATION_COLUMN_TYPES)
    crash_point("recommendations.write")
    with warehouse.write_connection(project.paths.warehouse_file) as conn:
        warehouse.replace_slice(conn, "recommendations", frame, {"eval_run_id": eval_run_id})
    return frame


def _with_stopped_note(reasoning: str, stopped: pl.DataFrame) -> str:
    """Models adaptive evaluation stopped are named with their reason: left out of the ranking, not forgotten."""
    if stopped.is_empty():
        return reasoning
    named = "; ".join(f"{r['model']} {r['status']} ({r['status_reason']})" for r in stopped.iter_rows(named=True))
    return f"{reasoning} Not ranked, stopped early by adaptive evaluation (partial data is never ranked): {named}."


def _with_judge_note(reasoning: str, no_candidates: bool, judge_note: tuple[bool, str] | None) -> str:
    """A judge task's reasoning says whose verdicts its accuracy rests on, or why it has none."""
    if judge_note is None:
        return reasoning
    passed, note = judge_note
    if no_candidates and not passed:
        return f"No model was scored: {note}."
    return f"{reasoning} Scored by an LLM judge: {note}."


def check_gates(project: Project, eval_run_id: str) -> list[TaskGates]:
    """Evaluate every task's promotion gates once and record every result in `promotion_gates`."""
    with warehouse.write_connection(project.paths.warehouse_file) as conn:
        with warehouse.transaction(conn):
            evaluated = evaluate_all_tasks(conn, list(project.tasks), project.deployment)
            record_all(conn, eval_run_id, evaluated)
    return evaluated
