"""Everything a report shows, read from the warehouse for one evaluation run (no rendering here).

A report can be rebuilt for any past run: the leaderboard is the metrics of the candidates the
run's recommendation weighed (from the eval runs it names), not whatever is newest today.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
import duckdb
import polars as pl

from model_eval.duckdb_files import table_exists
from model_eval.golden import TaskSpec


class NoRecommendationError(LookupError):
    """The warehouse has no recommendation for the requested run (or none at all)."""


@dataclass(frozen=True)
class TaskSection:
    task: str
    dataset_version: str
    policy: str
    threshold: float | None         # from the task file as it is now; None if the task is gone
    description: str
    recommendation: dict            # the task-policy row of `recommendations`
    leaderboard: pl.DataFrame       # one metrics row per candidate, best accuracy first
    case_grid: pl.DataFrame         # case x model: share right, answers, expected
    gates: pl.DataFrame             # `promotion_gates` rows of this run
    assignments: pl.DataFrame       # the task's whole assignment history, oldest first
    trends: pl.DataFrame            # every metrics row of the task, all runs and versions
    drift: pl.DataFrame             # `model_drift` rows of this run
    # Models adaptive evaluation stopped on this task (never ranked): their status, reason and partial figures.
    stopped: pl.DataFrame = field(default_factory=pl.DataFrame)
    # Models whose earlier evaluation this run found unchanged and reused instead of running (unchanged.py).
    reused: frozenset[str] = frozenset()

    @property
    def champion(self) -> str | None:
        return self.recommendation["champion"]

    def champion_metrics(self) -> dict | None:
        if self.champion is None:
            return None
        rows = self.leaderboard.filter(pl.col("model") == self.champion)
        return rows.row(0, named=True) if rows.height else None


@dataclass(frozen=True)
class ReportData:
    eval_run_id: str
    run: dict                        # the `eval_runs` row (empty if a lone recommendation run has none)
    run_cost_usd: float | None       # cost of the calls this run sent; None when any price is unknown
    unpriced_calls: int
    created_at: datetime             # when the run's recommendations were made
    tasks: list[TaskSection]


def newest_recommended_run(conn: duckdb.DuckDBPyConnection) -> str:
    rows = conn.sql("SELECT eval_run_id FROM recommendations GROUP BY eval_run_id ORDER BY max(created_at) DESC LIMIT 1").fetchall()
    if not rows:
        raise NoRecommendationError("the warehouse holds no recommendation yet; run `model-eval run` first")
    return rows[0][0]


def previous_recommended_run(conn: duckdb.DuckDBPyConnection, eval_run_id: str) -> str | None:
    """The run whose recommendations came last before this run's."""
    rows = conn.sql("""
        WITH made AS (SELECT eval_run_id, max(created_at) AS created_at FROM recommendations GROUP BY eval_run_id)
        SELECT eval_run_id FROM made WHERE created_at < (SELECT created_at FROM made WHERE eval_run_id = $run)
        ORDER BY created_at DESC LIMIT 1""", params={"run": eval_run_id}).fetchall()
    return rows[0][0] if rows else None


def current_leaderboard(conn: duckdb.DuckDBPyConnection) -> pl.DataFrame:
    """Each model's newest metrics on each task's current golden version."""
    return conn.sql("""
        SELECT m.* FROM model_task_metrics m JOIN (SELECT DISTINCT task, dataset_version FROM golden_versions WHERE is_current)
        USING (task, dataset_version)
        QUALIFY row_number() OVER (PARTITION BY m.model, m.task ORDER BY m.evaluated_at DESC) = 1
        ORDER BY m.task, m.model""").pl()


def _rows(conn: duckdb.DuckDBPyConnection, table: str, sql: str, params: dict) -> pl.DataFrame:
    """A query on a table an older warehouse may not have yet: empty then, never an error."""
    return conn.sql(sql, params=params).pl() if table_exists(conn, table) else pl.DataFrame()


LEADERBOARD_SQL = """
SELECT * FROM model_task_metrics
WHERE task = $task AND dataset_version = $version AND list_contains($models, model) AND list_contains($runs, eval_run_id)
QUALIFY row_number() OVER (PARTITION BY model ORDER BY evaluated_at DESC) = 1
ORDER BY accuracy DESC, p95_latency_ms NULLS LAST, model
"""

# The stopped evaluations the recommendation left out: each model's newest one made before it.
STOPPED_SQL = """
SELECT * FROM model_task_metrics
WHERE task = $task AND dataset_version = $version AND list_contains($models, model) AND status <> 'complete'
  AND evaluated_at <= $made
QUALIFY row_number() OVER (PARTITION BY model ORDER BY evaluated_at DESC) = 1
ORDER BY model
"""

# Per case and model: how often it was right and what it answered, from the run its metrics came from.
CASE_GRID_SQL = """
WITH runs AS (SELECT unnest($models) AS model, unnest($runs) AS eval_run_id),
expected AS (
    SELECT case_id, arg_max(expected_json, ingested_at) AS expected_json FROM golden_cases
    WHERE task = $task AND dataset_version = $version GROUP BY case_id
)
SELECT s.case_id, s.model, avg(s.correct::DOUBLE) AS share_right, count(*) AS repeats,
       list(coalesce(s.parsed, CASE WHEN s.call_failed THEN '(call failed)' ELSE '(unparsed)' END) ORDER BY s.repeat) AS answers,
       list(i.response_text ORDER BY s.repeat) AS responses,
       any_value(s.reason) FILTER (WHERE NOT s.correct) AS a_reason, any_value(e.expected_json) AS expected_json
FROM scores s JOIN runs USING (model, eval_run_id)
LEFT JOIN inference_results i USING (eval_run_id, model, task, dataset_version, case_id, repeat)
LEFT JOIN expected e USING (case_id)
WHERE s.task = $task AND s.dataset_version = $version
GROUP BY s.case_id, s.model
ORDER BY s.case_id, s.model
"""


def _task_section(conn: duckdb.DuckDBPyConnection, eval_run_id: str, rec: dict, specs: dict) -> TaskSection:
    task, version = rec["task"], rec["dataset_version"]
    params = {"task": task, "version": version, "models": rec["candidates"], "runs": rec["source_eval_runs"]}
    board = conn.sql(LEADERBOARD_SQL, params=params).pl()
    # The run each candidate's figures came from, so the grid shows the answers behind them.
    run_of = {r["model"]: r["eval_run_id"] for r in board.iter_rows(named=True)}
    grid = conn.sql(CASE_GRID_SQL, params={"task": task, "version": version, "models": list(run_of),
                                           "runs": [run_of[m] for m in run_of]}).pl()
    gates = _rows(conn, "promotion_gates", "SELECT * FROM promotion_gates WHERE eval_run_id = $run AND task = $task ORDER BY checked_at, gate",
                  {"run": eval_run_id, "task": task})
    assignments = _rows(conn, "model_assignments", "SELECT * FROM model_assignments WHERE task = $task ORDER BY seq", {"task": task})
    # Partial figures of stopped evaluations are no trend: only complete evaluations.
    trends = conn.sql("""SELECT m.*, r.started_at FROM model_task_metrics m LEFT JOIN eval_runs r USING (eval_run_id)
                         WHERE m.task = $task AND m.status = 'complete' ORDER BY m.evaluated_at""", params={"task": task}).pl()
    stopped = conn.sql(STOPPED_SQL, params={"task": task, "version": version, "models": rec.get("stopped") or [],
                                            "made": rec["created_at"]}).pl()
    drift = _rows(conn, "model_drift", "SELECT * FROM model_drift WHERE eval_run_id = $run AND task = $task ORDER BY model, metric",
                  {"run": eval_run_id, "task": task})
    reused = _rows(conn, "reused_evaluations", "SELECT model FROM reused_evaluations WHERE eval_run_id = $run AND task = $task",
                   {"run": eval_run_id, "task": task})
    spec = specs.get(task)
    return TaskSection(task=task, dataset_version=version, policy=rec["policy"],
                       threshold=spec.qualification_threshold if spec is not None else None,
                       description=spec.description if spec is not None else "",
                       recommendation=rec, leaderboard=board, case_grid=grid, gates=gates, assignments=assignments,
                       trends=trends, drift=drift, stopped=stopped,
                       reused=frozenset(reused["model"].to_list() if not reused.is_empty() else []))


def run_cost(conn: duckdb.DuckDBPyConnection, eval_run_id: str) -> tuple[float | None, int, int]:
    """(cost of the calls the run sent, calls without a known price, calls sent). Cached answers cost nothing now."""
    total, unpriced, sent = conn.sql("""
        SELECT sum(cost_usd), count(*) FILTER (WHERE cost_usd IS NULL AND error_class IS NULL), count(*)
        FROM inference_results WHERE eval_run_id = $run AND NOT from_cache""", params={"run": eval_run_id}).fetchall()[0]
    if unpriced:
        return None, unpriced, sent
    return (total or 0.0), 0, sent


def load_report_data(conn: duckdb.DuckDBPyConnection, eval_run_id: str | None, tasks: tuple[TaskSpec, ...] = ()) -> ReportData:
    """Read one run's report from the warehouse; the newest recommended run when `eval_run_id` is None.

    `tasks` (as loaded now) give thresholds and descriptions; a task no longer defined shows without them.
    """
    run_id = eval_run_id or newest_recommended_run(conn)
    recs = conn.sql("SELECT * FROM recommendations WHERE eval_run_id = $run AND is_task_policy ORDER BY task",
                    params={"run": run_id}).pl()
    if recs.is_empty():
        known = [r for (r,) in conn.sql("SELECT DISTINCT eval_run_id FROM recommendations ORDER BY 1 DESC LIMIT 5").fetchall()]
        raise NoRecommendationError(f"eval run {run_id!r} has no recommendations"
                                    + (f"; recent runs with one: {', '.join(known)}" if known else "; run `model-eval run` first"))
    specs = {t.name: t for t in tasks}
    run_rows = conn.sql("SELECT * FROM eval_runs WHERE eval_run_id = $run", params={"run": run_id}).pl()
    cost, unpriced, _ = run_cost(conn, run_id)
    return ReportData(
        eval_run_id=run_id,
        run=run_rows.row(0, named=True) if run_rows.height else {},
        run_cost_usd=cost,
        unpriced_calls=unpriced,
        created_at=recs["created_at"].max(),
        tasks=[_task_section(conn, run_id, rec, specs) for rec in recs.iter_rows(named=True)],
    )


@dataclass(frozen=True)
class RunChanges:
    """What the summary compares: the previous recommended run's decisions and this run's assignment changes."""
    previous_eval_run_id: str | None
    previous: dict[str, dict]        # task -> that run's task-policy recommendation row
    previous_metrics: dict[tuple[str, str], dict]   # (task, model) -> metrics row the previous run weighed
    assignment_changes: pl.DataFrame  # `model_assignments` rows recorded by this run


def load_run_changes(conn: duckdb.DuckDBPyConnection, eval_run_id: str) -> RunChanges:
    previous_id = previous_recommended_run(conn, eval_run_id)
    previous, previous_metrics = {}, {}
    if previous_id is not None:
        recs = conn.sql("SELECT * FROM recommendations WHERE eval_run_id = $run AND is_task_policy",
                        params={"run": previous_id}).pl()
        for rec in recs.iter_rows(named=True):
            previous[rec["task"]] = rec
            board = conn.sql(LEADERBOARD_SQL, params={"task": rec["task"], "version": rec["dataset_version"],
                                                      "models": rec["candidates"], "runs": rec["source_eval_runs"]}).pl()
            previous_metrics.update({(rec["task"], r["model"]): r for r in board.iter_rows(named=True)})
    changes = _rows(conn, "model_assignments", "SELECT * FROM model_assignments WHERE eval_run_id = $run ORDER BY seq",
                    {"run": eval_run_id})
    return RunChanges(previous_id, previous, previous_metrics, changes)
