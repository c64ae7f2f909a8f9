"""The warm runner (runner_client.py / runner_server.py): real `model-eval run` processes, a real runner
process, a real Dagster instance and warehouse; the model is the fake OpenAI endpoint (a test double
for a hosted provider), whose answer each test can change while it runs."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import pytest

from model_eval.runner_client import connect, private_socket_dir, receive_message, runner_is_up, send_message, socket_path, stop_runner
from model_eval.process_identity import ProcessIdentity
from model_eval.settings import PROJECT_ROOT
from model_eval_tests.conftest import stub_project_env
from model_eval_tests.fake_openai_server import FakeOpenAIServer, hang, ok

CANARY = "sk-warm-runner-canary-7f3a9c"
CASES, REPEATS = 10, 3            # the grading task asks each case three times
CALLS = CASES * REPEATS


class Project:
    def __init__(self, root: Path, env: dict[str, str], server: FakeOpenAIServer, answer: dict, keys_seen: list):
        self.root, self.env, self.server, self.answer, self.keys_seen = root, env, server, answer, keys_seen
        self.home = root / "dagster_home"

    def run(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        return subprocess.run(self.command(*args), env=self.env, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=timeout)

    def start(self, *args: str) -> subprocess.Popen:
        return subprocess.Popen(self.command(*args), env=self.env, cwd=PROJECT_ROOT, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)

    @staticmethod
    def command(*args: str) -> list[str]:
        return [sys.executable, "-m", "model_eval.cli", "run", "-q", *args]

    def log(self) -> str:
        path = self.home / "runner.log"
        return path.read_text() if path.exists() else ""

    def served_runs(self) -> list[str]:
        return re.findall(r"runner \d+: ran '([^']*)': exit (\d+)", self.log())

    def wait_for_runner(self, timeout_s: float = 90) -> int:
        """The pid of the runner once it accepts connections."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            found = re.findall(r"runner (\d+): serving", self.log())
            if found and runner_is_up(self.home):
                return int(found[-1])
            time.sleep(0.1)
        raise AssertionError(f"no warm runner came up; its log:\n{self.log()}")

    def eval_runs(self) -> list[tuple]:
        with duckdb.connect(str(self.root / "warehouse" / "model_eval.duckdb"), read_only=True) as conn:
            return conn.sql("SELECT eval_run_id, status, owner_process FROM eval_runs ORDER BY started_at").fetchall()


def wait_until(condition, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}").exists() and "zombie" not in Path(f"/proc/{pid}/status").read_text().lower()


@pytest.fixture
def project(tmp_path):
    answer, keys_seen = {"reply": ok("PASS")}, []

    def script(info):
        keys_seen.append(info.authorization)
        return answer["reply"]

    with FakeOpenAIServer(script) as server:
        env = {**stub_project_env(tmp_path, server.api_base, "grading", CASES,
                                  ", api_key_env: WARM_RUNNER_TEST_KEY, timeout_s: 120, max_attempts: 1"),
               "MODEL_EVAL_RUNNER": "warm", "MODEL_EVAL_RUNNER_IDLE_MINUTES": "3", "WARM_RUNNER_TEST_KEY": CANARY}
        project = Project(tmp_path, env, server, answer, keys_seen)
        try:
            yield project
        finally:
            answer["reply"] = ok("PASS")
            stop_runner(project.home)


def start_a_run_that_waits_for_the_model(project: Project) -> subprocess.Popen:
    """A run served by the runner, started once the model hangs; returned when it has called the model."""
    project.answer["reply"] = hang(60)
    waiting = project.start("--fresh")
    wait_until(lambda: project.server.total > CALLS, 60, "the served run to call the model")
    return waiting


def decision(output: str) -> list[str]:
    """What a run printed about its decision: task headers, each leaderboard row's model, n and accuracy
    with its interval, the champion lines and the assignments (latency and speed differ run to run)."""
    kept = []
    for line in output.splitlines():
        if line.startswith("== ") or line.strip().startswith(("champion:", "grading:")):
            kept.append(line.strip())
        elif line.startswith("  stub "):
            kept.append(" ".join(line.split()[:4]))
    return kept


def test_a_later_run_is_served_by_the_warm_runner_with_the_same_result(project):
    first = project.run()
    assert first.returncode == 0, first.stderr[-3000:]
    assert "starting a warm runner" in first.stderr
    assert project.served_runs() == []                      # the first run ran in its own process
    pid = project.wait_for_runner()

    project.answer["reply"] = ok("PASS")
    calls = project.server.total
    second = project.run("--fresh")
    assert second.returncode == 0, second.stderr[-3000:]
    assert project.served_runs() == [("run --in-process -q --fresh", "0")]
    assert project.server.total == calls + CALLS                # it really asked the model again
    assert decision(second.stdout) == decision(first.stdout)   # the same decision, printed to our pipe
    assert len(decision(first.stdout)) == 5
    # The caller's environment reached the run (the key went out in the calls) and nowhere else.
    assert project.keys_seen[-CALLS:] == [f"Bearer {CANARY}"] * CALLS
    assert CANARY not in project.log()
    (first_run, first_status, first_owner), (_, second_status, second_owner) = project.eval_runs()
    assert first_status == second_status == "complete"
    assert ProcessIdentity.from_text(second_owner).pid == pid   # owned by the runner, so a kill is reaped
    assert ProcessIdentity.from_text(first_owner).pid != pid


def test_exit_codes_and_errors_come_back_from_the_runner(project):
    assert project.run().returncode == 0
    project.wait_for_runner()
    bad = project.run("--tasks", "no_such_task")
    assert bad.returncode == 2
    assert "unknown task(s) no_such_task" in bad.stderr
    assert project.served_runs() == [("run --in-process -q --tasks no_such_task", "2")]


def test_a_runner_with_other_code_or_another_instance_steps_aside(project):
    assert project.run().returncode == 0
    pid = project.wait_for_runner()
    with connect(project.home) as conn:
        send_message(conn, {"argv": ["run"], "env": {}, "cwd": "/", "fingerprint": "older-code"}, [0, 1, 2])
        reply, _ = receive_message(conn)
    assert reply == {"stale": True}
    wait_until(lambda: not alive(pid), 30, "the stale runner to exit")
    # The next run runs in its own process and starts a runner of the current code.
    again = project.run()
    assert again.returncode == 0, again.stderr[-3000:]
    second = project.wait_for_runner()
    assert second != pid

    # An instance folder deleted and made again is another instance: its runner steps aside too.
    shutil.rmtree(project.home)
    fresh = project.run()
    assert fresh.returncode == 0, fresh.stderr[-3000:]
    wait_until(lambda: not alive(second), 30, "the runner of the deleted instance to exit")
    assert project.wait_for_runner() not in (pid, second)


def test_ctrl_c_interrupts_the_run_in_the_runner_and_a_run_meanwhile_runs_in_its_own_process(project):
    assert project.run().returncode == 0
    pid = project.wait_for_runner()
    waiting = start_a_run_that_waits_for_the_model(project)

    busy = project.run("--tasks", "no_such_task")             # the runner is busy: this one runs here
    assert busy.returncode == 2 and "unknown task(s)" in busy.stderr

    waiting.send_signal(signal.SIGINT)
    _, err = waiting.communicate(timeout=60)
    # Dagster turns the interrupt into a failed step, as it does for a run in the caller's own process.
    assert waiting.returncode != 0 and "DagsterExecutionInterruptedError" in err, err[-3000:]
    assert project.served_runs() == [("run --in-process -q --fresh", str(waiting.returncode))]   # not the busy one
    wait_until(lambda: not alive(pid), 30, "the interrupted runner to exit")
    statuses = [status for _, status, _ in project.eval_runs()]
    assert statuses[0] == "complete" and statuses[-1] != "running"

    project.answer["reply"] = ok("PASS")
    after = project.run()
    assert after.returncode == 0, after.stderr[-3000:]


def test_a_runner_killed_during_a_run_fails_that_run_and_the_next_one_reaps_it(project):
    assert project.run().returncode == 0
    pid = project.wait_for_runner()
    waiting = start_a_run_that_waits_for_the_model(project)
    os.kill(pid, signal.SIGKILL)
    _, err = waiting.communicate(timeout=60)
    assert waiting.returncode == 1
    assert f"the warm runner (pid {pid}) ended during the run" in err

    project.answer["reply"] = ok("PASS")
    after = project.run()
    assert after.returncode == 0, after.stderr[-3000:]
    runs = project.eval_runs()
    assert [status for _, status, _ in runs] == ["complete", "incomplete", "complete"]


def test_an_idle_runner_exits(project):
    project.env["MODEL_EVAL_RUNNER_IDLE_MINUTES"] = "0.03"   # about 2 s
    assert project.run().returncode == 0
    wait_until(lambda: "idle for 2 s: exiting" in project.log(), 120, "the runner to come up and go idle")
    pid = int(re.findall(r"runner (\d+): serving", project.log())[-1])
    wait_until(lambda: not alive(pid), 30, "the idle runner to exit")
    assert not socket_path(project.home).exists()


def test_no_runner_when_its_folder_is_open_to_others(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    assert private_socket_dir() == tmp_path / f"model-eval-runner-{os.getuid()}"
    (tmp_path / f"model-eval-runner-{os.getuid()}").chmod(0o755)
    assert private_socket_dir() is None


def test_a_caller_killed_during_its_run_interrupts_it_in_the_runner(project):
    assert project.run().returncode == 0
    pid = project.wait_for_runner()
    waiting = start_a_run_that_waits_for_the_model(project)
    waiting.kill()                                   # SIGKILL: the caller cannot say anything, its socket closes
    waiting.communicate(timeout=30)
    wait_until(lambda: not alive(pid), 60, "the runner to interrupt the run and exit")
    assert "that run was interrupted" in project.log()
    assert [status for _, status, _ in project.eval_runs()][-1] == "incomplete"


def ignored_signals(pid: int) -> set[int]:
    mask = int(re.search(r"SigIgn:\s*([0-9a-f]+)", Path(f"/proc/{pid}/status").read_text()).group(1), 16)
    return {signum for signum in (signal.SIGINT, signal.SIGTERM) if mask & (1 << (signum - 1))}


def ignore_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)   # what a shell does to a command started with `&`


def test_a_run_started_in_the_background_leaves_sigterm_working(project):
    # Dagster's interrupt capture leaves SIGTERM with SIGINT's handler after an in-process run: here
    # SIG_IGN, which every process started afterwards (a local model server) would inherit.
    script = ("import re, signal, sys; from model_eval.cli import main; code = main(['run', '--in-process', '-q']); "
              "mask = int(re.search(r'SigIgn:\\s*([0-9a-f]+)', open('/proc/self/status').read()).group(1), 16); "
              "print('sigterm ignored' if mask & (1 << (signal.SIGTERM - 1)) else 'sigterm default', code)")
    done = subprocess.run([sys.executable, "-c", script], env={**project.env, "MODEL_EVAL_RUNNER": "off"}, cwd=PROJECT_ROOT,
                          capture_output=True, text=True, timeout=300, preexec_fn=ignore_sigint)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "sigterm default 0"


def test_a_runner_started_by_a_background_caller_can_be_interrupted_and_stopped(project):
    first = subprocess.run(project.command(), env=project.env, cwd=PROJECT_ROOT, capture_output=True, text=True,
                           timeout=300, preexec_fn=ignore_sigint)
    assert first.returncode == 0, first.stderr[-3000:]
    pid = project.wait_for_runner()
    served = project.run()                          # a run in the runner: Dagster's interrupt capture ran there
    assert served.returncode == 0 and len(project.served_runs()) == 1, served.stderr[-3000:]
    assert ignored_signals(pid) == set()            # SIGINT interrupts its runs, SIGTERM stops it
    os.kill(pid, signal.SIGTERM)
    wait_until(lambda: not alive(pid), 30, "the runner to stop on SIGTERM")
