"""The summary after a scheduled evaluation: a few lines for people who will not open the report.

It goes out every time, also when nothing changed: silence would look the same as a broken schedule.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import polars as pl

from model_eval.report.data import ReportData, RunChanges

SAFETY_ACTIONS = ("rollback", "abort_rollout", "manual_rollback")


@dataclass(frozen=True)
class Summary:
    title: str
    text: str
    severity: str          # "info", or "warning" when something got worse
    facts: dict


def _figures(metrics: dict | None) -> str:
    if metrics is None:
        return ""
    cost = "cost unknown" if metrics["cost_per_case_usd"] is None else f"${metrics['cost_per_case_usd']:.6f}/case"
    p95 = "-" if metrics["p95_latency_ms"] is None else f"{metrics['p95_latency_ms']:.0f} ms"
    return (f"accuracy {metrics['accuracy']:.2f} (95% interval {metrics['accuracy_low']:.2f}-{metrics['accuracy_high']:.2f}, "
            f"{metrics['cases']} cases), p95 {p95}, {cost}")


def build_summary(data: ReportData, changes: RunChanges, report_path: Path | None) -> Summary:
    lines: list[str] = []
    run = data.run
    when = f" ({run['trigger']}, started {run['started_at']:%Y-%m-%d %H:%M} UTC)" if run else ""
    lines.append(f"Evaluation run {data.eval_run_id}{when}.")
    # Cost and report first: chat channels cut long messages, and these two lines matter most.
    if data.run_cost_usd is None:
        cost = f"unknown ({data.unpriced_calls} call(s) have no known price)"
    else:
        cost = f"${data.run_cost_usd:.4f} for the calls sent in this run"
    lines += [f"Cost: {cost}.", f"Report: {report_path if report_path is not None else 'not written'}"]

    lines += ["", "Champion per task:"]
    for section in data.tasks:
        if section.champion:
            lines.append(f"- {section.task} ({section.dataset_version}): {section.champion}, {_figures(section.champion_metrics())}")
        else:
            best = section.leaderboard.head(1).to_dicts()
            why = (f"best was {best[0]['model']} at {best[0]['accuracy']:.2f}" if best else "no model was evaluated")
            threshold = f" against a threshold of {section.threshold:.2f}" if section.threshold is not None else ""
            lines.append(f"- {section.task} ({section.dataset_version}): no model qualifies ({why}{threshold})")

    changed = _changes(data, changes)
    lines += ["", f"Changes since the previous run ({changes.previous_eval_run_id or 'none: this is the first'}):"]
    lines += [f"- {c}" for c in changed] or ["- none"]

    regressions = _regressions(data, changes)
    lines += ["", "Regressions:"]
    lines += [f"- {r}" for r in regressions] or ["- none"]

    drift_rows = [r for s in data.tasks if not s.drift.is_empty() for r in s.drift.iter_rows(named=True)]
    flagged = [r for r in drift_rows if r["drifted"]]
    lines += ["", f"Drift ({len(drift_rows)} paired comparison(s) with earlier fresh answers):"]
    lines += [f"- {r['model']} on {r['task']}: {_drift_line(r)}" for r in flagged] or [
        "- none detected" if drift_rows else "- not measured: no model was asked the same requests anew in an earlier run"]

    bad = len(regressions) + sum(1 for r in flagged if r["direction"] == "worse")
    title = (f"weekly summary {data.eval_run_id}: {len(changed)} change(s), {len(regressions)} regression(s), "
             f"{len(flagged)} drift flag(s)")
    facts = {"eval_run_id": data.eval_run_id, "previous_eval_run_id": changes.previous_eval_run_id,
             "champions": {s.task: s.champion for s in data.tasks}, "changes": len(changed),
             "regressions": len(regressions), "drift_flags": len(flagged), "run_cost_usd": data.run_cost_usd,
             "report": str(report_path) if report_path is not None else None}
    return Summary(title=title, text="\n".join(lines), severity="warning" if bad else "info", facts=facts)


def _drift_line(row: dict) -> str:
    unit, digits = ("", 3) if row["metric"] == "accuracy" else (" ms", 0)
    return (f"{row['metric']} {row['direction']}, "
            f"{row['baseline_value']:.{digits}f}{unit} -> {row['current_value']:.{digits}f}{unit} on "
            f"{row['paired_cases']} paired cases, Holm-adjusted p={row['p_value_holm']:.2g} (vs run {row['baseline_eval_run_id']})")


def _changes(data: ReportData, changes: RunChanges) -> list[str]:
    out = []
    for section in data.tasks:
        before = changes.previous.get(section.task)
        if before is None:
            if changes.previous_eval_run_id is not None:
                out.append(f"{section.task}: first recommendation")
            continue
        if before["dataset_version"] != section.dataset_version:
            out.append(f"{section.task}: golden set {before['dataset_version']} -> {section.dataset_version}")
        if before["champion"] != section.champion:
            out.append(f"{section.task}: champion {before['champion'] or 'none'} -> {section.champion or 'none'}")
        elif section.champion:
            old, new = changes.previous_metrics.get((section.task, section.champion)), section.champion_metrics()
            if old and new and round(old["accuracy"], 3) != round(new["accuracy"], 3):
                out.append(f"{section.task}: champion {section.champion} kept; accuracy {old['accuracy']:.3f} -> {new['accuracy']:.3f}")
        added = sorted(set(section.recommendation["candidates"]) - set(before["candidates"]))
        removed = sorted(set(before["candidates"]) - set(section.recommendation["candidates"]))
        if added:
            out.append(f"{section.task}: new candidate(s) {', '.join(added)}")
        if removed:
            out.append(f"{section.task}: no longer evaluated: {', '.join(removed)}")
    for row in changes.assignment_changes.iter_rows(named=True):
        out.append(f"{row['task']}: assignment {row['action']}: {row['model']} ({row['stage']}) - {row['reason']}")
    return out


def _regressions(data: ReportData, changes: RunChanges) -> list[str]:
    """Things that got worse, with evidence: drift for the worse, safety actions, lost qualification."""
    out = []
    for section in data.tasks:
        for r in (section.drift.filter(pl.col("drifted") & (pl.col("direction") == "worse")).iter_rows(named=True)
                  if not section.drift.is_empty() else []):
            out.append(f"{r['model']} on {section.task}: {_drift_line(r)}")
        before = changes.previous.get(section.task)
        if before is not None and before["champion"] and section.champion is None and before["dataset_version"] == section.dataset_version:
            out.append(f"{section.task}: {before['champion']} no longer qualifies and no other model does")
    for row in changes.assignment_changes.iter_rows(named=True):
        if row["action"] in SAFETY_ACTIONS:
            out.append(f"{row['task']}: {row['action']} to {row['model']}: {row['reason']}")
    return out
