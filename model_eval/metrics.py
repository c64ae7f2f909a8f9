"""Per (eval run, model, task) metrics, computed in DuckDB SQL over the scores table.

SQL keeps this fast on millions of rows; the Wilson interval is added in polars afterwards because
it needs only the per-group counts.
"""

from __future__ import annotations

import duckdb
import polars as pl

from model_eval.stats import wilson_interval

METRICS_SQL = """
WITH per_case AS (
    SELECT eval_run_id, model, task, dataset_version, case_id,
           bool_and(correct) AS right_every_repeat,
           -- a case is consistent when every repeat gave the same parsed answer (a failed parse counts as its own answer)
           count(DISTINCT coalesce(parsed, '<unparsed>')) = 1 AND count(*) FILTER (WHERE call_failed) = 0 AS consistent
    FROM scores {where}
    GROUP BY ALL
),
per_case_summary AS (
    SELECT eval_run_id, model, task, dataset_version, count(*) AS cases,
           avg(right_every_repeat::DOUBLE) AS correctness, avg(consistent::DOUBLE) AS consistency
    FROM per_case GROUP BY ALL
),
per_call AS (
    SELECT eval_run_id, model, task, dataset_version,
           count(*) AS calls,
           count(*) FILTER (WHERE correct) AS correct_calls,
           avg(correct::DOUBLE) AS accuracy,
           avg(score) AS mean_score,
           avg((NOT call_failed)::DOUBLE) AS success_rate,
           quantile_cont(latency_ms, 0.50) FILTER (WHERE NOT call_failed) AS p50_latency_ms,
           quantile_cont(latency_ms, 0.95) FILTER (WHERE NOT call_failed) AS p95_latency_ms,
           quantile_cont(latency_ms, 0.99) FILTER (WHERE NOT call_failed) AS p99_latency_ms,
           avg(input_tokens) FILTER (WHERE NOT call_failed) AS mean_input_tokens,
           avg(output_tokens) FILTER (WHERE NOT call_failed) AS mean_output_tokens,
           -- one unknown price makes the total unknown: a partial sum would look cheaper than it is
           CASE WHEN count(*) FILTER (WHERE NOT call_failed AND cost_usd IS NULL) > 0 THEN NULL
                ELSE coalesce(sum(cost_usd) FILTER (WHERE NOT call_failed), 0) END AS total_cost_usd,
           max(scored_at) AS evaluated_at
    FROM scores {where}
    GROUP BY ALL
)
SELECT c.eval_run_id, c.model, c.task, c.dataset_version, s.cases, c.calls, c.correct_calls, c.accuracy, c.mean_score,
       s.correctness, s.consistency, c.success_rate, c.p50_latency_ms, c.p95_latency_ms, c.p99_latency_ms,
       c.mean_input_tokens, c.mean_output_tokens, c.total_cost_usd, c.total_cost_usd / s.cases AS cost_per_case_usd,
       c.evaluated_at
FROM per_call c JOIN per_case_summary s USING (eval_run_id, model, task, dataset_version)
ORDER BY c.task, c.model, c.eval_run_id
"""


def compute_metrics(conn: duckdb.DuckDBPyConnection, eval_run_ids: list[str] | None = None) -> pl.DataFrame:
    """Metrics for the given eval runs (all runs when None), one row per (eval run, model, task, version)."""
    if eval_run_ids is None:
        frame = conn.sql(METRICS_SQL.format(where="")).pl()
    else:
        where = "WHERE list_contains($ids::VARCHAR[], eval_run_id)"
        frame = conn.sql(METRICS_SQL.format(where=where), params={"ids": eval_run_ids}).pl()
    if frame.is_empty():
        return frame.with_columns(pl.lit(None, pl.Float64).alias("accuracy_low"),
                                  pl.lit(None, pl.Float64).alias("accuracy_high")).drop("correct_calls")
    bounds = [wilson_interval(int(k), int(n)) for k, n in zip(frame["correct_calls"], frame["calls"])]
    return frame.with_columns(
        pl.Series("accuracy_low", [b[0] for b in bounds], dtype=pl.Float64),
        pl.Series("accuracy_high", [b[1] for b in bounds], dtype=pl.Float64),
    ).drop("correct_calls")


LATEST_METRICS_SQL = """
-- The newest metrics for each (model, task) on each task's current dataset version.
SELECT m.* FROM model_task_metrics m
JOIN (SELECT model, task, dataset_version, max(evaluated_at) AS evaluated_at
      FROM model_task_metrics GROUP BY ALL) newest USING (model, task, dataset_version, evaluated_at)
"""


def latest_metrics(conn: duckdb.DuckDBPyConnection, model: str, task: str, dataset_version: str,
                   since=None) -> dict | None:
    """The newest metrics row of `model` on one task version; None if there is none (or none after `since`)."""
    frame = conn.sql("""
        SELECT * FROM model_task_metrics WHERE model = $model AND task = $task AND dataset_version = $version
        ORDER BY evaluated_at DESC LIMIT 1""", params={"model": model, "task": task, "version": dataset_version}).pl()
    if not frame.height:
        return None
    row = frame.row(0, named=True)
    return row if since is None or row["evaluated_at"] > since else None


def leaderboard(conn: duckdb.DuckDBPyConnection, task: str | None = None) -> pl.DataFrame:
    """Newest metrics per model and task, best accuracy first: what people look at after a run."""
    frame = conn.sql(LATEST_METRICS_SQL + " ORDER BY task, accuracy DESC, p50_latency_ms").pl()
    return frame.filter(pl.col("task") == task) if task else frame
