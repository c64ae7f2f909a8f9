"""The judge scorer end to end without Dagster: calibration against human verdicts, the kappa bar, judged
scores, bounded verdict retries, cached and costed judge calls, pairwise win rates.

Candidates and judges are served by the scripted OpenAI-compatible server (a test double for hosted
providers). The judge is scripted from what it is shown: a calibration answer gets the human's verdict
(a good judge) or PASS whatever it is (the bundled tiny model's habit); a candidate's answer is graded by
the marker the candidate put in it.
"""

from __future__ import annotations

import json
import re
import shutil

import polars as pl
import pytest
import yaml
from statsmodels.stats.inter_rater import cohens_kappa as statsmodels_kappa

from model_eval import warehouse
from model_eval.agreement import Confusion, cohens_kappa
from model_eval.inference import RetryPolicy
from model_eval.project import Project
from model_eval.settings import PROJECT_ROOT
from model_eval.steps.evaluation import run_inference, score_model
from model_eval.steps.golden import ingest_golden
from model_eval.steps.models import sync_registry
from model_eval.steps.pairwise import compute_win_rates
from model_eval.steps.recommendation import recommend_tasks, refresh_metrics
from model_eval_tests.fake_openai_server import FakeOpenAIServer, ok

FAST_RETRY = RetryPolicy(backoff_base_s=0.01, backoff_cap_s=0.05, retry_after_cap_s=0.1)
TASK = "posting_summary"
CALIBRATION = [json.loads(line) for line in (PROJECT_ROOT / "golden" / TASK / "calibration.jsonl").read_text().splitlines()]
HUMAN = {row["answer"]: row["human_verdict"] for row in CALIBRATION}
GOOD, BAD = "GOOD-SUMMARY", "BAD-SUMMARY"


def answer_of(prompt: str, label: str) -> str:
    found = re.search(label + r":\n<<<\n(.*?)\n>>>", prompt, re.DOTALL)
    return found.group(1) if found else ""


def verdict(score: float, reason: str = "scripted") -> str:
    return json.dumps({"score": score, "reason": reason})


class Judge:
    """The scripted judge: `calibration` is 'good' (the human's verdict) or 'yes-man' (always PASS);
    `answers` is 'good' (by the candidate's marker), 'garbled' (never JSON) or 'first-garbled' (JSON only
    when asked again); `pairs` is 'good' (the answer with the good marker wins) or 'always-a'."""

    def __init__(self, calibration="good", answers="good", pairs="good"):
        self.calibration, self.answers, self.pairs = calibration, answers, pairs

    def __call__(self, info):
        model = info.payload["model"]
        if model == "cand-good":
            return ok(f"{GOOD}: a faithful summary of the posting.", completion_tokens=20)
        if model == "cand-bad":
            return ok(f"{BAD}: it pays a made-up salary.", completion_tokens=20)
        messages = info.payload["messages"]
        prompt = messages[1]["content"]
        asked_again = len(messages) > 2
        if "Answer A:" in prompt:
            if self.pairs == "always-a":
                return ok(json.dumps({"winner": "A", "reason": "first is best"}))
            return ok(json.dumps({"winner": "A" if GOOD in answer_of(prompt, "Answer A") else "B", "reason": "marker"}))
        answer = answer_of(prompt, "The answer to grade")
        if answer in HUMAN:
            passed = self.calibration == "yes-man" or HUMAN[answer] == "PASS"
            return ok(verdict(1.0 if passed else 0.0), prompt_tokens=400, completion_tokens=15)
        if self.answers == "garbled" or (self.answers == "first-garbled" and not asked_again):
            return ok("I would say this one passes, mostly.")
        return ok(verdict(1.0 if GOOD in answer else 0.1, "marker"), prompt_tokens=300, completion_tokens=15)


@pytest.fixture
def judged(tmp_path, paths):
    """The shipped open-ended task, its judge and candidates behind the scripted server."""
    shutil.copytree(PROJECT_ROOT / "golden" / TASK, paths.golden_dir / TASK)
    judge = Judge()
    with FakeOpenAIServer(lambda info: judge(info)) as server:
        def entry(name, price):
            return {"name": name, "model": f"openai/{name}", "api_base": server.api_base, "params": {"temperature": 0.0},
                    "price_per_million": {"input": price, "output": price}, "provider": "fake", "max_attempts": 2,
                    "timeout_s": 30, "tasks": [TASK]}
        # The shipped task names its judge, pairwise reference and tie-breaker smollm2-135m: here those are
        # registry entries of the same name behind the scripted server.
        paths.registry_file.write_text(yaml.safe_dump({"models": [
            entry("cand-good", 1.0), entry("cand-bad", 1.0), {**entry("smollm2-135m", 2.0), "tasks": []}]}))
        task_file = paths.golden_dir / TASK / "task.yaml"
        spec = yaml.safe_load(task_file.read_text())
        spec["scorer"]["settings"]["pairwise"] = {"reference_model": "cand-bad"}
        del spec["scorer"]["settings"]["max_verdict_attempts"]     # the default, 3
        task_file.write_text(yaml.safe_dump(spec))
        yield {"paths": paths, "server": server, "judge": judge}


def evaluate(paths, log, models=("cand-good", "cand-bad"), run="run-1"):
    ingest_golden(Project.load(paths), run, log)
    sync_registry(Project.load(paths), run, log)
    for model in models:
        run_inference(Project.load(paths), model, run, log, retry=FAST_RETRY)
    scored = {model: score_model(Project.load(paths), model, run, log, retry=FAST_RETRY) for model in models}
    compute_win_rates(Project.load(paths), run, log, completing=run, retry=FAST_RETRY)    # once every model has answered
    return scored


def query(paths, sql):
    with warehouse.read_connection(paths.warehouse_file) as conn:
        return conn.sql(sql).pl()


def test_a_calibrated_judge_scores_the_task_and_its_calls_are_recorded_and_cached(judged, log):
    paths, server = judged["paths"], judged["server"]
    scored = evaluate(paths, log)

    calibration = query(paths, "SELECT * FROM judge_calibrations WHERE eval_run_id = 'run-1'").row(0, named=True)
    assert calibration["passed"] and calibration["cases"] == 14 and calibration["kappa"] == pytest.approx(1.0)
    assert calibration["min_kappa"] == 0.6 and calibration["min_kappa_source"] == "deployment.yaml"
    assert (calibration["human_pass_judge_pass"], calibration["human_fail_judge_fail"]) == (7, 7)
    assert scored["cand-good"].judging.tasks[TASK].scored

    scores = query(paths, f"SELECT model, avg(correct::INT) AS accuracy, count(*) AS n, any_value(reason) AS reason "
                          f"FROM scores WHERE task = '{TASK}' GROUP BY model ORDER BY model")
    assert scores.rows() == [("cand-bad", 0.0, 20, scores["reason"][0]), ("cand-good", 1.0, 20, scores["reason"][1])]
    assert "judge smollm2-135m: 0.10 (below 0.5)" in scores["reason"][0]

    calls = query(paths, """SELECT purpose, count(*) AS calls, sum(cost_usd) AS cost, count(*) FILTER (WHERE final) AS final
                             FROM judge_results WHERE eval_run_id = 'run-1' GROUP BY purpose ORDER BY purpose""")
    # 14 calibration answers; 2 models x 10 cases x 2 repeats graded; 10 x 2 pairs judged in both orders for cand-good.
    assert calls["purpose"].to_list() == ["calibration", "pairwise", "score"]
    assert calls["calls"].to_list() == [14, 40, 40] and calls["final"].to_list() == [14, 40, 40]
    # Priced like inference: 2 USD per million tokens, 400 + 15 tokens per calibration call.
    assert calls["cost"][0] == pytest.approx(14 * 415 * 2 / 1e6)

    win = query(paths, "SELECT * FROM pairwise_win_rates").row(0, named=True)
    assert (win["model"], win["reference_model"], win["cases"], win["wins"], win["losses"]) == ("cand-good", "cand-bad", 10, 20, 0)
    assert win["win_rate"] == 1.0 and win["position_consistency"] == 1.0 and win["win_rate_low"] < 1.0

    refresh_metrics(Project.load(paths), log, completing="run-1")
    recommendation = recommend_tasks(Project.load(paths), "run-1", log).filter(its_policy(TASK)).row(0, named=True)
    assert recommendation["champion"] == "cand-good"
    assert "Scored by an LLM judge: judge smollm2-135m passed calibration: kappa 1.00" in recommendation["reasoning"]

    sent = server.total
    evaluate(paths, log, run="run-1")    # the same run again: every call, the judge's included, from the cache
    assert server.total == sent


def its_policy(task):
    """The recommendation row a task's own policy made."""
    return (pl.col("task") == task) & pl.col("is_task_policy")


def test_a_judge_below_the_kappa_bar_cannot_score_and_the_run_says_why(judged, log):
    paths, judge = judged["paths"], judged["judge"]
    judge.calibration = "yes-man"   # PASS to everything, as the bundled 135M model does
    scored = evaluate(paths, log)

    calibration = query(paths, "SELECT * FROM judge_calibrations").row(0, named=True)
    assert not calibration["passed"] and calibration["kappa"] == pytest.approx(0.0)
    assert (calibration["human_pass_judge_pass"], calibration["human_fail_judge_pass"]) == (7, 7)
    judgement = scored["cand-good"].judging.tasks[TASK]
    assert not judgement.scored
    assert "judge smollm2-135m failed calibration: kappa 0.00" in judgement.reason and "below the bar 0.60" in judgement.reason
    assert any(level == "warning" and "failed calibration" in line for level, line in log.lines)
    # Nothing is scored with an uncalibrated judge, and no candidate answer was sent to it.
    assert query(paths, f"SELECT count(*) AS n FROM scores WHERE task = '{TASK}'")["n"][0] == 0
    assert query(paths, "SELECT count(*) AS n FROM judge_results WHERE purpose <> 'calibration'")["n"][0] == 0

    refresh_metrics(Project.load(paths), log, completing="run-1")
    recommendation = recommend_tasks(Project.load(paths), "run-1", log).filter(its_policy(TASK)).row(0, named=True)
    assert recommendation["champion"] is None
    assert recommendation["reasoning"].startswith("No model was scored: judge smollm2-135m failed calibration")


def test_a_task_can_set_its_own_kappa_bar(judged, log):
    paths = judged["paths"]
    task_file = paths.golden_dir / TASK / "task.yaml"
    spec = yaml.safe_load(task_file.read_text())
    spec["scorer"]["settings"]["min_kappa"] = 1.0
    task_file.write_text(yaml.safe_dump(spec))
    judged["judge"].calibration = "good"
    evaluate(paths, log, models=("cand-good",))
    calibration = query(paths, "SELECT passed, min_kappa, min_kappa_source FROM judge_calibrations").row(0)
    assert calibration == (True, 1.0, "task.yaml")     # kappa 1.0 reaches a bar of 1.0


def test_unparseable_verdicts_are_asked_again_then_recorded_as_failures(judged, log):
    paths, judge = judged["paths"], judged["judge"]
    judge.answers = "first-garbled"
    evaluate(paths, log, models=("cand-good",))
    attempts = query(paths, """SELECT verdict_attempt, final, count(*) AS n, any_value(verdict_problem) AS problem
                               FROM judge_results WHERE purpose = 'score' GROUP BY ALL ORDER BY verdict_attempt""")
    assert attempts.rows() == [(1, False, 20, "no JSON object in the reply"), (2, True, 20, None)]
    assert query(paths, f"SELECT bool_and(correct) AS ok FROM scores WHERE task = '{TASK}'")["ok"][0]

    judge.answers = "garbled"
    paths.cache_file.unlink()      # otherwise the usable verdicts above come back from the cache
    evaluate(paths, log, models=("cand-good",), run="run-2")
    failed = query(paths, f"SELECT count(*) AS n, bool_or(correct) AS any_right, any_value(reason) AS reason FROM scores "
                          f"WHERE task = '{TASK}' AND eval_run_id = 'run-2'").row(0)
    assert failed[0] == 20 and not failed[1]
    assert failed[2] == "judge smollm2-135m gave no usable verdict after 3 attempt(s): no JSON object in the reply"
    # max_verdict_attempts defaults to 3: three calls per answer, never more.
    attempts = query(paths, "SELECT verdict_attempt, count(*) AS n FROM judge_results WHERE eval_run_id = 'run-2' "
                            "AND purpose = 'score' GROUP BY ALL ORDER BY 1")
    assert attempts.rows() == [(1, 20), (2, 20), (3, 20)]


def test_pairwise_swaps_positions_so_a_position_biased_judge_yields_ties(judged, log):
    paths, judge = judged["paths"], judged["judge"]
    judge.pairs = "always-a"
    evaluate(paths, log)
    win = query(paths, "SELECT * FROM pairwise_win_rates").row(0, named=True)
    assert win["win_rate"] == 0.5 and win["ties"] == 20 and win["wins"] == 0 and win["position_consistency"] == 0.0
    # The reference model is not compared with itself.
    assert query(paths, "SELECT count(*) AS n FROM pairwise_win_rates WHERE model = 'cand-bad'")["n"][0] == 0


def test_a_judge_missing_from_the_registry_skips_its_task_only(judged, log):
    paths = judged["paths"]
    registry = yaml.safe_load(paths.registry_file.read_text())
    registry["models"] = [m for m in registry["models"] if m["name"] != "smollm2-135m"]
    paths.registry_file.write_text(yaml.safe_dump(registry))
    scored = evaluate(paths, log, models=("cand-good",))
    assert "judge smollm2-135m cannot run (it is not in the registry models.yaml)" in scored["cand-good"].judging.tasks[TASK].reason


@pytest.mark.parametrize("table", [
    [[7, 0], [7, 0]],          # PASS to everything: chance
    [[6, 1], [2, 5]],
    [[5, 2], [3, 4]],
    [[3, 4], [5, 2]],          # worse than chance
    [[9, 1], [3, 2]],
    [[6, 1], [1, 6]],          # an upper bound past 1, cut to 1
    [[4, 1, 0], [1, 3, 2], [0, 1, 5]],
])
def test_kappa_and_its_standard_error_match_statsmodels(table):
    ours = cohens_kappa(table)
    theirs = statsmodels_kappa(table)
    assert ours.kappa == pytest.approx(theirs.kappa, abs=1e-12)
    assert ours.std == pytest.approx(theirs.std_kappa, abs=1e-12)
    assert (ours.low, ours.high) == pytest.approx((max(-1, theirs.kappa_low), min(1, theirs.kappa_upp)), abs=1e-9)


def test_a_missing_verdict_counts_as_a_disagreement():
    answered = Confusion.of([("PASS", "PASS")] * 5 + [("FAIL", "FAIL")] * 5 + [("PASS", "FAIL"), ("FAIL", "PASS")] * 2)
    silent = Confusion.of([("PASS", "PASS")] * 5 + [("FAIL", "FAIL")] * 5 + [("PASS", None), ("FAIL", None)] * 2)
    assert answered.agreement == silent.agreement == 10 / 14 and silent.unparseable == 4
    # Not answering the hard cases scores exactly as answering them wrong, never better.
    assert cohens_kappa(silent.kappa_table()).kappa == pytest.approx(cohens_kappa(answered.kappa_table()).kappa)
    assert cohens_kappa(silent.kappa_table()).kappa == pytest.approx(statsmodels_kappa([[5, 2], [2, 5]]).kappa)
    never = Confusion.of([("PASS", None), ("FAIL", None)] * 7)
    assert never.agreement == 0 and cohens_kappa(never.kappa_table()).kappa == pytest.approx(-1.0)


def _with_task(paths):
    shutil.copytree(PROJECT_ROOT / "golden" / TASK, paths.golden_dir / TASK)
    return paths.golden_dir / TASK


def test_the_shipped_open_ended_task_needs_no_expected_answers_and_validates(paths, log):
    folder = _with_task(paths)
    ingestion = ingest_golden(Project.load(paths), "run-1", log)
    row = ingestion.versions.filter(ingestion.versions["task"] == TASK).row(0, named=True)
    assert row["cases"] == 10 and row["scorer"] == "judge" and row["validation_passed"]
    with warehouse.read_connection(paths.warehouse_file) as conn:
        assert conn.sql(f"SELECT count(*) FROM golden_cases WHERE task = '{TASK}' AND expected_json IS NULL").fetchall() == [(10,)]
    verdicts = [json.loads(line)["human_verdict"] for line in (folder / "calibration.jsonl").read_text().splitlines()]
    assert verdicts.count("PASS") == verdicts.count("FAIL") == 7


@pytest.mark.parametrize("breakage, where", [
    (lambda rows: [{k: v for k, v in rows[0].items() if k != "human_verdict"}] + rows[1:], "calibration.jsonl, line 1, field 'human_verdict'"),
    (lambda rows: [{**rows[0], "answer": ""}] + rows[1:], "calibration.jsonl, line 1, field 'answer'"),
    (lambda rows: [{**rows[0], "verdict": "PASS"}] + rows[1:], "calibration.jsonl, line 1, field 'verdict'"),
    (lambda rows: [r for r in rows if r["human_verdict"] == "PASS"] + [{**rows[0], "id": f"extra-{i}"} for i in range(4)],
     "a verdict task needs both PASS and FAIL cases"),
    (lambda rows: [{**rows[0], "human_verdict": "MAYBE"}] + rows[1:], "must be one of PASS, FAIL"),
])
def test_a_bad_calibration_file_is_named_and_nothing_is_written(paths, log, breakage, where):
    from model_eval.errors import GoldenSetError

    calibration = _with_task(paths) / "calibration.jsonl"
    rows = [json.loads(line) for line in calibration.read_text().splitlines()]
    calibration.write_text("".join(json.dumps(r) + "\n" for r in breakage(rows)))
    with pytest.raises(GoldenSetError) as raised:
        ingest_golden(Project.load(paths), "run-1", log)
    assert where in str(raised.value)
    assert not paths.warehouse_file.exists()


def test_bad_judge_settings_name_the_field(paths):
    from model_eval.errors import GoldenSetError
    from model_eval.golden import load_task

    folder = _with_task(paths)
    spec = yaml.safe_load((folder / "task.yaml").read_text())
    for key, value, words in [("rubric", "", "'rubric' is required"), ("pass_threshold", 1.5, "'pass_threshold' must be a number"),
                              ("max_verdict_attempts", 9, "'max_verdict_attempts' must be a whole number from 1 to 5"),
                              ("pairwise", {"reference": "x"}, "'pairwise' must be {reference_model"),
                              ("judge", "x", "unknown setting(s) for scorer 'judge': judge")]:
        (folder / "task.yaml").write_text(yaml.safe_dump({**spec, "scorer": {"name": "judge",
                                                                             "settings": {**spec["scorer"]["settings"], key: value}}}))
        with pytest.raises(GoldenSetError) as raised:
            load_task(folder)
        assert "field 'scorer.settings'" in str(raised.value) and words in str(raised.value), str(raised.value)


def _materialization_metadata(instance, asset: str, partition: str | None = None) -> dict:
    import dagster as dg

    records = instance.fetch_materializations(dg.AssetKey(asset), limit=10).records
    event = next(r.asset_materialization for r in records if partition is None or r.asset_materialization.partition == partition)
    return {key: value.value for key, value in event.metadata.items()}


@pytest.mark.parametrize("calibration", ["yes-man", "good"])
def test_through_dagster_the_run_says_whether_the_judge_may_score(judged, log, monkeypatch, tmp_path, capsys, calibration):
    from model_eval.cli import _print_leaderboard
    from model_eval.definitions import defs
    from model_eval.orchestration import run_evaluation
    from model_eval_tests.conftest import use_project_files

    paths = judged["paths"]
    judged["judge"].calibration = calibration
    deployment = tmp_path / "deployment.yaml"
    shipped = yaml.safe_load((PROJECT_ROOT / "deployment.yaml").read_text())
    deployment.write_text(yaml.safe_dump({**shipped, "initial_assignments": {TASK: "cand-bad"},
                                          "alerts": {"log_file": str(tmp_path / "alerts.log")}}))
    instance = use_project_files(monkeypatch, tmp_path, paths.golden_dir, paths.registry_file, deployment)
    project = Project.load(type(paths).from_env())
    models = [project.registry.get("cand-good"), project.registry.get("cand-bad")]
    outcome = run_evaluation(defs(), instance, project, models, [TASK], say=lambda _: None)
    assert outcome.ok, (outcome.error, outcome.failed)

    judges = _materialization_metadata(instance, "scores", "cand-good")["judges"]
    leaderboard = _materialization_metadata(instance, "recommendations")["leaderboard"]
    agreement = _materialization_metadata(instance, "consensus")["agreement"]
    _print_leaderboard(project.paths, outcome.eval_run_id, [TASK])
    printed = capsys.readouterr().out
    # Two different scripted summaries: no majority, so the tie-breaker's (smollm2-135m) answer would win,
    # but it answered nothing here: no consensus, and each model agrees with none.
    assert set(agreement) == {f"{TASK}/cand-good", f"{TASK}/cand-bad"}
    if calibration == "yes-man":
        assert judges[TASK]["scored"] is False and "failed calibration: kappa 0.00" in judges[TASK]["reason"]
        assert "judge: judge smollm2-135m failed calibration" in leaderboard
        assert "why: No model was scored: judge smollm2-135m failed calibration" in printed
        assert printed.count("failed calibration") == 1      # said once, in the reasoning
        assert "win rate" not in printed
    else:
        assert judges[TASK] == {"judge": "smollm2-135m", "scored": True, "kappa": 1.0, "reason": judges[TASK]["reason"]}
        assert "champion: cand-good" in printed and "Scored by an LLM judge" in printed
        assert "win rate of cand-good against cand-bad (judge smollm2-135m, not accuracy): 1.00" in printed
        assert "win rate of cand-good against cand-bad" in leaderboard


def test_a_failing_judge_is_recorded_with_its_key_redacted(judged, log, monkeypatch):
    from model_eval_tests.fake_openai_server import server_error

    canary = "sk-judge-canary-51c0ffee"
    paths, judge = judged["paths"], judged["judge"]
    monkeypatch.setenv("JUDGE_KEY", canary)
    registry = yaml.safe_load(paths.registry_file.read_text())
    for model in registry["models"]:
        if model["name"] == "smollm2-135m":
            model["api_key_env"] = "JUDGE_KEY"
    paths.registry_file.write_text(yaml.safe_dump(registry))
    # The judge's provider refuses the key and echoes it back, as some do.
    judged["server"].script = lambda info: (server_error(401, "Incorrect API key provided", echo_key=True)
                                            if info.payload["model"] == "smollm2-135m" else judge(info))
    scored = evaluate(paths, log, models=("cand-good",))

    calls = query(paths, "SELECT count(*) AS n, min(error_class) AS error, bool_and(final) AS final, "
                         "bool_and(contains(error_message, '***')) AS redacted FROM judge_results").row(0)
    assert calls == (14, "AuthenticationError", True, True)    # a 401 is not retried; each call is one failed row
    assert "14 verdict(s) unparseable" in scored["cand-good"].judging.tasks[TASK].reason
    assert canary.encode() not in paths.warehouse_file.read_bytes() and canary not in log.text()


def test_a_changed_calibration_file_counts_as_a_golden_change(paths):
    from model_eval.discovery import golden_fingerprints

    calibration = _with_task(paths) / "calibration.jsonl"
    before = golden_fingerprints(paths.golden_dir)
    calibration.write_text(calibration.read_text().replace('"human_verdict": "PASS"', '"human_verdict": "FAIL"', 1))
    after = golden_fingerprints(paths.golden_dir)
    assert after[TASK] != before[TASK] and {k: v for k, v in after.items() if k != TASK} == {k: v for k, v in before.items() if k != TASK}
