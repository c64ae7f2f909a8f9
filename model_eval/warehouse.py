"""The DuckDB warehouse: the public SQL interface (documented in warehouse/README.md).

duckdb 2.0: read with conn.sql(...) (relations), and drain conn.execute(...) results with fetchall();
an undrained result blocks the connection.

DuckDB lets one process write a database file at a time, and a reader holding the file open blocks
writers. So writers never touch the public file: they take an exclusive lock, change a private
working copy in one short transaction, and publish it over the public file by atomic rename. SQL
users and the pipeline's own reads open the public file read-only and never wait for a run. Every
write replaces a well-defined slice (e.g. one eval run x one model) inside a single transaction:
rows are never appended twice and a failure publishes nothing.
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
import shutil
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Iterator

import duckdb
import polars as pl

from model_eval import duckdb_files, warehouse_slices
from model_eval.crash_points import crash_point
from model_eval.file_lock import describe_holder, exclusive_lock

_log = logging.getLogger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS models (
    model VARCHAR, litellm_model VARCHAR, provider VARCHAR, family VARCHAR, api_base VARCHAR,
    api_key_env VARCHAR,                      -- the NAME of the variable; keys are never stored
    params_json VARCHAR, price_input_per_million DOUBLE, price_output_per_million DOUBLE,
    tasks VARCHAR[], tiers BIGINT[], enabled BOOLEAN, local_model VARCHAR, config_hash VARCHAR,
    available BOOLEAN, unavailable_reason VARCHAR,
    first_seen_run VARCHAR, last_seen_run VARCHAR, last_synced_at TIMESTAMP,
    mode VARCHAR, completion_template_json VARCHAR,
    PRIMARY KEY (model, config_hash)
);
-- Warehouses made before models had a mode get the columns here (appended, as in the table above).
ALTER TABLE models ADD COLUMN IF NOT EXISTS mode VARCHAR;
ALTER TABLE models ADD COLUMN IF NOT EXISTS completion_template_json VARCHAR;
CREATE TABLE IF NOT EXISTS golden_versions (
    task VARCHAR, dataset_version VARCHAR, source_file VARCHAR, file_hash VARCHAR, cases BIGINT,
    output_kind VARCHAR, scorer VARCHAR, is_current BOOLEAN, validation_passed BOOLEAN,
    expectations_run BIGINT, eval_run_id VARCHAR, ingested_at TIMESTAMP,
    validation_key VARCHAR,                   -- what the validation depended on (golden_validation.validation_key)
    PRIMARY KEY (task, dataset_version, file_hash)
);
CREATE TABLE IF NOT EXISTS golden_cases (
    task VARCHAR, dataset_version VARCHAR, case_id VARCHAR, content_hash VARCHAR, line BIGINT,
    inputs_json VARCHAR, expected_json VARCHAR, difficulty VARCHAR, kind VARCHAR, tags VARCHAR[],
    notes VARCHAR, source_file VARCHAR, file_hash VARCHAR, eval_run_id VARCHAR, ingested_at TIMESTAMP,
    PRIMARY KEY (task, dataset_version, case_id, file_hash)
);
CREATE TABLE IF NOT EXISTS eval_runs (
    eval_run_id VARCHAR PRIMARY KEY, trigger VARCHAR, started_at TIMESTAMP, updated_at TIMESTAMP,
    models VARCHAR[], tasks VARCHAR[], calls BIGINT, cached_calls BIGINT, failed_calls BIGINT,
    status VARCHAR, status_reason VARCHAR, owner_process VARCHAR   -- see model_eval/eval_runs.py
);
-- inference_results and scores are views over Parquet slices: see warehouse_slices.py.
CREATE TABLE IF NOT EXISTS model_task_metrics (
    eval_run_id VARCHAR, model VARCHAR, task VARCHAR, dataset_version VARCHAR, cases BIGINT, calls BIGINT,
    accuracy DOUBLE, accuracy_low DOUBLE, accuracy_high DOUBLE, mean_score DOUBLE, correctness DOUBLE,
    consistency DOUBLE, success_rate DOUBLE, p50_latency_ms DOUBLE, p95_latency_ms DOUBLE,
    p99_latency_ms DOUBLE, mean_input_tokens DOUBLE, mean_output_tokens DOUBLE, total_cost_usd DOUBLE,
    cost_per_case_usd DOUBLE, evaluated_at TIMESTAMP
);
-- Added later: warehouses created before them get the columns here.
ALTER TABLE model_task_metrics ADD COLUMN IF NOT EXISTS repeats BIGINT;
ALTER TABLE model_task_metrics ADD COLUMN IF NOT EXISTS pass_all_k DOUBLE;
ALTER TABLE model_task_metrics ADD COLUMN IF NOT EXISTS flip_rate DOUBLE;
-- Capacity (model_eval/capacity.py): output tokens per second of each call, and for local models the
-- serving process's peak resident memory and the model file's size. NULL where unknown (remote servers).
ALTER TABLE model_task_metrics ADD COLUMN IF NOT EXISTS output_tokens_per_s DOUBLE;
ALTER TABLE model_task_metrics ADD COLUMN IF NOT EXISTS peak_memory_mb DOUBLE;
ALTER TABLE model_task_metrics ADD COLUMN IF NOT EXISTS memory_eval_run_id VARCHAR;
ALTER TABLE model_task_metrics ADD COLUMN IF NOT EXISTS model_file_mb DOUBLE;
CREATE TABLE IF NOT EXISTS model_resources (
    eval_run_id VARCHAR, model VARCHAR, task VARCHAR, local_model VARCHAR, model_file_mb DOUBLE,
    peak_rss_mb DOUBLE,                       -- NULL: no call of this task reached the model (all cached)
    rss_samples BIGINT, server_pid BIGINT, measured_at TIMESTAMP
);
CREATE TABLE IF NOT EXISTS recommendations (
    eval_run_id VARCHAR, task VARCHAR, dataset_version VARCHAR, policy VARCHAR, is_task_policy BOOLEAN,
    champion VARCHAR, runner_up VARCHAR, champion_score DOUBLE, runner_up_score DOUBLE, confidence DOUBLE,
    qualified VARCHAR[], candidates VARCHAR[], ranking_json VARCHAR, reasoning VARCHAR,
    source_eval_runs VARCHAR[], created_at TIMESTAMP
);
-- Models stopped by adaptive evaluation (evaluation_status), listed beside the ranking, never in it.
ALTER TABLE recommendations ADD COLUMN IF NOT EXISTS stopped VARCHAR[];
-- How each (eval run, model, task) ended (model_eval/adaptive_run.py): 'complete' (every exhaustive run, and an
-- adaptive one no bound stopped), 'stopped: cannot qualify' or 'stopped: cannot beat the champion'. Written in the
-- transaction that writes the inference slice. A stopped (model, task) is never ranked on its partial rows.
CREATE TABLE IF NOT EXISTS evaluation_status (
    eval_run_id VARCHAR, model VARCHAR, task VARCHAR, dataset_version VARCHAR, status VARCHAR, reason VARCHAR,
    adaptive BOOLEAN,                         -- the task was under an adaptive plan in this run
    cases_total BIGINT,                       -- cases of the task's current golden version
    cases_scored BIGINT,                      -- cases the decision rests on: all, or the n a bound stopped it at
    calls_made BIGINT,                        -- answers recorded (sent to the model or reused from the cache)
    calls_saved BIGINT,                       -- requests not asked: after a stop, and repeats of settled cases
    decided_at TIMESTAMP
);
-- The evaluation's status beside its figures, so ranking and baselines can leave stopped ones out.
ALTER TABLE model_task_metrics ADD COLUMN IF NOT EXISTS status VARCHAR DEFAULT 'complete';
ALTER TABLE model_task_metrics ADD COLUMN IF NOT EXISTS status_reason VARCHAR;
-- What decided the evaluation's rows besides the answers (model_eval/unchanged.py); NULL when a call failed.
ALTER TABLE evaluation_status ADD COLUMN IF NOT EXISTS inputs_fingerprint VARCHAR;
-- Evaluations a run found unchanged and reused instead of running again (model_eval/unchanged.py).
CREATE TABLE IF NOT EXISTS reused_evaluations (
    eval_run_id VARCHAR, model VARCHAR, task VARCHAR, reused_eval_run_id VARCHAR, reused_at TIMESTAMP
);
"""

CREATE_PROMOTION_TABLES = """
CREATE SEQUENCE IF NOT EXISTS assignment_seq;
CREATE TABLE IF NOT EXISTS model_assignments (
    seq BIGINT DEFAULT nextval('assignment_seq'), task VARCHAR, model VARCHAR, stage VARCHAR, traffic_share DOUBLE,
    previous_model VARCHAR, pinned BOOLEAN, action VARCHAR, reason VARCHAR, assigned_by VARCHAR,
    assigned_at TIMESTAMP, eval_run_id VARCHAR,
    baseline_accuracy DOUBLE, baseline_success_rate DOUBLE, baseline_p95_latency_ms DOUBLE
);
ALTER TABLE model_assignments ADD COLUMN IF NOT EXISTS baseline_dataset_version VARCHAR;
ALTER TABLE model_assignments ADD COLUMN IF NOT EXISTS baseline_eval_run_id VARCHAR;
CREATE TABLE IF NOT EXISTS model_drift (
    eval_run_id VARCHAR, baseline_eval_run_id VARCHAR, model VARCHAR, task VARCHAR, dataset_version VARCHAR,
    metric VARCHAR, paired_cases BIGINT, paired_calls BIGINT, baseline_value DOUBLE, current_value DOUBLE,
    change DOUBLE, relative_change DOUBLE, improved_cases BIGINT, worsened_cases BIGINT, test VARCHAR,
    statistic DOUBLE, p_value DOUBLE, p_value_holm DOUBLE, drifted BOOLEAN, direction VARCHAR, detail VARCHAR,
    computed_at TIMESTAMP
);
CREATE TABLE IF NOT EXISTS promotion_gates (
    eval_run_id VARCHAR, task VARCHAR, champion VARCHAR, incumbent VARCHAR, gate VARCHAR, passed BOOLEAN,
    detail VARCHAR, test VARCHAR, p_value DOUBLE, effect_size DOUBLE, checked_at TIMESTAMP
);
ALTER TABLE promotion_gates ADD COLUMN IF NOT EXISTS dataset_version VARCHAR;
ALTER TABLE promotion_gates ADD COLUMN IF NOT EXISTS n_cases BIGINT;
ALTER TABLE promotion_gates ADD COLUMN IF NOT EXISTS estimate DOUBLE;
ALTER TABLE promotion_gates ADD COLUMN IF NOT EXISTS ci_low DOUBLE;
ALTER TABLE promotion_gates ADD COLUMN IF NOT EXISTS ci_high DOUBLE;
ALTER TABLE promotion_gates ADD COLUMN IF NOT EXISTS p_adjusted DOUBLE;
ALTER TABLE promotion_gates ADD COLUMN IF NOT EXISTS comparisons BIGINT;
ALTER TABLE promotion_gates ADD COLUMN IF NOT EXISTS margin DOUBLE;
ALTER TABLE promotion_gates ADD COLUMN IF NOT EXISTS alpha DOUBLE;
ALTER TABLE promotion_gates ADD COLUMN IF NOT EXISTS detectable_difference DOUBLE;
"""

# Calls applications made through the router, loaded from its append-only logs (production_log.py).
CREATE_PRODUCTION_TABLES = """
CREATE TABLE IF NOT EXISTS production_calls (
    call_id VARCHAR PRIMARY KEY, ts TIMESTAMP, task VARCHAR, request_key_hash VARCHAR, model VARCHAR,
    role VARCHAR, stage VARCHAR, bucket DOUBLE, latency_ms DOUBLE, input_tokens BIGINT,
    output_tokens BIGINT, success BOOLEAN, error VARCHAR, rating DOUBLE, source_file VARCHAR,
    rated_at TIMESTAMP, extra_json VARCHAR
);
CREATE TABLE IF NOT EXISTS production_log_offsets (file VARCHAR PRIMARY KEY, "offset" BIGINT);
CREATE TABLE IF NOT EXISTS production_pending_ratings (
    call_id VARCHAR PRIMARY KEY, rating DOUBLE, rated_at TIMESTAMP, source_file VARCHAR
);
-- Added with the gateway: each call's cost (NULL: unknown price or tokens), and the feedback's comment.
ALTER TABLE production_calls ADD COLUMN IF NOT EXISTS cost_usd DOUBLE;
ALTER TABLE production_calls ADD COLUMN IF NOT EXISTS rating_comment VARCHAR;
ALTER TABLE production_pending_ratings ADD COLUMN IF NOT EXISTS rating_comment VARCHAR;
"""

# Open-ended tasks: judge calls and their calibration against human verdicts (judge.py,
# judge_calibration.py), pairwise win rates, and consensus across models (consensus.py).
CREATE_JUDGE_TABLES = """
CREATE TABLE IF NOT EXISTS judge_results (
    eval_run_id VARCHAR, task VARCHAR, dataset_version VARCHAR, case_id VARCHAR, model VARCHAR, repeat INTEGER,
    purpose VARCHAR, position VARCHAR, reference_model VARCHAR, judge_model VARCHAR, judge_config_hash VARCHAR,
    rubric_hash VARCHAR, verdict_attempt INTEGER, final BOOLEAN, cache_key VARCHAR, response_text VARCHAR,
    verdict_score DOUBLE, verdict_winner VARCHAR, verdict_reason VARCHAR, verdict_problem VARCHAR,
    latency_ms DOUBLE, input_tokens BIGINT, output_tokens BIGINT, cost_usd DOUBLE, error_class VARCHAR,
    error_message VARCHAR, attempts INTEGER, from_cache BOOLEAN, completed_at DOUBLE, judged_at TIMESTAMP
);
CREATE TABLE IF NOT EXISTS judge_calibrations (
    eval_run_id VARCHAR, task VARCHAR, judge_model VARCHAR, judge_config_hash VARCHAR, rubric_hash VARCHAR,
    calibration_file VARCHAR, calibration_hash VARCHAR, cases BIGINT, agreement DOUBLE, kappa DOUBLE,
    kappa_low DOUBLE, kappa_high DOUBLE, human_pass_judge_pass BIGINT, human_pass_judge_fail BIGINT,
    human_pass_judge_none BIGINT, human_fail_judge_pass BIGINT, human_fail_judge_fail BIGINT,
    human_fail_judge_none BIGINT, unparseable BIGINT, min_kappa DOUBLE, min_kappa_source VARCHAR,
    passed BOOLEAN, reason VARCHAR, calibrated_at TIMESTAMP
);
CREATE TABLE IF NOT EXISTS pairwise_win_rates (
    eval_run_id VARCHAR, model VARCHAR, task VARCHAR, dataset_version VARCHAR, candidate_eval_run_id VARCHAR,
    reference_model VARCHAR, reference_eval_run_id VARCHAR, judge_model VARCHAR, rubric_hash VARCHAR, cases BIGINT, comparisons BIGINT,
    wins BIGINT, ties BIGINT, losses BIGINT, unresolved BIGINT, win_rate DOUBLE, win_rate_low DOUBLE,
    win_rate_high DOUBLE, position_consistency DOUBLE, judged_at TIMESTAMP
);
CREATE TABLE IF NOT EXISTS consensus_answers (
    eval_run_id VARCHAR, task VARCHAR, dataset_version VARCHAR, case_id VARCHAR, output_kind VARCHAR, method VARCHAR,
    models_answering BIGINT, consensus_answer VARCHAR, consensus_text VARCHAR, consensus_model VARCHAR, supporters VARCHAR[],
    agreement DOUBLE, tie_broken_by VARCHAR, reason VARCHAR, source_eval_runs VARCHAR[], computed_at TIMESTAMP
);
CREATE TABLE IF NOT EXISTS consensus_agreement (
    eval_run_id VARCHAR, task VARCHAR, dataset_version VARCHAR, model VARCHAR, source_eval_run_id VARCHAR,
    cases BIGINT, agreed BIGINT, agreement_rate DOUBLE, loo_cases BIGINT, loo_agreement_rate DOUBLE,
    computed_at TIMESTAMP
);
"""

# Columns added after a table first shipped: a warehouse created by an older version gains them here.
MIGRATIONS = """
ALTER TABLE eval_runs ADD COLUMN IF NOT EXISTS status VARCHAR;
ALTER TABLE eval_runs ADD COLUMN IF NOT EXISTS status_reason VARCHAR;
ALTER TABLE eval_runs ADD COLUMN IF NOT EXISTS owner_process VARCHAR;
ALTER TABLE golden_versions ADD COLUMN IF NOT EXISTS validation_key VARCHAR;
"""

ALL_DDL = (SCHEMA, CREATE_PROMOTION_TABLES, CREATE_PRODUCTION_TABLES, CREATE_JUDGE_TABLES, MIGRATIONS)

LOCK_MARKERS = ("Could not set lock", "Conflicting lock", "database is locked")


def _is_lock_error(exc: Exception) -> bool:
    return any(marker in str(exc) for marker in LOCK_MARKERS)


def working_file(public: Path) -> Path:
    """The private file writers change; `public` is only ever replaced whole by a finished copy of it."""
    return public.parent / ".writer" / public.name


WRITE_LOCK_TIMEOUT_ENV = "MODEL_EVAL_WRITE_LOCK_TIMEOUT_S"
DEFAULT_WRITE_LOCK_TIMEOUT_S = 600.0


class WriterLockTimeout(TimeoutError):
    """Gave up waiting for the warehouse writer lock; the message names the holder and how to free it."""


def write_lock_timeout_s() -> float:
    value = os.environ.get(WRITE_LOCK_TIMEOUT_ENV)
    try:
        return float(value) if value else DEFAULT_WRITE_LOCK_TIMEOUT_S
    except ValueError:
        raise ValueError(f"{WRITE_LOCK_TIMEOUT_ENV}={value!r}: expected a number of seconds") from None


def _publish(working: Path, public: Path) -> None:
    """Copy the working file over the public one atomically: readers see the old or the new, never a mix."""
    temporary = public.parent / f".{public.name}.{os.getpid()}.publishing"
    shutil.copyfile(working, temporary)
    with open(temporary, "rb") as handle:
        os.fsync(handle.fileno())
    crash_point("warehouse.publish")
    os.replace(temporary, public)


def _remove_abandoned_copies(public: Path) -> None:
    """Half-copied files of writers killed while publishing (called under the lock: no one is publishing)."""
    for leftover in public.parent.glob(f".{public.name}.*.publishing"):
        leftover.unlink(missing_ok=True)


def _reset_working_copy(working: Path, public: Path) -> None:
    """Make the private copy the published file again (the public file is the truth)."""
    for stale in (working, working.with_name(working.name + ".wal")):
        stale.unlink(missing_ok=True)
    if public.exists():
        shutil.copyfile(public, working)


@contextmanager
def write_connection(path: Path, lock_timeout_s: float | None = None) -> Iterator[duckdb.DuckDBPyConnection]:
    """Open the warehouse for writing; on success the change is published to `path` for readers.

    Writers work on a private copy under an exclusive lock and publish it by atomic rename, so a
    person's open read-only connection (the duckdb CLI, a notebook) never blocks a run, and never
    sees half of a change. Use it for one short transaction. A writer killed (or failing) at any
    moment leaves the public file as it was, and the next writer drops whatever it had not published.
    A waiting writer says who holds the lock; it gives up after `lock_timeout_s` (default
    $MODEL_EVAL_WRITE_LOCK_TIMEOUT_S, else 600 s) with an error naming the holder.
    """
    timeout_s = write_lock_timeout_s() if lock_timeout_s is None else lock_timeout_s
    path.parent.mkdir(parents=True, exist_ok=True)
    working = working_file(path)
    unpublished = working.parent / "unpublished"
    # One writer at a time across processes (parallel Dagster steps, the CLI, a person's --write).
    lock_path = working.parent / "write.lock"

    def gave_up() -> Exception:
        return WriterLockTimeout(
            f"{lock_path}: gave up after {timeout_s:.0f} s waiting for the warehouse writer lock, held by "
            f"{describe_holder(lock_path)}. If that process is stuck, stop it (kill <pid>): the lock is "
            f"released the moment it exits. Wait longer with {WRITE_LOCK_TIMEOUT_ENV}=<seconds>.")

    def waiting(waited_s: float, holder: str) -> None:
        _log.warning("waiting for the warehouse writer lock (%.0f s so far, giving up after %.0f s), held by %s",
                     waited_s, timeout_s, holder)

    with exclusive_lock(lock_path, timeout_s, gave_up, on_wait=waiting):
        _remove_abandoned_copies(path)
        if unpublished.exists():
            # The last writer died or failed before publishing: whatever it changed is dropped whole.
            _log.warning("%s: the previous writer stopped before publishing; its unpublished change is discarded", path)
            _reset_working_copy(working, path)
        elif not working.exists() and path.exists():
            shutil.copyfile(path, working)  # a warehouse from before writers had a private copy
        unpublished.touch()
        with duckdb_files.open_file(working) as conn:
            create_tables(conn)
            yield conn
            crash_point("warehouse.committed")
            conn.execute("CHECKPOINT")  # everything into the main file before it is copied
            listed = warehouse_slices.listed_files(conn)
        # Detached now (this process's only use of the working file): the file is closed and whole.
        _publish(working, path)
        unpublished.unlink()
        warehouse_slices.collect_garbage(path, listed)


@contextmanager
def read_connection(path: Path, lock_timeout_s: float = 60.0) -> Iterator[duckdb.DuckDBPyConnection]:
    """A read-only connection to the published warehouse, the way SQL users should open it."""
    if not path.exists():
        raise FileNotFoundError(f"{path}: no warehouse yet; run `model-eval run` first")
    deadline = time.monotonic() + lock_timeout_s
    with ExitStack() as opened:
        while True:
            try:
                conn = opened.enter_context(duckdb_files.open_file(path, read_only=True))
                break
            except duckdb.Error as exc:
                # Only someone opening the public file for writing by hand can cause this; wait for them.
                if not _is_lock_error(exc) or time.monotonic() > deadline:
                    raise
                time.sleep(0.1 + random.uniform(0, 0.1))
        yield conn


# What the tables and views were last created from, kept in the warehouse: a writer whose DDL and slice
# folder are unchanged skips creating them again (about 50 ms a write, and a run makes some 25 writes).
SCHEMA_TABLE = "warehouse_schema"


def _schema_fingerprint(conn: duckdb.DuckDBPyConnection) -> str:
    database = warehouse_slices.database_file_or_none(conn)
    # The slices' folder is part of it: views name their files by absolute path, so a moved warehouse
    # folder must have its views re-pointed.
    where = str(warehouse_slices.slices_dir(warehouse_slices.public_file(conn))) if database else ":memory:"
    text = "\n".join([*ALL_DDL, warehouse_slices.MANIFEST_DDL, repr(warehouse_slices.SLICED_TABLES), where])
    return hashlib.sha256(text.encode()).hexdigest()


def create_tables(conn: duckdb.DuckDBPyConnection) -> None:
    """Every table of the warehouse (idempotent); the one place their columns are declared."""
    fingerprint = _schema_fingerprint(conn)
    try:
        if conn.execute(f"SELECT fingerprint FROM {SCHEMA_TABLE}").fetchall() == [(fingerprint,)]:
            return
    except duckdb.CatalogException:
        pass   # a new warehouse, or one from before the fingerprint
    for ddl in ALL_DDL:
        conn.execute(ddl)
    warehouse_slices.prepare(conn)
    conn.execute(f"CREATE OR REPLACE TABLE {SCHEMA_TABLE} AS SELECT ?::VARCHAR AS fingerprint", [fingerprint])


@contextmanager
def transaction(conn: duckdb.DuckDBPyConnection) -> Iterator[duckdb.DuckDBPyConnection]:
    """BEGIN ... COMMIT, or ROLLBACK and re-raise: a step's writes land together or not at all."""
    conn.execute("BEGIN TRANSACTION")
    try:
        yield conn
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def replace_slice(conn: duckdb.DuckDBPyConnection, table: str, frame: pl.DataFrame, where: dict[str, object]) -> int:
    """Delete the rows matching `where` and insert `frame`, in one transaction. Returns rows inserted."""
    with transaction(conn):
        return replace_rows(conn, table, frame, where)


def replace_rows(conn: duckdb.DuckDBPyConnection, table: str, frame: pl.DataFrame, where: dict[str, object]) -> int:
    """`replace_slice` inside a transaction the caller holds (several tables changed together).

    For `inference_results` and `scores` (Parquet slices), `where` must name the eval run and the model.
    """
    if table in warehouse_slices.SLICED_TABLES:
        if set(where) != {"eval_run_id", "model"}:
            raise ValueError(f"{table} is replaced one (eval_run_id, model) slice at a time, not by {sorted(where)}")
        conn.register("incoming_rows", frame.to_arrow())
        try:
            return warehouse_slices.write_slice(conn, table, str(where["eval_run_id"]), str(where["model"]),
                                                "SELECT * FROM incoming_rows")
        finally:
            conn.unregister("incoming_rows")
    predicate = " AND ".join(f"{column} = ?" for column in where) or "TRUE"
    conn.execute(f"DELETE FROM {table} WHERE {predicate}", list(where.values()))
    if frame.height:
        conn.register("incoming_rows", frame.to_arrow())
        conn.execute(f"INSERT INTO {table} BY NAME SELECT * FROM incoming_rows")
        conn.unregister("incoming_rows")
    return frame.height


def insert_new(conn: duckdb.DuckDBPyConnection, table: str, frame: pl.DataFrame, key: list[str]) -> int:
    """Insert the rows of `frame` whose key is not in `table` yet (reference data kept as history)."""
    if not frame.height:
        return 0
    conn.register("incoming_rows", frame.to_arrow())
    join = " AND ".join(f"t.{k} = i.{k}" for k in key)
    before = conn.sql(f"SELECT count(*) FROM {table}").fetchall()[0][0]
    conn.execute(f"INSERT INTO {table} BY NAME SELECT i.* FROM incoming_rows i WHERE NOT EXISTS (SELECT 1 FROM {table} t WHERE {join})")
    conn.unregister("incoming_rows")
    return conn.sql(f"SELECT count(*) FROM {table}").fetchall()[0][0] - before


def latest_eval_run(conn: duckdb.DuckDBPyConnection, model: str) -> str | None:
    """The eval run that most recently produced inference results for `model`."""
    rows = conn.execute(
        "SELECT eval_run_id FROM inference_results WHERE model = ? GROUP BY eval_run_id ORDER BY max(completed_at) DESC LIMIT 1",
        [model],
    ).fetchall()
    return rows[0][0] if rows else None
