"""A real DuckDB warehouse filled with hand-made evaluation results, for the gate and rollout tests.

Scores are written per (case, repeat) as an evaluation would write them; metrics are then computed
by the pipeline's own SQL, so the tests exercise the same path as a run.
"""

from __future__ import annotations

import dataclasses
from datetime import datetime, timedelta
from pathlib import Path

import duckdb
import polars as pl

from model_eval import warehouse
from model_eval.deployment import Degradation, Deployment, Gates, Rollout
from model_eval.gate_evaluation import evaluate_all_tasks, record_all
from model_eval.golden import TaskSpec, load_task
from model_eval.metrics import compute_metrics
from model_eval.promotion import record
from model_eval.scoring import SCORE_SCHEMA
from model_eval.warehouse_slices import write_slice
from model_eval.settings import PROJECT_ROOT
from model_eval.steps._common import utc_now


def make_task(name: str = "alpha", kind: str = "verdict", version: str = "v1") -> TaskSpec:
    """A shipped task under another name: grading (verdict) or extraction (json, graded scores)."""
    source = {"verdict": "grading", "json": "extraction"}[kind]
    return dataclasses.replace(load_task(PROJECT_ROOT / "golden" / source), name=name, dataset_version=version)


def deployment(**sections) -> Deployment:
    """deployment.yaml settings for a test: production-grade defaults, with `sections` overriding."""
    return Deployment(path=Path("deployment.yaml"), initial_assignments={},
                      gates=Gates(**sections.get("gates", {})), rollout=Rollout(**sections.get("rollout", {})),
                      degradation=Degradation(**sections.get("degradation", {})), alerts=None,
                      schedule_cron="0 1 * * 0", schedule_timezone="UTC")


class DecisionWarehouse:
    """An open, writable warehouse connection with helpers; close() when done."""

    def __init__(self, folder: Path):
        self.path = folder / "warehouse" / "model_eval.duckdb"
        with warehouse.write_connection(self.path):
            pass  # creates every table
        self.conn = duckdb.connect(str(warehouse.working_file(self.path)))

    def close(self) -> None:
        self.conn.close()

    def golden(self, task: TaskSpec, cases: int, *, validated: bool = True, ingested_at: datetime | None = None,
               file_hash: str = "h1") -> None:
        self.conn.execute("UPDATE golden_versions SET is_current = FALSE WHERE task = ?", [task.name])
        self.conn.execute("""INSERT INTO golden_versions (task, dataset_version, file_hash, cases, output_kind, is_current,
                             validation_passed, ingested_at) VALUES (?, ?, ?, ?, ?, TRUE, ?, ?)""",
                          [task.name, task.dataset_version, file_hash, cases, task.output_kind, validated,
                           ingested_at or utc_now() - timedelta(days=30)])

    def model(self, name: str, price: bool = True) -> None:
        self.conn.execute("""INSERT INTO models (model, config_hash, price_input_per_million, price_output_per_million,
                             last_synced_at) VALUES (?, ?, ?, ?, ?)""",
                          [name, name, 1.0 if price else None, 2.0 if price else None, utc_now()])

    def evaluate(self, task: TaskSpec, model: str, eval_run_id: str, outcomes: list[list[float]], *,
                 latency_ms: float = 200.0, cost: float | None = 0.001, failed: set[tuple[int, int]] = frozenset(),
                 scored_at: datetime | None = None) -> dict:
        """One model's results: outcomes[case][repeat] is the score (1 right, 0 wrong; fractions for graded tasks,
        right when >= 0.8). Returns the metrics row the pipeline computes from them."""
        rows = []
        for case, repeats in enumerate(outcomes):
            for repeat, score in enumerate(repeats):
                call_failed = (case, repeat) in failed
                rows.append({"eval_run_id": eval_run_id, "model": model, "task": task.name,
                             "dataset_version": task.dataset_version, "case_id": f"case-{case:03d}", "repeat": repeat,
                             "scorer": task.scorer, "score": 0.0 if call_failed else float(score),
                             "correct": not call_failed and score >= 0.8,
                             "parsed": None if call_failed else ("PASS" if score >= 0.8 else "FAIL"), "reason": "",
                             "call_failed": call_failed, "latency_ms": latency_ms * (1 + 0.01 * case),
                             "input_tokens": 100, "output_tokens": 5, "cost_usd": None if call_failed else cost})
        frame = pl.DataFrame(rows, schema=SCORE_SCHEMA).with_columns(pl.lit(scored_at or utc_now()).alias("scored_at"))
        self.conn.register("incoming", frame.to_arrow())
        # scores is a view over one file per (eval run, model): rewrite that slice with this task's rows replaced.
        write_slice(self.conn, "scores", eval_run_id, model,
                    """SELECT * FROM scores WHERE eval_run_id = ? AND model = ? AND task <> ?
                       UNION ALL BY NAME SELECT * FROM incoming""", [eval_run_id, model, task.name])
        self.conn.unregister("incoming")
        metrics = compute_metrics(self.conn)
        self.conn.execute("DELETE FROM model_task_metrics")
        self.conn.register("metrics", metrics.to_arrow())
        self.conn.execute("INSERT INTO model_task_metrics BY NAME SELECT * FROM metrics")
        self.conn.unregister("metrics")
        return metrics.filter((pl.col("model") == model) & (pl.col("eval_run_id") == eval_run_id)
                              & (pl.col("task") == task.name)).row(0, named=True)

    def recommend(self, task: TaskSpec, champion: str | None, qualified: list[str] | None = None,
                  eval_run_id: str = "e1") -> None:
        self.conn.execute("""INSERT INTO recommendations (eval_run_id, task, dataset_version, policy, is_task_policy, champion,
                             qualified, created_at) VALUES (?, ?, ?, ?, TRUE, ?, ?, ?)""",
                          [eval_run_id, task.name, task.dataset_version, task.policy, champion,
                           qualified if qualified is not None else ([champion] if champion else []), utc_now()])

    def assign(self, task: TaskSpec, model: str, *, stage: str = "full", previous: str | None = None,
               action: str = "initial", at: datetime | None = None, share: float | None = None) -> None:
        from model_eval.metrics import latest_metrics

        record(self.conn, task=task.name, model=model, stage=stage,
               traffic_share=share if share is not None else {"full": 1.0, "shadow": 0.0, "partial": 0.1}[stage],
               previous_model=previous, pinned=False, action=action, reason="test", assigned_by="test",
               baseline=latest_metrics(self.conn, model, task.name, task.dataset_version))
        if at is not None:
            self.conn.execute("UPDATE model_assignments SET assigned_at = ? WHERE seq = (SELECT max(seq) FROM model_assignments)",
                              [at])

    def record_gates(self, tasks: list[TaskSpec], settings: Deployment, eval_run_id: str = "e1"):
        evaluated = evaluate_all_tasks(self.conn, tasks, settings)
        record_all(self.conn, eval_run_id, evaluated)
        return evaluated

    def production_calls(self, task: TaskSpec, model: str, *, calls: int, successes: int, latency_ms: float = 200.0,
                         failed_latency_ms: float = 30_000.0, at: datetime | None = None, role: str = "primary") -> None:
        at = at or utc_now() - timedelta(minutes=5)
        start = self.conn.execute("SELECT count(*) FROM production_calls").fetchall()[0][0]
        rows = [(f"call-{start + i}", at, task.name, model, role, i < successes,
                 latency_ms if i < successes else failed_latency_ms) for i in range(calls)]
        self.conn.executemany("INSERT INTO production_calls (call_id, ts, task, model, role, success, latency_ms) "
                              "VALUES (?, ?, ?, ?, ?, ?, ?)", rows)


def outcomes(right: int, cases: int = 20, repeats: int = 3) -> list[list[float]]:
    """Right on the first `right` cases in every repeat, wrong on the rest."""
    return [[1.0 if case < right else 0.0] * repeats for case in range(cases)]
