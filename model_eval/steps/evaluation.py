"""Steps `inference_results` and `scores`: every (case x repeat) answered by one model, then scored."""

from __future__ import annotations

import asyncio
import itertools
import json
import shutil
from dataclasses import dataclass

import polars as pl

from model_eval import capacity, eval_runs, warehouse
from model_eval.adaptive_run import STATUS_COLUMNS, AdaptiveRun, current_champions, expected_answers, status_rows
from model_eval.crash_points import crash_point
from model_eval.errors import GoldenSetError
from model_eval.inference import ProgressFn, RetryPolicy, RunStats, iter_requests, run_model
from model_eval.project import Project
from model_eval.registry import ModelSpec
from model_eval.response_cache import ResponseCache
from model_eval.scoring import SCORE_SCHEMA, score_results
from model_eval.steps._common import Log, utc_now
from model_eval.steps.judging import Judging, judge_model_results
from model_eval.unchanged import recorded_fingerprints
from model_eval.warehouse_slices import no_rows, write_slice

CURRENT_CASE_COUNTS = """
SELECT c.task, count(*) FROM golden_cases c JOIN golden_versions v USING (task, dataset_version, file_hash)
WHERE v.is_current GROUP BY c.task"""

# No ORDER BY: sorting would hold every case in memory before the first batch comes out.
CURRENT_CASES_FOR_INFERENCE = """
SELECT c.task, c.dataset_version, c.case_id, c.inputs_json
FROM golden_cases c JOIN golden_versions v USING (task, dataset_version, file_hash)
WHERE v.is_current AND list_contains($tasks::VARCHAR[], c.task)"""

CURRENT_EXPECTED_FOR_TASKS = """
SELECT DISTINCT c.task, c.dataset_version, c.case_id, c.expected_json
FROM golden_cases c JOIN golden_versions v USING (task, dataset_version, file_hash)
WHERE v.is_current AND list_contains($tasks::VARCHAR[], c.task)"""

CURRENT_EXPECTED_ANSWERS = """
SELECT DISTINCT c.task, c.dataset_version, c.case_id, c.expected_json, c.inputs_json
FROM golden_cases c JOIN golden_versions v USING (task, dataset_version, file_hash) WHERE v.is_current"""


def run_inference(
    project: Project,
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
    adaptive: bool = False,
) -> RunStats:
    """Every (case x repeat) of every task the model serves; replaces this (eval run, model) slice and its
    `evaluation_status` rows. `adaptive`: stop asking where the answers so far settle the decision
    (model_eval/adaptive_run.py); the status rows say where it stopped and why."""
    paths = project.paths
    spec = project.registry.get(model_name)
    tasks = [t for t in project.select_tasks(task_names) if spec.serves(t.name, t.tier)]
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
        adaptive_run = None
        if adaptive:
            cases = list(cases)   # the plan orders every case before the first call
            expected = expected_answers(conn.execute(CURRENT_EXPECTED_FOR_TASKS, {"tasks": [t.name for t in tasks]}).fetchall())
            adaptive_run = AdaptiveRun(spec, tasks, cases, expected, min_repeats=project.deployment.gates.min_repeats,
                               alpha=project.deployment.adaptive.alpha, champions=current_champions(conn, tasks, spec.name))
            kwargs |= {"admit": adaptive_run.admit, "observe": adaptive_run.observe}
        requests = iter_requests(spec, tasks, cases)
        with ResponseCache(paths.cache_file) as cache, capacity.memory_sampler(spec) as sampler:
            _, stats = asyncio.run(run_model(spec, requests if adaptive_run is None else adaptive_run.arrange(requests), cache, retry=retry,
                                             on_progress=on_progress, cache_max_age_s=cache_max_age_s, sink=write_batch,
                                             total=total, **kwargs))
    if adaptive_run is not None:
        for name in adaptive_run.plan.tasks:
            status, reason, _ = adaptive_run.decision(name)
            log.info(f"model {spec.name}, task {name}: {status} ({reason})")
    if stats.unknown_cost:
        log.warning(f"model {spec.name}: {stats.unknown_cost} call(s) have no known price; their cost is NULL")
    with warehouse.write_connection(paths.warehouse_file) as conn, warehouse.transaction(conn):
        part_files = sorted(str(p) for p in staging.glob("part-*.parquet"))
        # The file list is a parameter: a path with quotes or glob characters stays a path.
        if part_files:
            source = f"""SELECT *, ?::VARCHAR AS eval_run_id, ?::VARCHAR AS dagster_run_id,
                                CASE WHEN error_class IS NULL THEN {capacity.OUTPUT_TOKENS_PER_S_SQL} END AS output_tokens_per_s
                         FROM read_parquet(?)"""
            write_slice(conn, "inference_results", eval_run_id, spec.name, source, [eval_run_id, dagster_run_id, part_files])
        else:
            write_slice(conn, "inference_results", eval_run_id, spec.name, no_rows("inference_results"))
        _record_resources(conn, spec, eval_run_id, sampler, part_files)
        _record_status(conn, spec, eval_run_id, tasks, counts, part_files, adaptive_run)
        _record_eval_run(conn, eval_run_id, trigger)
        crash_point("inference.write")
    shutil.rmtree(staging, ignore_errors=True)
    return stats


def _record_resources(conn, spec: ModelSpec, eval_run_id: str, sampler, part_files: list[str]) -> None:
    """Replace this (eval run, model) slice of `model_resources`: per task, the serving process's peak
    resident memory inside the windows of the calls that reached the model, and the model file's size."""
    conn.execute("DELETE FROM model_resources WHERE eval_run_id = ? AND model = ?", [eval_run_id, spec.name])
    if not spec.local_model or not part_files:
        return  # a remote server's memory is unknown: no row
    calls = conn.execute("SELECT task, completed_at - latency_ms / 1000, completed_at, NOT from_cache FROM read_parquet(?)",
                         [part_files]).fetchall()
    # The server swaps models inside the first call that reaches it, so that call's window still shows the
    # previous model: memory counts from the end of the first call on.
    loaded_at = min((end for _, _, end, sent in calls if sent), default=None)
    windows: dict[str, list[tuple[float, float]]] = {task: [] for task, *_ in calls}
    for task, start, end, sent in calls:
        if sent and end >= loaded_at:
            windows[task].append((max(start, loaded_at), end))
    file_mb = capacity.model_file_mb(spec.local_model)
    rows = []
    for task, task_windows in sorted(windows.items()):
        peak = capacity.peak_in_windows(sampler.samples, task_windows) if sampler is not None else None
        rows.append([eval_run_id, spec.name, task, spec.local_model, file_mb, None if peak is None else peak[0] / 1024,
                     0 if peak is None else peak[1], None if sampler is None else sampler.pid, utc_now()])
    conn.executemany("INSERT INTO model_resources VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)


def _record_status(conn, spec: ModelSpec, eval_run_id: str, tasks, counts: dict[str, int], part_files: list[str],
                   adaptive_run: AdaptiveRun | None) -> None:
    """Replace this (eval run, model) slice of `evaluation_status`: how each task's evaluation ended."""
    answered = dict(conn.execute("SELECT task, count(*) FROM read_parquet(?) GROUP BY task", [part_files]).fetchall()) if part_files else {}
    conn.execute("DELETE FROM evaluation_status WHERE eval_run_id = ? AND model = ?", [eval_run_id, spec.name])
    conn.executemany(f"INSERT INTO evaluation_status ({', '.join(STATUS_COLUMNS)}) VALUES ({', '.join('?' * len(STATUS_COLUMNS))})",
                     status_rows(eval_run_id, spec.name, tasks, counts, answered, adaptive_run, utc_now()))
    # What a later run compares to find this evaluation unchanged (unchanged.py).
    for task, fingerprint in recorded_fingerprints(conn, spec, tasks, part_files).items():
        conn.execute("UPDATE evaluation_status SET inputs_fingerprint = ? WHERE eval_run_id = ? AND model = ? AND task = ?",
                     [fingerprint, eval_run_id, spec.name, task])


@dataclass
class InferenceSummary:
    """For the inference asset's metadata in the UI, read from one connection."""
    statuses: dict    # task -> how the evaluation ended and the calls it made and saved
    capacity: dict    # task -> median output tokens/s of the calls sent; a local model's peak memory (None: unknown)


def inference_summary(project: Project, model_name: str, eval_run_id: str) -> InferenceSummary:
    with warehouse.read_connection(project.paths.warehouse_file) as conn:
        statuses = conn.execute("""SELECT task, status, cases_scored, cases_total, calls_made, calls_saved, reason FROM evaluation_status
                                   WHERE eval_run_id = ? AND model = ? ORDER BY task""", [eval_run_id, model_name]).fetchall()
        capacity = conn.execute("""
            SELECT r.task, median(r.output_tokens_per_s) FILTER (WHERE NOT r.from_cache), any_value(m.peak_rss_mb)
            FROM inference_results r
            LEFT JOIN model_resources m ON m.eval_run_id = r.eval_run_id AND m.model = r.model AND m.task = r.task
            WHERE r.eval_run_id = ? AND r.model = ? GROUP BY r.task ORDER BY r.task""", [eval_run_id, model_name]).fetchall()
    return InferenceSummary(
        statuses={task: {"status": status, "cases": f"{scored} of {total}", "calls_made": made, "calls_saved": saved,
                         "reason": reason} for task, status, scored, total, made, saved, reason in statuses},
        capacity={task: {"output_tokens_per_s": None if rate is None else round(rate, 2),
                         "peak_memory_mb": None if memory is None else round(memory, 1)} for task, rate, memory in capacity})


def _record_eval_run(conn, eval_run_id: str, trigger: str) -> None:
    """Upsert the eval run's summary from the results it has so far (several partitions add to one run)."""
    eval_runs.record_results(conn, eval_run_id, trigger)


@dataclass(frozen=True)
class ModelScores:
    scores: pl.DataFrame
    judging: Judging          # what the judge tasks' judges did (calibration, calls, win rates), empty without judge tasks


def score_model(project: Project, model_name: str, eval_run_id: str | None, log: Log, *, retry: RetryPolicy = RetryPolicy(),
                completion=None) -> ModelScores:
    """Score the model's results of `eval_run_id` (or its newest eval run); replaces that slice of `scores`.

    Tasks with a pure scorer are scored here; judge tasks go to the judging step (model calls), and
    everything it produced is written in the same transaction as the scores."""
    tasks = {t.name: t for t in project.tasks}
    judged = [t.name for t in project.tasks if t.is_judged]
    with warehouse.read_connection(project.paths.warehouse_file) as conn:
        has_run = eval_run_id and conn.execute(
            "SELECT count(*) FROM inference_results WHERE eval_run_id = ? AND model = ?", [eval_run_id, model_name]).fetchall()[0][0]
        run_id = eval_run_id if has_run else warehouse.latest_eval_run(conn, model_name)
        if run_id is None:
            raise ValueError(f"model {model_name}: no inference results to score; materialize inference_results first")
        results = conn.sql("SELECT * FROM inference_results WHERE eval_run_id = $run AND model = $model",
                           params={"run": run_id, "model": model_name}).pl()
        cases = conn.sql(CURRENT_EXPECTED_ANSWERS).pl()
    in_judged = pl.col("task").is_in(judged)
    judge_cases = {(r["task"], r["dataset_version"], r["case_id"]):
                   (json.loads(r["inputs_json"]), None if r["expected_json"] is None else json.loads(r["expected_json"]))
                   for r in cases.filter(in_judged).iter_rows(named=True)}
    judging = judge_model_results(project, model_name, results.filter(in_judged), judge_cases, log,
                                  retry=retry, completion=completion)
    scores = pl.concat([score_results(results.filter(~in_judged), cases.filter(~in_judged), tasks),
                        pl.DataFrame(judging.scores, schema=SCORE_SCHEMA)]).with_columns(pl.lit(utc_now()).alias("scored_at"))
    judge_rows = judging.judge_results(run_id)
    crash_point("scores.scored")
    with warehouse.write_connection(project.paths.warehouse_file) as conn, warehouse.transaction(conn):
        warehouse.replace_rows(conn, "scores", scores, {"eval_run_id": run_id, "model": model_name})
        judged_rows = judge_rows.filter(pl.col("model").is_not_null()) if judge_rows.height else judge_rows
        warehouse.replace_rows(conn, "judge_results", judged_rows, {"eval_run_id": run_id, "model": model_name, "purpose": "score"})
        for calibration in judging.calibrations:
            rows = judge_rows.filter((pl.col("purpose") == "calibration") & (pl.col("task") == calibration.task))
            warehouse.replace_rows(conn, "judge_results", rows, {"eval_run_id": run_id, "task": calibration.task, "purpose": "calibration"})
            record = pl.DataFrame([{**calibration.record(), "eval_run_id": run_id, "calibrated_at": utc_now()}])
            warehouse.replace_rows(conn, "judge_calibrations", record, {"eval_run_id": run_id, "task": calibration.task})
    log.info(f"model {model_name}: scored {scores.height} results of eval run {run_id}")
    return ModelScores(scores, judging)
