"""Score inference results with each task's registered scorer."""

from __future__ import annotations

import json

import polars as pl

from model_eval.golden import TaskSpec
from model_eval.scorers import get_scorer

SCORE_SCHEMA = {
    "eval_run_id": pl.String, "model": pl.String, "task": pl.String, "dataset_version": pl.String, "case_id": pl.String,
    "repeat": pl.Int32, "scorer": pl.String, "score": pl.Float64, "correct": pl.Boolean, "parsed": pl.String,
    "reason": pl.String, "call_failed": pl.Boolean, "latency_ms": pl.Float64, "input_tokens": pl.Int64,
    "output_tokens": pl.Int64, "cost_usd": pl.Float64,
}


def score_results(results: pl.DataFrame, cases: pl.DataFrame, tasks: dict[str, TaskSpec]) -> pl.DataFrame:
    """One score row per inference row. A failed call scores 0 and says so; nothing here raises on model output.

    `results` has the inference_results columns; `cases` has golden_cases' (task, dataset_version, case_id, expected_json).
    """
    expected = {
        # A judge task's case may have no expected answer (NULL); pure scorers never see those tasks.
        (row["task"], row["dataset_version"], row["case_id"]): json.loads(row["expected_json"]) if row["expected_json"] is not None else None
        for row in cases.select("task", "dataset_version", "case_id", "expected_json").iter_rows(named=True)
    }
    rows = []
    for row in results.iter_rows(named=True):
        key = (row["task"], row["dataset_version"], row["case_id"])
        base = {k: row[k] for k in ("eval_run_id", "model", "task", "dataset_version", "case_id", "repeat",
                                    "latency_ms", "input_tokens", "output_tokens", "cost_usd")}
        rows.append({**base, **score_row(row, tasks.get(row["task"]), key in expected, expected.get(key))})
    return pl.DataFrame(rows, schema=SCORE_SCHEMA)


def score_row(row: dict, task: TaskSpec | None, known_case: bool, expected) -> dict:
    """The score fields of one inference row (scorer, score, correct, parsed, reason, call_failed).

    `known_case`: the case is in the current golden set, with `expected` its expected answer. Also
    used by adaptive evaluation to score each answer the moment it arrives (model_eval/adaptive_run.py)."""
    if task is None or not known_case:
        # The golden set changed under the results (task removed or case gone): say so, never guess.
        return {"scorer": task.scorer if task else None, "score": 0.0, "correct": False, "parsed": None,
                "reason": "case is not in the current golden set", "call_failed": row["error_class"] is not None}
    if row["error_class"] is not None:
        return {"scorer": task.scorer, "score": 0.0, "correct": False, "parsed": None,
                "reason": f"call failed: {row['error_class']}", "call_failed": True}
    result = get_scorer(task.scorer).score(row["response_text"], expected, task.scorer_settings)
    return {"scorer": task.scorer, "score": float(result.value), "correct": bool(result.correct),
            "parsed": result.parsed, "reason": result.reason, "call_failed": False}
