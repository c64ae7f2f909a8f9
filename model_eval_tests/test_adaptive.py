"""Adaptive evaluation: the anytime-valid test's error rate by simulation, its stopping power, the plan's
order and skips, and the engine stopping a hopeless model against the scripted server (a test double)."""

from __future__ import annotations

import asyncio
import random

import numpy as np
import pytest

from model_eval.adaptive import CANNOT_BEAT, CANNOT_QUALIFY, COMPLETE, AdaptivePlan, WithoutReplacementTest
from model_eval.inference import CallRequest, RetryPolicy, run_model
from model_eval.registry import ModelSpec
from model_eval.response_cache import ResponseCache, cache_key
from model_eval_tests.fake_openai_server import FakeOpenAIServer, ok


def stops_at(values: list[float], null_mean: float, alpha: float = 0.05) -> int | None:
    test = WithoutReplacementTest(len(values), null_mean, alpha)
    for i, value in enumerate(values, 1):
        test.update(value)
        if test.rejected:
            return i
    return None


@pytest.mark.parametrize("ones,size,null_mean", [(210, 300, 0.7), (240, 300, 0.8), (95, 100, 0.95), (150, 200, 0.7)])
def test_true_null_is_rejected_at_most_alpha_of_the_time_however_often_it_is_checked(ones, size, null_mean):
    """Population mean at or above the null mean: over 2,000 random orders, a stop at ANY point counts
    as an error; Ville's inequality bounds that share by alpha."""
    population = [1.0] * ones + [0.0] * (size - ones)
    assert sum(population) / size >= null_mean
    rng = random.Random(11)
    errors = 0
    for _ in range(2000):
        rng.shuffle(population)
        errors += stops_at(population, null_mean) is not None
    # 0.05 plus three binomial standard errors of a 2,000-draw estimate.
    assert errors / 2000 <= 0.05 + 3 * (0.05 * 0.95 / 2000) ** 0.5, errors


def test_fractional_case_scores_keep_the_error_rate():
    """Case scores are means over repeats (0, 1/3, 2/3, 1), not only 0 or 1."""
    rng = np.random.default_rng(5)
    population = rng.choice([0.0, 1 / 3, 2 / 3, 1.0], size=400, p=[0.1, 0.1, 0.2, 0.6]).tolist()
    null_mean = sum(population) / len(population)
    shuffler = random.Random(3)
    errors = 0
    for _ in range(1500):
        shuffler.shuffle(population)
        errors += stops_at(population, null_mean) is not None
    assert errors / 1500 <= 0.05 + 3 * (0.05 * 0.95 / 1500) ** 0.5


def test_a_clearly_worse_model_is_stopped_early_in_nearly_every_order():
    population = [1.0] * 250 + [0.0] * 250          # accuracy 0.5 against a threshold of 0.8
    rng = random.Random(2)
    stops = []
    for _ in range(300):
        rng.shuffle(population)
        stops.append(stops_at(population, 0.8))
    assert all(s is not None for s in stops)
    assert np.median(stops) <= 0.1 * len(population), np.median(stops)


def test_an_impossible_target_stops_exactly_when_arithmetic_says_so():
    """No bet needed: once more cases failed than the threshold allows, the test rejects at that case."""
    size, null_mean = 20, 0.9          # at most 2 of 20 may fail
    test = WithoutReplacementTest(size, null_mean, alpha=1e-12)   # a bettor that can never win on evidence alone
    values = [1.0] * 5 + [0.0] * 3 + [1.0] * 12
    for i, value in enumerate(values, 1):
        test.update(value)
        if test.rejected:
            break
    assert i == 8                     # the third failure


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError):
        WithoutReplacementTest(10, 1.5)
    test = WithoutReplacementTest(1, 0.5)
    test.update(1.0)
    with pytest.raises(ValueError, match="more values"):
        test.update(1.0)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        WithoutReplacementTest(3, 0.5).update(2.0)


# ---------------------------------------------------------------- the plan
class Req:
    def __init__(self, task, case_id, repeat):
        self.task, self.case_id, self.repeat = task, case_id, repeat


def test_plan_orders_first_repeats_case_by_case_and_skips_stable_repeats():
    cases = [f"c{i}" for i in range(6)]
    plan = AdaptivePlan({"t": (cases, 0.5)}, min_repeats=2, seed="run-1")
    requests = [Req("t", c, r) for c in cases for r in range(3)]
    ordered = list(plan.arrange(requests))
    assert [r.repeat for r in ordered] == [0, 1] * 6 + [2] * 6
    assert [r.case_id for r in ordered[:12:2]] == plan.tasks["t"].order     # the seeded random order
    assert plan.tasks["t"].order != sorted(cases) or AdaptivePlan({"t": (cases, 0.5)}, 2, seed="run-2").tasks["t"].order != sorted(cases)
    # c0 answered the same twice: its third repeat is not asked; c1 answered differently: it is.
    for case, answers in (("c0", ["PASS", "PASS "]), ("c1", ["PASS", "FAIL"])):
        for repeat, text in enumerate(answers):
            plan.observe("t", case, repeat, text, text.strip() == "PASS")
    assert not plan.wants(Req("t", "c0", 2)) and plan.wants(Req("t", "c1", 2))
    assert plan.wants(Req("t", "c2", 2))          # not known yet: asked
    assert plan.skipped_repeats == 1


def test_plan_stops_a_task_and_turns_down_the_rest_of_it():
    cases = [f"c{i}" for i in range(40)]
    plan = AdaptivePlan({"t": (cases, 0.9), "other": (["x"], 0.5)}, min_repeats=1, seed="s")
    for case in plan.tasks["t"].order:
        plan.observe("t", case, 0, "FAIL", False)
        if plan.outcomes()["t"] != COMPLETE:
            break
    assert plan.outcomes() == {"t": CANNOT_QUALIFY, "other": COMPLETE}
    assert not plan.wants(Req("t", "c39", 0)) and plan.wants(Req("other", "x", 0))


def test_plan_stops_a_model_that_cannot_beat_the_champion_only_when_given_one():
    cases = [f"c{i}" for i in range(200)]
    champion = {c: 1.0 for c in cases}            # the champion is right everywhere
    plans = {with_champion: AdaptivePlan({"t": (cases, 0.5)}, min_repeats=1, seed="s",
                                         champions={"t": champion} if with_champion else None)
             for with_champion in (True, False)}
    rng = random.Random(4)
    for plan in plans.values():
        for case in plan.tasks["t"].order:       # 75% right: qualifies, but is worse than the champion
            right = rng.random() < 0.75
            plan.observe("t", case, 0, "PASS" if right else "FAIL", right)
    assert plans[True].outcomes()["t"] == CANNOT_BEAT
    assert plans[False].outcomes()["t"] == COMPLETE


# ---------------------------------------------------------------- through the engine
def test_engine_stops_sending_for_a_hopeless_model(tmp_path):
    """A model that answers FAIL to every case whose expected answer is PASS: accuracy 0 against 0.8."""
    cases = [f"case-{i:03d}" for i in range(200)]
    with FakeOpenAIServer(lambda info: ok("FAIL")) as server, ResponseCache(tmp_path / "c.sqlite") as cache:
        spec = ModelSpec(name="m", litellm_model="openai/fake", provider="openai", family="fake", api_base=server.api_base,
                         price_input_per_million=0.0, price_output_per_million=0.0, max_concurrency=4, timeout_s=5.0,
                         client="http")
        requests = []
        for case in cases:
            messages = [{"role": "user", "content": f"{case}: PASS or FAIL?"}]
            requests += [CallRequest("t", "v1", case, r, messages, {}, cache_key(spec.config_hash, messages, {}, r))
                         for r in range(3)]
        plan = AdaptivePlan({"t": (cases, 0.8)}, min_repeats=2, seed="run")
        frame, stats = asyncio.run(run_model(
            spec, list(plan.arrange(requests)), cache, retry=RetryPolicy(0.01, 0.05, 0.05), admit=plan.wants,
            observe=lambda row: plan.observe(row["task"], row["case_id"], row["repeat"], row["response_text"],
                                             row["response_text"] == "PASS")))
        sent = server.total
    assert plan.outcomes() == {"t": CANNOT_QUALIFY}
    assert sent == stats.sent == frame.height < 0.1 * len(requests)
    assert stats.skipped == len(requests) - frame.height
