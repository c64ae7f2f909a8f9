"""The real Dagster UI (dagster-webserver) loads the code location and shows the asset graph and jobs."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from model_eval.settings import PROJECT_ROOT


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _graphql(port: int, query: str) -> dict:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/graphql", data=json.dumps({"query": query}).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


@pytest.fixture
def webserver(tmp_path):
    port = _free_port()
    env = {**os.environ, "DAGSTER_HOME": str(tmp_path), "DAGSTER_DISABLE_TELEMETRY": "1"}
    process = subprocess.Popen(
        [sys.executable, "-m", "dagster_webserver", "-w", str(PROJECT_ROOT / "workspace.yaml"), "-h", "127.0.0.1", "-p", str(port)],
        cwd=PROJECT_ROOT, env=env, stdout=subprocess.DEVNULL, stderr=open(tmp_path / "webserver.log", "wb"),
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/server_info", timeout=2).read()
            break
        except OSError:
            if process.poll() is not None:
                pytest.fail("webserver exited: " + (tmp_path / "webserver.log").read_text()[-2000:])
            time.sleep(0.5)
    else:
        process.kill()
        pytest.fail("webserver did not answer within 120 s")
    yield port
    process.terminate()
    process.wait(timeout=30)


def test_ui_loads_the_asset_graph_jobs_and_partitions(webserver):
    data = _graphql(webserver, """{
      assetNodes { assetKey { path } groupName isPartitioned }
      workspaceOrError { ... on Workspace { locationEntries { name locationOrLoadError { __typename
        ... on PythonError { message } } } } }
    }""")["data"]
    entries = data["workspaceOrError"]["locationEntries"]
    assert [e["name"] for e in entries] == ["model_eval"]
    assert entries[0]["locationOrLoadError"]["__typename"] == "RepositoryLocation", entries
    nodes = {n["assetKey"]["path"][0]: n for n in data["assetNodes"]}
    assert set(nodes) == {"golden_cases", "model_registry", "inference_results", "scores", "consensus", "pairwise_win_rates",
                          "model_task_metrics", "model_drift", "recommendations", "production_calls", "model_assignments"}
    assert nodes["inference_results"]["isPartitioned"] and nodes["scores"]["isPartitioned"]
    assert not nodes["recommendations"]["isPartitioned"]
    jobs = _graphql(webserver, """{ repositoriesOrError { ... on RepositoryConnection { nodes { jobs { name } } } } }""")
    names = {j["name"] for j in jobs["data"]["repositoriesOrError"]["nodes"][0]["jobs"]}
    assert {"prepare", "evaluate_model", "recommend", "refresh_model"} <= names
    automation = _graphql(webserver, """{ repositoriesOrError { ... on RepositoryConnection { nodes {
        schedules { name cronSchedule } sensors { name } } } } }""")["data"]["repositoriesOrError"]["nodes"][0]
    assert automation["schedules"] == [{"name": "weekly_evaluation", "cronSchedule": "0 1 * * 0"}]
    assert {s["name"] for s in automation["sensors"]} >= {"new_model_sensor", "golden_version_sensor", "evaluation_complete"}
