"""Unchanged evaluations are reused, not run again (model_eval/unchanged.py), through a real Dagster
instance and warehouse. Models are served by the scripted OpenAI-compatible server (a test double for
hosted providers). Two tasks (grading, classification; 10 cases each, 3 repeats) and two models."""

from __future__ import annotations

import json
import re

import pytest
import yaml

from model_eval import warehouse
from model_eval.definitions import defs
from model_eval.orchestration import run_evaluation
from model_eval.project import Project
from model_eval.settings import PROJECT_ROOT, ProjectPaths
from model_eval.unchanged import Reuse, inputs_fingerprint
from model_eval_tests.conftest import copy_golden, use_project_files
from model_eval_tests.fake_openai_server import FakeOpenAIServer, ok, server_error

TASKS = ["classification", "grading"]   # the order the project lists them
MODELS = ["first", "second"]
CASES = 10   # the fewest a golden file may have


@pytest.fixture
def project_files(tmp_path, monkeypatch):
    golden = copy_golden(tmp_path / "golden", cases_per_task=CASES, tasks=TASKS)
    first_case = json.loads((golden / "grading" / "cases" / "v1.jsonl").read_text().splitlines()[0])
    marker = next(v for v in first_case["inputs"].values() if isinstance(v, str))[:60]
    state = {"fail_first_case_of": None}

    def script(info):
        if info.payload.get("model") == state["fail_first_case_of"] and marker in info.last_message:
            return server_error(500)
        return ok("PASS")

    with FakeOpenAIServer(script) as server:
        registry = tmp_path / "models.yaml"

        def write_registry(temperature_of_second: float = 0.0, input_price_of_first: float = 1.0):
            registry.write_text(yaml.safe_dump({"models": [
                {"name": name, "model": f"openai/{name}", "api_base": server.api_base, "provider": "fake", "max_attempts": 1,
                 "timeout_s": 30, "price_per_million": {"input": input_price_of_first if name == "first" else 1.0, "output": 2.0},
                 "params": {"temperature": temperature_of_second if name == "second" else 0.0}} for name in MODELS]}))

        write_registry()
        shipped = yaml.safe_load((PROJECT_ROOT / "deployment.yaml").read_text())
        deployment = tmp_path / "deployment.yaml"
        deployment.write_text(yaml.safe_dump({**shipped, "initial_assignments": {t: "first" for t in TASKS},
                                              "alerts": {"log_file": str(tmp_path / "alerts.log")}}))
        instance = use_project_files(monkeypatch, tmp_path, golden, registry, deployment)
        yield {"golden": golden, "instance": instance, "server": server, "state": state, "write_registry": write_registry}


def _evaluate(files, models: list[str] | None = None, **kwargs):
    project = Project.load(ProjectPaths.from_env())
    outcome = run_evaluation(defs(), files["instance"], project, project.registry.select(models), TASKS,
                             say=lambda line: None, **kwargs)
    assert outcome.ok, outcome
    return outcome


def _query(sql: str, params: dict | None = None):
    with warehouse.read_connection(ProjectPaths.from_env().warehouse_file) as conn:
        return conn.sql(sql, params=params).fetchall()


def _job_names(files, outcome):
    return [files["instance"].get_run_by_id(run_id).job_name for run_id in outcome.dagster_run_ids]


def test_an_unchanged_rerun_reuses_every_evaluation_sends_nothing_and_decides_the_same(project_files):
    first = _evaluate(project_files)
    calls = project_files["server"].total
    assert calls > 0 and first.reused == {}

    again = _evaluate(project_files)
    assert project_files["server"].total == calls                    # nothing asked again
    assert again.reused == {m: [Reuse(t, first.eval_run_id) for t in TASKS] for m in MODELS}
    assert _job_names(project_files, again) == ["prepare", "recommend"]   # no model's evaluation ran
    assert _query("SELECT count(*) FROM inference_results WHERE eval_run_id = $r", {"r": again.eval_run_id}) == [(0,)]
    assert sorted(_query("SELECT model, task, reused_eval_run_id FROM reused_evaluations WHERE eval_run_id = $r",
                         {"r": again.eval_run_id})) == sorted((m, t, first.eval_run_id) for m in MODELS for t in TASKS)
    assert _query("SELECT status FROM eval_runs WHERE eval_run_id = $r", {"r": again.eval_run_id}) == [("complete",)]
    # The decision rests on the reused evaluation's figures, and is the one the first run made.
    decisions = """SELECT task, policy, champion, runner_up, source_eval_runs FROM recommendations
                   WHERE eval_run_id = $r ORDER BY task, policy"""
    assert _query(decisions, {"r": again.eval_run_id}) == _query(decisions, {"r": first.eval_run_id})
    assert all(set(runs) == {first.eval_run_id} for *_, runs in _query(decisions, {"r": again.eval_run_id}))
    # Its report says where the figures come from: every leaderboard row is the reused evaluation.
    page = (ProjectPaths.from_env().reports_dir / f"{again.eval_run_id}.html").read_text()
    assert f"{len(MODELS) * len(TASKS)} evaluation(s) found unchanged and reused" in page
    rows = re.findall(r"<tr><td>(first|second)</td>.*?</tr>", page)
    assert len(rows) == len(MODELS) * len(TASKS)
    assert page.count(f'{first.eval_run_id}<br><span class="note">(unchanged, reused)</span>') == len(rows)
    first_page = (ProjectPaths.from_env().reports_dir / f"{first.eval_run_id}.html").read_text()
    assert first_page.count("<td>this run</td>") == len(rows) and "<td>this run</td>" not in page


def test_each_change_reruns_exactly_what_it_touches(project_files):
    first = _evaluate(project_files)

    # A changed expected answer: the task is scored again for every model (its answers come from the cache).
    cases_file = project_files["golden"] / "grading" / "cases" / "v1.jsonl"
    rows = [json.loads(line) for line in cases_file.read_text().splitlines()]
    rows[0]["expected"] = "FAIL" if rows[0]["expected"] == "PASS" else "PASS"
    cases_file.write_text("".join(json.dumps(r) + "\n" for r in rows))
    sent = project_files["server"].total
    relabelled = _evaluate(project_files)
    assert project_files["server"].total == sent
    assert relabelled.reused == {m: [Reuse("classification", first.eval_run_id)] for m in MODELS}
    assert _query("SELECT DISTINCT task FROM inference_results WHERE eval_run_id = $r",
                  {"r": relabelled.eval_run_id}) == [("grading",)]

    # Changed settings of one model: that model is asked again on every task; the other is reused.
    project_files["write_registry"](temperature_of_second=0.5)
    settings = _evaluate(project_files)
    assert settings.reused == {"first": [Reuse("classification", first.eval_run_id), Reuse("grading", relabelled.eval_run_id)]}
    assert project_files["server"].total - sent == CASES * 3 * len(TASKS)   # second's cases x repeats, sent again
    assert _job_names(project_files, settings) == ["prepare", "evaluate_model", "recommend"]
    assert _leaderboard_sources(settings.eval_run_id) == {
        ("first", f'{first.eval_run_id}<br><span class="note">(unchanged, reused)</span>'),
        ("first", f'{relabelled.eval_run_id}<br><span class="note">(unchanged, reused)</span>'), ("second", "this run")}

    # --fresh (cache age 0) reuses nothing and asks everything again.
    sent = project_files["server"].total
    fresh = _evaluate(project_files, max_cache_age_hours=0.0)
    assert fresh.reused == {} and project_files["server"].total - sent == CASES * 3 * len(TASKS) * len(MODELS)

    # A run of one model: the other's figures are its newest evaluation, which this run did not make.
    only_first = _evaluate(project_files, models=["first"])
    assert only_first.reused == {"first": [Reuse(t, fresh.eval_run_id) for t in TASKS]}
    assert _leaderboard_sources(only_first.eval_run_id) == {
        ("first", f'{fresh.eval_run_id}<br><span class="note">(unchanged, reused)</span>'),
        ("second", f'{fresh.eval_run_id}<br><span class="note">(not evaluated in this run)</span>')}


def _leaderboard_sources(eval_run_id: str) -> set[tuple[str, str]]:
    """(model, the report's "evaluated in" cell) of every leaderboard row in the run's report."""
    page = (ProjectPaths.from_env().reports_dir / f"{eval_run_id}.html").read_text()
    return set(re.findall(r"<tr><td>(first|second)</td>.*?<td>(this run|eval-[^<]+<br><span[^>]*>[^<]*</span>)</td></tr>", page))


def test_an_evaluation_with_a_failed_call_is_run_again(project_files):
    project_files["state"]["fail_first_case_of"] = "second"
    first = _evaluate(project_files)
    assert _query("SELECT count(*) FROM inference_results WHERE model = 'second' AND error_class IS NOT NULL") == [(3,)]
    project_files["state"]["fail_first_case_of"] = None
    sent = project_files["server"].total

    again = _evaluate(project_files)
    # second's grading had failed calls: run again, and only its 3 failed calls reach the model.
    assert again.reused == {"first": [Reuse(t, first.eval_run_id) for t in TASKS],
                            "second": [Reuse("classification", first.eval_run_id)]}
    assert project_files["server"].total - sent == 3
    assert _query("SELECT count(*) FROM inference_results WHERE eval_run_id = $r AND error_class IS NOT NULL",
                  {"r": again.eval_run_id}) == [(0,)]
    third = _evaluate(project_files)
    assert third.reused["second"] == [Reuse(t, r) for t, r in (("classification", first.eval_run_id), ("grading", again.eval_run_id))]


def test_a_new_price_costs_the_cached_answers_again_without_asking(project_files):
    first = _evaluate(project_files)
    sent = project_files["server"].total
    project_files["write_registry"](input_price_of_first=3.0)

    repriced = _evaluate(project_files)
    assert project_files["server"].total == sent                      # every answer came from the cache
    assert repriced.reused == {"second": [Reuse(t, first.eval_run_id) for t in TASKS]}   # first was run again
    rows = _query("""SELECT input_tokens, output_tokens, cost_usd FROM inference_results
                     WHERE eval_run_id = $r AND model = 'first'""", {"r": repriced.eval_run_id})
    assert len(rows) == CASES * 3 * len(TASKS) and all(i > 0 for i, _, _ in rows)
    assert all(cost == pytest.approx((3.0 * i + 2.0 * o) / 1e6) for i, o, cost in rows)   # the new price, not the old


def test_the_fingerprint_covers_each_input_and_not_the_order_of_keys():
    base = inputs_fingerprint(["k1", "k2"], "golden-hash", "task-hash", (1.0, 2.0), "code-1")
    assert inputs_fingerprint(["k2", "k1"], "golden-hash", "task-hash", (1, 2), "code-1") == base
    changed = [inputs_fingerprint(["k1", "k3"], "golden-hash", "task-hash", (1.0, 2.0), "code-1"),
               inputs_fingerprint(["k1"], "golden-hash", "task-hash", (1.0, 2.0), "code-1"),
               inputs_fingerprint(["k1", "k2"], "other", "task-hash", (1.0, 2.0), "code-1"),
               inputs_fingerprint(["k1", "k2"], "golden-hash", "other", (1.0, 2.0), "code-1"),
               inputs_fingerprint(["k1", "k2"], "golden-hash", "task-hash", (1.5, 2.0), "code-1"),
               inputs_fingerprint(["k1", "k2"], "golden-hash", "task-hash", None, "code-1"),
               inputs_fingerprint(["k1", "k2"], "golden-hash", "task-hash", (1.0, 2.0), "code-2")]
    assert len({base, *changed}) == 8
