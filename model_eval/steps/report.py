"""Steps `model_drift` and the report: drift of each model since its previous fresh run, the HTML
report of the run (written by `model_assignments`, once the run's gates and assignments are known), and the summary
sent after a scheduled evaluation."""

from __future__ import annotations

from pathlib import Path

import polars as pl

from model_eval import warehouse
from model_eval.alerts import Alert, DeliveryReport, send_alert
from model_eval.drift import record_drift
from model_eval.project import Project
from model_eval.report import WrittenReport, report_data, summarize, write_report
from model_eval.report.data import ReportData
from model_eval.report.summary import Summary
from model_eval.steps._common import Log


def detect_drift(project: Project, eval_run_id: str, log: Log) -> pl.DataFrame:
    """Record the run's `model_drift` rows with deployment.yaml's drift settings, and log the flags."""
    with warehouse.write_connection(project.paths.warehouse_file) as conn:
        frame = record_drift(conn, eval_run_id, project.deployment.drift)
    for row in frame.filter(pl.col("drifted")).iter_rows(named=True):
        log.warning(f"drift: {row['model']} on {row['task']}: {row['detail']}")
    log.info(f"drift: {frame.height} comparison(s) with earlier fresh answers, {int(frame['drifted'].sum() or 0)} flagged")
    return frame


def write_run_report(project: Project, eval_run_id: str | None = None) -> WrittenReport:
    """The run's HTML report (the newest recommended run when None); thresholds come from the loaded tasks."""
    return write_report(project.paths, eval_run_id, project.tasks)


def run_report_data(project: Project, eval_run_id: str, log: Log) -> ReportData | None:
    """What the run's report will show, without drawing it (for the UI's figures); None if it cannot be read."""
    try:
        return report_data(project.paths, eval_run_id, project.tasks)
    except Exception as exc:  # noqa: BLE001 - figures for the UI never fail the step that shows them
        log.warning(f"report figures for {eval_run_id} not read: {type(exc).__name__}: {exc}")
        return None


def write_run_report_safely(project: Project, eval_run_id: str, log: Log) -> WrittenReport | None:
    """The report as a by-product of a step that must not fail for it: a promotion or a rollback never
    waits on a chart. The failure is logged with its reason; `model-eval report` can write it later."""
    try:
        report = write_run_report(project, eval_run_id)
    except Exception as exc:  # noqa: BLE001 - see the docstring
        log.warning(f"report for {eval_run_id} not written: {type(exc).__name__}: {exc}")
        return None
    log.info(f"report: {report.path}")
    return report


def send_run_summary(project: Project, eval_run_id: str, report_path: Path | None,
                     log: Log) -> tuple[Summary, list[DeliveryReport]]:
    """Send the run's summary to every alert channel deployment.yaml configures, also when nothing changed."""
    summary = summarize(project.paths, eval_run_id, report_path, project.tasks)
    alert = Alert(kind="weekly_summary", title=summary.title, details=summary.text, severity=summary.severity,
                  facts=summary.facts)
    return summary, send_alert(alert, project.deployment.alerts, log)
