"""Numeric figures for Dagster materialization metadata, as plain floats under stable keys.

The Dagster UI plots a float metadata key across an asset's materializations, so each key must
keep its name and type from run to run: `<task>/champion_accuracy`, `<model>/<task>/p95_latency_ms`.
A figure that is unknown (no champion, no known price) is left out rather than written as 0.
"""

from __future__ import annotations

import polars as pl

from model_eval.report.data import ReportData

METRIC_FIGURES = ("accuracy", "accuracy_low", "accuracy_high", "p95_latency_ms", "cost_per_case_usd", "success_rate")


def recommendation_figures(data: ReportData) -> dict[str, float | str]:
    figures: dict[str, float | str] = {}
    for section in data.tasks:
        task = section.task
        figures[f"{task}/champion"] = section.champion or "none qualifies"
        if not section.leaderboard.is_empty():
            figures[f"{task}/best_accuracy"] = float(section.leaderboard["accuracy"].max())
        metrics = section.champion_metrics()
        if metrics is None:
            continue
        figures[f"{task}/champion_accuracy"] = float(metrics["accuracy"])
        figures[f"{task}/champion_accuracy_low"] = float(metrics["accuracy_low"])
        if metrics["p95_latency_ms"] is not None:
            figures[f"{task}/champion_p95_latency_ms"] = float(metrics["p95_latency_ms"])
        if metrics["cost_per_case_usd"] is not None:
            figures[f"{task}/champion_cost_per_case_usd"] = float(metrics["cost_per_case_usd"])
        else:
            figures[f"{task}/champion_cost"] = "unknown"
    return figures


def metrics_figures(board: pl.DataFrame) -> dict[str, float]:
    """One float per (model, task, figure) from a leaderboard (one metrics row per model and task)."""
    figures = {}
    for row in board.iter_rows(named=True):
        for name in METRIC_FIGURES + tuple(c for c in ("flip_rate", "pass_all_k") if c in board.columns):
            if row.get(name) is not None:
                figures[f"{row['model']}/{row['task']}/{name}"] = float(row[name])
    return figures
