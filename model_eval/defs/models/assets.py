import dagster as dg

from model_eval.defs.partitions import MODELS
from model_eval.defs.resources import ModelEvalResource, eval_run_id
from model_eval.steps.models import ensure_assignments, sync_registry


@dg.asset(group_name="models", kinds={"duckdb"},
          description="The model registry file, synced to the warehouse; adds a partition per enabled model.")
def model_registry(context: dg.AssetExecutionContext, model_eval: ModelEvalResource) -> dg.MaterializeResult:
    project = model_eval.project()
    synced = sync_registry(project, eval_run_id(context), context.log)
    # A fresh install starts from the declared assignments, so gates always have a model to compare with.
    initial = ensure_assignments(project, context.log)
    names = [m.name for m in project.registry.models if m.enabled]
    known = set(context.instance.get_dynamic_partitions(MODELS.name))
    new = [n for n in names if n not in known]
    if new:
        context.instance.add_dynamic_partitions(MODELS.name, new)
    return dg.MaterializeResult(metadata={
        "models": len(project.registry.models),
        "available": dg.MetadataValue.json([m.name for m in synced.available]),
        "skipped": dg.MetadataValue.json(synced.skipped),
        "new_partitions": dg.MetadataValue.json(new),
        "initial_assignments": dg.MetadataValue.json(initial),
    })
