"""The whole asset chain through a real Dagster instance, the real CLI and the real local llama.cpp server.

A small golden subset (10 cases per task, the minimum validation allows) keeps this to a few minutes
on 2 cores. Run once, then run again unchanged: the second run must make zero model calls, reuse every
evaluation (model_eval/unchanged.py) and reach the same decision.
"""

from __future__ import annotations

import contextlib
import io
import socket
from pathlib import Path

import dagster as dg
import pytest
import yaml

from model_eval import warehouse
from model_eval.cli import main as cli_main
from model_eval.settings import PROJECT_ROOT
from model_eval_tests.conftest import copy_golden

pytestmark = pytest.mark.llm

LOCAL_MODELS = ["smollm2-135m", "gemma3-270m"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    """Two CLI runs over the same golden subset; returns everything the tests look at."""
    root = tmp_path_factory.mktemp("e2e")
    golden = copy_golden(root / "golden", cases_per_task=10, tasks=["grading", "extraction", "classification"])
    # Short answers keep the run quick; repeats 2 on one task exercises consistency.
    for task, changes in {"grading": {"repeats": 1}, "classification": {"repeats": 2},
                          "extraction": {"repeats": 1, "call_params": {"max_tokens": 48}}}.items():
        task_file = golden / task / "task.yaml"
        data = yaml.safe_load(task_file.read_text())
        data.update(changes)
        task_file.write_text(yaml.safe_dump(data, sort_keys=False))
    registry = yaml.safe_load((PROJECT_ROOT / "models.yaml").read_text())
    port = _free_port()
    registry["local_server"]["port"] = port
    (root / "models.yaml").write_text(yaml.safe_dump(registry, sort_keys=False))

    env = {
        "MODEL_EVAL_GOLDEN_DIR": str(golden), "MODEL_EVAL_REGISTRY": str(root / "models.yaml"),
        "MODEL_EVAL_WAREHOUSE": str(root / "warehouse" / "model_eval.duckdb"), "DAGSTER_HOME": str(root / "dagster_home"),
    }
    mp = pytest.MonkeyPatch()
    for key, value in env.items():
        mp.setenv(key, value)
    for key in ("OPENAI_API_KEY", "ANTHROPIC_API_KEY", "GEMINI_API_KEY"):
        mp.delenv(key, raising=False)

    outputs, codes = [], []
    for _ in range(2):
        buffer = io.StringIO()
        with contextlib.redirect_stdout(buffer):
            codes.append(cli_main(["run"]))
        outputs.append(buffer.getvalue())
    yield {"root": root, "port": port, "outputs": outputs, "codes": codes, "warehouse": Path(env["MODEL_EVAL_WAREHOUSE"]),
           "instance": dg.DagsterInstance.get(), "golden": golden}
    mp.undo()


def _query(evaluated, sql: str):
    with warehouse.read_connection(evaluated["warehouse"]) as conn:
        return conn.sql(sql).fetchall()


def test_cli_runs_succeed_and_print_leaderboards_and_champions(evaluated):
    assert evaluated["codes"] == [0, 0], evaluated["outputs"]
    first = evaluated["outputs"][0]
    for task in ("grading", "extraction", "classification"):
        assert f"== {task} (version v1" in first
    assert first.count("champion:") == 3 and first.count("why: ") == 3
    for model in LOCAL_MODELS:
        assert f"{model}: done in" in first
    assert "skip gpt-4o-mini: environment variable OPENAI_API_KEY is not set" in first
    report = next(line for line in first.splitlines() if line.startswith("report: ")).removeprefix("report: ")
    assert Path(report).is_file() and Path(report).parent.name == "reports"


def test_every_case_and_repeat_answered_once_per_model_per_run(evaluated):
    expected_per_model = 10 * 1 + 10 * 2 + 10 * 1
    rows = _query(evaluated, """
        SELECT eval_run_id, model, count(*), count(DISTINCT (task, case_id, repeat)) FROM inference_results GROUP BY ALL""")
    assert len(rows) == len(LOCAL_MODELS)  # the first eval run's, two models; the unchanged second run wrote none
    for _, model, n, distinct in rows:
        assert model in LOCAL_MODELS and n == distinct == expected_per_model
    assert _query(evaluated, "SELECT count(*) FROM scores")[0][0] == len(LOCAL_MODELS) * expected_per_model
    tokens = _query(evaluated, "SELECT min(input_tokens), min(output_tokens), min(latency_ms) FROM inference_results WHERE error_class IS NULL")[0]
    assert all(value is not None and value > 0 for value in tokens)  # real usage and latency from the server
    costs = _query(evaluated, "SELECT count(*) FILTER (WHERE cost_usd IS NULL AND error_class IS NULL), max(cost_usd) FROM inference_results")[0]
    assert costs == (0, 0.0)  # local models are priced at 0 in the registry: known, not missing


def test_unchanged_rerun_makes_zero_model_calls_and_reuses_every_evaluation(evaluated):
    runs = _query(evaluated, "SELECT eval_run_id, status FROM eval_runs ORDER BY started_at")
    assert [status for _, status in runs] == ["complete", "complete"]
    (first, _), (second, _) = runs
    reused = _query(evaluated, f"SELECT model, task, reused_eval_run_id FROM reused_evaluations WHERE eval_run_id = '{second}'")
    assert sorted(reused) == sorted((m, t, first) for m in LOCAL_MODELS for t in ("classification", "extraction", "grading"))
    for model in LOCAL_MODELS:
        assert f"{model}: unchanged since eval run {first}" in evaluated["outputs"][1]
    # No model was asked anything: each partition was materialized once, by the first run, which sent every call.
    records = evaluated["instance"].fetch_materializations(dg.AssetKey("inference_results"), limit=10).records
    assert sorted(r.partition_key for r in records) == sorted(LOCAL_MODELS)
    for record in records:
        metadata = record.asset_materialization.metadata
        assert metadata["eval_run_id"].value == first and metadata["from_cache"].value == 0 < metadata["calls"].value
    decisions = "SELECT task, policy, champion, runner_up, qualified FROM recommendations WHERE eval_run_id = '{}' ORDER BY ALL"
    assert _query(evaluated, decisions.format(second)) == _query(evaluated, decisions.format(first))


def test_metrics_and_recommendations_cover_every_model_task_and_policy(evaluated):
    metrics = _query(evaluated, "SELECT model, task, cases, calls, accuracy, accuracy_low, accuracy_high, p50_latency_ms FROM model_task_metrics")
    assert len(metrics) == len(LOCAL_MODELS) * 3   # one evaluation of each, reused by the second run
    for model, task, cases, calls, acc, low, high, p50 in metrics:
        assert cases == 10 and calls == (20 if task == "classification" else 10)
        assert 0 <= low <= acc <= high <= 1 and p50 > 0
    recs = _query(evaluated, """
        SELECT task, policy, champion, runner_up, qualified, candidates, reasoning FROM recommendations
        WHERE eval_run_id = (SELECT max(eval_run_id) FROM recommendations)""")
    assert len(recs) == 3 * 7
    for task, policy, champion, runner_up, qualified, candidates, reasoning in recs:
        assert sorted(candidates) == sorted(LOCAL_MODELS)
        assert reasoning
        if champion is None:
            assert runner_up is None and qualified == [] and "no" in reasoning.lower()
        else:
            assert champion in qualified and champion != runner_up


def test_runs_are_in_the_dagster_instance_with_partitions_and_leaderboard(evaluated):
    instance = evaluated["instance"]
    runs = instance.get_runs()
    by_job = {}
    for run in runs:
        by_job.setdefault(run.job_name, []).append(run)
        assert run.status == dg.DagsterRunStatus.SUCCESS
    assert len(by_job["prepare"]) == 2 and len(by_job["recommend"]) == 2
    assert sorted(r.tags["dagster/partition"] for r in by_job["evaluate_model"]) == sorted(LOCAL_MODELS)  # the first run's
    assert set(LOCAL_MODELS) <= set(instance.get_dynamic_partitions("models"))
    record = instance.fetch_materializations(dg.AssetKey("recommendations"), limit=1).records[0]
    board = record.asset_materialization.metadata["leaderboard"].value
    assert "| model | n cases | accuracy (95% CI over cases) |" in board and "smollm2-135m" in board and "gemma3-270m" in board


def test_the_run_stopped_the_server_it_started(evaluated):
    assert not _port_open(evaluated["port"])
