"""Drift: the paired tests against scipy, and the pairing rules on a real DuckDB warehouse (Holm's
adjustment is model_eval.stats.holm_adjust, checked in test_stats.py)."""

from __future__ import annotations

import random
from datetime import datetime, timedelta

import polars as pl
import pytest
from scipy import stats as scipy_stats

from model_eval import warehouse, warehouse_slices
from model_eval.drift import DriftSettings, compute_drift, record_drift, sign_test, wilcoxon_signed_rank
from model_eval.stats import holm_adjust


# ---------------------------------------------------------------- the statistics, against independent implementations
@pytest.mark.parametrize("improved,worsened", [(0, 0), (0, 5), (3, 9), (7, 7), (12, 1), (0, 16), (20, 31)])
def test_sign_test_matches_scipy_binomtest(improved, worsened):
    expected = 1.0 if improved + worsened == 0 else scipy_stats.binomtest(improved, improved + worsened, 0.5).pvalue
    assert sign_test(improved, worsened) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("seed", range(8))
def test_wilcoxon_without_ties_matches_scipy_exact(seed):
    rng = random.Random(seed)
    n = rng.randint(3, 40)
    shift = rng.choice([0.0, 0.3, 1.0])
    differences = [rng.gauss(shift, 1.0) for _ in range(n)]
    mine = wilcoxon_signed_rank(differences)
    theirs = scipy_stats.wilcoxon(differences, method="exact")
    assert mine.method == "exact"
    assert mine.statistic == pytest.approx(theirs.statistic)
    assert mine.p_value == pytest.approx(theirs.pvalue, rel=1e-9)


@pytest.mark.parametrize("seed", range(6))
def test_wilcoxon_with_ties_zeros_or_many_cases_matches_scipy_normal_approximation(seed):
    rng = random.Random(100 + seed)
    n = rng.choice([12, 30, 80, 200])
    # Rounded latencies: ties and zero differences, as real per-case medians have.
    differences = [round(rng.gauss(rng.choice([0, 2]), 5)) for _ in range(n)]
    mine = wilcoxon_signed_rank(differences)
    theirs = scipy_stats.wilcoxon(differences, zero_method="wilcox", correction=False, method="approx")
    assert mine.method == "approx"
    assert mine.statistic == pytest.approx(theirs.statistic)
    assert mine.p_value == pytest.approx(theirs.pvalue, rel=1e-9)


def test_wilcoxon_with_no_nonzero_difference_says_nothing_changed():
    assert wilcoxon_signed_rank([0.0, 0.0]).p_value == 1.0


# ---------------------------------------------------------------- pairing, on a real warehouse
T0 = datetime(2026, 11, 1, 1, 0)


def _case(case_id: str, content: str) -> dict:
    return {"task": "grading", "dataset_version": "v1", "case_id": case_id, "content_hash": content, "line": 1,
            "inputs_json": "{}", "expected_json": '"PASS"', "file_hash": "f-" + content, "ingested_at": T0}


def _rows(run: str, started: datetime, answers: dict[str, list[bool]], latency: dict[str, list[float]] | float = 100.0,
          from_cache: bool = False, model: str = "m", key_prefix: str = "k") -> tuple[list[dict], list[dict], dict]:
    results, scores = [], []
    for case_id, correct in answers.items():
        for repeat, right in enumerate(correct):
            ms = latency[case_id][repeat] if isinstance(latency, dict) else latency
            common = {"eval_run_id": run, "model": model, "task": "grading", "dataset_version": "v1", "case_id": case_id,
                      "repeat": repeat}
            results.append({**common, "cache_key": f"{key_prefix}-{case_id}-{repeat}", "response_text": "PASS",
                            "latency_ms": ms, "error_class": None, "from_cache": from_cache, "completed_at": 0.0})
            scores.append({**common, "correct": right, "score": float(right), "call_failed": False, "latency_ms": ms})
    return results, scores, {"eval_run_id": run, "trigger": "test", "started_at": started, "updated_at": started}


@pytest.fixture
def conn(tmp_path):
    with warehouse.write_connection(tmp_path / "w.duckdb") as connection:
        yield connection


def _load(conn, cases: list[dict], runs: list[tuple[list[dict], list[dict], dict]]) -> None:
    conn.register("c", pl.DataFrame(cases).to_arrow())
    conn.execute("INSERT INTO golden_cases BY NAME SELECT * FROM c")
    for results, scores, run in runs:
        for table, rows in (("inference_results", results), ("scores", scores), ("eval_runs", [run])):
            conn.register("r", pl.DataFrame(rows).to_arrow())
            if table == "eval_runs":   # runs repeat when two models share one
                conn.execute("INSERT OR IGNORE INTO eval_runs BY NAME SELECT * FROM r")
            else:                      # result tables are Parquet slices behind views
                warehouse_slices.append_rows(conn, table, "r")
            conn.unregister("r")


def _cases(n: int) -> list[dict]:
    return [_case(f"c{i:02d}", f"h{i}") for i in range(n)]


def test_a_model_that_turned_wrong_on_unchanged_cases_is_flagged_with_the_exact_sign_test(conn):
    ids = [f"c{i:02d}" for i in range(20)]
    before = {c: [True, True] for c in ids}
    after = {c: [i >= 12, i >= 12] for i, c in enumerate(ids)}  # 12 cases now wrong, none better
    _load(conn, _cases(20), [_rows("r1", T0, before), _rows("r2", T0 + timedelta(days=7), after)])
    frame = compute_drift(conn, "r2")
    accuracy = frame.filter(pl.col("metric") == "accuracy").row(0, named=True)
    assert (accuracy["baseline_eval_run_id"], accuracy["paired_cases"], accuracy["paired_calls"]) == ("r1", 20, 40)
    assert (accuracy["improved_cases"], accuracy["worsened_cases"]) == (0, 12)
    assert accuracy["p_value"] == pytest.approx(scipy_stats.binomtest(0, 12, 0.5).pvalue)
    assert accuracy["current_value"] == pytest.approx(8 / 20) and accuracy["baseline_value"] == 1.0
    assert accuracy["drifted"] and accuracy["direction"] == "worse" and "DRIFT" in accuracy["detail"]
    latency = frame.filter(pl.col("metric") == "latency_ms").row(0, named=True)
    assert not latency["drifted"] and latency["p_value"] == 1.0  # identical latencies


def test_a_small_change_is_not_flagged_and_holm_adjusts_across_the_run(conn):
    ids = [f"c{i:02d}" for i in range(20)]
    before = {c: [True] for c in ids}
    after = {c: [i >= 2] for i, c in enumerate(ids)}  # 2 of 20 flipped: p = 0.5
    later = T0 + timedelta(days=7)
    _load(conn, _cases(20), [_rows("r1", T0, before), _rows("r2", later, after),
                              _rows("r1", T0, before, model="n", key_prefix="n"), _rows("r2", later, before, model="n", key_prefix="n")])
    frame = compute_drift(conn, "r2")
    assert frame.height == 4  # two models x (accuracy, latency)
    assert not frame.filter(pl.col("metric") == "accuracy")["drifted"].any()
    assert frame["p_value_holm"].to_list() == pytest.approx(holm_adjust(frame["p_value"].to_list()))


def test_latency_drift_is_the_wilcoxon_test_on_per_case_median_latency(conn):
    rng = random.Random(3)
    ids = [f"c{i:02d}" for i in range(15)]
    before_ms = {c: [rng.uniform(80, 120) for _ in range(3)] for c in ids}
    after_ms = {c: [2.2 * v + rng.uniform(-5, 5) for v in before_ms[c]] for c in ids}
    right = {c: [True] * 3 for c in ids}
    _load(conn, _cases(15), [_rows("r1", T0, right, before_ms), _rows("r2", T0 + timedelta(days=7), right, after_ms)])
    latency = compute_drift(conn, "r2").filter(pl.col("metric") == "latency_ms").row(0, named=True)
    medians = [(sorted(after_ms[c])[1], sorted(before_ms[c])[1]) for c in ids]
    expected = scipy_stats.wilcoxon([a - b for a, b in medians], method="exact")
    assert latency["p_value"] == pytest.approx(expected.pvalue)
    assert latency["drifted"] and latency["direction"] == "worse" and latency["worsened_cases"] == 15
    # The same shift under the minimum change is significant but not flagged.
    small = compute_drift(conn, "r2", DriftSettings(min_latency_change=2.0)).filter(pl.col("metric") == "latency_ms")
    assert not small["drifted"][0] and "under the 200% minimum change" in small["detail"][0]


def test_cached_answers_changed_cases_and_changed_requests_are_not_evidence(conn):
    ids = [f"c{i:02d}" for i in range(10)]
    before = {c: [True] for c in ids}
    after = {c: [False] for c in ids}
    cases = _cases(10) + [_case("c00", "edited")]  # c00's content changed at some point
    _load(conn, cases, [
        _rows("r1", T0, before),
        _rows("r2", T0 + timedelta(days=7), after),                                   # asked anew: paired
        _rows("r3", T0 + timedelta(days=14), after, from_cache=True),                 # from the cache: nothing to compare
        _rows("r4", T0 + timedelta(days=21), after, model="m", key_prefix="other"),   # a different request: not paired
    ])
    paired = compute_drift(conn, "r2").filter(pl.col("metric") == "accuracy").row(0, named=True)
    assert paired["paired_cases"] == 9  # c00 left out
    assert compute_drift(conn, "r3").is_empty()
    r4 = compute_drift(conn, "r4")
    assert r4.is_empty()


def test_recorded_drift_replaces_the_runs_slice(conn):
    ids = [f"c{i:02d}" for i in range(12)]
    _load(conn, _cases(12), [_rows("r1", T0, {c: [True] for c in ids}),
                              _rows("r2", T0 + timedelta(days=7), {c: [False] for c in ids})])
    first = record_drift(conn, "r2")
    record_drift(conn, "r2")
    stored = conn.sql("SELECT metric, drifted, p_value FROM model_drift WHERE eval_run_id = 'r2' ORDER BY metric").fetchall()
    assert len(stored) == first.height == 2
    assert stored[0][0] == "accuracy" and stored[0][1] is True
