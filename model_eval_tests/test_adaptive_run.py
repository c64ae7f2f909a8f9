"""Adaptive evaluation end to end: `model-eval run --adaptive` and deployment.yaml's switch, through a real
Dagster instance and warehouse, against the scripted OpenAI-compatible server (a TEST DOUBLE for hosted
providers).

One task `alpha`: 40 verdict cases, 3 repeats, threshold 0.6, policy `quality` (accuracy first, so a
model may also be stopped for not beating the champion). The scripted models:

* `oracle`   - right on every case, except that on about a fifth of the cases every third arrival of
  the request is wrong (its repeats disagree there: those cases are unstable);
* `decent-a` and `decent-b` - wrong on about 30% of the cases (different ones), every repeat alike;
  both qualify, both are clearly less accurate than `oracle`; `decent-a` is the assigned model;
* `bad`      - right on about 15% of the cases.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import dagster as dg
import pytest
import yaml

from model_eval import warehouse
from model_eval.adaptive import CANNOT_BEAT, CANNOT_QUALIFY, COMPLETE
from model_eval.definitions import defs
from model_eval.deployment import load_deployment
from model_eval.errors import InputError
from model_eval.metrics import latest_metrics
from model_eval.orchestration import run_evaluation
from model_eval.project import Project
from model_eval.settings import PROJECT_ROOT, ProjectPaths
from model_eval_tests.fake_openai_server import FakeOpenAIServer, ok

CASES, REPEATS, THRESHOLD, MIN_REPEATS = 40, 3, 0.6, 2
TASK = "alpha"


def _unit(*parts) -> int:
    return int(hashlib.sha256(":".join(map(str, parts)).encode()).hexdigest(), 16) % 100


def unstable(case: str) -> bool:
    return _unit("flaky", case) < 20


def script(info):
    case = re.search(r"\[(alpha-\d\d)\]", info.last_message).group(1)
    expected = "PASS" if int(case[-2:]) % 2 == 0 else "FAIL"
    wrong = "FAIL" if expected == "PASS" else "PASS"
    model = info.payload["model"]
    if model == "oracle":
        right = not (unstable(case) and info.attempt % 3 == 2)
    elif model == "bad":
        right = _unit("bad", case) < 15
    else:
        right = _unit(model, case) >= 30
    return ok(expected if right else wrong)


def write_project(root, server, models: list[str], adaptive: dict | None = None) -> dict[str, str]:
    """Golden set, registry and deployment under `root`; returns the environment a `model-eval run` needs."""
    folder = root / "golden" / TASK / "cases"
    folder.mkdir(parents=True)
    spec = yaml.safe_load((PROJECT_ROOT / "golden" / "grading" / "task.yaml").read_text())
    (folder.parent / "task.yaml").write_text(yaml.safe_dump({**spec, "name": TASK, "repeats": REPEATS,
                                                             "qualification_threshold": THRESHOLD, "policy": "quality"}))
    rows = [{"id": f"{TASK}-{i:02d}", "inputs": {"posting": f"Posting number {i}: a data analyst role.",
                                                 "summary": f"[{TASK}-{i:02d}] An analyst role."},
             "expected": "PASS" if i % 2 == 0 else "FAIL"} for i in range(CASES)]
    (folder / "v1.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "models.yaml").write_text(yaml.safe_dump({"models": [
        {"name": m, "model": f"openai/{m}", "api_base": server.api_base, "params": {"temperature": 0.0}, "provider": "fake",
         "price_per_million": {"input": 1.0, "output": 2.0}, "max_concurrency": 4, "timeout_s": 30, "max_attempts": 2}
        for m in models]}))
    deployment = {"initial_assignments": {TASK: "decent-a" if "decent-a" in models else models[0]},
                  # Gates are evaluated (and recorded) every run, but never pass: nothing is promoted between runs.
                  "gates": {"min_cases": 1000, "min_repeats": MIN_REPEATS},
                  "alerts": {"log_file": str(root / "alerts.log")}}
    if adaptive is not None:
        deployment["adaptive"] = adaptive
    (root / "deployment.yaml").write_text(yaml.safe_dump(deployment))
    (root / "dagster_home").mkdir()
    env = {**os.environ, "MODEL_EVAL_GOLDEN_DIR": str(root / "golden"), "MODEL_EVAL_REGISTRY": str(root / "models.yaml"),
           "MODEL_EVAL_DEPLOYMENT": str(root / "deployment.yaml"),
           "MODEL_EVAL_WAREHOUSE": str(root / "warehouse" / "model_eval.duckdb"),
           "DAGSTER_HOME": str(root / "dagster_home"), "no_proxy": "127.0.0.1"}
    env.pop("MODEL_EVAL_CRASH_AT", None)
    return env


def evaluate(env, **kwargs):
    """`run_evaluation` in this process, on the project `env` names, with the instance `model-eval run` would use."""
    with pytest.MonkeyPatch.context() as mp:
        for key, value in env.items():
            if key.startswith("MODEL_EVAL_") or key == "DAGSTER_HOME":
                mp.setenv(key, value)
        project = Project.load(ProjectPaths.from_env())
        instance = dg.DagsterInstance.from_config(env["DAGSTER_HOME"])
        return run_evaluation(defs(), instance, project, list(project.registry.models), [TASK], say=lambda _: None, **kwargs)


def cli_run(env, *args, crash_at: str | None = None) -> subprocess.CompletedProcess:
    env = {**env, **({"MODEL_EVAL_CRASH_AT": crash_at} if crash_at else {})}
    return subprocess.run([sys.executable, "-m", "model_eval.cli", "run", "-q", *args], env=env, cwd=PROJECT_ROOT,
                          capture_output=True, text=True, timeout=300)


def query(env, sql: str, params: list | None = None):
    with warehouse.read_connection(Path(env["MODEL_EVAL_WAREHOUSE"])) as conn:
        return conn.execute(sql, params or []).fetchall()


def statuses(env, eval_run_id: str) -> dict[str, tuple]:
    rows = query(env, """SELECT model, status, cases_scored, calls_made, calls_saved, adaptive, reason FROM evaluation_status
                         WHERE eval_run_id = ? AND task = ?""", [eval_run_id, TASK])
    return {model: tuple(rest) for model, *rest in rows}


def newest_eval_run(env) -> str:
    return query(env, "SELECT eval_run_id FROM eval_runs ORDER BY started_at DESC LIMIT 1")[0][0]


MODELS = ["bad", "decent-a", "decent-b", "oracle"]   # the oracle last: the crash below lands before it is asked


@pytest.fixture(scope="module")
def scenario(tmp_path_factory):
    """Exhaustive run; the same suite asked anew with --adaptive; an adaptive run killed mid-calls; its resumption."""
    root = tmp_path_factory.mktemp("adaptive")
    with FakeOpenAIServer(script) as server:
        env = write_project(root, server, MODELS)
        sent = []
        full = evaluate(env)
        sent.append(server.total)
        adaptive = cli_run(env, "--adaptive", "--fresh")
        sent.append(server.total - sum(sent))
        adaptive_id = newest_eval_run(env)
        crashed = cli_run(env, "--adaptive", "--fresh", crash_at="inference.cached#2")
        crashed_id = newest_eval_run(env)
        resumed = evaluate(env, adaptive=True, max_cache_age_hours=1.0)
    yield {"env": env, "full": full, "adaptive": adaptive, "adaptive_id": adaptive_id, "sent": sent,
           "crashed": crashed, "crashed_id": crashed_id, "resumed": resumed}


def test_off_by_default_every_request_is_asked_and_recorded_complete(scenario):
    env, full = scenario["env"], scenario["full"]
    assert full.ok, full.error or full.failed
    assert scenario["sent"][0] == len(MODELS) * CASES * REPEATS
    recorded = statuses(env, full.eval_run_id)
    assert set(recorded) == set(MODELS)
    for model, (status, scored, made, saved, adaptive, _) in recorded.items():
        assert (status, scored, made, saved, adaptive) == (COMPLETE, CASES, CASES * REPEATS, 0, False), model


def test_adaptive_stops_clearly_worse_models_with_fewer_calls_and_names_the_same_champion(scenario):
    env, run = scenario["env"], scenario["adaptive"]
    assert run.returncode == 0, run.stderr
    adaptive_id, full_id = scenario["adaptive_id"], scenario["full"].eval_run_id
    recorded = statuses(env, adaptive_id)
    full_accuracy = {m: a for m, a in query(env, "SELECT model, accuracy FROM model_task_metrics WHERE eval_run_id = ?", [full_id])}
    # Every decision is right against the exhaustive run's figures: below the threshold, or below the champion.
    for model in ("bad", "decent-a", "decent-b"):
        status, scored, made, saved, adaptive, reason = recorded[model]
        assert status in (CANNOT_QUALIFY, CANNOT_BEAT) and adaptive, (model, status)
        assert scored < CASES and saved > 0 and f"after {scored} of {CASES} cases" in reason
        assert full_accuracy[model] < (THRESHOLD if status == CANNOT_QUALIFY else full_accuracy["oracle"])
    assert recorded["decent-a"][0] == recorded["decent-b"][0] == CANNOT_BEAT   # both qualified in the full run
    assert recorded["oracle"][0] == COMPLETE
    # Every request is either answered or saved, and the server saw exactly the answered ones (--fresh).
    assert sum(r[2] + r[3] for r in recorded.values()) == len(MODELS) * CASES * REPEATS
    assert scenario["sent"][1] == sum(r[2] for r in recorded.values()) <= 0.6 * scenario["sent"][0]

    champions = dict(query(env, "SELECT eval_run_id, champion FROM recommendations WHERE is_task_policy AND task = ?", [TASK]))
    assert champions[adaptive_id] == champions[full_id] == "oracle"
    candidates, qualified, stopped, reasoning = query(env, """
        SELECT candidates, qualified, stopped, reasoning FROM recommendations
        WHERE eval_run_id = ? AND is_task_policy""", [adaptive_id])[0]
    assert candidates == qualified == ["oracle"] and sorted(stopped) == ["bad", "decent-a", "decent-b"]
    for model in stopped:
        assert f"{model} {recorded[model][0]} (after {recorded[model][1]} of {CASES} cases" in reasoning
    # Stopped under every policy too: no policy ranks partial rows.
    for policy, ranked in query(env, "SELECT policy, qualified FROM recommendations WHERE eval_run_id = ?", [adaptive_id]):
        assert set(ranked) <= {"oracle"}, policy
    # The console leaderboard shows each stopped model with its status and the case it stopped at.
    for model in stopped:
        line = next(line for line in run.stdout.splitlines() if line.strip().startswith(model + " "))
        assert f"{recorded[model][0]}, not ranked: after {recorded[model][1]} of {CASES} cases" in line
    # So does the HTML report.
    report = re.search(r"report: (\S+)", run.stdout).group(1)
    page = open(report).read()
    assert "Stopped early (not ranked)" in page and all(model in page for model in stopped)


def test_a_stopped_evaluation_is_no_gate_candidate_and_no_baseline(scenario):
    env = scenario["env"]
    adaptive_id, full_id = scenario["adaptive_id"], scenario["full"].eval_run_id
    # The oracle's gates against the assigned decent-a: Holm over oracle and decent-b in the full run; decent-b,
    # stopped in the adaptive run, is no challenger there.
    comparisons = dict(query(env, """SELECT eval_run_id, comparisons FROM promotion_gates WHERE gate = 'non_inferiority'
                                     AND champion = 'oracle' AND list_contains(?, eval_run_id)""", [[full_id, adaptive_id]]))
    assert comparisons == {full_id: 2, adaptive_id: 1}
    with warehouse.read_connection(Path(env["MODEL_EVAL_WAREHOUSE"])) as conn:
        for model in ("bad", "decent-a", "decent-b"):
            # Its newest figures are the stopped ones, yet gates and baselines read its newest complete evaluation.
            newest = conn.execute("""SELECT eval_run_id, status FROM model_task_metrics WHERE model = ?
                                     ORDER BY evaluated_at DESC LIMIT 1""", [model]).fetchall()[0]
            assert newest[0] in (adaptive_id, scenario["resumed"].eval_run_id) and newest[1].startswith("stopped: ")
            assert latest_metrics(conn, model, TASK, "v1")["eval_run_id"] == full_id


def test_stable_repeats_are_not_asked_and_never_fewer_than_min_repeats(scenario):
    env, adaptive_id = scenario["env"], scenario["adaptive_id"]
    rows = dict(query(env, """SELECT case_id, count(*) FROM inference_results WHERE eval_run_id = ? AND model = 'oracle'
                              GROUP BY case_id""", [adaptive_id]))
    assert len(rows) == CASES
    assert {case: n for case, n in rows.items() if unstable(case)} == {case: REPEATS for case in rows if unstable(case)}
    # A settled case's third repeat is not asked; only a case near the end of the order may have had its third
    # repeat taken up (at most one worker pool, 2 x max_concurrency + 2 = 10) before its first two answers were in.
    settled = [n for case, n in rows.items() if not unstable(case)]
    assert set(settled) <= {MIN_REPEATS, REPEATS} and settled.count(REPEATS) <= 10 and settled.count(MIN_REPEATS) >= len(settled) - 10
    # The oracle's figures are those of the exhaustive run (a settled case's skipped repeats would have agreed).
    figures = query(env, """SELECT eval_run_id, accuracy, cases FROM model_task_metrics WHERE model = 'oracle'
                            AND list_contains(?, eval_run_id) ORDER BY eval_run_id""", [[adaptive_id, scenario["full"].eval_run_id]])
    assert figures[0][1:] == pytest.approx(figures[1][1:])


def test_a_run_killed_mid_calls_and_resumed_makes_the_same_decisions(scenario):
    crashed, resumed = scenario["crashed"], scenario["resumed"]
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr
    assert resumed.ok, resumed.error or resumed.failed
    env = scenario["env"]
    assert statuses(env, scenario["crashed_id"]) == {} or set(statuses(env, scenario["crashed_id"])) < set(MODELS)
    decisions = {m: r[:2] for m, r in statuses(env, resumed.eval_run_id).items()}
    assert decisions == {m: r[:2] for m, r in statuses(env, scenario["adaptive_id"]).items()}


# ---------------------------------------------------------------- the deployment switch and its validation
def test_deployment_turns_it_on_the_flag_turns_it_off_and_the_schedule_stays_exhaustive(tmp_path):
    with FakeOpenAIServer(script) as server:
        env = write_project(tmp_path, server, ["bad", "oracle"], adaptive={"enabled": True, "alpha": 0.05})
        on = evaluate(env)
        asked_on = server.total
        off = evaluate(env, adaptive=False, max_cache_age_hours=0.0)
        asked_off = server.total - asked_on
        # The weekly schedule asks for exhaustive runs although `adaptive.enabled` is true, until `adaptive.schedule` says so.
        asked_by_schedule = {flag: weekly_adaptive_setting(env, tmp_path / "deployment.yaml", flag) for flag in (False, True)}
    assert on.ok and off.ok
    adaptive = statuses(env, on.eval_run_id)
    assert adaptive["bad"][0] == CANNOT_QUALIFY and adaptive["bad"][4]     # no champion yet: only the threshold decides
    assert adaptive["oracle"][0] == COMPLETE and asked_on < 2 * CASES * REPEATS
    assert asked_off == 2 * CASES * REPEATS
    assert {m: r[:1] + r[3:5] for m, r in statuses(env, off.eval_run_id).items()} == {
        "bad": (COMPLETE, 0, False), "oracle": (COMPLETE, 0, False)}
    assert asked_by_schedule == {False: {False}, True: {True}}


def weekly_adaptive_setting(env, deployment, schedule: bool) -> set:
    """The `adaptive` run config of the weekly schedule's requests, with `adaptive.schedule` set as given."""
    settings = yaml.safe_load(deployment.read_text())
    settings["adaptive"]["schedule"] = schedule
    deployment.write_text(yaml.safe_dump(settings))
    from model_eval.defs.resources import ModelEvalResource

    with pytest.MonkeyPatch.context() as mp:
        for key in ("MODEL_EVAL_GOLDEN_DIR", "MODEL_EVAL_REGISTRY", "MODEL_EVAL_DEPLOYMENT", "MODEL_EVAL_WAREHOUSE"):
            mp.setenv(key, env[key])
        with dg.build_schedule_context(instance=dg.DagsterInstance.from_config(env["DAGSTER_HOME"]),
                                       resources={"model_eval": ModelEvalResource()},
                                       scheduled_execution_time=datetime(2026, 11, 29, 1, 0)) as context:
            requests = list(defs().resolve_schedule_def("weekly_evaluation")(context))
    assert len(requests) == 2
    return {r.run_config["ops"]["inference_results"]["config"]["adaptive"] for r in requests}


@pytest.mark.parametrize(("section", "field", "words"), [
    ("adaptive:\n  enabled: yes please\n", "adaptive.enabled", "true or false"),
    ("adaptive:\n  enabled: true\n  alpha: 1.5\n", "adaptive.alpha", "strictly between 0 and 1"),
    ("adaptive:\n  schedule: 1\n", "adaptive.schedule", "true or false"),
    ("adaptive:\n  enabled: true\n  patience: 3\n", "adaptive.patience", "unknown setting"),
    ("adaptive: [enabled]\n", "adaptive", "must be a mapping"),
])
def test_bad_adaptive_settings_name_the_file_line_and_field(tmp_path, section, field, words):
    path = tmp_path / "deployment.yaml"
    path.write_text("gates:\n  min_repeats: 2\n" + section)
    with pytest.raises(InputError) as error:
        load_deployment(path, tmp_path)
    line = next(i for i, text in enumerate(path.read_text().splitlines(), 1) if text.strip().startswith(field.split(".")[-1]))
    assert error.value.field == field and error.value.line == line and words in error.value.message
    assert str(path) in str(error.value)


def test_defaults_are_off_for_runs_and_for_the_schedule(tmp_path):
    path = tmp_path / "deployment.yaml"
    path.write_text("gates:\n  min_repeats: 2\n")
    settings = load_deployment(path, tmp_path).adaptive
    assert (settings.enabled, settings.schedule, settings.alpha) == (False, False, 0.05)
