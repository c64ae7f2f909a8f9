"""The weekly re-evaluation. Its cron comes from deployment.yaml, read when the definitions are built
(not when this module is imported): a bad deployment.yaml keeps the code location loading with the
default cron, and every tick of the schedule then fails with the file, line and field to fix."""

from __future__ import annotations

import dagster as dg

from model_eval.defs.automation.requests import callable_models, evaluation_requests, missing_partitions
from model_eval.defs import jobs
from model_eval.defs.resources import ModelEvalResource
from model_eval.deployment import DEFAULT_SCHEDULE_CRON, load_deployment
from model_eval.errors import InputError
from model_eval.settings import ProjectPaths

WEEKLY_MAX_CACHE_AGE_HOURS = 24.0  # a weekly re-evaluation asks the models again


def build_weekly_evaluation(cron: str, timezone: str) -> dg.ScheduleDefinition:
    @dg.schedule(name="weekly_evaluation", cron_schedule=cron, execution_timezone=timezone,
                 job=jobs.refresh_model_job, default_status=dg.DefaultScheduleStatus.RUNNING,
                 description="Re-evaluate every enabled model on every task (asking the models again), then recommend and promote.")
    def weekly_evaluation(context: dg.ScheduleEvaluationContext, model_eval: ModelEvalResource):
        project = model_eval.project()  # a bad project file fails this tick, naming file, line and field
        models = callable_models([m for m in project.registry.models if m.enabled], context.log, project.paths.warehouse_file)
        if not models:
            return dg.SkipReason("no enabled model can be called (see the log for each reason)")
        # A schedule cannot return partition requests, so it adds the partitions itself.
        for request in missing_partitions(context.instance, [m.name for m in models]):
            context.instance.add_dynamic_partitions(request.partitions_def_name, list(request.partition_keys))
        eval_run_id = f"weekly-{context.scheduled_execution_time:%Y%m%dT%H%M}"
        # Exhaustive unless deployment.yaml's `adaptive.schedule` says otherwise (never `adaptive.enabled` alone).
        return evaluation_requests(models, eval_run_id, "schedule", eval_run_id, max_cache_age_hours=WEEKLY_MAX_CACHE_AGE_HOURS,
                                   adaptive=project.deployment.adaptive.schedule)

    return weekly_evaluation


@dg.definitions
def weekly_schedule() -> dg.Definitions:
    paths = ProjectPaths.from_env()
    try:
        deployment = load_deployment(paths.deployment_file, paths.base_dir)
        cron, timezone = deployment.schedule_cron, deployment.schedule_timezone
    except InputError:
        cron, timezone = DEFAULT_SCHEDULE_CRON, "UTC"
    return dg.Definitions(schedules=[build_weekly_evaluation(cron, timezone)])
