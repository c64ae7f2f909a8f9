"""Services stop cleanly and reap what died: `model-eval ui` (dagster dev, its webserver, daemon, code
server and run workers) leaves no process behind on SIGTERM or Ctrl-C, and under it a run left
STARTED by a killed `model-eval run` is marked failed by the reap_dead_runs sensor without anyone
starting a run."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
import urllib.request

import dagster as dg
import pytest
import yaml

from model_eval import warehouse
from model_eval.process_identity import process_started_at
from model_eval.settings import PROJECT_ROOT
from model_eval.supervise import descendants
from model_eval_tests.conftest import copy_golden
from model_eval_tests.fake_openai_server import FakeOpenAIServer, always, hang

# A service whose processes all ignore SIGTERM and SIGINT (as dagster dev's did for 25 s), one of
# them in a session of its own (out of the process group), one a grandchild.
STUBBORN_TREE = textwrap.dedent("""
    import os, signal, subprocess, sys, time
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    stubborn = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); signal.signal(signal.SIGINT, signal.SIG_IGN); time.sleep(600)"
    spawner = "import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', sys.argv[1]]); time.sleep(600)"
    children = [subprocess.Popen([sys.executable, "-c", stubborn]),
                subprocess.Popen([sys.executable, "-c", stubborn], start_new_session=True),
                subprocess.Popen([sys.executable, "-c", spawner, stubborn])]
    time.sleep(1.0)
    with open(sys.argv[1], "w") as out:
        out.write("ready")
    time.sleep(600)
""")

SUPERVISOR = "import sys; from model_eval.supervise import run_service; sys.exit(run_service(sys.argv[1:], grace_s=3.0))"


def _wait_for(condition, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.2)
    pytest.fail(f"timed out after {timeout_s:.0f} s waiting for {what}")


def _alive(pids) -> list[int]:
    return sorted(pid for pid in pids if process_started_at(pid) is not None)


@pytest.mark.parametrize("stop_signal", [signal.SIGTERM, signal.SIGINT])
def test_a_service_tree_that_ignores_signals_is_stopped_whole(tmp_path, stop_signal):
    ready = tmp_path / "ready"
    supervisor = subprocess.Popen([sys.executable, "-c", SUPERVISOR, sys.executable, "-c", STUBBORN_TREE, str(ready)],
                                  cwd=PROJECT_ROOT, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(ready.exists, 60, "the service tree to start")
        tree = descendants(supervisor.pid)
        assert len(tree) == 5, tree   # the service, its three children and the grandchild
        supervisor.send_signal(stop_signal)
        code = supervisor.wait(timeout=10)
        assert code == 128 + stop_signal, supervisor.stderr.read()
        assert _alive(tree) == []
        assert "stopped every process of the service" in supervisor.stderr.read()
    finally:
        for pid in _alive(descendants(supervisor.pid)):
            os.kill(pid, signal.SIGKILL)
        supervisor.kill()


# ---------------------------------------------------------------- model-eval ui
def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_ui_reaps_a_run_left_by_a_killed_process_and_stops_every_process_on_sigterm(tmp_path):
    golden = copy_golden(tmp_path / "golden", cases_per_task=10, tasks=["grading"])
    # Each answer takes 0.1 s, so the 30 calls span several cache writes and the second one is reached.
    with FakeOpenAIServer(always(hang(seconds=0.1))) as server:
        registry = tmp_path / "models.yaml"
        registry.write_text(yaml.safe_dump({"models": [{"name": "fake", "model": "openai/fake", "api_base": server.api_base,
                                                        "price_per_million": {"input": 1, "output": 1}, "max_concurrency": 2}]}))
        deployment = tmp_path / "deployment.yaml"
        deployment.write_text(yaml.safe_dump({"initial_assignments": {}, "alerts": {"log_file": str(tmp_path / "alerts.log")}}))
        home = tmp_path / "dagster_home"
        warehouse_file = tmp_path / "warehouse" / "model_eval.duckdb"
        env = {**os.environ, "DAGSTER_HOME": str(home), "MODEL_EVAL_GOLDEN_DIR": str(golden), "MODEL_EVAL_REGISTRY": str(registry),
               "MODEL_EVAL_DEPLOYMENT": str(deployment), "MODEL_EVAL_WAREHOUSE": str(warehouse_file), "no_proxy": "127.0.0.1"}
        # The situation: `model-eval run` killed in the middle of a run, which stays STARTED.
        killed = subprocess.run([sys.executable, "-m", "model_eval.cli", "run", "-q"], cwd=PROJECT_ROOT, capture_output=True, text=True,
                                env={**env, "MODEL_EVAL_CRASH_AT": "inference.cached#2"}, timeout=600)
        assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    instance = dg.DagsterInstance.from_config(str(home))
    [stuck] = instance.get_runs(filters=dg.RunsFilter(statuses=[dg.DagsterRunStatus.STARTED]))

    port = _free_port()
    ui = subprocess.Popen([sys.executable, "-m", "model_eval.cli", "ui", "--port", str(port)], cwd=PROJECT_ROOT, env=env,
                          stdout=open(tmp_path / "ui.log", "wb"), stderr=subprocess.STDOUT)
    try:
        def webserver_up():
            try:
                return urllib.request.urlopen(f"http://127.0.0.1:{port}/server_info", timeout=2).read()
            except OSError:
                assert ui.poll() is None, (tmp_path / "ui.log").read_text()[-3000:]
                return None

        _wait_for(webserver_up, 180, "the Dagster webserver")
        up_at = time.monotonic()

        def failed():
            run = instance.get_run_by_id(stuck.run_id)
            return run if run.status == dg.DagsterRunStatus.FAILURE else None

        _wait_for(failed, 180, "the reap_dead_runs sensor to mark the dead run failed")
        reaped_after = time.monotonic() - up_at
        message = [r.event_log_entry.dagster_event.message for r in
                   instance.get_records_for_run(stuck.run_id, of_type=dg.DagsterEventType.RUN_FAILURE).records][-1]
        assert "is gone" in message and "reap_dead_runs sensor" in message, message
        status = _wait_for(lambda: _eval_status(warehouse_file, stuck.tags["model_eval/eval_run_id"]) == "incomplete", 60,
                           "the evaluation to be marked incomplete")
        assert status

        tree = descendants(ui.pid)
        assert len(tree) >= 4, tree   # dagster dev, webserver, daemon, code server (at least)
        ui.send_signal(signal.SIGTERM)
        code = ui.wait(timeout=10)
        assert code == 128 + signal.SIGTERM
        log = (tmp_path / "ui.log").read_text()
        assert _alive(tree) == [], log[-3000:]
        stopped = [line for line in log.splitlines() if line.startswith("stopped every process of the service")]
        assert stopped, log[-3000:]
        print(f"\nunder `model-eval ui` the dead run was marked failed {reaped_after:.1f} s after the webserver answered; "
              f"SIGTERM: {len(tree)} processes, {stopped[0]}")
    finally:
        for pid in _alive(descendants(ui.pid)):
            os.kill(pid, signal.SIGKILL)
        ui.kill()
        ui.wait()


def _eval_status(warehouse_file, eval_run_id: str) -> str | None:
    with warehouse.read_connection(warehouse_file) as conn:
        rows = conn.execute("SELECT status FROM eval_runs WHERE eval_run_id = ?", [eval_run_id]).fetchall()
    return rows[0][0] if rows else None
