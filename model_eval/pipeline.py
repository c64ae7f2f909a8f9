"""The pipeline's steps as plain functions: what each Dagster asset does, without Dagster.

Each step reads its inputs, computes in memory, and writes its slice of the warehouse in one
transaction at the end, so a failure anywhere leaves the warehouse exactly as it was.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import json
import logging
import shutil
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Protocol

import polars as pl

from model_eval import warehouse
from model_eval.errors import GoldenSetError
from model_eval.golden import TaskSpec, load_tasks, read_cases
from model_eval.golden_validation import validate_cases
from model_eval.inference import ProgressFn, RetryPolicy, RunStats, iter_requests, run_model
from model_eval.metrics import LATEST_METRICS_SQL, compute_metrics
from model_eval.policies import recommend, registered_policies
from model_eval.registry import ModelSpec, Registry, availability, load_registry
from model_eval.response_cache import ResponseCache
from model_eval.scoring import score_results
from model_eval.settings import ProjectPaths


class Log(Protocol):
    def info(self, msg: str) -> None: ...
    def warning(self, msg: str) -> None: ...


def _now() -> datetime:
    return datetime.now(timezone.utc).replace(tzinfo=None)


# ---------------------------------------------------------------- golden sets
@dataclass(frozen=True)
class GoldenIngestion:
    tasks: list[TaskSpec]
    versions: pl.DataFrame        # one row per (task, version) file
    new_cases: int
    expectations_run: int


def ingest_golden(paths: ProjectPaths, eval_run_id: str, log: Log) -> GoldenIngestion:
    """Load, check and validate every task and every version; write only if all of it is valid."""
    tasks = load_tasks(paths.golden_dir)
    version_rows, case_frames, expectations = [], [], 0
    for task in tasks:
        for version in task.versions:
            path = task.cases_file(version)
            cases = read_cases(task, version)
            outcome = validate_cases(cases, task.output_kind, str(path))
            expectations += outcome.expectations_run
            if not outcome.passed:
                raise GoldenSetError(path, "failed validation:\n  " + "\n  ".join(outcome.problems))
            file_hash = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
            version_rows.append({"task": task.name, "dataset_version": version, "source_file": str(path),
                                 "file_hash": file_hash, "cases": cases.height, "output_kind": task.output_kind,
                                 "scorer": task.scorer, "is_current": version == task.dataset_version,
                                 "validation_passed": True, "expectations_run": outcome.expectations_run,
                                 "eval_run_id": eval_run_id, "ingested_at": _now()})
            case_frames.append(cases.drop("expected_error", "expected_verdict").with_columns(
                pl.lit(file_hash).alias("file_hash"), pl.lit(eval_run_id).alias("eval_run_id"),
                pl.lit(_now()).alias("ingested_at")))
            log.info(f"golden {task.name} {version}: {cases.height} cases valid ({outcome.expectations_run} expectations)")
    versions = pl.DataFrame(version_rows)
    all_cases = pl.concat(case_frames)
    with warehouse.write_connection(paths.warehouse_file) as conn:
        conn.execute("BEGIN TRANSACTION")
        try:
            new_cases = warehouse.insert_new(conn, "golden_cases", all_cases, ["task", "dataset_version", "case_id", "file_hash"])
            warehouse.insert_new(conn, "golden_versions", versions, ["task", "dataset_version", "file_hash"])
            # Exactly one file is current per task: the version the task file names (or the newest).
            conn.execute("UPDATE golden_versions SET is_current = FALSE")
            conn.register("current_files", versions.filter(pl.col("is_current")).select("task", "dataset_version", "file_hash").to_arrow())
            conn.execute("UPDATE golden_versions g SET is_current = TRUE FROM current_files c "
                         "WHERE g.task = c.task AND g.dataset_version = c.dataset_version AND g.file_hash = c.file_hash")
            conn.execute("COMMIT")
        except Exception:
            conn.execute("ROLLBACK")
            raise
    return GoldenIngestion(tasks=tasks, versions=versions, new_cases=new_cases, expectations_run=expectations)


# ---------------------------------------------------------------- model registry
@dataclass(frozen=True)
class RegistrySync:
    registry: Registry
    available: list[ModelSpec]
    skipped: dict[str, str]       # model -> reason


def sync_registry(paths: ProjectPaths, eval_run_id: str, log: Log) -> RegistrySync:
    registry = load_registry(paths.registry_file, paths.discovered_registry_file)
    available, skipped, rows = [], {}, []
    for spec in registry.models:
        reason = availability(spec) if spec.enabled else "disabled in the registry"
        if reason is None:
            available.append(spec)
        else:
            skipped[spec.name] = reason
            log.info(f"model {spec.name}: skipped, {reason}")
        rows.append({**spec.public_record(), "available": reason is None, "unavailable_reason": reason,
                     "first_seen_run": eval_run_id, "last_seen_run": eval_run_id, "last_synced_at": _now()})
    frame = pl.DataFrame(rows, schema_overrides={"tasks": pl.List(pl.String), "tiers": pl.List(pl.Int64),
                                                 "price_input_per_million": pl.Float64, "price_output_per_million": pl.Float64,
                                                 "api_base": pl.String, "api_key_env": pl.String, "local_model": pl.String,
                                                 "unavailable_reason": pl.String})
    with warehouse.write_connection(paths.warehouse_file) as conn:
        conn.execute("BEGIN TRANSACTION")
        try:
            conn.register("synced", frame.to_arrow())
            # Keep each (model, config) ever seen, so old results stay explained; refresh what is seen now.
            conn.execute("""
                INSERT INTO models BY NAME SELECT * FROM synced s
                WHERE NOT EXISTS (SELECT 1 FROM models m WHERE m.model = s.model AND m.config_hash = s.config_hash)""")
            conn.execute("""
                UPDATE models m SET enabled = s.enabled, available = s.available, unavailable_reason = s.unavailable_reason,
                       last_seen_run = s.last_seen_run, last_synced_at = s.last_synced_at
                FROM synced s WHERE m.model = s.model AND m.config_hash = s.config_hash""")
            conn.execute("COMMIT")
        except Exception:
            conn.execute("ROLLBACK")
            raise
    return RegistrySync(registry=registry, available=available, skipped=skipped)


# ---------------------------------------------------------------- inference
def run_inference(
    paths: ProjectPaths,
    model_name: str,
    eval_run_id: str,
    log: Log,
    *,
    task_names: list[str] | None = None,
    trigger: str = "manual",
    dagster_run_id: str | None = None,
    on_progress: ProgressFn | None = None,
    retry: RetryPolicy = RetryPolicy(),
    completion=None,
    cache_max_age_s: float | None = None,
) -> RunStats:
    """Every (case x repeat) of every task the model serves; replaces this (eval run, model) slice."""
    registry = load_registry(paths.registry_file, paths.discovered_registry_file)
    spec = registry.get(model_name)
    tasks = [t for t in load_tasks(paths.golden_dir, only=task_names) if spec.serves(t.name, t.tier)]
    staging = paths.warehouse_file.parent / "staging" / f"{eval_run_id}--{spec.name}"
    shutil.rmtree(staging, ignore_errors=True)  # leftovers of a killed attempt: their answers are in the cache
    staging.mkdir(parents=True)
    parts = itertools.count()

    def write_batch(batch: pl.DataFrame) -> None:
        # Result rows go to Parquet as they come, so memory does not grow with the suite.
        batch.write_parquet(staging / f"part-{next(parts):05d}.parquet")

    # Holding a read connection is safe: writers publish by rename and never wait for readers.
    with warehouse.read_connection(paths.warehouse_file) as conn:
        counts = dict(conn.sql(CURRENT_CASE_COUNTS).fetchall())
        missing = sorted(t.name for t in tasks if not counts.get(t.name))
        if missing:
            raise GoldenSetError(paths.golden_dir, f"task(s) {', '.join(missing)} have no ingested cases; materialize golden_cases first")
        total = sum(counts[t.name] * t.repeats for t in tasks)
        log.info(f"model {spec.name}: {total} calls over {len(tasks)} task(s)")
        reader = conn.sql(CURRENT_CASES_FOR_INFERENCE, params={"tasks": [t.name for t in tasks]}).to_arrow_reader(2000)
        cases = (row for batch in reader for row in batch.to_pylist())
        kwargs = {"completion": completion} if completion is not None else {}
        with ResponseCache(paths.cache_file) as cache:
            _, stats = asyncio.run(run_model(spec, iter_requests(spec, tasks, cases), cache, retry=retry, on_progress=on_progress,
                                             cache_max_age_s=cache_max_age_s, sink=write_batch, total=total, **kwargs))
    if stats.unknown_cost:
        log.warning(f"model {spec.name}: {stats.unknown_cost} call(s) have no known price; their cost is NULL")
    with warehouse.write_connection(paths.warehouse_file) as conn:
        conn.execute("BEGIN TRANSACTION")
        try:
            conn.execute("DELETE FROM inference_results WHERE eval_run_id = ? AND model = ?", [eval_run_id, spec.name])
            part_files = sorted(str(p) for p in staging.glob("part-*.parquet"))
            if part_files:
                # The file list is a parameter: a path with quotes or glob characters stays a path.
                conn.execute("""INSERT INTO inference_results BY NAME
                                SELECT *, ? AS eval_run_id, ?::VARCHAR AS dagster_run_id FROM read_parquet(?)""",
                             [eval_run_id, dagster_run_id, part_files])
            _record_eval_run(conn, eval_run_id, trigger)
            conn.execute("COMMIT")
        except Exception:
            conn.execute("ROLLBACK")
            raise
    shutil.rmtree(staging, ignore_errors=True)
    return stats


CURRENT_CASE_COUNTS = """
SELECT c.task, count(*) FROM golden_cases c JOIN golden_versions v USING (task, dataset_version, file_hash)
WHERE v.is_current GROUP BY c.task"""

# No ORDER BY: sorting would hold every case in memory before the first batch comes out.
CURRENT_CASES_FOR_INFERENCE = """
SELECT c.task, c.dataset_version, c.case_id, c.inputs_json
FROM golden_cases c JOIN golden_versions v USING (task, dataset_version, file_hash)
WHERE v.is_current AND list_contains($tasks::VARCHAR[], c.task)"""


def _record_eval_run(conn, eval_run_id: str, trigger: str) -> None:
    """Upsert the eval run's summary from the results it has so far (several partitions add to one run)."""
    conn.execute("""
        INSERT OR REPLACE INTO eval_runs
        SELECT ?, ?, coalesce((SELECT started_at FROM eval_runs WHERE eval_run_id = ?), now()::TIMESTAMP), now()::TIMESTAMP,
               list_sort(list(DISTINCT model)), list_sort(list(DISTINCT task)), count(*),
               count(*) FILTER (WHERE from_cache), count(*) FILTER (WHERE error_class IS NOT NULL)
        FROM inference_results WHERE eval_run_id = ?""", [eval_run_id, trigger, eval_run_id, eval_run_id])


# ---------------------------------------------------------------- scores, metrics, recommendations
def score_model(paths: ProjectPaths, model_name: str, eval_run_id: str | None, log: Log) -> pl.DataFrame:
    """Score the model's results of `eval_run_id` (or its newest eval run); replaces that slice of `scores`."""
    tasks = {t.name: t for t in load_tasks(paths.golden_dir)}
    with warehouse.read_connection(paths.warehouse_file) as conn:
        has_run = eval_run_id and conn.execute(
            "SELECT count(*) FROM inference_results WHERE eval_run_id = ? AND model = ?", [eval_run_id, model_name]).fetchall()[0][0]
        run_id = eval_run_id if has_run else warehouse.latest_eval_run(conn, model_name)
        if run_id is None:
            raise ValueError(f"model {model_name}: no inference results to score; materialize inference_results first")
        results = conn.sql("SELECT * FROM inference_results WHERE eval_run_id = $run AND model = $model",
                           params={"run": run_id, "model": model_name}).pl()
        cases = conn.sql("""
            SELECT DISTINCT c.task, c.dataset_version, c.case_id, c.expected_json
            FROM golden_cases c JOIN golden_versions v USING (task, dataset_version, file_hash) WHERE v.is_current""").pl()
    scores = score_results(results, cases, tasks).with_columns(pl.lit(_now()).alias("scored_at"))
    with warehouse.write_connection(paths.warehouse_file) as conn:
        warehouse.replace_slice(conn, "scores", scores, {"eval_run_id": run_id, "model": model_name})
    log.info(f"model {model_name}: scored {scores.height} results of eval run {run_id}")
    return scores


def refresh_metrics(paths: ProjectPaths, log: Log) -> pl.DataFrame:
    """Recompute every (eval run, model, task) row from `scores` and swap the table in one transaction."""
    with warehouse.write_connection(paths.warehouse_file) as conn:
        metrics = compute_metrics(conn)
        warehouse.replace_slice(conn, "model_task_metrics", metrics, {})
    log.info(f"metrics: {metrics.height} (eval run, model, task) rows")
    return metrics


def recommend_all(paths: ProjectPaths, eval_run_id: str, log: Log, model_names: list[str] | None = None) -> pl.DataFrame:
    """Champion and runner-up per task and policy, from each enabled model's newest metrics on the current version."""
    tasks = load_tasks(paths.golden_dir)
    registry = load_registry(paths.registry_file, paths.discovered_registry_file)
    eligible = set(model_names) if model_names else {m.name for m in registry.models if m.enabled}
    with warehouse.read_connection(paths.warehouse_file) as conn:
        latest = conn.sql(LATEST_METRICS_SQL).pl()
    rows = []
    for task in tasks:
        candidates = latest.filter((pl.col("task") == task.name) & (pl.col("dataset_version") == task.dataset_version)
                                   & pl.col("model").is_in(sorted(eligible)))
        if candidates.is_empty():
            log.warning(f"task {task.name}: no evaluated model on version {task.dataset_version}; no recommendation")
        for policy in registered_policies():
            result = recommend(candidates.rename({"cost_per_case_usd": "cost_per_case"}),
                               policy, task.qualification_threshold)
            rows.append({
                "eval_run_id": eval_run_id, "task": task.name, "dataset_version": task.dataset_version, "policy": policy,
                "is_task_policy": policy == task.policy, "champion": result.champion, "runner_up": result.runner_up,
                "champion_score": result.champion_score, "runner_up_score": result.runner_up_score,
                "confidence": result.confidence, "qualified": list(result.qualified),
                "candidates": sorted(candidates["model"].to_list()), "ranking_json": json.dumps(result.ranking),
                "reasoning": result.reasoning, "source_eval_runs": sorted(set(candidates["eval_run_id"].to_list())),
                "created_at": _now(),
            })
    frame = pl.DataFrame(rows, schema_overrides={"champion": pl.String, "runner_up": pl.String, "champion_score": pl.Float64,
                                                 "runner_up_score": pl.Float64, "confidence": pl.Float64,
                                                 "qualified": pl.List(pl.String), "candidates": pl.List(pl.String),
                                                 "source_eval_runs": pl.List(pl.String)})
    with warehouse.write_connection(paths.warehouse_file) as conn:
        warehouse.replace_slice(conn, "recommendations", frame, {"eval_run_id": eval_run_id})
    return frame


def leaderboard(conn, task: str | None = None) -> pl.DataFrame:
    """Newest metrics per model and task, best accuracy first: what people look at after a run."""
    frame = conn.sql(LATEST_METRICS_SQL + " ORDER BY task, accuracy DESC, p50_latency_ms").pl()
    return frame.filter(pl.col("task") == task) if task else frame


def logger(name: str = "model_eval") -> Log:
    return logging.getLogger(name)


# ---------------------------------------------------------------- production calls, promotion, rollback
def ingest_production_calls(paths: ProjectPaths, log: Log) -> int:
    """Load new lines of the router's append-only call logs into `production_calls`."""
    from model_eval.production_log import ingest_call_logs

    with warehouse.write_connection(paths.warehouse_file) as conn:
        added = ingest_call_logs(paths.call_log_dir, conn)
    log.info(f"production calls: {added} new row(s) from {paths.call_log_dir}")
    return added


def newest_champions(conn, tasks: list[TaskSpec]) -> dict[str, str | None]:
    """Each task's champion under its own policy, from its newest recommendation on the current version."""
    frame = conn.sql("""
        SELECT task, dataset_version, champion FROM recommendations WHERE is_task_policy
        QUALIFY row_number() OVER (PARTITION BY task, dataset_version ORDER BY created_at DESC) = 1""").pl()
    current = {(t.name, t.dataset_version) for t in tasks}
    return {r["task"]: r["champion"] for r in frame.iter_rows(named=True) if (r["task"], r["dataset_version"]) in current}


def publish_assignments(paths: ProjectPaths, conn, registry: Registry) -> None:
    """Write the routing snapshot applications read (atomically: they never see half a file)."""
    from model_eval.promotion import current_assignments, snapshot_tasks
    from model_eval.router import write_snapshot

    write_snapshot(paths.snapshot_file, snapshot_tasks(current_assignments(conn), registry))


def ensure_assignments(paths: ProjectPaths, log: Log) -> list[str]:
    """Record the assignments deployment.yaml declares for tasks with none yet, and publish the snapshot."""
    from model_eval.deployment import load_deployment
    from model_eval.promotion import ensure_initial_assignments

    tasks = load_tasks(paths.golden_dir)
    registry = load_registry(paths.registry_file, paths.discovered_registry_file)
    deployment = load_deployment(paths.deployment_file, paths.base_dir)
    with warehouse.write_connection(paths.warehouse_file) as conn:
        added = ensure_initial_assignments(conn, deployment, registry, tasks)
        publish_assignments(paths, conn, registry)
    if added:
        log.info(f"initial assignments from {deployment.path.name}: {', '.join(added)}")
    return added


def promote(paths: ProjectPaths, eval_run_id: str, log: Log, assigned_by: str = "pipeline"):
    """Turn the newest recommendations into assignment changes, gated, staged, with automatic rollback."""
    from model_eval.alerts import send_alert
    from model_eval.deployment import load_deployment
    from model_eval.promotion import alert_for, apply_decisions, ensure_initial_assignments, plan_promotions

    tasks = load_tasks(paths.golden_dir)
    registry = load_registry(paths.registry_file, paths.discovered_registry_file)
    deployment = load_deployment(paths.deployment_file, paths.base_dir)
    with warehouse.write_connection(paths.warehouse_file) as conn:
        conn.execute("BEGIN TRANSACTION")
        try:
            initial = ensure_initial_assignments(conn, deployment, registry, tasks)
            decisions = plan_promotions(conn, tasks, newest_champions(conn, tasks), deployment)
            apply_decisions(conn, decisions, tasks, eval_run_id, assigned_by)
            conn.execute("COMMIT")
        except Exception:
            conn.execute("ROLLBACK")
            raise
        publish_assignments(paths, conn, registry)
    if initial:
        log.info(f"initial assignments from {deployment.path.name}: {', '.join(initial)}")
    for decision in decisions:
        log.info(f"{decision.task}: {decision.action}: {decision.reason}")
        alert = alert_for(decision)
        if alert is not None:
            for report in send_alert(alert, deployment.alerts, log):
                if not report.ok:
                    log.warning(f"alert channel {report.channel} failed: {report.error}")
    return decisions
