import dagster as dg
import polars as pl

from model_eval.defs.partitions import MODELS
from model_eval.defs.resources import ModelEvalResource, eval_run_id, is_orchestrated, trigger
from model_eval.eval_runs import complete_evaluation
from model_eval.serving import local_models_served
from model_eval.adaptive_run import resolve_switch
from model_eval.steps.evaluation import inference_summary, run_inference, score_model


class InferenceConfig(dg.Config):
    tasks: list[str] = []  # empty: every task the model serves
    # Reuse cached answers only if younger than this (hours); None reuses any. The weekly schedule
    # sets it so a re-evaluation really asks the models again.
    max_cache_age_hours: float | None = None
    # Adaptive evaluation (docs/decisions.md, section 11): true or false decides; None (the default)
    # follows deployment.yaml's `adaptive.enabled`. The weekly schedule passes `adaptive.schedule`.
    adaptive: bool | None = None


@dg.asset(
    group_name="evaluation",
    partitions_def=MODELS,
    deps=["golden_cases", "model_registry"],
    kinds={"litellm", "duckdb"},
    description="Every (case x repeat) answered by one model through litellm; cached, retried, replaced atomically.",
)
def inference_results(context: dg.AssetExecutionContext, config: InferenceConfig, model_eval: ModelEvalResource) -> dg.MaterializeResult:
    project = model_eval.project()
    spec = project.registry.get(context.partition_key)

    def progress(stats):
        context.log.info(f"{spec.name}: {stats.done}/{stats.total} calls ({stats.cached} cached, {stats.retries} retries, {stats.errors} failed)")

    adaptive = resolve_switch(config.adaptive, project.deployment.adaptive.enabled)
    with local_models_served(project.registry, [spec], project.paths.warehouse_file.parent / "run"):
        stats = run_inference(project, spec.name, eval_run_id(context), context.log, task_names=config.tasks or None,
                              trigger=trigger(context), dagster_run_id=context.run.run_id, on_progress=progress,
                              cache_max_age_s=None if config.max_cache_age_hours is None else config.max_cache_age_hours * 3600,
                              adaptive=adaptive)
    summary = inference_summary(project, spec.name, eval_run_id(context))
    return dg.MaterializeResult(metadata={
        "eval_run_id": eval_run_id(context),
        "calls": stats.total,
        "sent_to_model": stats.sent,
        "from_cache": stats.cached,
        "retries": stats.retries,
        "failed_calls": stats.errors,
        "adaptive": adaptive,
        "not_asked": stats.skipped,
        # How each task's evaluation ended: complete, or stopped (never ranked) with the case it stopped at and why.
        "status_by_task": dg.MetadataValue.json(summary.statuses),
        "error_classes": dg.MetadataValue.json(stats.error_classes),
        "wall_seconds": round(stats.wall_s, 2),
        # Median output tokens/s of the calls sent, and a local model's peak resident memory (null: unknown).
        "capacity_by_task": dg.MetadataValue.json(summary.capacity),
        "dagster/row_count": stats.done,
    })


@dg.asset(group_name="evaluation", partitions_def=MODELS, deps=["inference_results"], kinds={"duckdb"},
          description="Each result scored by its task's registered scorer.")
def scores(context: dg.AssetExecutionContext, model_eval: ModelEvalResource) -> dg.MaterializeResult:
    project = model_eval.project()
    scored = score_model(project, context.partition_key, eval_run_id(context), context.log)
    frame, judging = scored.scores, scored.judging
    if not is_orchestrated(context):
        # A run of its own (e.g. from the UI) is its own evaluation, and scoring is its last step.
        complete_evaluation(project.paths.warehouse_file, eval_run_id(context))
    # Accuracy over cases (each case's share of right repeats), with n = cases beside it.
    per_case = frame.group_by("task", "case_id").agg(pl.col("correct").mean().alias("case_accuracy"))
    per_task = per_case.group_by("task").agg(pl.col("case_accuracy").mean().alias("accuracy"), pl.len().alias("cases")).sort("task")
    return dg.MaterializeResult(metadata={
        "dagster/row_count": frame.height,
        "accuracy_by_task": dg.MetadataValue.json({r["task"]: {"accuracy": round(r["accuracy"], 4), "n_cases": r["cases"]}
                                                   for r in per_task.iter_rows(named=True)}),
        "unparseable": int(frame.filter(~pl.col("call_failed") & pl.col("parsed").is_null()).height),
        # Judge tasks: whether the judge passed calibration (and so scored the task), and why.
        "judges": dg.MetadataValue.json({name: {"judge": t.judge_model, "scored": t.scored, "reason": t.reason,
                                                "kappa": t.calibration.record()["kappa"] if t.calibration else None}
                                         for name, t in judging.tasks.items()}),
        "judge_calls": dg.MetadataValue.json({"sent": judging.calls_sent, "from_cache": judging.calls_cached}),
    })
