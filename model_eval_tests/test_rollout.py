"""Rollout and rollback edges on a real warehouse: minimum hours and calls, tests before acting,
aborts that no gate can block, rollbacks on accuracy and p95, and no re-promotion after a rollback.

The settings are the shipped production defaults (24 h per stage, 200 calls to advance, 100 calls
before production success is judged, 50 successful calls before p95 is), unless a test says otherwise.
"""

from __future__ import annotations

from datetime import timedelta

import pytest

from model_eval.promotion import plan_promotions
from model_eval_tests.decision_warehouse import DecisionWarehouse, deployment, make_task, outcomes, utc_now

SETTINGS = deployment()


@pytest.fixture
def wh(tmp_path):
    warehouse = DecisionWarehouse(tmp_path)
    yield warehouse
    warehouse.close()


@pytest.fixture
def task():
    return make_task("alpha")


def _decide(wh, task, champion, now=None, eval_run_id="e1", settings=SETTINGS, tasks=None):
    return plan_promotions(wh.conn, tasks or [task], {task.name: champion}, settings, now, eval_run_id=eval_run_id)[0]


def _candidate_setup(wh, task, stage=None, hours_ago=1.0):
    """inc serves alpha (14/20); new (19/20) is the champion, with its gates recorded for eval run e1.
    With `stage`, new is already in that rollout stage since `hours_ago`."""
    wh.golden(task, 20)
    wh.model("inc")
    wh.model("new")
    wh.evaluate(task, "inc", "e0", outcomes(14))
    wh.evaluate(task, "new", "e1", outcomes(19))
    wh.assign(task, "inc", at=utc_now() - timedelta(days=10))
    if stage:
        wh.assign(task, "new", stage=stage, previous="inc", action="promote", at=utc_now() - timedelta(hours=hours_ago))
    wh.recommend(task, "new")
    wh.record_gates([task], SETTINGS)


# ---------------------------------------------------------------- promotion reads the recorded gates
def test_promotion_needs_this_runs_gate_rows(wh, task):
    _candidate_setup(wh, task)
    assert _decide(wh, task, "new").action == "promote"
    missing = _decide(wh, task, "new", eval_run_id="a-run-without-gate-checks")
    assert missing.action == "blocked" and "no recorded result" in missing.reason


# ---------------------------------------------------------------- advancing needs time, calls and a test
def test_a_stage_lasts_at_least_min_hours(wh, task):
    _candidate_setup(wh, task, stage="shadow", hours_ago=1)
    decision = _decide(wh, task, "new")
    assert decision.action == "hold" and "1.0 h of 24 h in shadow" in decision.reason


def test_advancing_needs_min_production_calls_and_evidence_of_health(wh, task):
    _candidate_setup(wh, task, stage="shadow", hours_ago=30)
    waiting = _decide(wh, task, "new")
    assert waiting.action == "hold" and "0 of 200 logged production calls" in waiting.reason
    # 200 calls at 91%: not significantly above the 90% floor yet (exact one-sided binomial p ~ 0.37).
    wh.production_calls(task, "new", calls=200, successes=182, role="shadow")
    unproven = _decide(wh, task, "new")
    assert unproven.action == "hold" and "evidence that its success rate is at least 0.90" in unproven.reason
    wh.production_calls(task, "new", calls=100, successes=100, role="shadow")   # 282/300 = 94%: p ~ 0.009
    advanced = _decide(wh, task, "new")
    assert (advanced.action, advanced.stage, advanced.traffic_share) == ("advance", "partial", 0.1)


def test_the_rollout_is_aborted_when_the_recommendation_changes_whatever_the_gates(wh, task):
    _candidate_setup(wh, task, stage="partial", hours_ago=2)
    decision = _decide(wh, task, "other", eval_run_id="no-gate-rows")
    assert (decision.action, decision.model, decision.stage, decision.previous_model) == ("abort_rollout", "inc", "full", "new")


def test_a_degrading_candidate_in_partial_is_aborted_and_no_gate_can_block_it(wh, task):
    _candidate_setup(wh, task, stage="partial", hours_ago=2)
    wh.production_calls(task, "new", calls=150, successes=105)   # 70%
    decision = _decide(wh, task, "new", eval_run_id="no-gate-rows")
    assert (decision.action, decision.model, decision.stage, decision.previous_model) == ("abort_degraded", "inc", "full", "new")
    assert "150 logged production calls succeeded at 0.70" in decision.reason and "binomial" in decision.reason


# ---------------------------------------------------------------- rollback needs evidence
def _serving_setup(wh, task, previous="old"):
    """new serves alpha at full since an hour ago, promoted over `previous`."""
    wh.golden(task, 20)
    for model in ("old", "new"):
        wh.model(model)
    wh.evaluate(task, "old", "e0", outcomes(14))
    wh.evaluate(task, "new", "e1", outcomes(19))
    wh.assign(task, "new", previous=previous, action="advance", at=utc_now() - timedelta(hours=1))
    wh.recommend(task, "new")


@pytest.mark.parametrize("calls,successes,rolled_back", [
    (5, 0, False),       # every call failed, but 5 calls are below the 100 needed to judge
    (100, 98, False),    # healthy at 98%
    (120, 90, True),     # 75% over 120 calls: p < 0.05 against 90%
    (100, 86, False),    # 86%: below 90%, but not significantly (p ~ 0.12)
])
def test_rollback_on_production_success_needs_calls_and_a_test(wh, task, calls, successes, rolled_back):
    _serving_setup(wh, task)
    wh.production_calls(task, "new", calls=calls, successes=successes)
    decision = _decide(wh, task, "new")
    assert decision.action == ("rollback" if rolled_back else "keep")
    if rolled_back:
        assert (decision.model, decision.previous_model) == ("old", "new") and "binomial p=" in decision.reason


def test_rollback_on_p95_counts_successful_calls_only_and_needs_enough_of_them(wh, task):
    _serving_setup(wh, task)   # p95 in evaluation: about 235 ms (successful calls)
    wh.production_calls(task, "new", calls=100, successes=95, latency_ms=200.0, failed_latency_ms=60_000.0)
    assert _decide(wh, task, "new").action == "keep"   # failed calls' timeouts are not latency
    wh.production_calls(task, "new", calls=30, successes=30, latency_ms=5_000.0)
    # 125 successful calls now, 30 of them slow: p95 over successful calls is 5 s, over 2x the baseline.
    decision = _decide(wh, task, "new")
    assert decision.action == "rollback" and "production p95 latency 5000 ms over 125 successful calls" in decision.reason


def test_p95_is_not_judged_below_min_latency_calls(wh, task):
    _serving_setup(wh, task)
    wh.production_calls(task, "new", calls=40, successes=40, latency_ms=5_000.0)
    assert _decide(wh, task, "new").action == "keep"


def test_rollback_on_an_accuracy_drop_on_the_same_golden_version(wh, task):
    _serving_setup(wh, task)
    wh.evaluate(task, "new", "e2", outcomes(11))    # 0.95 -> 0.55, paired over the same 20 cases
    decision = _decide(wh, task, "new")
    assert decision.action == "rollback" and "accuracy fell from 0.950 to 0.550 on v1" in decision.reason
    assert "paired over n=20 cases" in decision.reason


def test_an_accuracy_baseline_is_never_compared_across_golden_versions(wh, task):
    _serving_setup(wh, task)
    harder = make_task("alpha", version="v2")
    wh.golden(harder, 20, file_hash="h2")
    wh.evaluate(harder, "new", "e2", outcomes(11))  # lower, but on other cases
    wh.recommend(harder, "new")
    assert _decide(wh, harder, "new").action == "keep"


def test_a_drop_beyond_the_limit_on_three_cases_is_not_yet_evidence(wh, task):
    _serving_setup(wh, task)
    wh.evaluate(task, "new", "e2", outcomes(16))    # 0.95 -> 0.80: 0.15 > 0.10, but only 3 cases changed (p ~ 0.09)
    assert _decide(wh, task, "new").action == "keep"


# ---------------------------------------------------------------- no re-promotion after a rollback
def _after_rollback(wh, task, hours_ago=1.0):
    """new was rolled back from alpha `hours_ago`; it is the champion again, with its gates passing."""
    _candidate_setup(wh, task)
    wh.assign(task, "new", previous="inc", action="advance", at=utc_now() - timedelta(hours=hours_ago + 1))
    wh.assign(task, "inc", previous="new", action="rollback", at=utc_now() - timedelta(hours=hours_ago))
    wh.record_gates([task], SETTINGS)


def test_a_rolled_back_model_is_not_promoted_again_during_the_cooldown(wh, task):
    _after_rollback(wh, task)
    decision = _decide(wh, task, "new")
    assert decision.action == "cooldown" and not decision.changes_assignment
    assert "not promoted again until the golden cases change or the cool-down ends" in decision.reason
    later = _decide(wh, task, "new", now=utc_now() + timedelta(hours=SETTINGS.rollout.rollback_cooldown_hours))
    assert later.action == "promote"


def test_new_cases_lift_the_cooldown(wh, task):
    _after_rollback(wh, task)
    wh.golden(task, 20, file_hash="h2", ingested_at=utc_now() - timedelta(minutes=10))   # the golden file changed since
    assert _decide(wh, task, "new").action == "promote"


def test_an_abort_for_degradation_also_starts_a_cooldown(wh, task):
    _candidate_setup(wh, task, stage="partial", hours_ago=2)
    wh.production_calls(task, "new", calls=150, successes=105)
    aborted = _decide(wh, task, "new")
    from model_eval.promotion import apply_decisions

    apply_decisions(wh.conn, [aborted], [task], "e1", "test")
    assert _decide(wh, task, "new").action == "cooldown"
