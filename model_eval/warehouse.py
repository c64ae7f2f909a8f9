"""The DuckDB warehouse: the public SQL interface (documented in warehouse/README.md).

duckdb 2.0: read with conn.sql(...) (relations), and drain conn.execute(...) results with fetchall();
an undrained result blocks the connection.

DuckDB lets one process write a database file at a time. Writers here open the file only for one
short transaction and close it again (retrying while another process holds the lock), so the
long-running parts of a run never block SQL users. Every write replaces a well-defined slice
(e.g. one eval run x one model) inside a single transaction: rows are never appended twice and a
failure leaves the previous contents untouched.
"""

from __future__ import annotations

import random
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import duckdb
import polars as pl

SCHEMA = """
CREATE TABLE IF NOT EXISTS models (
    model VARCHAR, litellm_model VARCHAR, provider VARCHAR, family VARCHAR, api_base VARCHAR,
    api_key_env VARCHAR,                      -- the NAME of the variable; keys are never stored
    params_json VARCHAR, price_input_per_million DOUBLE, price_output_per_million DOUBLE,
    tasks VARCHAR[], tiers BIGINT[], enabled BOOLEAN, local_model VARCHAR, config_hash VARCHAR,
    available BOOLEAN, unavailable_reason VARCHAR,
    first_seen_run VARCHAR, last_seen_run VARCHAR, last_synced_at TIMESTAMP,
    PRIMARY KEY (model, config_hash)
);
CREATE TABLE IF NOT EXISTS golden_versions (
    task VARCHAR, dataset_version VARCHAR, source_file VARCHAR, file_hash VARCHAR, cases BIGINT,
    output_kind VARCHAR, scorer VARCHAR, is_current BOOLEAN, validation_passed BOOLEAN,
    expectations_run BIGINT, eval_run_id VARCHAR, ingested_at TIMESTAMP,
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
    models VARCHAR[], tasks VARCHAR[], calls BIGINT, cached_calls BIGINT, failed_calls BIGINT
);
CREATE TABLE IF NOT EXISTS inference_results (
    eval_run_id VARCHAR, model VARCHAR, task VARCHAR, dataset_version VARCHAR, case_id VARCHAR,
    repeat INTEGER, cache_key VARCHAR, response_text VARCHAR, latency_ms DOUBLE, input_tokens BIGINT,
    output_tokens BIGINT, cost_usd DOUBLE, finish_reason VARCHAR, error_class VARCHAR,
    error_message VARCHAR, attempts INTEGER, from_cache BOOLEAN, completed_at DOUBLE,
    dagster_run_id VARCHAR
);
CREATE TABLE IF NOT EXISTS scores (
    eval_run_id VARCHAR, model VARCHAR, task VARCHAR, dataset_version VARCHAR, case_id VARCHAR,
    repeat INTEGER, scorer VARCHAR, score DOUBLE, correct BOOLEAN, parsed VARCHAR, reason VARCHAR,
    call_failed BOOLEAN, latency_ms DOUBLE, input_tokens BIGINT, output_tokens BIGINT, cost_usd DOUBLE,
    scored_at TIMESTAMP
);
CREATE TABLE IF NOT EXISTS model_task_metrics (
    eval_run_id VARCHAR, model VARCHAR, task VARCHAR, dataset_version VARCHAR, cases BIGINT, calls BIGINT,
    accuracy DOUBLE, accuracy_low DOUBLE, accuracy_high DOUBLE, mean_score DOUBLE, correctness DOUBLE,
    consistency DOUBLE, success_rate DOUBLE, p50_latency_ms DOUBLE, p95_latency_ms DOUBLE,
    p99_latency_ms DOUBLE, mean_input_tokens DOUBLE, mean_output_tokens DOUBLE, total_cost_usd DOUBLE,
    cost_per_case_usd DOUBLE, evaluated_at TIMESTAMP
);
CREATE TABLE IF NOT EXISTS recommendations (
    eval_run_id VARCHAR, task VARCHAR, dataset_version VARCHAR, policy VARCHAR, is_task_policy BOOLEAN,
    champion VARCHAR, runner_up VARCHAR, champion_score DOUBLE, runner_up_score DOUBLE, confidence DOUBLE,
    qualified VARCHAR[], candidates VARCHAR[], ranking_json VARCHAR, reasoning VARCHAR,
    source_eval_runs VARCHAR[], created_at TIMESTAMP
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
CREATE TABLE IF NOT EXISTS promotion_gates (
    eval_run_id VARCHAR, task VARCHAR, champion VARCHAR, incumbent VARCHAR, gate VARCHAR, passed BOOLEAN,
    detail VARCHAR, test VARCHAR, p_value DOUBLE, effect_size DOUBLE, checked_at TIMESTAMP
);
"""

LOCK_MARKERS = ("Could not set lock", "Conflicting lock", "database is locked")


def _is_lock_error(exc: Exception) -> bool:
    return any(marker in str(exc) for marker in LOCK_MARKERS)


@contextmanager
def write_connection(path: Path, lock_timeout_s: float = 300.0) -> Iterator[duckdb.DuckDBPyConnection]:
    """Open the warehouse for writing, waiting (with jitter) while another process holds it.

    Use it for one short transaction and let it close: holding it blocks every other process.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + lock_timeout_s
    delay = 0.05
    while True:
        try:
            conn = duckdb.connect(str(path))
            break
        except duckdb.Error as exc:
            if not _is_lock_error(exc) or time.monotonic() > deadline:
                raise
            time.sleep(delay + random.uniform(0, delay))
            delay = min(delay * 2, 2.0)
    try:
        conn.execute(SCHEMA)
        conn.execute(CREATE_PROMOTION_TABLES)
        yield conn
    finally:
        conn.close()


@contextmanager
def read_connection(path: Path, lock_timeout_s: float = 60.0) -> Iterator[duckdb.DuckDBPyConnection]:
    """A read-only connection, the way SQL users should open the warehouse."""
    if not path.exists():
        raise FileNotFoundError(f"{path}: no warehouse yet; run `model-eval run` first")
    deadline = time.monotonic() + lock_timeout_s
    while True:
        try:
            conn = duckdb.connect(str(path), read_only=True)
            break
        except duckdb.Error as exc:
            if not _is_lock_error(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.1 + random.uniform(0, 0.1))
    try:
        yield conn
    finally:
        conn.close()


def replace_slice(conn: duckdb.DuckDBPyConnection, table: str, frame: pl.DataFrame, where: dict[str, object]) -> int:
    """Delete the rows matching `where` and insert `frame`, in one transaction. Returns rows inserted."""
    predicate = " AND ".join(f"{column} = ?" for column in where) or "TRUE"
    conn.execute("BEGIN TRANSACTION")
    try:
        conn.execute(f"DELETE FROM {table} WHERE {predicate}", list(where.values()))
        if frame.height:
            conn.register("incoming_rows", frame.to_arrow())
            conn.execute(f"INSERT INTO {table} BY NAME SELECT * FROM incoming_rows")
            conn.unregister("incoming_rows")
        conn.execute("COMMIT")
    except Exception:
        conn.execute("ROLLBACK")
        raise
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
