"""The same pipeline with PostgreSQL as the Dagster instance storage (dagster-postgres).

A real PostgreSQL server is started for this module (model_eval_tests/postgres_server.py; it
installs PostgreSQL with scripts/postgres_for_tests.sh when the machine has none). One evaluation
runs through an instance whose dagster.yaml is the project's own plus a `storage: postgres` block,
with credentials read from environment variables the way docs/scale-out.md shows them; the same
evaluation also runs through a default (SQLite) instance, and the two are compared.

The runs and events are read back with SQL from PostgreSQL itself, not only through the instance
API, so a silent fallback to SQLite files in DAGSTER_HOME would fail the test.

Models are served by the scripted local OpenAI-compatible server (a test double for hosted providers).
The module is skipped only when PostgreSQL cannot be installed or run on the machine at all; with
MODEL_EVAL_REQUIRE_POSTGRES=1 (set on CI) that is a failure instead.
"""

from __future__ import annotations

import json
import os
from collections import Counter

import dagster as dg
import pytest
import yaml

from model_eval import warehouse
from model_eval.definitions import defs
from model_eval.defs.resources import EVAL_RUN_TAG
from model_eval.orchestration import run_evaluation
from model_eval.project import Project
from model_eval.settings import PROJECT_ROOT, ProjectPaths
from model_eval_tests.conftest import copy_golden, use_project_files
from model_eval_tests.fake_openai_server import FakeOpenAIServer, always, ok
from model_eval_tests.postgres_server import LocalPostgres, PostgresUnavailable

TASKS = ["grading", "classification"]
MODELS = ["first", "second"]
# What `prepare`, `evaluate_model` (once per model) and `recommend` materialize.
CORE_ASSETS = {"golden_cases", "model_registry", "inference_results", "scores", "model_task_metrics", "recommendations"}

# The instance storage block, exactly as docs/scale-out.md shows it: every connection setting
# comes from the environment, so no credential is written into dagster.yaml. `scheme` names the
# driver: SQLAlchemy 2.1 maps a bare postgresql:// to psycopg 3, but dagster-postgres installs psycopg2.
POSTGRES_STORAGE = yaml.safe_load("""
storage:
  postgres:
    postgres_db:
      username: {env: DAGSTER_PG_USERNAME}
      password: {env: DAGSTER_PG_PASSWORD}
      hostname: {env: DAGSTER_PG_HOST}
      db_name: {env: DAGSTER_PG_DB}
      port: {env: DAGSTER_PG_PORT}
      scheme: postgresql+psycopg2
""")


@pytest.fixture(scope="module")
def postgres():
    server = LocalPostgres()
    try:
        server.start()
    except PostgresUnavailable as exc:
        if os.environ.get("MODEL_EVAL_REQUIRE_POSTGRES") == "1":
            pytest.fail(f"MODEL_EVAL_REQUIRE_POSTGRES=1 but PostgreSQL cannot run here: {exc}")
        pytest.skip(f"PostgreSQL cannot be installed or started on this machine: {exc}")
    try:
        yield server
    finally:
        server.stop()


def project_instance_config() -> dict:
    """The project's tracked dagster.yaml (run queue limit, run monitoring), which a deployment
    would extend with the storage block."""
    return yaml.safe_load((PROJECT_ROOT / "dagster.yaml").read_text()) or {}


@pytest.fixture(scope="module")
def evaluated(postgres, tmp_path_factory):
    """One evaluation of two models on two tasks through each instance; returns what the tests inspect."""
    root = tmp_path_factory.mktemp("postgres_instance")
    golden = copy_golden(root / "golden", cases_per_task=10, tasks=TASKS)  # 10: the golden validation minimum
    with pytest.MonkeyPatch.context() as mp, FakeOpenAIServer(always(ok("PASS"))) as server:
        registry_file = root / "models.yaml"
        registry_file.write_text(yaml.safe_dump({"models": [
            {"name": name, "model": f"openai/{name}", "api_base": server.api_base, "provider": "fake",
             "price_per_million": {"input": 1.0, "output": 1.0}, "timeout_s": 30} for name in MODELS]}))
        deployment = root / "deployment.yaml"
        deployment.write_text(yaml.safe_dump({
            "initial_assignments": {task: "first" for task in TASKS},
            "alerts": {"log_file": str(root / "alerts.log")},
        }))
        # SQLite: the default instance every other test uses, with its warehouse under root/sqlite.
        (root / "sqlite").mkdir()
        sqlite_instance = use_project_files(mp, root / "sqlite", golden, registry_file, deployment)

        # PostgreSQL: a DAGSTER_HOME whose dagster.yaml is the project's plus the storage block,
        # with the connection settings in the environment.
        for key, value in {"DAGSTER_PG_USERNAME": postgres.user, "DAGSTER_PG_PASSWORD": postgres.password,
                           "DAGSTER_PG_HOST": postgres.host, "DAGSTER_PG_DB": postgres.db,
                           "DAGSTER_PG_PORT": postgres.port}.items():
            mp.setenv(key, str(value))
        pg_home = root / "postgres" / "dagster_home"
        pg_home.mkdir(parents=True)
        (pg_home / "dagster.yaml").write_text(yaml.safe_dump({**project_instance_config(), **POSTGRES_STORAGE}))
        pg_instance = dg.DagsterInstance.from_config(str(pg_home))

        results = {}
        try:
            for name, instance in (("sqlite", sqlite_instance), ("postgres", pg_instance)):
                # A warehouse (and response cache) per instance: the second evaluation must call
                # the models again rather than reuse the first one's cached answers.
                mp.setenv("MODEL_EVAL_WAREHOUSE", str(root / name / "warehouse" / "model_eval.duckdb"))
                paths = ProjectPaths.from_env()
                project = Project.load(paths)
                calls_before = server.total
                outcome = run_evaluation(defs(), instance, project, list(project.registry.models), TASKS,
                                         trigger="test", say=lambda _: None)
                results[name] = {"outcome": outcome, "paths": paths, "instance": instance,
                                 "model_calls": server.total - calls_before}
            results["postgres"]["home"] = pg_home
            yield results
        finally:
            # Before the server stops: the instance holds connections to it.
            pg_instance.dispose()
            sqlite_instance.dispose()


def query(postgres, sql: str, params: tuple = ()) -> list[tuple]:
    conn = postgres.connect()
    try:
        with conn.cursor() as cursor:
            cursor.execute(sql, params)
            return cursor.fetchall()
    finally:
        conn.close()


def warehouse_counts(paths: ProjectPaths, table: str, columns: str) -> dict[tuple, int]:
    with warehouse.read_connection(paths.warehouse_file) as conn:
        rows = conn.sql(f"SELECT {columns}, count(*) FROM {table} GROUP BY ALL").fetchall()
    return {row[:-1]: row[-1] for row in rows}


def test_the_evaluation_succeeds_on_both_instances(evaluated):
    for name in ("sqlite", "postgres"):
        outcome = evaluated[name]["outcome"]
        assert outcome.ok and outcome.blocked is None, (name, outcome)
        assert sorted(outcome.succeeded) == MODELS
        assert len(outcome.dagster_run_ids) == 1 + len(MODELS) + 1   # prepare, one per model, recommend


def test_the_runs_are_recorded_in_postgresql(evaluated, postgres):
    pg = evaluated["postgres"]
    rows = query(postgres, "SELECT run_id, pipeline_name, status, partition FROM runs")
    # Read from PostgreSQL itself: exactly this evaluation's runs, all successful.
    assert {row[0] for row in rows} == set(pg["outcome"].dagster_run_ids)
    assert Counter(row[1] for row in rows) == {"prepare": 1, "evaluate_model": len(MODELS), "recommend": 1}
    assert {row[2] for row in rows} == {"SUCCESS"}
    assert sorted(row[3] for row in rows if row[1] == "evaluate_model") == MODELS
    # The eval run id tag travels with every run, as the sensors expect.
    tags = query(postgres, "SELECT DISTINCT value FROM run_tags WHERE key = %s", (EVAL_RUN_TAG,))
    assert tags == [(pg["outcome"].eval_run_id,)]
    # The model partitions the registry sync added live there too.
    partitions = query(postgres, "SELECT partition FROM dynamic_partitions WHERE partitions_def_name = 'models'")
    assert sorted(p for (p,) in partitions) == MODELS
    # ... and the instance really used it: no SQLite run or event database next to dagster.yaml.
    assert type(pg["instance"].run_storage).__module__.startswith("dagster_postgres")
    assert not list(pg["home"].rglob("*.db")), list(pg["home"].rglob("*.db"))
    assert {r.run_id for r in pg["instance"].get_runs()} == set(pg["outcome"].dagster_run_ids)


def test_asset_materializations_are_in_the_postgresql_event_log(evaluated, postgres):
    rows = query(postgres, "SELECT asset_key, partition FROM event_logs WHERE dagster_event_type = 'ASSET_MATERIALIZATION'")
    materialized = Counter(json.loads(key)[-1] for key, _ in rows)
    assert CORE_ASSETS <= set(materialized)
    assert sorted(partition for key, partition in rows if json.loads(key)[-1] == "inference_results") == MODELS
    # The same assets, as often, as through the default SQLite instance.
    sqlite_instance = evaluated["sqlite"]["instance"]
    from_sqlite = Counter()
    for run_id in evaluated["sqlite"]["outcome"].dagster_run_ids:
        for record in sqlite_instance.get_records_for_run(run_id, of_type=dg.DagsterEventType.ASSET_MATERIALIZATION).records:
            from_sqlite[record.event_log_entry.dagster_event.asset_key.path[-1]] += 1
    assert materialized == from_sqlite
    # The gate checks are recorded there too.
    checks = query(postgres, "SELECT count(*) FROM event_logs WHERE dagster_event_type = 'ASSET_CHECK_EVALUATION'")
    assert checks[0][0] > 0


def test_the_warehouse_is_filled_the_same_as_with_the_sqlite_instance(evaluated):
    sqlite, pg = evaluated["sqlite"], evaluated["postgres"]
    # Both evaluations really called the models (separate caches), equally often.
    assert pg["model_calls"] == sqlite["model_calls"] > 0
    by_slice = "model, task, dataset_version"
    for table in ("inference_results", "scores", "model_task_metrics"):
        from_pg = warehouse_counts(pg["paths"], table, by_slice)
        assert from_pg == warehouse_counts(sqlite["paths"], table, by_slice), table
        assert {key[0] for key in from_pg} == set(MODELS), table
    assert sum(warehouse_counts(pg["paths"], "inference_results", by_slice).values()) == pg["model_calls"]
    for table, columns in (("recommendations", "task, policy"), ("model_assignments", "task, model, stage")):
        assert warehouse_counts(pg["paths"], table, columns) == warehouse_counts(sqlite["paths"], table, columns), table
    # Every inference row points at a Dagster run that PostgreSQL holds.
    with warehouse.read_connection(pg["paths"].warehouse_file) as conn:
        run_ids = {r for (r,) in conn.sql("SELECT DISTINCT dagster_run_id FROM inference_results").fetchall()}
    assert run_ids <= set(pg["outcome"].dagster_run_ids)
