"""Model partitions run in parallel (separate runs, multiprocess executor, one warehouse) give the
same results as a serial run. Models are served by the scripted fake server (a test double)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import dagster as dg
import yaml

from model_eval import warehouse
from model_eval.defs.resources import EVAL_RUN_TAG
from model_eval_tests.conftest import copy_golden
from model_eval_tests.fake_openai_server import FakeOpenAIServer, slow_body

MODELS = ["alpha", "beta"]

RUN_ONE = """
import sys, dagster as dg
from model_eval.definitions import refresh_model_job_for_reconstruction
model, home = sys.argv[1], sys.argv[2]
instance = dg.DagsterInstance.get()  # DAGSTER_HOME points at the test's instance folder
result = dg.execute_job(dg.reconstructable(refresh_model_job_for_reconstruction), instance=instance,
                        tags={"dagster/partition": model, "model_eval/eval_run_id": "parallel"})
sys.exit(0 if result.success else 1)
"""


def _answer(info):
    digest = hashlib.sha256((info.payload["model"] + json.dumps(info.payload["messages"])).encode()).hexdigest()
    return slow_body(seconds=0.02, chunks=1, text=("PASS " if digest[0] < "8" else "FAIL ") + digest[:8])


def _prepare(root, server, golden):
    root.mkdir()
    registry = root / "models.yaml"
    registry.write_text(yaml.safe_dump({"models": [
        {"name": m, "model": f"openai/{m}", "api_base": server.api_base, "price_per_million": {"input": 1, "output": 1},
         "timeout_s": 30, "max_concurrency": 4} for m in MODELS]}))
    deployment = root / "deployment.yaml"
    deployment.write_text(yaml.safe_dump({"initial_assignments": {}, "alerts": {"log_file": str(root / "alerts.log")}}))
    home = root / "dagster_home"
    home.mkdir()
    env = {**os.environ, "MODEL_EVAL_GOLDEN_DIR": str(golden), "MODEL_EVAL_REGISTRY": str(registry),
           "MODEL_EVAL_DEPLOYMENT": str(deployment), "MODEL_EVAL_WAREHOUSE": str(root / "warehouse" / "model_eval.duckdb"),
           "DAGSTER_HOME": str(home)}
    instance = dg.DagsterInstance.local_temp(tempdir=str(home))
    instance.add_dynamic_partitions("models", MODELS)
    return env, instance


def _rows(root):
    with warehouse.read_connection(root / "warehouse" / "model_eval.duckdb") as conn:
        results = conn.sql("""SELECT model, task, case_id, repeat, response_text FROM inference_results
                              WHERE eval_run_id = 'parallel' ORDER BY ALL""").fetchall()
        scores = conn.sql("""SELECT model, task, case_id, repeat, correct, parsed FROM scores
                             WHERE eval_run_id = 'parallel' ORDER BY ALL""").fetchall()
    return results, scores


def test_parallel_partitions_match_a_serial_run(tmp_path):
    golden = copy_golden(tmp_path / "golden", cases_per_task=10, tasks=["grading", "classification"])
    with FakeOpenAIServer(_answer) as server:
        serial_env, _ = _prepare(tmp_path / "serial", server, golden)
        for model in MODELS:
            subprocess.run([sys.executable, "-c", RUN_ONE, model, serial_env["DAGSTER_HOME"]], env=serial_env, check=True,
                           timeout=600, capture_output=True)
        parallel_env, instance = _prepare(tmp_path / "parallel", server, golden)
        workers = [subprocess.Popen([sys.executable, "-c", RUN_ONE, model, parallel_env["DAGSTER_HOME"]], env=parallel_env,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for model in MODELS]
        for worker in workers:
            _, err = worker.communicate(timeout=600)
            assert worker.returncode == 0, err.decode()[-3000:]
    runs = instance.get_runs(filters=dg.RunsFilter(tags={EVAL_RUN_TAG: "parallel"}))
    assert sorted(r.tags["dagster/partition"] for r in runs) == MODELS and all(r.status == dg.DagsterRunStatus.SUCCESS for r in runs)
    stats = [instance.get_run_stats(r.run_id) for r in runs]
    assert max(s.start_time for s in stats) < min(s.end_time for s in stats), "the two runs did not overlap"
    serial, parallel = _rows(tmp_path / "serial"), _rows(tmp_path / "parallel")
    assert parallel == serial
    assert len(serial[0]) == 2 * (10 + 10) * 3
