"""Metrics SQL against scores whose figures are worked out by hand."""

from __future__ import annotations

import duckdb
import polars as pl
import pytest

from model_eval.metrics import compute_metrics
from model_eval.scoring import SCORE_SCHEMA
from model_eval.stats import wilson_interval
from model_eval.warehouse import SCHEMA


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
    connection.execute(SCHEMA)
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
    assert (row["cases"], row["calls"]) == (3, 6)
    assert row["accuracy"] == pytest.approx(3 / 6)
    assert (row["accuracy_low"], row["accuracy_high"]) == pytest.approx(wilson_interval(3, 6))
    assert row["correctness"] == pytest.approx(1 / 3)           # only case a right in every repeat
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
