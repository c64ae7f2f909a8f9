"""Secrets stay out of every output; every listener the project starts is on the loopback address."""

from __future__ import annotations

import socket

import pytest
import yaml

from model_eval.definitions import defs as build_definitions
from model_eval.deployment import load_deployment
from model_eval.errors import InputError
from model_eval.orchestration import run_evaluation
from model_eval.project import Project
from model_eval.registry import load_registry
from model_eval.settings import ProjectPaths
from model_eval_tests.conftest import copy_golden, use_project_files
from model_eval_tests.fake_openai_server import FakeOpenAIServer, ok, server_error
from model_eval_tests.local_receivers import SmtpReceiver, WebhookReceiver

CANARY = "sk-canary-5b8e1d0c9f2a7733"


def _listening_addresses(port: int) -> set[str]:
    """Local addresses with a LISTEN socket on `port`, read from the kernel's tables."""
    found = set()
    for table, width in (("/proc/net/tcp", 8), ("/proc/net/tcp6", 32)):
        try:
            lines = open(table).read().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            address, port_hex = fields[1].split(":")
            if fields[3] == "0A" and int(port_hex, 16) == port:  # 0A = LISTEN
                found.add(socket.inet_ntoa(bytes.fromhex(address)[::-1]) if width == 8 else address)
    return found


def test_test_servers_listen_on_loopback_only():
    with FakeOpenAIServer() as fake, WebhookReceiver() as hook, SmtpReceiver() as smtp:
        for port in (fake.port, hook.port, smtp.port):
            assert _listening_addresses(port) == {"127.0.0.1"}, port


def test_the_local_model_server_refuses_non_loopback_hosts():
    from model_eval.local_server import LocalModelServer, LocalServerError

    with pytest.raises(LocalServerError, match="loopback"):
        LocalModelServer({"m": "smollm2-135m-instruct"}, host="0.0.0.0")
    with pytest.raises(Exception, match="loopback"):
        load_registry_text = "local_server: {host: 0.0.0.0}\nmodels: []\n"
        import tempfile
        from pathlib import Path

        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / "models.yaml"
            path.write_text(load_registry_text)
            load_registry(path)


def test_a_canary_key_never_reaches_warehouse_logs_run_metadata_or_reports(tmp_path, monkeypatch, capfd):
    golden = copy_golden(tmp_path / "golden", cases_per_task=10, tasks=["grading"])
    # The provider echoes the key in its errors (some do); one model gets only errors, one only answers.
    def script(info):
        if info.payload["model"] == "keyed-bad":
            return server_error(401, "Incorrect API key provided", echo_key=True)
        return ok("PASS")

    with FakeOpenAIServer(script) as server, WebhookReceiver() as hook:
        models = [{"name": name, "model": f"openai/{name}", "api_base": server.api_base, "api_key_env": "CANARY_PROVIDER_KEY",
                   "price_per_million": {"input": 1, "output": 1}, "timeout_s": 30, "max_attempts": 1}
                  for name in ("keyed-good", "keyed-bad")]
        (tmp_path / "models.yaml").write_text(yaml.safe_dump({"models": models}))
        (tmp_path / "deployment.yaml").write_text(yaml.safe_dump({
            "initial_assignments": {"grading": "keyed-bad"},
            "alerts": {"log_file": str(tmp_path / "alerts.log"), "webhook_url_env": "CANARY_HOOK"}}))
        monkeypatch.setenv("CANARY_PROVIDER_KEY", CANARY)
        monkeypatch.setenv("CANARY_HOOK", hook.url("/hook"))
        instance = use_project_files(monkeypatch, tmp_path, golden, tmp_path / "models.yaml", tmp_path / "deployment.yaml")
        paths = ProjectPaths.from_env()
        project = Project.load(paths)
        outcome = run_evaluation(build_definitions(), instance, project, list(project.registry.models), ["grading"], say=print,
                                 log_level="DEBUG")
        assert outcome.succeeded == ["keyed-good", "keyed-bad"]
        hook_bodies = [r.body for r in hook.requests]

    # Every file the run wrote: warehouse (public and working copy), cache, staging, snapshot, alerts, Dagster storage.
    for file in tmp_path.rglob("*"):
        if file.is_file():
            assert CANARY.encode() not in file.read_bytes(), file
    # Every event Dagster recorded, with its metadata.
    for run in instance.get_runs():
        for entry in instance.all_logs(run.run_id):
            assert CANARY not in repr(entry), run.job_name
    assert all(CANARY.encode() not in body for body in hook_bodies)
    out, err = capfd.readouterr()
    assert CANARY not in out and CANARY not in err
    # The echoed key was there to leak, and was redacted where the error is recorded.
    from model_eval import warehouse

    with warehouse.read_connection(paths.warehouse_file) as conn:
        messages = [m for (m,) in conn.sql("SELECT DISTINCT error_message FROM inference_results WHERE model = 'keyed-bad'").fetchall()]
    assert messages and all("***" in m for m in messages)


@pytest.mark.parametrize("body,words", [
    ("gates: {min_cases: -1}", ["gates.min_cases", "negative"]),
    ("gates: {colour: 1}", ["gates.colour", "unknown setting"]),
    ("rollout: {partial_share: 1.5}", ["rollout.partial_share", "between 0 and 1"]),
    ("gates: {significance: 0}", ["gates.significance", "strictly between 0 and 1"]),
    ("gates: {non_inferiority_margin: 1.5}", ["gates.non_inferiority_margin", "between 0 and 1"]),
    ("degradation: {min_production_calls: 2.5}", ["degradation.min_production_calls", "whole number"]),
    ("schedule: {cron: 'every sunday'}", ["schedule.cron", "5-field"]),
    ("alerts: {webhook_url_env: 'https://hooks.example/secret'}", ["alerts.webhook_url_env"]),
    ("initial_assignments: [grading]", ["initial_assignments"]),
    ("surprise: {}", ["surprise", "unknown section"]),
    ("gates: [", ["line"]),
])
def test_malformed_deployment_file_names_the_field(tmp_path, body, words):
    path = tmp_path / "deployment.yaml"
    path.write_text(body + "\n")
    with pytest.raises(InputError) as caught:
        load_deployment(path, tmp_path)
    message = str(caught.value)
    assert str(path) in message
    for word in words:
        assert word in message, message
    assert "hooks.example/secret" not in message
