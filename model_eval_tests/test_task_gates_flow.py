"""Two tasks through a real Dagster instance: one task's gate fails, the other task is promoted.

Models are served by the scripted local OpenAI-compatible server (a test double for hosted
providers). Each task has 20 cases, 3 repeats. `incumbent` serves both tasks and is right on 14 of
20 cases; `alpha-champ` (alpha only, priced) and `beta-champ` (beta only, no known price) are right
on 19 of 20. beta's champion must be held back by `gate_costs_known`; alpha's must still be promoted,
and the `recommend` run must succeed.
"""

from __future__ import annotations

import json
import re

import dagster as dg
import pytest
import yaml

from model_eval import warehouse
from model_eval.definitions import defs
from model_eval.orchestration import run_evaluation
from model_eval.project import Project
from model_eval.promotion import current_assignments
from model_eval.settings import PROJECT_ROOT, ProjectPaths
from model_eval_tests.conftest import use_project_files
from model_eval_tests.fake_openai_server import FakeOpenAIServer, ok

CASES = 20
RIGHT = {"incumbent": 14, "alpha-champ": 19, "beta-champ": 19}


def write_task(golden, name: str) -> None:
    """A verdict task like the shipped grading task, with 20 generated cases (PASS on even ids)."""
    folder = golden / name / "cases"
    folder.mkdir(parents=True)
    spec = yaml.safe_load((PROJECT_ROOT / "golden" / "grading" / "task.yaml").read_text())
    (golden / name / "task.yaml").write_text(yaml.safe_dump({**spec, "name": name}))
    rows = [{"id": f"{name}-{i:02d}", "inputs": {"posting": f"Posting number {i} for {name}: a data analyst role.",
                                                 "summary": f"[{name}-{i:02d}] An analyst role."},
             "expected": "PASS" if i % 2 == 0 else "FAIL"} for i in range(CASES)]
    (folder / "v1.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def script(info):
    """Right on the first RIGHT[model] cases of each task (by case number), wrong on the rest."""
    found = re.search(r"\[(\w+)-(\d\d)\]", info.last_message)
    number = int(found.group(2))
    expected = "PASS" if number % 2 == 0 else "FAIL"
    wrong = "FAIL" if expected == "PASS" else "PASS"
    return ok(expected if number < RIGHT[info.payload["model"]] else wrong)


@pytest.fixture
def two_tasks(tmp_path, monkeypatch):
    golden = tmp_path / "golden"
    for name in ("alpha", "beta"):
        write_task(golden, name)
    with FakeOpenAIServer(script) as server:
        def entry(name, tasks, price=True):
            model = {"name": name, "model": f"openai/{name}", "api_base": server.api_base, "params": {"temperature": 0.0},
                     "provider": "fake", "max_attempts": 2, "timeout_s": 30, "tasks": tasks}
            if price:
                model["price_per_million"] = {"input": 1.0, "output": 2.0}
            return model

        registry = tmp_path / "models.yaml"
        registry.write_text(yaml.safe_dump({"models": [
            entry("incumbent", ["alpha", "beta"]), entry("alpha-champ", ["alpha"]), entry("beta-champ", ["beta"], price=False)]}))
        deployment = tmp_path / "deployment.yaml"
        # The shipped gate and rollout settings; only the alert log moves into the test folder.
        shipped = yaml.safe_load((PROJECT_ROOT / "deployment.yaml").read_text())
        deployment.write_text(yaml.safe_dump({
            "initial_assignments": {"alpha": "incumbent", "beta": "incumbent"},
            "gates": shipped["gates"], "rollout": shipped["rollout"], "degradation": shipped["degradation"],
            "alerts": {"log_file": str(tmp_path / "alerts.log")}}))
        instance = use_project_files(monkeypatch, tmp_path, golden, registry, deployment)
        yield {"paths": ProjectPaths.from_env(), "instance": instance, "alerts": tmp_path / "alerts.log"}


def _check_evaluations(instance, run_id):
    events = [r.event_log_entry.dagster_event for r in instance.get_records_for_run(run_id).records]
    return {e.event_specific_data.check_name: e.event_specific_data for e in events
            if e is not None and e.event_type_value == "ASSET_CHECK_EVALUATION"}


def test_one_tasks_failing_gate_never_blocks_another_task(two_tasks):
    paths, instance = two_tasks["paths"], two_tasks["instance"]
    project = Project.load(paths)
    outcome = run_evaluation(defs(), instance, project, list(project.registry.models), ["alpha", "beta"], say=lambda _: None)

    # The recommend run succeeded; the gate that held beta back is reported, not raised.
    assert outcome.ok, (outcome.error, outcome.failed)
    assert outcome.blocked == "gate_costs_known (failed for beta; passed for alpha)"
    recommend = instance.get_runs(filters=dg.RunsFilter(job_name="recommend"))[0]
    assert recommend.status == dg.DagsterRunStatus.SUCCESS

    checks = _check_evaluations(instance, recommend.run_id)
    assert set(checks) == {"gate_threshold", "gate_sample_size", "gate_non_inferiority", "gate_costs_known"}
    costs = checks["gate_costs_known"]
    assert not costs.passed and costs.severity == dg.AssetCheckSeverity.WARN
    assert costs.metadata["failed_tasks"].value == ["beta"] and costs.metadata["passed_tasks"].value == ["alpha"]
    assert all(checks[name].passed for name in ("gate_threshold", "gate_sample_size", "gate_non_inferiority"))
    assert "| alpha | pass | 20 |" in checks["gate_non_inferiority"].metadata["tasks"].value

    with warehouse.read_connection(paths.warehouse_file) as conn:
        states = current_assignments(conn)
        gates = conn.sql("""SELECT task, champion, incumbent, gate, passed, n_cases, estimate, ci_high, p_value,
                                   detectable_difference FROM promotion_gates ORDER BY task, gate""").pl()
        blocked = conn.sql("""SELECT task, champion, gate, detail FROM promotion_gates
                              WHERE NOT passed ORDER BY checked_at DESC LIMIT 20""").fetchall()
        decisions = dict(conn.sql("""SELECT task, action FROM model_assignments
                                     QUALIFY row_number() OVER (PARTITION BY task ORDER BY seq DESC) = 1""").fetchall())
        metrics = conn.sql("""SELECT model, task, cases, accuracy, accuracy_low FROM model_task_metrics
                              WHERE task = 'alpha' ORDER BY model""").fetchall()

    # alpha's champion is promoted to shadow; beta keeps its model.
    assert (states["alpha"].model, states["alpha"].stage, states["alpha"].previous_model) == ("alpha-champ", "shadow", "incumbent")
    assert (states["beta"].serving, states["beta"].stage) == ("incumbent", "full")
    assert decisions == {"alpha": "promote", "beta": "initial"}
    # Every gate evaluation is a row, passed or failed: 4 gates x 2 tasks.
    assert gates.height == 8 and gates.filter(~gates["passed"])["gate"].to_list() == ["costs_known"]
    assert blocked[0][:3] == ("beta", "beta-champ", "costs_known") and "no known price" in blocked[0][3]
    alpha = gates.filter((gates["task"] == "alpha") & (gates["gate"] == "non_inferiority")).row(0, named=True)
    assert alpha["n_cases"] == 20 and alpha["estimate"] == pytest.approx(-0.25) and alpha["ci_high"] < 0.05
    assert alpha["p_value"] < 0.05 and alpha["detectable_difference"] > 0
    # The case is the unit: 14 of 20 cases right on every repeat has a lower bound of 0.48, not 0.575.
    assert [(m, n, round(a, 2), round(lo, 3)) for m, _, n, a, lo in metrics] == [
        ("alpha-champ", 20, 0.95, 0.764), ("incumbent", 20, 0.7, 0.481)]
    alerts = [json.loads(line) for line in two_tasks["alerts"].read_text().splitlines()]
    assert {(a["kind"], a["task"]) for a in alerts} == {("promotion", "alpha"), ("gate_failed", "beta")}
