"""The pipeline's steps without Dagster, against the scripted fault server (a test double for hosted providers).

Partitions are replaced atomically (never appended twice, never half-written), failed calls are
recorded and scored 0 with a reason, and a key from the environment never reaches the warehouse.
"""

from __future__ import annotations

import pytest
import yaml

from model_eval import warehouse
from model_eval.project import Project
from model_eval.steps import evaluation as evaluation_step
from model_eval.steps.evaluation import run_inference, score_model
from model_eval.steps.golden import ingest_golden
from model_eval.steps.models import sync_registry
from model_eval.steps.recommendation import recommend_tasks, refresh_metrics
from model_eval.inference import RetryPolicy
from model_eval_tests.fake_openai_server import FakeOpenAIServer, always, nonsense, ok, route, server_error

FAST_RETRY = RetryPolicy(backoff_base_s=0.01, backoff_cap_s=0.05, retry_after_cap_s=0.1)
CANARY = "sk-canary-9d2f7c1e55aa"


@pytest.fixture
def fake_server():
    with FakeOpenAIServer(always(ok("PASS"))) as server:
        yield server


@pytest.fixture
def fake_paths(paths, fake_server, monkeypatch):
    """The shipped golden sets and a registry with one model behind the fake server, keyed by a canary."""
    monkeypatch.setenv("FAKE_PROVIDER_KEY", CANARY)
    paths.registry_file.write_text(yaml.safe_dump({"models": [{
        "name": "hosted-fake", "model": "openai/fake", "api_base": fake_server.api_base, "api_key_env": "FAKE_PROVIDER_KEY",
        "params": {"temperature": 0.0}, "price_per_million": {"input": 1.0, "output": 2.0}, "provider": "openai",
        "max_attempts": 2, "timeout_s": 30,  # generous: a loaded 2-core machine must not turn into timeouts
    }]}))
    return paths


def _evaluate(paths, log, eval_run_id="run-1"):
    ingest_golden(Project.load(paths), eval_run_id, log)
    sync_registry(Project.load(paths), eval_run_id, log)
    stats = run_inference(Project.load(paths), "hosted-fake", eval_run_id, log, retry=FAST_RETRY)
    score_model(Project.load(paths), "hosted-fake", eval_run_id, log)
    refresh_metrics(Project.load(paths), log, completing=eval_run_id)  # its only model is scored: it is complete
    recommend_tasks(Project.load(paths), eval_run_id, log)
    return stats


def _count(paths, sql):
    with warehouse.read_connection(paths.warehouse_file) as conn:
        return conn.sql(sql).fetchall()[0][0]


def test_rematerializing_a_partition_replaces_it(fake_paths, fake_server, log):
    first = _evaluate(fake_paths, log)
    rows = _count(fake_paths, "SELECT count(*) FROM inference_results")
    assert first.errors == 0, first.error_classes
    assert rows == first.total == 14 * 3 + 14 * 3 + 16 * 3 + 20 * 3
    sent = fake_server.total
    again = _evaluate(fake_paths, log)  # same eval run id: replace, not append
    assert _count(fake_paths, "SELECT count(*) FROM inference_results") == rows
    assert _count(fake_paths, "SELECT count(*) FROM scores") == rows
    assert again.cached == rows and fake_server.total == sent  # and no call was sent again
    _evaluate(fake_paths, log, "run-2")  # a new eval run is kept beside the old one
    assert _count(fake_paths, "SELECT count(*) FROM inference_results") == 2 * rows


def test_a_failed_write_leaves_the_previous_partition_intact(fake_paths, fake_server, log, monkeypatch):
    _evaluate(fake_paths, log)
    before = _count(fake_paths, "SELECT count(*) FILTER (WHERE response_text = 'PASS') FROM inference_results")
    fake_server.script = always(ok("FAIL"))
    (fake_paths.cache_file).unlink()  # force new answers

    def broken(*_args, **_kwargs):
        raise RuntimeError("disk full while recording the eval run")

    monkeypatch.setattr(evaluation_step, "_record_eval_run", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        run_inference(Project.load(fake_paths), "hosted-fake", "run-1", log, retry=FAST_RETRY)
    assert _count(fake_paths, "SELECT count(*) FILTER (WHERE response_text = 'PASS') FROM inference_results") == before
    assert _count(fake_paths, "SELECT count(*) FILTER (WHERE response_text = 'FAIL') FROM inference_results") == 0


def test_outage_and_garbage_are_recorded_and_scored_zero_with_reasons(fake_paths, fake_server, log):
    # Grading prompts get nonsense, extraction prompts a persistent outage; classification answers normally.
    fake_server.script = route([("Summary", always(nonsense())), ("JSON", always(server_error(503)))], default=always(ok("software")))
    stats = _evaluate(fake_paths, log)
    assert stats.errors == 14 * 3 and stats.retries == 14 * 3  # max_attempts 2: one retry each
    with warehouse.read_connection(fake_paths.warehouse_file) as conn:
        by_task = dict((t, (n, failed, right, reason)) for t, n, failed, right, reason in conn.sql("""
            SELECT task, count(*), count(*) FILTER (WHERE call_failed), count(*) FILTER (WHERE correct), any_value(reason)
            FROM scores GROUP BY task""").fetchall())
        metrics = dict(conn.sql("SELECT task, success_rate FROM model_task_metrics").fetchall())
    assert by_task["extraction"][1] == by_task["extraction"][0] and "call failed" in by_task["extraction"][3]
    assert by_task["grading"][1] == 0 and by_task["grading"][2] == 0 and "ambiguous" in by_task["grading"][3].lower()
    assert by_task["classification"][2] > 0  # the software postings are right
    assert metrics["extraction"] == 0.0 and metrics["grading"] == 1.0


def test_the_key_never_reaches_the_warehouse_or_logs(fake_paths, fake_server, log):
    # The provider echoes the key it received in its error message (some do).
    fake_server.script = route([("JSON", always(server_error(401, "Incorrect API key provided", echo_key=True)))],
                               default=always(ok("PASS")))
    _evaluate(fake_paths, log)
    assert _count(fake_paths, "SELECT count(*) FROM inference_results WHERE error_message LIKE '%***%'") > 0
    assert CANARY not in log.text()
    assert CANARY.encode() not in fake_paths.warehouse_file.read_bytes()
    with warehouse.read_connection(fake_paths.warehouse_file) as conn:
        for (table,) in conn.sql("SELECT table_name FROM information_schema.tables").fetchall():
            assert CANARY not in repr(conn.sql(f"SELECT * FROM {table}").fetchall()), table


def test_an_open_reader_never_blocks_a_write_and_sees_a_consistent_snapshot(fake_paths, log):
    import duckdb

    ingest_golden(Project.load(fake_paths), "run-1", log)
    reader = duckdb.connect(str(fake_paths.warehouse_file), read_only=True)   # e.g. a person's duckdb CLI, left open
    try:
        before = reader.sql("SELECT count(*) FROM golden_cases").fetchall()[0][0]
        cases_dir = fake_paths.golden_dir / "classification" / "cases"
        (cases_dir / "v2.jsonl").write_text((cases_dir / "v1.jsonl").read_text())
        ingest_golden(Project.load(fake_paths), "run-2", log)                      # does not wait for the reader
        assert reader.sql("SELECT count(*) FROM golden_cases").fetchall()[0][0] == before  # its snapshot is stable
    finally:
        reader.close()
    assert _count(fake_paths, "SELECT count(*) FROM golden_cases") == before + 16  # new readers see the change
