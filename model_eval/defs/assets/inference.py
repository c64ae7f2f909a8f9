import dagster as dg

from model_eval.defs.partitions import MODELS
from model_eval.defs.resources import ModelEvalResource, eval_run_id, trigger
from model_eval.pipeline import run_inference
from model_eval.registry import load_registry
from model_eval.serving import local_models_served


class InferenceConfig(dg.Config):
    tasks: list[str] = []  # empty: every task the model serves
    # Reuse cached answers only if younger than this (hours); None reuses any. The weekly schedule
    # sets it so a re-evaluation really asks the models again.
    max_cache_age_hours: float | None = None


@dg.asset(
    group_name="evaluation",
    partitions_def=MODELS,
    deps=["golden_cases", "model_registry"],
    kinds={"litellm", "duckdb"},
    description="Every (case x repeat) answered by one model through litellm; cached, retried, replaced atomically.",
)
def inference_results(context: dg.AssetExecutionContext, config: InferenceConfig, model_eval: ModelEvalResource) -> dg.MaterializeResult:
    paths = model_eval.paths()
    registry = load_registry(paths.registry_file, paths.discovered_registry_file)
    spec = registry.get(context.partition_key)

    def progress(stats):
        context.log.info(f"{spec.name}: {stats.done}/{stats.total} calls ({stats.cached} cached, {stats.retries} retries, {stats.errors} failed)")

    with local_models_served(registry, [spec], paths.warehouse_file.parent / "run"):
        stats = run_inference(paths, spec.name, eval_run_id(context), context.log, task_names=config.tasks or None,
                              trigger=trigger(context), dagster_run_id=context.run.run_id, on_progress=progress,
                              cache_max_age_s=None if config.max_cache_age_hours is None else config.max_cache_age_hours * 3600)
    return dg.MaterializeResult(metadata={
        "eval_run_id": eval_run_id(context),
        "calls": stats.total,
        "sent_to_model": stats.sent,
        "from_cache": stats.cached,
        "retries": stats.retries,
        "failed_calls": stats.errors,
        "error_classes": dg.MetadataValue.json(stats.error_classes),
        "wall_seconds": round(stats.wall_s, 2),
        "dagster/row_count": stats.total,
    })
