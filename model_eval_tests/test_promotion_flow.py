"""Promotion through real Dagster runs: gate checks, staged rollout, automatic rollback, alerts.

Models are served by the scripted local OpenAI-compatible server (a test double for hosted
providers): `always-pass` answers PASS to everything; the `oracle` models answer each grading case
correctly (the script looks the expected verdict up from the golden file). Alerts go to a local
webhook receiver, a local SMTP receiver and the log file.
"""

from __future__ import annotations

import json

import dagster as dg
import pytest
import yaml

from model_eval import warehouse
from model_eval.definitions import defs
from model_eval.orchestration import run_evaluation
from model_eval.project import Project
from model_eval.promotion import current_assignments
from model_eval.router import Router
from model_eval.settings import ProjectPaths
from model_eval_tests.conftest import copy_golden, use_project_files
from model_eval_tests.fake_openai_server import FakeOpenAIServer, ok, server_error
from model_eval_tests.local_receivers import SmtpReceiver, WebhookReceiver

DEFINITIONS = defs()


def oracle_script(golden_dir):
    """Right answers for the oracle models, PASS for always-pass; `broken` models get 500s."""
    cases = [json.loads(line) for line in (golden_dir / "grading" / "cases" / "v1.jsonl").read_text().splitlines()]
    verdict_by_summary = {c["inputs"]["summary"][:80]: c["expected"] for c in cases}
    broken: set[str] = set()

    def script(info):
        model = info.payload.get("model")
        if model in broken:
            return server_error(503)
        if model == "always-pass":
            return ok("PASS")
        for summary, verdict in verdict_by_summary.items():
            if summary in info.last_message:
                return ok(verdict)
        return ok("I cannot tell")

    return script, broken


@pytest.fixture
def setup(tmp_path, monkeypatch):
    golden = copy_golden(tmp_path / "golden", tasks=["grading"])
    script, broken = oracle_script(golden)
    webhook = WebhookReceiver()
    smtp = SmtpReceiver()
    with FakeOpenAIServer(script) as server, webhook, smtp:
        def entry(name, price=True):
            model = {"name": name, "model": f"openai/{name}", "api_base": server.api_base, "params": {"temperature": 0.0},
                     "provider": "fake", "max_attempts": 2, "timeout_s": 30}
            if price:
                model["price_per_million"] = {"input": 1.0, "output": 2.0}
            return model

        registry = tmp_path / "models.yaml"
        registry.write_text(yaml.safe_dump({"models": [entry("always-pass"), entry("oracle", price=False)]}))
        deployment = tmp_path / "deployment.yaml"
        deployment.write_text(yaml.safe_dump({
            "initial_assignments": {"grading": "always-pass"},
            # Three evaluations run back to back within seconds and no application logs calls, so the stage
            # rules that need hours and production calls are off here; test_rollout.py covers them.
            "rollout": {"partial_share": 0.25, "min_hours_in_stage": 0, "min_production_calls": 0},
            "alerts": {"log_file": str(tmp_path / "alerts.log"), "webhook_url_env": "TEST_ALERT_WEBHOOK",
                       "smtp": {"host": "127.0.0.1", "port": smtp.port, "sender": "me@example.org",
                                "recipients": ["team@example.org"]}},
        }))
        monkeypatch.setenv("TEST_ALERT_WEBHOOK", webhook.url("/hooks/T000/canary-secret"))
        instance = use_project_files(monkeypatch, tmp_path, golden, registry, deployment)
        yield {"paths": ProjectPaths.from_env(), "instance": instance, "registry_file": registry, "broken": broken,
               "webhook": webhook, "smtp": smtp, "tmp": tmp_path}


def evaluate(setup, fresh=False):
    project = Project.load(setup["paths"])
    return run_evaluation(DEFINITIONS, setup["instance"], project, list(project.registry.models), ["grading"], say=lambda _: None,
                          max_cache_age_hours=0.0 if fresh else None)


def state(setup):
    with warehouse.read_connection(setup["paths"].warehouse_file) as conn:
        return current_assignments(conn)["grading"]


def check_results(setup, run_id):
    return {e.check_name: e.passed
            for e in (r.event_log_entry.dagster_event.event_specific_data for r in
                      setup["instance"].get_records_for_run(run_id).records if r.event_log_entry.dagster_event
                      and r.event_log_entry.dagster_event.event_type_value == "ASSET_CHECK_EVALUATION")}


def test_a_failing_gate_holds_the_task_back_is_recorded_and_is_not_a_failed_run(setup):
    outcome = evaluate(setup)
    assert state(setup).model == "always-pass" and state(setup).stage == "full"
    with warehouse.read_connection(setup["paths"].warehouse_file) as conn:
        champion = conn.sql("SELECT champion FROM recommendations WHERE task = 'grading' AND is_task_policy").fetchall()
        gates = dict(conn.sql("SELECT gate, passed FROM promotion_gates").fetchall())
        blocked = conn.sql("SELECT detail FROM promotion_gates WHERE gate = 'costs_known' AND NOT passed").fetchall()
        last = conn.sql("SELECT action FROM model_assignments ORDER BY seq DESC LIMIT 1").fetchall()
    assert champion == [("oracle",)]
    # The unpriced oracle's cost is unknown: the gate fails for grading (a WARN check), the run succeeds,
    # and model_assignments runs, recording nothing for grading but the initial assignment.
    runs = setup["instance"].get_runs(filters=dg.RunsFilter(job_name="recommend"))
    assert runs[0].status == dg.DagsterRunStatus.SUCCESS
    checks = check_results(setup, runs[0].run_id)
    assert checks["gate_costs_known"] is False and checks["gate_threshold"] is True
    assert outcome.ok and outcome.blocked == "gate_costs_known (failed for grading)"
    assert gates == {"threshold": True, "sample_size": True, "non_inferiority": True, "costs_known": False}
    assert blocked and "no known price" in blocked[0][0] and last == [("initial",)]
    # Promotion materialized alone (no gate checks in its run) finds no gate rows for its run: blocked, not promoted.
    DEFINITIONS.resolve_job_def("recommend").execute_in_process(
        instance=setup["instance"], asset_selection=[dg.AssetKey("model_assignments")], raise_on_error=False)
    assert state(setup).model == "always-pass"
    alerts = [json.loads(line) for line in (setup["tmp"] / "alerts.log").read_text().splitlines()]
    assert [a["kind"] for a in alerts] == ["gate_failed", "gate_failed"]
    assert "no recorded result" in alerts[-1]["details"]


def _set_oracle_price(setup):
    data = yaml.safe_load(setup["registry_file"].read_text())
    for model in data["models"]:
        if model["name"] == "oracle":
            model["price_per_million"] = {"input": 1.0, "output": 2.0}
    setup["registry_file"].write_text(yaml.safe_dump(data))


def test_champion_rolls_out_in_stages_then_degrades_and_is_rolled_back_with_alerts(setup):
    _set_oracle_price(setup)
    router_file = setup["paths"].snapshot_file
    stages = []
    for _ in range(3):
        outcome = evaluate(setup)
        assert outcome.ok and outcome.blocked is None, (outcome.error, outcome.blocked)
        current = state(setup)
        stages.append((current.model, current.stage, current.traffic_share, current.previous_model))
    assert stages == [("oracle", "shadow", 0.0, "always-pass"), ("oracle", "partial", 0.25, "always-pass"),
                      ("oracle", "full", 1.0, "always-pass")]

    # Applications follow the published snapshot: at full, every request goes to the oracle.
    decision = Router(router_file).route("grading", "user-42")
    assert decision.primary.model == "oracle" and decision.shadow is None

    # The oracle starts failing: the next (fresh) re-evaluation sees it and restores the previous model.
    setup["broken"].add("oracle")
    evaluate(setup, fresh=True)
    restored = state(setup)
    assert (restored.model, restored.stage, restored.previous_model) == ("always-pass", "full", "oracle")
    with warehouse.read_connection(setup["paths"].warehouse_file) as conn:
        actions = [a for (a,) in conn.sql("SELECT action FROM model_assignments WHERE task = 'grading' ORDER BY seq").fetchall()]
        reason = conn.sql("SELECT reason FROM model_assignments ORDER BY seq DESC LIMIT 1").fetchall()[0][0]
    assert actions == ["initial", "promote", "advance", "advance", "rollback"]
    assert "success rate" in reason and "restoring always-pass" in reason
    assert Router(router_file).route("grading", "user-42").primary.model == "always-pass"

    # Every change reached every channel; the webhook's secret path never reached the log file.
    kinds = [json.loads(line)["kind"] for line in (setup["tmp"] / "alerts.log").read_text().splitlines()]
    assert kinds == ["promotion", "promotion", "promotion", "rollback"]
    texts = [r.json()["text"] for r in setup["webhook"].requests]
    assert len(texts) == 4 and "rollback" in texts[-1] and "[CRITICAL]" in texts[-1]
    subjects = [m.message["Subject"] for m in setup["smtp"].messages]
    assert len(subjects) == 4 and subjects[-1].startswith("[model_eval] [CRITICAL]")
    assert "canary-secret" not in (setup["tmp"] / "alerts.log").read_text()


def test_a_broken_alert_channel_never_fails_the_pipeline(setup, monkeypatch):
    _set_oracle_price(setup)
    monkeypatch.setenv("TEST_ALERT_WEBHOOK", "http://127.0.0.1:9/closed-port")
    deployment = setup["paths"].deployment_file
    data = yaml.safe_load(deployment.read_text())
    data["alerts"]["smtp"]["port"] = 9  # nothing listens there
    deployment.write_text(yaml.safe_dump(data))
    outcome = evaluate(setup)
    assert outcome.ok and state(setup).stage == "shadow"
    assert "promotion" in (setup["tmp"] / "alerts.log").read_text()


def test_degradation_seen_in_logged_production_calls_rolls_back(setup):
    from model_eval.router import CallLog

    _set_oracle_price(setup)
    for _ in range(3):
        assert evaluate(setup).ok
    assert (state(setup).model, state(setup).stage) == ("oracle", "full")

    # An application routes its requests and logs them; most calls to the oracle now fail.
    router = Router(setup["paths"].snapshot_file)
    calls = CallLog(setup["paths"].call_log_dir)
    for i in range(120):  # above degradation.min_production_calls (100): fewer would not be judged
        decision = router.route("grading", f"request-{i}")
        calls.record(decision, decision.primary.model, latency_ms=20.0, input_tokens=100, output_tokens=2,
                     success=i % 4 == 0, error=None if i % 4 == 0 else "upstream 503", role="primary")

    outcome = evaluate(setup)  # unchanged evaluation (all cached): only the production log shows the problem
    assert outcome.ok
    restored = state(setup)
    assert (restored.model, restored.previous_model) == ("always-pass", "oracle")
    with warehouse.read_connection(setup["paths"].warehouse_file) as conn:
        reason = conn.sql("SELECT reason FROM model_assignments ORDER BY seq DESC LIMIT 1").fetchall()[0][0]
        logged = conn.sql("SELECT count(*), count(*) FILTER (WHERE success) FROM production_calls").fetchall()[0]
    assert logged == (120, 30)
    assert "120 logged production calls succeeded at 0.25" in reason and "binomial" in reason
