"""Recommendation policies: qualification, ranking, ties and the edge cases."""

from __future__ import annotations

import itertools

import polars as pl
import pytest

from model_eval.policies import (
    Anchors,
    get_policy,
    recommend,
    registered_policies,
)
from model_eval.stats import prob_a_beats_b, prob_at_least

ALL_POLICIES = ["balanced", "cost", "quality", "reliable", "speed", "strict", "weighted"]

SCHEMA = {
    "model": pl.String,
    "accuracy": pl.Float64,
    "accuracy_low": pl.Float64,
    "accuracy_high": pl.Float64,
    "correctness": pl.Float64,
    "consistency": pl.Float64,
    "success_rate": pl.Float64,
    "p50_latency_ms": pl.Float64,
    "cost_per_case": pl.Float64,
    "cases": pl.Int64,
    "calls": pl.Int64,
}


def cand(
    model: str,
    accuracy: float = 0.9,
    *,
    correctness: float | None = None,
    consistency: float = 1.0,
    success_rate: float = 1.0,
    p50: float | None = 500.0,
    cost: float | None = 0.001,
    calls: int = 30,
    cases: int = 10,
) -> dict:
    return {
        "model": model,
        "accuracy": accuracy,
        # The interval only feeds the reasoning text; keep it plausible.
        "accuracy_low": max(0.0, accuracy - 0.1),
        "accuracy_high": min(1.0, accuracy + 0.05),
        "correctness": accuracy if correctness is None else correctness,
        "consistency": consistency,
        "success_rate": success_rate,
        "p50_latency_ms": p50,
        "cost_per_case": cost,
        "cases": cases,
        "calls": calls,
    }


def frame(*rows: dict) -> pl.DataFrame:
    return pl.DataFrame(list(rows), schema=SCHEMA)


# --------------------------------------------------------------------------
# Registry and input checks
# --------------------------------------------------------------------------


def test_all_policies_registered():
    assert registered_policies() == ALL_POLICIES


def test_unknown_policy_error_lists_registered_names():
    with pytest.raises(KeyError) as info:
        get_policy("cheapest")
    assert "cheapest" in str(info.value) and "weighted" in str(info.value)
    with pytest.raises(KeyError):
        recommend(frame(cand("a")), "cheapest", 0.8)


def test_missing_column_and_duplicate_model_are_rejected():
    with pytest.raises(ValueError, match="cost_per_case"):
        recommend(frame(cand("a")).drop("cost_per_case"), "quality", 0.8)
    with pytest.raises(ValueError, match="more than one row"):
        recommend(frame(cand("a"), cand("a", 0.5)), "quality", 0.8)


@pytest.mark.parametrize("threshold", [-0.1, 1.1, "0.8", True])
def test_invalid_threshold_is_rejected(threshold):
    with pytest.raises(ValueError, match="threshold"):
        recommend(frame(cand("a")), "quality", threshold)


# --------------------------------------------------------------------------
# Individual policies
# --------------------------------------------------------------------------


def test_strict_requires_perfect_correctness_and_no_failed_calls():
    df = frame(
        cand("flaky_fast", 1.0, correctness=0.9, p50=100),  # right on average, not every repeat
        cand("erroring", 1.0, success_rate=0.97, p50=150),  # a call failed
        cand("perfect_slow", 1.0, p50=900),
        cand("perfect_mid", 1.0, p50=400),
    )
    rec = recommend(df, "strict", 0.8)
    assert rec.champion == "perfect_mid" and rec.runner_up == "perfect_slow"
    assert rec.qualified == ["perfect_mid", "perfect_slow"]
    assert rec.ranking == [("perfect_mid", 400.0), ("perfect_slow", 900.0)]
    assert rec.champion_score == 400.0 and "lower is better" in rec.score_name


def test_strict_with_no_perfect_model_names_best_correctness():
    rec = recommend(frame(cand("a", 0.95, correctness=0.9), cand("b", 0.97, correctness=0.8)), "strict", 0.8)
    assert rec.champion is None and rec.runner_up is None
    assert "No model qualified" in rec.reasoning
    assert "best accuracy seen was 97.0% (b" in rec.reasoning
    assert "best correctness was 90.0% (a)" in rec.reasoning


ANCHORS = Anchors(latency_target_ms=1000.0, budget_per_case_usd=0.002)


def test_weighted_scores_by_hand():
    df = frame(
        cand("accurate", 0.95, p50=1000, cost=0.004),
        cand("fast", 0.85, p50=200, cost=0.003),
        cand("cheap", 0.90, p50=600, cost=0.001),
        cand("weak", 0.50, p50=10, cost=0.0),  # below threshold: not ranked
    )
    rec = recommend(df, "weighted", 0.8, ANCHORS)
    # accuracy: (acc - 0.8) / 0.2; speed: 1000 / (1000 + p50); cost: 0.002 / (0.002 + cost)
    expected = {
        "accurate": 0.5 * 0.75 + 0.3 * 0.5 + 0.2 * (1 / 3),
        "fast": 0.5 * 0.25 + 0.3 * (1000 / 1200) + 0.2 * 0.4,
        "cheap": 0.5 * 0.5 + 0.3 * (1000 / 1600) + 0.2 * (2 / 3),
    }
    assert dict(rec.ranking) == pytest.approx(expected)
    assert [m for m, _ in rec.ranking] == ["accurate", "cheap", "fast"]
    assert "weak" not in rec.qualified


def test_weighted_tie_is_broken_by_accuracy_and_explained():
    # accurate: 0.5*0.5 + 0.3*0.5 + 0.2*0.5 = 0.5; quick: 0.5*0.2 + 0.3*0.8 + 0.2*0.8 = 0.5
    df = frame(cand("quick", 0.84, p50=250, cost=0.00025), cand("accurate", 0.9, p50=1000, cost=0.001))
    rec = recommend(df, "weighted", 0.8, Anchors(1000.0, 0.001))
    assert rec.champion_score == pytest.approx(rec.runner_up_score)
    assert rec.champion == "accurate"
    assert "tie was broken by higher accuracy (90.0% vs 84.0%)" in rec.reasoning


def test_weighted_unknown_cost_counts_as_zero_and_is_mentioned():
    df = frame(cand("known", 0.9, p50=500, cost=0.002), cand("mystery", 0.9, p50=500, cost=None))
    rec = recommend(df, "weighted", 0.8, Anchors(1000.0, 0.001))
    scores = dict(rec.ranking)
    # identical except cost: known gets 0.2 x 0.001/0.003 for cost, mystery nothing
    assert scores["known"] - scores["mystery"] == pytest.approx(0.2 / 3)
    assert rec.champion == "known"
    assert "unknown for mystery" in rec.reasoning and "counts as 0" in rec.reasoning
    assert "cost unknown" in rec.reasoning  # in the runner-up's figures


def test_identical_candidates_tie_and_fall_back_to_the_name():
    df = frame(cand("b"), cand("a"))
    for policy in ("weighted", "balanced"):
        rec = recommend(df, policy, 0.8)
        scores = dict(rec.ranking)
        assert scores["a"] == scores["b"]
        assert rec.champion == "a"  # last resort: model name
        assert "model name" in rec.reasoning


def test_balanced_uses_equal_thirds():
    df = frame(cand("accurate", 0.95, p50=1000, cost=0.004), cand("fast_cheap", 0.85, p50=200, cost=0.001))
    rec = recommend(df, "balanced", 0.8, ANCHORS)
    assert rec.champion == "fast_cheap"
    assert dict(rec.ranking) == pytest.approx({"fast_cheap": (0.25 + 1000 / 1200 + 2 / 3) / 3,
                                               "accurate": (0.75 + 0.5 + 1 / 3) / 3})


def test_a_weak_model_joining_does_not_change_the_winner():
    # The example: A (95%, slow) beats B (90%, fast); D (80%, fast) joins. Min-max normalisation
    # across candidates used to hand the win to B; fixed anchors keep every score where it was.
    a, b, d = cand("A", 0.95, p50=1500), cand("B", 0.90, p50=300), cand("D", 0.80, p50=300)
    for policy in ("weighted", "balanced"):
        two = recommend(frame(a, b), policy, 0.8, ANCHORS)
        three = recommend(frame(a, b, d), policy, 0.8, ANCHORS)
        assert two.champion == three.champion
        assert dict(three.ranking)["A"] == dict(two.ranking)["A"]


def test_anchors_must_be_positive():
    with pytest.raises(ValueError, match="latency_target_ms"):
        Anchors(latency_target_ms=0)
    with pytest.raises(ValueError, match="budget_per_case_usd"):
        Anchors(budget_per_case_usd=-1.0)


def test_speed_picks_lowest_latency_among_qualifiers():
    df = frame(cand("slow", 0.95, p50=900), cand("fast", 0.82, p50=120), cand("fastest_but_bad", 0.5, p50=50))
    rec = recommend(df, "speed", 0.8)
    assert (rec.champion, rec.runner_up) == ("fast", "slow")
    assert rec.champion_score == 120.0
    # the champion is less accurate, and the confidence says so honestly
    assert rec.confidence < 0.5


def test_quality_orders_by_accuracy_then_correctness_then_consistency():
    df = frame(
        cand("c", 0.9, correctness=0.8, consistency=0.9),
        cand("a", 0.9, correctness=0.8, consistency=1.0),
        cand("b", 0.9, correctness=0.85, consistency=0.5),
        cand("d", 0.85, correctness=1.0, consistency=1.0),
    )
    rec = recommend(df, "quality", 0.8)
    assert rec.qualified == ["b", "a", "c", "d"]
    assert "tied" not in rec.reasoning  # b beat a on the policy's own rule, not a tie-break


def test_cost_ranks_unknown_cost_last():
    df = frame(
        cand("unknown_price", 0.99, cost=None),
        cand("pricey", 0.85, cost=0.01),
        cand("free_local", 0.81, cost=0.0),
    )
    rec = recommend(df, "cost", 0.8)
    assert rec.qualified == ["free_local", "pricey", "unknown_price"]
    assert rec.ranking[-1] == ("unknown_price", None)
    assert "$0 per case" in rec.reasoning
    assert "unknown for unknown_price" in rec.reasoning


def test_cost_with_all_prices_unknown_falls_back_to_tie_break():
    df = frame(cand("x", 0.85, cost=None), cand("y", 0.9, cost=None))
    rec = recommend(df, "cost", 0.8)
    assert rec.champion == "y" and rec.champion_score is None
    assert "tie was broken by higher accuracy" in rec.reasoning


def test_reliable_prefers_success_times_consistency_then_accuracy():
    df = frame(
        cand("accurate_flaky", 0.95, success_rate=0.9, consistency=0.9),  # 0.81
        cand("steady", 0.85, success_rate=1.0, consistency=0.95),  # 0.95
        cand("steady_better", 0.88, success_rate=0.95, consistency=1.0),  # 0.95, higher accuracy
    )
    rec = recommend(df, "reliable", 0.8)
    assert rec.qualified == ["steady_better", "steady", "accurate_flaky"]
    assert rec.champion_score == pytest.approx(0.95)


# --------------------------------------------------------------------------
# Ties and determinism
# --------------------------------------------------------------------------

TIED_ROWS = [
    # identical figures except the name: only the alphabetical rule separates them
    cand("zeta", 0.9, p50=300, cost=0.002),
    cand("alpha", 0.9, p50=300, cost=0.002),
    # same accuracy and speed, cheaper
    cand("cheaper", 0.9, p50=300, cost=0.001),
    # same accuracy, faster
    cand("faster", 0.9, p50=250, cost=0.002),
]


@pytest.mark.parametrize("policy", ALL_POLICIES)
def test_result_does_not_depend_on_row_order(policy):
    results = {repr(recommend(frame(*rows), policy, 0.8)) for rows in itertools.permutations(TIED_ROWS)}
    assert len(results) == 1


def test_tie_on_speed_is_broken_by_cost_then_name():
    rec = recommend(frame(*[r for r in TIED_ROWS if r["model"] != "faster"]), "speed", 0.8)
    assert rec.qualified == ["cheaper", "alpha", "zeta"]
    assert "tie was broken by lower cost per case ($0.00100 per case vs $0.00200 per case)" in rec.reasoning

    rec = recommend(frame(TIED_ROWS[0], TIED_ROWS[1]), "speed", 0.8)
    assert rec.champion == "alpha"
    assert "model name (alphabetical: alpha before zeta)" in rec.reasoning


def test_tie_on_quality_is_broken_by_latency():
    rec = recommend(frame(*TIED_ROWS), "quality", 0.8)
    assert rec.champion == "faster"
    assert "lower p50 latency (250 ms vs 300 ms)" in rec.reasoning


# --------------------------------------------------------------------------
# Single candidate, nobody qualifying, failed models
# --------------------------------------------------------------------------


@pytest.mark.parametrize("policy", ALL_POLICIES)
def test_single_candidate_has_no_runner_up(policy):
    rec = recommend(frame(cand("only", 1.0, p50=420, cost=0.0005, calls=60, cases=20)), policy, 0.8)
    assert rec.champion == "only" and rec.runner_up is None and rec.runner_up_score is None
    assert rec.qualified == ["only"]
    assert rec.confidence == pytest.approx(prob_at_least(1.0, 20, 0.8))  # over the 20 cases, not the 60 calls
    assert "only one of 1 candidate" in rec.reasoning
    # figures named in the reasoning, with n beside them
    assert "accuracy 100.0% over n=20 cases (95% CI 90.0%-100.0%)" in rec.reasoning
    assert "p50 420 ms" in rec.reasoning and "$0.000500 per case" in rec.reasoning


def test_confidence_without_per_case_results_is_unpaired_over_cases():
    rec = recommend(frame(cand("a", 0.95, calls=120, cases=40), cand("b", 0.85, calls=60, cases=20)), "quality", 0.8)
    assert rec.confidence == pytest.approx(prob_a_beats_b(0.95, 40, 0.85, 20))
    assert f"confidence a is truly more accurate: {rec.confidence:.2f} (unpaired, over 40 and 20 cases)" in rec.reasoning


def test_confidence_with_per_case_results_is_paired():
    from scipy import stats as sps

    # Both right on 16 cases; a alone right on 3, b alone on 1: paired, the shared cases add no noise.
    a = {f"c{i}": 1.0 if i < 19 else 0.0 for i in range(20)}
    b = {f"c{i}": 1.0 if i < 16 or i == 19 else 0.0 for i in range(20)}
    rec = recommend(frame(cand("a", 0.95, cases=20), cand("b", 0.85, cases=20)), "quality", 0.8, case_accuracy={"a": a, "b": b})
    differences = [a[c] - b[c] for c in sorted(a)] + [1.0, -1.0]
    assert rec.confidence == pytest.approx(1 - sps.ttest_1samp(differences, 0, alternative="greater").pvalue)
    assert "paired over the 20 cases both answered" in rec.reasoning


@pytest.mark.parametrize("policy", ALL_POLICIES)
def test_no_qualifier_means_no_champion(policy):
    rec = recommend(frame(cand("m1", 0.72), cand("m2", 0.6)), policy, 0.8)
    assert rec.champion is None and rec.runner_up is None
    assert rec.champion_score is None and rec.confidence is None
    assert rec.qualified == [] and rec.ranking == []
    assert "No model qualified" in rec.reasoning
    assert "best accuracy seen was 72.0% (m1" in rec.reasoning and "threshold of 80.0%" in rec.reasoning


def test_accuracy_exactly_at_threshold_qualifies():
    # 5 right of 6 summed case by case lands one bit below 5/6
    accuracy = sum([1 / 6] * 5)
    assert accuracy < 5 / 6
    rec = recommend(frame(cand("edge", accuracy)), "quality", 5 / 6)
    assert rec.champion == "edge"


@pytest.mark.parametrize("policy", ALL_POLICIES)
def test_model_whose_calls_all_failed_never_qualifies(policy):
    dead = cand("dead", 0.0, correctness=0.0, consistency=0.0, success_rate=0.0, p50=None, cost=None)
    # even with a zero threshold a model that never answered is not crowned
    rec = recommend(frame(dead), policy, 0.0)
    assert rec.champion is None
    assert "no successful call cannot qualify (dead)" in rec.reasoning

    rec = recommend(frame(dead, cand("alive", 1.0)), policy, 0.0)
    assert rec.champion == "alive" and rec.qualified == ["alive"]


def test_null_latency_is_shown_not_crashed_on():
    # inconsistent upstream data: some success but no latency recorded
    rec = recommend(frame(cand("a", 0.9, p50=None), cand("b", 0.85, p50=300)), "speed", 0.8)
    assert rec.champion == "b" and rec.runner_up == "a"
    assert "p50 unknown" in rec.reasoning


def test_empty_frame_has_no_champion():
    rec = recommend(pl.DataFrame(schema=SCHEMA), "weighted", 0.8)
    assert rec.champion is None and "No candidates" in rec.reasoning


# --------------------------------------------------------------------------
# Independence of irrelevant alternatives
# --------------------------------------------------------------------------
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@st.composite
def candidate_rows(draw, name: str) -> dict:
    return cand(
        name,
        draw(st.sampled_from([0.5, 0.7, 0.8, 0.85, 0.9, 0.95, 1.0])),
        correctness=draw(st.sampled_from([0.6, 0.8, 1.0])),
        consistency=draw(st.sampled_from([0.5, 0.9, 1.0])),
        success_rate=draw(st.sampled_from([0.0, 0.9, 1.0])),
        p50=draw(st.one_of(st.none(), st.floats(1, 20_000))),
        cost=draw(st.one_of(st.none(), st.just(0.0), st.floats(1e-6, 0.05))),
        cases=20,
    )


@settings(max_examples=150, deadline=None)
@given(data=st.data(), size=st.integers(1, 5), policy=st.sampled_from(ALL_POLICIES))
def test_a_model_that_does_not_win_never_changes_the_champion(data, size, policy):
    rows = [data.draw(candidate_rows(f"m{i}")) for i in range(size)]
    extra = data.draw(candidate_rows("extra"))
    anchors = Anchors(data.draw(st.floats(100, 5000)), data.draw(st.floats(1e-5, 0.01)))
    without = recommend(frame(*rows), policy, 0.8, anchors)
    with_extra = recommend(frame(*rows, extra), policy, 0.8, anchors)
    if with_extra.champion != "extra":
        # Adding (or, read backwards, removing) a model that does not win leaves the champion where it was.
        assert with_extra.champion == without.champion
        others = {m: score for m, score in with_extra.ranking if m != "extra"}
        assert others == dict(without.ranking)
