"""Metrics SQL against scores whose figures are worked out by hand."""

from __future__ import annotations

import duckdb
import polars as pl
import pytest

from model_eval.metrics import compute_metrics
from model_eval.scoring import SCORE_SCHEMA
from model_eval.stats import wilson_interval
from model_eval.warehouse import create_tables


def _scores(rows: list[tuple]) -> pl.DataFrame:
    """rows: (model, case_id, repeat, correct, parsed, call_failed, latency_ms, cost_usd)."""
    records = [{
        "eval_run_id": "r1", "model": m, "task": "t", "dataset_version": "v1", "case_id": c, "repeat": r,
        "scorer": "label", "score": 1.0 if ok else 0.0, "correct": ok, "parsed": parsed, "reason": "",
        "call_failed": failed, "latency_ms": lat, "input_tokens": None if failed else 100,
        "output_tokens": None if failed else 10, "cost_usd": cost,
    } for m, c, r, ok, parsed, failed, lat, cost in rows]
    return pl.DataFrame(records, schema=SCORE_SCHEMA).with_columns(pl.lit("2026-01-01").str.to_datetime().alias("scored_at"))


@pytest.fixture
def conn():
    connection = duckdb.connect()
    create_tables(connection)
    yield connection
    connection.close()


def _load(conn, frame):
    conn.register("f", frame.to_arrow())
    conn.execute("INSERT INTO scores BY NAME SELECT * FROM f")


def test_metrics_match_hand_computed_figures(conn):
    # Case a: right twice (consistent). Case b: right once, wrong once with another answer.
    # Case c: one failed call, one wrong answer.
    _load(conn, _scores([
        ("m", "a", 0, True, "x", False, 100.0, 0.001), ("m", "a", 1, True, "x", False, 200.0, 0.001),
        ("m", "b", 0, True, "y", False, 300.0, 0.001), ("m", "b", 1, False, "z", False, 400.0, 0.001),
        ("m", "c", 0, False, None, True, 5000.0, None), ("m", "c", 1, False, "q", False, 500.0, 0.001),
    ]))
    row = compute_metrics(conn).row(0, named=True)
    assert (row["cases"], row["calls"], row["repeats"]) == (3, 6, 2)
    assert row["accuracy"] == pytest.approx((1 + 0.5 + 0) / 3)  # mean over cases of each case's share of right repeats
    # The interval is over the 3 cases (successes = 1.5), not over the 6 calls.
    assert (row["accuracy_low"], row["accuracy_high"]) == pytest.approx(wilson_interval(1.5, 3))
    assert row["correctness"] == pytest.approx(1 / 3)           # only case a right in every repeat
    assert row["pass_all_k"] == pytest.approx(1 / 3)            # pass^k with k = 2: the same share
    assert row["flip_rate"] == pytest.approx(1 / 3)             # case b: right once, wrong once
    assert row["consistency"] == pytest.approx(1 / 3)           # b disagrees, c has a failed call
    assert row["success_rate"] == pytest.approx(5 / 6)
    assert row["p50_latency_ms"] == pytest.approx(300.0)        # failed call's 5 s excluded
    assert row["p95_latency_ms"] == pytest.approx(480.0)        # linear interpolation over 100..500
    assert row["total_cost_usd"] == pytest.approx(0.005)
    assert row["cost_per_case_usd"] == pytest.approx(0.005 / 3)
    assert row["mean_output_tokens"] == pytest.approx(10.0)
    assert isinstance(row["accuracy"], float)


def test_one_unknown_price_makes_the_total_unknown_not_smaller(conn):
    _load(conn, _scores([("m", "a", 0, True, "x", False, 100.0, 0.002), ("m", "b", 0, True, "x", False, 100.0, None)]))
    row = compute_metrics(conn).row(0, named=True)
    assert row["total_cost_usd"] is None and row["cost_per_case_usd"] is None


def test_groups_by_model_and_filters_by_eval_run(conn):
    _load(conn, _scores([("m1", "a", 0, True, "x", False, 1.0, 0.0), ("m2", "a", 0, False, "y", False, 2.0, 0.0)]))
    frame = compute_metrics(conn).sort("model")
    assert frame["model"].to_list() == ["m1", "m2"] and frame["accuracy"].to_list() == [1.0, 0.0]
    assert compute_metrics(conn, ["other-run"]).height == 0
    assert compute_metrics(conn, ["r1"]).height == 2


def _same_answer_every_repeat(model: str, right_cases: int, cases: int = 20, repeats: int = 3) -> list[tuple]:
    return [(model, f"c{i:02d}", r, i < right_cases, "PASS" if i < right_cases else "FAIL", False, 100.0, 0.001)
            for i in range(cases) for r in range(repeats)]


def test_repeats_do_not_count_as_cases_for_the_interval(conn):
    # Right on 14 of 20 cases, the same answer on all 3 repeats: n is 20, not 60.
    _load(conn, _scores(_same_answer_every_repeat("m", 14)))
    row = compute_metrics(conn).row(0, named=True)
    low, high = row["accuracy_low"], row["accuracy_high"]
    assert row["cases"] == 20 and row["accuracy"] == pytest.approx(0.7)
    assert round(low, 3) == 0.481 and round(high, 3) == 0.855   # Wilson over 60 calls would say 0.575..0.801
    assert row["flip_rate"] == 0.0 and row["pass_all_k"] == pytest.approx(0.7) and row["consistency"] == 1.0


def test_wilson_on_cases_matches_statsmodels(conn):
    from statsmodels.stats.proportion import proportion_confint

    _load(conn, _scores(_same_answer_every_repeat("m", 14) + _same_answer_every_repeat("n", 3, cases=11, repeats=2)))
    for row in compute_metrics(conn).iter_rows(named=True):
        expected = proportion_confint(round(row["accuracy"] * row["cases"]), row["cases"], alpha=0.05, method="wilson")
        assert (row["accuracy_low"], row["accuracy_high"]) == pytest.approx(expected, abs=1e-12)


def test_an_answer_that_never_parses_is_not_consistent(conn):
    # Case a: no repeat parses (the same garbage every time). Case b: the same parsed answer twice.
    _load(conn, _scores([("m", "a", 0, False, None, False, 10.0, 0.0), ("m", "a", 1, False, None, False, 10.0, 0.0),
                         ("m", "b", 0, True, "x", False, 10.0, 0.0), ("m", "b", 1, True, "x", False, 10.0, 0.0)]))
    row = compute_metrics(conn).row(0, named=True)
    assert row["consistency"] == pytest.approx(0.5) and row["flip_rate"] == 0.0


def test_renumbering_or_shuffling_repeats_changes_no_figure(conn):
    import random

    rng = random.Random(7)
    rows = []
    for i in range(15):  # mixed outcomes within cases, so the repeat numbers carry no information
        outcomes = [rng.random() < 0.6 for _ in range(3)]
        rows += [("m", f"c{i}", r, ok, "PASS" if ok else "FAIL", False, 100.0 + 10 * r + i, 0.001)
                 for r, ok in enumerate(outcomes)]
    shuffled = []
    for i in range(15):
        case_rows = [r for r in rows if r[1] == f"c{i}"]
        numbers = rng.sample([5, 9, 12], 3)  # renumbered and permuted
        shuffled += [(m, c, numbers[k], *rest) for k, (m, c, _, *rest) in enumerate(case_rows)]
    _load(conn, _scores(rows))
    before = compute_metrics(conn).drop("evaluated_at")
    conn.execute("DELETE FROM scores")
    _load(conn, _scores(shuffled))
    after = compute_metrics(conn).drop("evaluated_at")
    assert before.equals(after)


def test_case_accuracies_for_many_evaluations_in_one_scan_match_one_by_one(conn):
    from model_eval.metrics import case_accuracies, case_accuracies_of

    _load(conn, _scores(_same_answer_every_repeat("m", 14) + _same_answer_every_repeat("n", 3, cases=11, repeats=2)
                        + [("n", "c00", 2, False, "FAIL", False, 100.0, 0.001)]))
    wanted = compute_metrics(conn)
    table = case_accuracies_of(conn, wanted)
    for row in wanted.iter_rows(named=True):
        assert table[(row["task"], row["model"])] == case_accuracies(conn, row["model"], row["task"], row["dataset_version"],
                                                                      row["eval_run_id"])
    assert table[("t", "n")]["c00"] == pytest.approx(2 / 3)
    assert case_accuracies_of(conn, wanted.clear()) == {}
