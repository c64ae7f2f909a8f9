"""The Dagster code location (see workspace.yaml)."""

import dagster as dg

from model_eval.defs.assets.golden import golden_cases
from model_eval.defs.assets.inference import inference_results
from model_eval.defs.assets.registry import model_registry
from model_eval.defs.assets.promotion import model_assignments, production_calls
from model_eval.defs.assets.scoring import model_task_metrics, recommendations, scores
from model_eval.defs.checks import gate_checks
from model_eval.defs.automation import (
    alert_on_run_failure,
    evaluation_complete,
    golden_version_sensor,
    new_model_sensor,
    weekly_evaluation,
)
from model_eval.defs.jobs import evaluate_model_job, prepare_job, recommend_job, refresh_model_job
from model_eval.defs.resources import ModelEvalResource

defs = dg.Definitions(
    assets=[golden_cases, model_registry, inference_results, scores, model_task_metrics, recommendations,
            production_calls, model_assignments],
    asset_checks=gate_checks,
    jobs=[prepare_job, evaluate_model_job, recommend_job, refresh_model_job],
    schedules=[weekly_evaluation],
    sensors=[new_model_sensor, golden_version_sensor, evaluation_complete, alert_on_run_failure],
    resources={"model_eval": ModelEvalResource()},
)


def refresh_model_job() -> dg.JobDefinition:
    """The `refresh_model` job, for `dg.reconstructable` (multiprocess execution outside the UI)."""
    return defs.resolve_job_def("refresh_model")
