"""A crash never wedges the pipeline: `model-eval run` killed with SIGKILL at chosen moments, then run again.

The moments are named crash points (model_eval/crash_points.py): the process kills itself exactly
there, inside Dagster runs, inside warehouse writes, between commit and publish, mid-way through
the model calls. Each kill is followed by another `model-eval run` on the same Dagster instance and
warehouse, which must reap what the killed one left, and the last run must complete. Models are
served by the scripted OpenAI-compatible server (a test double for hosted providers).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass

import dagster as dg
import pytest
import yaml

from model_eval import warehouse
from model_eval.response_cache import ResponseCache
from model_eval.settings import PROJECT_ROOT
from model_eval_tests.conftest import copy_golden
from model_eval_tests.fake_openai_server import FakeOpenAIServer, slow_body
from model_eval_tests.test_promotion_flow import oracle_script

MODELS = ["oracle", "always-pass"]
CASES, REPEATS = 10, 3
TOTAL_CALLS = len(MODELS) * CASES * REPEATS

# In the order the pipeline reaches them. Each is where one run dies; the next run starts from there.
KILL_POINTS = [
    ("golden.write", "prepare: inside the golden_cases write transaction (the run that wedged the pool)"),
    ("warehouse.publish@golden.write", "prepare: the atomic publish of the golden cases, copied but not renamed"),
    ("inference.cached#3", "model calls of the first model, after 3 batches of answers were cached"),
    ("inference.write", "first model: inside the inference_results write transaction"),
    ("scores.scored", "first model: scoring done, nothing written"),
    ("warehouse.committed@scores.scored", "first model: scores committed in the private copy, not yet published"),
    ("inference.cached#2", "model calls of the second model, after 2 batches of answers were cached"),
    ("warehouse.publish@inference.write#2", "second model: the atomic publish of its inference results"),
    ("metrics.write", "recommend: inside the metrics transaction that admits the evaluation"),
    ("recommendations.write", "recommend: metrics written, recommendations not"),
    ("promotion.write", "promotion: inside the assignment transaction"),
    ("warehouse.publish@promotion.write", "promotion: committed, publish killed half-way"),
]
# Kills from here on land after the evaluation's scores were admitted to metrics (it is complete).
ADMITTED_FROM = "recommendations.write"


def _answer_slowly(script):
    # Each answer takes 0.05 s on top of the client's own cost, 2 in flight: a kill lands with answers
    # cached and calls in flight.
    def slow(info):
        reply = script(info)
        return slow_body(seconds=0.1, chunks=2, text=reply.text)
    return slow


@dataclass
class Project:
    env: dict[str, str]
    root: object
    server: FakeOpenAIServer

    @property
    def warehouse_file(self):
        return self.root / "warehouse" / "model_eval.duckdb"

    @property
    def cache_file(self):
        return self.root / "warehouse" / "cache" / "responses.sqlite"

    def cached(self) -> int:
        if not self.cache_file.exists():
            return 0
        with ResponseCache(self.cache_file) as cache:
            return cache.count()

    def run(self, crash_at: str | None = None) -> tuple[subprocess.CompletedProcess, int, float]:
        """`model-eval run` in a process of its own; returns it, the calls it sent and its wall time."""
        env = dict(self.env)
        if crash_at:
            env["MODEL_EVAL_CRASH_AT"] = crash_at
        sent_before, started = self.server.total, time.monotonic()
        done = subprocess.run([sys.executable, "-m", "model_eval.cli", "run", "-q"], env=env, cwd=PROJECT_ROOT,
                              capture_output=True, text=True, timeout=600)
        return done, self.server.total - sent_before, time.monotonic() - started

    def instance(self) -> dg.DagsterInstance:
        return dg.DagsterInstance.from_config(self.env["DAGSTER_HOME"])

    def query(self, sql: str, params=None):
        with warehouse.read_connection(self.warehouse_file) as conn:
            return conn.sql(sql, params=params).fetchall()


def _project(root, server, golden) -> Project:
    root.mkdir()
    registry = root / "models.yaml"
    registry.write_text(yaml.safe_dump({"models": [
        {"name": m, "model": f"openai/{m}", "api_base": server.api_base, "params": {"temperature": 0.0}, "provider": "fake",
         "price_per_million": {"input": 1.0, "output": 2.0}, "max_concurrency": 2, "timeout_s": 30, "max_attempts": 2}
        for m in MODELS]}))
    deployment = root / "deployment.yaml"
    deployment.write_text(yaml.safe_dump({
        "initial_assignments": {"grading": "always-pass"},
        "gates": {"min_cases": CASES, "min_repeats": 2, "significance": 0.05},
        "rollout": {"partial_share": 0.2, "min_hours_in_stage": 0, "min_production_calls": 0},
        "alerts": {"log_file": str(root / "alerts.log")}}))
    (root / "dagster_home").mkdir()
    env = {**os.environ, "MODEL_EVAL_GOLDEN_DIR": str(golden), "MODEL_EVAL_REGISTRY": str(registry),
           "MODEL_EVAL_DEPLOYMENT": str(deployment), "MODEL_EVAL_WAREHOUSE": str(root / "warehouse" / "model_eval.duckdb"),
           "DAGSTER_HOME": str(root / "dagster_home"), "no_proxy": "127.0.0.1"}
    env.pop("MODEL_EVAL_CRASH_AT", None)
    return Project(env=env, root=root, server=server)


EVALUATION_ROWS = {
    "inference_results": "SELECT model, task, case_id, repeat, response_text, error_class, input_tokens, output_tokens, cost_usd "
                         "FROM inference_results WHERE eval_run_id = $id ORDER BY ALL",
    "scores": "SELECT model, task, case_id, repeat, score, correct, parsed, call_failed FROM scores WHERE eval_run_id = $id ORDER BY ALL",
    "model_task_metrics": "SELECT model, task, dataset_version, cases, calls, accuracy, accuracy_low, accuracy_high, correctness, "
                          "consistency, success_rate, mean_input_tokens, mean_output_tokens, total_cost_usd "
                          "FROM model_task_metrics WHERE eval_run_id = $id ORDER BY ALL",
    "recommendations": "SELECT task, dataset_version, policy, champion, runner_up, qualified, candidates "
                       "FROM recommendations WHERE eval_run_id = $id ORDER BY ALL",
}


def _evaluation_rows(project: Project, eval_run_id: str) -> dict[str, list]:
    return {table: project.query(sql, {"id": eval_run_id}) for table, sql in EVALUATION_ROWS.items()}


def _newest_eval_run(project: Project) -> tuple[str, str, str | None]:
    return project.query("SELECT eval_run_id, status, status_reason FROM eval_runs ORDER BY started_at DESC LIMIT 1")[0]


@pytest.fixture(scope="module")
def crashed_and_clean(tmp_path_factory):
    """One instance killed at every point in turn and then run to the end; another never interrupted."""
    base = tmp_path_factory.mktemp("crash")
    golden = copy_golden(base / "golden", cases_per_task=CASES, tasks=["grading"])
    script, _ = oracle_script(golden)
    with FakeOpenAIServer(_answer_slowly(script)) as server:
        clean = _project(base / "clean", server, golden)
        done, clean_sent, clean_s = clean.run()
        assert done.returncode == 0, done.stderr[-3000:]
        clean_eval = _newest_eval_run(clean)[0]

        crashed = _project(base / "crashed", server, golden)
        kills = []
        for point, _ in KILL_POINTS:
            uncached = TOTAL_CALLS - crashed.cached()
            done, sent, wall = crashed.run(crash_at=point)
            kills.append({"point": point, "done": done, "sent": sent, "uncached_before": uncached, "wall_s": wall,
                          "eval": _newest_eval_run(crashed)[0]})
        uncached = TOTAL_CALLS - crashed.cached()
        final, final_sent, final_s = crashed.run()
        yield {"clean": clean, "clean_eval": clean_eval, "clean_sent": clean_sent, "clean_s": clean_s, "crashed": crashed,
               "kills": kills, "final": final, "final_sent": final_sent, "final_uncached": uncached, "final_s": final_s,
               "server": server, "golden": golden}


def test_every_kill_point_was_reached_and_killed_the_run(crashed_and_clean):
    for kill in crashed_and_clean["kills"]:
        done = kill["done"]
        assert done.returncode == -signal.SIGKILL, (kill["point"], done.returncode, done.stderr[-3000:])
        assert f"crash point {kill['point']} reached" in done.stderr


def test_each_next_run_reaps_the_killed_runs_and_says_so(crashed_and_clean):
    kills, final = crashed_and_clean["kills"], crashed_and_clean["final"]
    outputs = [k["done"].stdout for k in kills[1:]] + [final.stdout]
    for kill, output in zip(kills, outputs):
        assert "reaped dead run" in output and "marked failed" in output, (kill["point"], output[-2000:])
    instance = crashed_and_clean["crashed"].instance()
    runs = instance.get_runs()
    assert not [r for r in runs if r.status in (dg.DagsterRunStatus.STARTED, dg.DagsterRunStatus.STARTING)]
    failed = [r for r in runs if r.status == dg.DagsterRunStatus.FAILURE]
    assert len(failed) == len(KILL_POINTS)  # exactly the run each kill interrupted
    for run in failed:
        messages = [r.event_log_entry.dagster_event.message for r in instance.get_records_for_run(
            run.run_id, of_type=dg.DagsterEventType.RUN_FAILURE).records]
        assert any("is gone" in (m or "") for m in messages), messages
    assert not instance.event_log_storage.get_concurrency_run_ids()  # no pool slot held by anyone


def test_the_run_after_the_last_kill_completes_and_sends_only_unfinished_calls(crashed_and_clean):
    final = crashed_and_clean["final"]
    assert final.returncode == 0, final.stderr[-3000:]
    assert crashed_and_clean["final_sent"] == crashed_and_clean["final_uncached"]
    for kill in crashed_and_clean["kills"]:
        # A killed run never sent a call whose answer was already cached when it started.
        assert kill["sent"] <= kill["uncached_before"], kill
    assert crashed_and_clean["crashed"].cached() == TOTAL_CALLS
    assert sum(k["sent"] for k in crashed_and_clean["kills"]) > 0
    _print_figures(crashed_and_clean)


def _print_figures(crashed_and_clean) -> None:
    """The figures the README quotes (seen with pytest -s)."""
    kills = crashed_and_clean["kills"]
    print(f"\n{len(kills)} kill points; uninterrupted run {crashed_and_clean['clean_s']:.1f} s, {crashed_and_clean['clean_sent']} calls sent")
    for kill in kills:
        print(f"  {kill['point']:<40} died after {kill['wall_s']:5.1f} s, sent {kill['sent']:3d} of {kill['uncached_before']:3d} uncached calls")
    print(f"  final run: {crashed_and_clean['final_s']:.1f} s, sent {crashed_and_clean['final_sent']} "
          f"(= the {crashed_and_clean['final_uncached']} calls not cached); total sent over all runs "
          f"{sum(k['sent'] for k in kills) + crashed_and_clean['final_sent']} for {TOTAL_CALLS} calls")


def test_the_recovered_evaluation_has_the_rows_of_an_uninterrupted_one(crashed_and_clean):
    crashed = crashed_and_clean["crashed"]
    final_eval, status, _ = _newest_eval_run(crashed)
    assert status == "complete"
    # The last kills land after an evaluation was admitted, so the final run finds it unchanged and
    # reuses it (model_eval/unchanged.py): the results are that evaluation's, the decision the final run's.
    reused = crashed.query("SELECT DISTINCT reused_eval_run_id FROM reused_evaluations WHERE eval_run_id = $id", {"id": final_eval})
    assert len(reused) == 1, reused
    recovered = {**_evaluation_rows(crashed, reused[0][0]), "recommendations": _evaluation_rows(crashed, final_eval)["recommendations"]}
    uninterrupted = _evaluation_rows(crashed_and_clean["clean"], crashed_and_clean["clean_eval"])
    assert recovered == uninterrupted
    assert len(recovered["inference_results"]) == TOTAL_CALLS and len(recovered["scores"]) == TOTAL_CALLS
    assert recovered["model_task_metrics"] and recovered["recommendations"]


def test_killed_evaluations_are_incomplete_and_never_feed_metrics(crashed_and_clean):
    crashed = crashed_and_clean["crashed"]
    statuses = dict((e, (s, r)) for e, s, r in crashed.query("SELECT eval_run_id, status, status_reason FROM eval_runs"))
    admitted_from = [p for p, _ in KILL_POINTS].index(ADMITTED_FROM)
    for index, kill in enumerate(crashed_and_clean["kills"]):
        status, reason = statuses[kill["eval"]]
        if index < admitted_from:
            assert status == "incomplete" and "ended without finishing it" in reason, (kill["point"], status, reason)
        else:
            # Its scores were admitted to the metrics before the kill: the evidence is whole; only
            # the recommendation and promotion steps died, and the next run did them again.
            assert status == "complete", (kill["point"], status, reason)
    in_metrics = {e for (e,) in crashed.query("SELECT DISTINCT eval_run_id FROM model_task_metrics")}
    assert in_metrics and all(statuses[e][0] == "complete" for e in in_metrics)
    # Nothing a killed writer left behind lingers: no half-copied file, no staged parts of dead evaluations.
    assert not list(crashed.warehouse_file.parent.glob(".*.publishing"))
    incomplete = {e for e, (s, _) in statuses.items() if s == "incomplete"}
    staged = {p.name.split("--")[0] for p in (crashed.warehouse_file.parent / "staging").glob("*")}
    assert not staged & incomplete


def test_a_run_killed_mid_calls_is_finished_by_the_next_one_sending_only_the_unfinished_calls(crashed_and_clean, tmp_path):
    project = _project(tmp_path / "mid-calls", crashed_and_clean["server"], crashed_and_clean["golden"])
    killed, sent_killed, _ = project.run(crash_at="inference.cached#3")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    finished = project.cached()
    assert 0 < finished < TOTAL_CALLS
    done, sent, wall = project.run()
    assert done.returncode == 0, done.stderr[-3000:]
    assert sent == TOTAL_CALLS - finished                 # not one finished call again
    eval_run_id, status, _ = _newest_eval_run(project)
    assert status == "complete"
    assert _evaluation_rows(project, eval_run_id) == _evaluation_rows(crashed_and_clean["clean"], crashed_and_clean["clean_eval"])
    print(f"\nkilled mid-calls after {sent_killed} sent ({finished} finished); the next run sent {sent} and completed in {wall:.1f} s")
