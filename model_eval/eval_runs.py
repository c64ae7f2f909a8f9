"""An evaluation's life in the `eval_runs` table: running, then complete or incomplete.

* running    - its results are being produced. `owner_process` names the `model-eval run` process
               driving it (host, pid, start time), when one does.
* complete   - every model partition it ran has finished. Set in the same transaction that admits
               its scores into `model_task_metrics`, so metrics never see half an evaluation.
* incomplete - it stopped before that: its process died (found by the reaper) or it ended early
               (`status_reason` says which). Its rows stay for inspection but never feed metrics,
               recommendations or promotion.

Rows written before statuses existed have status NULL and count as complete.
"""

from __future__ import annotations

from pathlib import Path

import duckdb

from model_eval.process_identity import ProcessIdentity

RUNNING, COMPLETE, INCOMPLETE = "running", "complete", "incomplete"


def start(conn: duckdb.DuckDBPyConnection, eval_run_id: str, trigger: str, owner: ProcessIdentity | None) -> None:
    """Record an evaluation as running before any of its work, so a crash at any later moment is visible."""
    conn.execute("""
        INSERT INTO eval_runs (eval_run_id, trigger, started_at, updated_at, models, tasks, calls, cached_calls, failed_calls,
                               status, owner_process)
        VALUES (?, ?, now()::TIMESTAMP, now()::TIMESTAMP, [], [], 0, 0, 0, ?, ?)
        ON CONFLICT (eval_run_id) DO NOTHING""", [eval_run_id, trigger, RUNNING, owner.as_text() if owner else None])


def record_results(conn: duckdb.DuckDBPyConnection, eval_run_id: str, trigger: str) -> None:
    """Summarise the results the evaluation has so far (several partitions add to one); keeps its status."""
    conn.execute("""
        INSERT INTO eval_runs (eval_run_id, trigger, started_at, updated_at, models, tasks, calls, cached_calls, failed_calls, status)
        SELECT ?, ?, now()::TIMESTAMP, now()::TIMESTAMP, list_sort(list(DISTINCT model)), list_sort(list(DISTINCT task)),
               count(*), count(*) FILTER (WHERE from_cache), count(*) FILTER (WHERE error_class IS NOT NULL), ?
        FROM inference_results WHERE eval_run_id = ?
        ON CONFLICT (eval_run_id) DO UPDATE SET updated_at = excluded.updated_at, models = excluded.models,
            tasks = excluded.tasks, calls = excluded.calls, cached_calls = excluded.cached_calls,
            failed_calls = excluded.failed_calls""", [eval_run_id, trigger, RUNNING, eval_run_id])


def complete(conn: duckdb.DuckDBPyConnection, eval_run_id: str) -> str | None:
    """Mark a running evaluation complete (an incomplete one stays so). Returns its status now; None if unknown."""
    conn.execute("UPDATE eval_runs SET status = ?, status_reason = NULL, updated_at = now()::TIMESTAMP WHERE eval_run_id = ? AND status = ?",
                 [COMPLETE, eval_run_id, RUNNING])
    rows = conn.execute("SELECT coalesce(status, ?) FROM eval_runs WHERE eval_run_id = ?", [COMPLETE, eval_run_id]).fetchall()
    return rows[0][0] if rows else None


def complete_evaluation(warehouse_file: Path, eval_run_id: str) -> str | None:
    from model_eval import warehouse

    with warehouse.write_connection(warehouse_file) as conn:
        return complete(conn, eval_run_id)


def status_of(conn: duckdb.DuckDBPyConnection, eval_run_id: str) -> str | None:
    rows = conn.execute("SELECT coalesce(status, ?) FROM eval_runs WHERE eval_run_id = ?", [COMPLETE, eval_run_id]).fetchall()
    return rows[0][0] if rows else None


def mark_incomplete(conn: duckdb.DuckDBPyConnection, eval_run_id: str, reason: str) -> bool:
    """Mark a running evaluation incomplete, with the reason. True if it was running."""
    changed = conn.execute("""UPDATE eval_runs SET status = ?, status_reason = ?, updated_at = now()::TIMESTAMP
                              WHERE eval_run_id = ? AND status = ? RETURNING eval_run_id""",
                           [INCOMPLETE, reason, eval_run_id, RUNNING]).fetchall()
    return bool(changed)


def admitted(conn: duckdb.DuckDBPyConnection, completing: str | None = None) -> list[str]:
    """The eval runs whose scores may feed metrics: complete ones (and `completing`, being completed now)."""
    # The slice manifest lists every (eval run, model) that has scores, without reading them.
    rows = conn.execute("""
        SELECT DISTINCT eval_run_id FROM warehouse_slices WHERE table_name = 'scores' AND
         eval_run_id NOT IN (SELECT eval_run_id FROM eval_runs WHERE status IN (?, ?) AND eval_run_id IS DISTINCT FROM ?)
        ORDER BY 1""", [RUNNING, INCOMPLETE, completing]).fetchall()
    return [r[0] for r in rows]


def has_statuses(conn: duckdb.DuckDBPyConnection) -> bool:
    """False for a warehouse not yet written by a version that records statuses (nothing can be running)."""
    return conn.execute("""SELECT count(*) FROM information_schema.columns
                           WHERE table_catalog = current_database() AND table_name = 'eval_runs'
                             AND column_name = 'status'""").fetchall()[0][0] > 0


def abandoned(conn: duckdb.DuckDBPyConnection, dead_lone_runs: set[str] = frozenset()) -> list[tuple[str, str]]:
    """Running evaluations nobody is working on any more, with the reason: their owning process is gone,
    or (for an evaluation that is one Dagster run, started from the UI) that run was found dead."""
    found = []
    for eval_run_id, owner in conn.execute("SELECT eval_run_id, owner_process FROM eval_runs WHERE status = ?", [RUNNING]).fetchall():
        if owner:
            process = ProcessIdentity.from_text(owner)
            if process.is_alive() is False:
                found.append((eval_run_id, f"its process ({process.describe()}) ended without finishing it"))
        elif eval_run_id in dead_lone_runs:
            found.append((eval_run_id, f"its Dagster run {eval_run_id} died"))
    return found
