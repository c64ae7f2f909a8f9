"""Steps `production_calls` and `model_assignments`: load what applications logged, then turn the newest
recommendations into assignment changes, gated and staged, with automatic rollback."""

from __future__ import annotations

from model_eval import warehouse
from model_eval.crash_points import crash_point
from model_eval.alerts import send_alert
from model_eval.production_log import has_call_logs, ingest_call_logs
from model_eval.project import Project
from model_eval.promotion import Decision, alert_for, apply_decisions, ensure_initial_assignments, newest_champions, plan_promotions
from model_eval.steps._common import Log
from model_eval.steps.models import publish_assignments


def ingest_production_calls(project: Project, log: Log) -> int:
    """Load new lines of the router's append-only call logs into `production_calls`."""
    if not has_call_logs(project.paths.call_log_dir):
        log.info(f"production calls: no call logs in {project.paths.call_log_dir}")
        return 0   # no write: a warehouse write costs a copy of the file
    with warehouse.write_connection(project.paths.warehouse_file) as conn:
        added = ingest_call_logs(project.paths.call_log_dir, conn)
    log.info(f"production calls: {added} new row(s) from {project.paths.call_log_dir}")
    return added


def promote(project: Project, eval_run_id: str, log: Log, assigned_by: str = "pipeline") -> list[Decision]:
    tasks, deployment = list(project.tasks), project.deployment
    with warehouse.write_connection(project.paths.warehouse_file) as conn:
        with warehouse.transaction(conn):
            initial = ensure_initial_assignments(conn, deployment, project.registry, tasks)
            decisions = plan_promotions(conn, tasks, newest_champions(conn, tasks), deployment, eval_run_id=eval_run_id)
            apply_decisions(conn, decisions, tasks, eval_run_id, assigned_by)
            crash_point("promotion.write")
        publish_assignments(project, conn)
    crash_point("promotion.published")
    if initial:
        log.info(f"initial assignments from {deployment.path.name}: {', '.join(initial)}")
    for decision in decisions:
        log.info(f"{decision.task}: {decision.action}: {decision.reason}")
        alert = alert_for(decision)
        if alert is not None:
            for report in send_alert(alert, deployment.alerts, log):
                if not report.ok:
                    log.warning(f"alert channel {report.channel} failed: {report.error}")
    return decisions
