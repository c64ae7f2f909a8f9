"""Per (eval run, model, task) metrics, computed in DuckDB SQL over the scores table.

SQL keeps this fast on millions of rows; the Wilson interval is added in polars afterwards because
it needs only the per-group counts.
"""

from __future__ import annotations

import duckdb
import polars as pl

from model_eval.capacity import OUTPUT_TOKENS_PER_S_SQL
from model_eval.stats import wilson_interval

METRICS_SQL = """
WITH per_case AS (
    -- The case is the unit of evidence: repeats are averaged into one figure per case.
    SELECT eval_run_id, model, task, dataset_version, case_id,
           count(*) AS repeats,
           avg(correct::DOUBLE) AS case_accuracy,
           avg(score) AS case_score,
           bool_and(correct) AS right_every_repeat,
           -- repeats disagree on the outcome: right on some, wrong on others
           bool_or(correct) AND NOT bool_and(correct) AS flipped,
           -- every repeat answered, parsed, and gave the same answer (an answer that never parses is not consistent)
           count(*) FILTER (WHERE call_failed OR parsed IS NULL) = 0 AND count(DISTINCT parsed) = 1 AS consistent
    FROM {source} {where}
    GROUP BY ALL
),
per_case_summary AS (
    SELECT eval_run_id, model, task, dataset_version, count(*) AS cases, min(repeats) AS repeats,
           avg(case_accuracy) AS accuracy, sum(case_accuracy) AS accuracy_sum, avg(case_score) AS mean_score,
           avg(right_every_repeat::DOUBLE) AS correctness, avg(flipped::DOUBLE) AS flip_rate,
           avg(consistent::DOUBLE) AS consistency
    FROM per_case GROUP BY ALL
),
per_call AS (
    SELECT eval_run_id, model, task, dataset_version,
           count(*) AS calls,
           avg((NOT call_failed)::DOUBLE) AS success_rate,
           -- latency is measured over successful calls only (production figures use the same definition)
           quantile_cont(latency_ms, 0.50) FILTER (WHERE NOT call_failed) AS p50_latency_ms,
           quantile_cont(latency_ms, 0.95) FILTER (WHERE NOT call_failed) AS p95_latency_ms,
           quantile_cont(latency_ms, 0.99) FILTER (WHERE NOT call_failed) AS p99_latency_ms,
           avg(input_tokens) FILTER (WHERE NOT call_failed) AS mean_input_tokens,
           avg(output_tokens) FILTER (WHERE NOT call_failed) AS mean_output_tokens,
           -- the typical call's output rate (wall time, prompt processing included); see capacity.py
           median({tokens_per_s}) FILTER (WHERE NOT call_failed) AS output_tokens_per_s,
           -- one unknown price makes the total unknown: a partial sum would look cheaper than it is
           CASE WHEN count(*) FILTER (WHERE NOT call_failed AND cost_usd IS NULL) > 0 THEN NULL
                ELSE coalesce(sum(cost_usd) FILTER (WHERE NOT call_failed), 0) END AS total_cost_usd,
           max(scored_at) AS evaluated_at
    FROM {source} {where}
    GROUP BY ALL
),
-- Local models only (remote servers have no rows: NULL, shown as unknown). The newest measurement at or
-- before the evaluation: this eval run's when its calls reached the model, else an earlier one.
measured_memory AS (SELECT model, task, eval_run_id, peak_rss_mb, measured_at FROM model_resources WHERE peak_rss_mb IS NOT NULL),
model_files AS (SELECT DISTINCT model, model_file_mb, measured_at FROM model_resources WHERE model_file_mb IS NOT NULL)
SELECT c.eval_run_id, c.model, c.task, c.dataset_version, s.cases, c.calls, s.repeats, s.accuracy, s.accuracy_sum,
       s.mean_score, s.correctness, s.correctness AS pass_all_k, s.flip_rate, s.consistency, c.success_rate,
       c.p50_latency_ms, c.p95_latency_ms, c.p99_latency_ms,
       c.mean_input_tokens, c.mean_output_tokens, c.total_cost_usd, c.total_cost_usd / s.cases AS cost_per_case_usd,
       c.evaluated_at, c.output_tokens_per_s,
       coalesce(same_task.peak_rss_mb, any_task.peak_rss_mb) AS peak_memory_mb,
       coalesce(same_task.eval_run_id, any_task.eval_run_id) AS memory_eval_run_id, f.model_file_mb
FROM per_call c JOIN per_case_summary s USING (eval_run_id, model, task, dataset_version)
ASOF LEFT JOIN measured_memory same_task ON c.model = same_task.model AND c.task = same_task.task
                                         AND c.evaluated_at >= same_task.measured_at
ASOF LEFT JOIN measured_memory any_task ON c.model = any_task.model AND c.evaluated_at >= any_task.measured_at
ASOF LEFT JOIN model_files f ON c.model = f.model AND c.evaluated_at >= f.measured_at
ORDER BY c.task, c.model, c.eval_run_id
"""


def compute_metrics(conn: duckdb.DuckDBPyConnection, eval_run_ids: list[str] | None = None,
                    source: str = "scores") -> pl.DataFrame:
    """Metrics for the given eval runs (all runs when None), one row per (eval run, model, task, version).

    Accuracy is the mean over cases of each case's share of right repeats; its 95% interval is Wilson
    over the cases (n = `cases`), never over calls. `source` is the relation holding score rows: the
    `scores` table, or a subquery over some of its slices.
    """
    if eval_run_ids is None:
        frame = conn.sql(METRICS_SQL.format(source=source, where="", tokens_per_s=OUTPUT_TOKENS_PER_S_SQL)).pl()
    else:
        where = "WHERE list_contains($ids::VARCHAR[], eval_run_id)"
        frame = conn.sql(METRICS_SQL.format(source=source, where=where, tokens_per_s=OUTPUT_TOKENS_PER_S_SQL), params={"ids": eval_run_ids}).pl()
    bounds = [wilson_interval(total, int(n)) for total, n in zip(frame["accuracy_sum"], frame["cases"])]
    return frame.with_columns(
        pl.Series("accuracy_low", [b[0] for b in bounds], dtype=pl.Float64),
        pl.Series("accuracy_high", [b[1] for b in bounds], dtype=pl.Float64),
    ).drop("accuracy_sum")


def case_accuracies(conn: duckdb.DuckDBPyConnection, model: str, task: str, dataset_version: str,
                    eval_run_id: str) -> dict[str, float]:
    """Each case's share of right repeats for one model in one eval run: the paired tests' input."""
    return dict(conn.execute("""
        SELECT case_id, avg(correct::DOUBLE) FROM scores
        WHERE model = ? AND task = ? AND dataset_version = ? AND eval_run_id = ? GROUP BY case_id""",
                             [model, task, dataset_version, eval_run_id]).fetchall())


def case_accuracies_of(conn: duckdb.DuckDBPyConnection, evaluations: pl.DataFrame) -> dict[tuple[str, str], dict[str, float]]:
    """`case_accuracies` for many evaluations in one scan: (task, model) -> case -> share of right repeats.

    `evaluations` has one row per (eval_run_id, model, task, dataset_version) wanted."""
    if evaluations.is_empty():
        return {}
    conn.register("wanted_evaluations", evaluations.select("eval_run_id", "model", "task", "dataset_version").to_arrow())
    try:
        rows = conn.execute("""
            SELECT s.task, s.model, s.case_id, avg(s.correct::DOUBLE) FROM scores s
            JOIN wanted_evaluations USING (eval_run_id, model, task, dataset_version) GROUP BY ALL""").fetchall()
    finally:
        conn.unregister("wanted_evaluations")
    table: dict[tuple[str, str], dict[str, float]] = {}
    for task, model, case, accuracy in rows:
        table.setdefault((task, model), {})[case] = accuracy
    return table


def paired_differences(first: dict[str, float], second: dict[str, float]) -> list[float]:
    """first - second on the cases both answered, in case order (so the result never depends on row order)."""
    return [first[case] - second[case] for case in sorted(first.keys() & second.keys())]


LATEST_METRICS_SQL = """
-- The newest metrics for each (model, task) on each task's current dataset version.
SELECT m.* FROM model_task_metrics m
JOIN (SELECT model, task, dataset_version, max(evaluated_at) AS evaluated_at
      FROM model_task_metrics GROUP BY ALL) newest USING (model, task, dataset_version, evaluated_at)
"""


def latest_metrics(conn: duckdb.DuckDBPyConnection, model: str, task: str, dataset_version: str,
                   since=None) -> dict | None:
    """The newest metrics row of a complete evaluation of `model` on one task version; None if there is none
    (or none after `since`). An evaluation adaptive mode stopped is partial: never a gate's or a baseline's figures."""
    frame = conn.sql("""
        SELECT * FROM model_task_metrics WHERE model = $model AND task = $task AND dataset_version = $version
        AND status = 'complete' ORDER BY evaluated_at DESC LIMIT 1""", params={"model": model, "task": task, "version": dataset_version}).pl()
    if not frame.height:
        return None
    row = frame.row(0, named=True)
    return row if since is None or row["evaluated_at"] > since else None


def leaderboard(conn: duckdb.DuckDBPyConnection, task: str | None = None) -> pl.DataFrame:
    """Newest metrics per model and task, best accuracy first: what people look at after a run."""
    frame = conn.sql(LATEST_METRICS_SQL + " ORDER BY task, accuracy DESC, p50_latency_ms").pl()
    return frame.filter(pl.col("task") == task) if task else frame
