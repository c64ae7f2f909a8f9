import dagster as dg

from model_eval.defs.resources import ModelEvalResource, eval_run_id
from model_eval.steps.promotion import ingest_production_calls, promote


@dg.asset(group_name="promotion", kinds={"duckdb"},
          description="Production calls logged by applications through the router (append-only files), loaded into the warehouse.")
def production_calls(context: dg.AssetExecutionContext, model_eval: ModelEvalResource) -> dg.MaterializeResult:
    added = ingest_production_calls(model_eval.project(), context.log)
    return dg.MaterializeResult(metadata={"new_rows": added})


@dg.asset(group_name="promotion", deps=["recommendations", "production_calls"], kinds={"duckdb"},
          description="Each task's assigned model: gated promotion through shadow -> partial -> full, automatic rollback.")
def model_assignments(context: dg.AssetExecutionContext, model_eval: ModelEvalResource) -> dg.MaterializeResult:
    decisions = promote(model_eval.project(), eval_run_id(context), context.log)
    table = "| task | action | reason |\n|---|---|---|\n" + "\n".join(
        f"| {d.task} | {d.action} | {d.reason.replace('|', '/')} |" for d in decisions)
    return dg.MaterializeResult(metadata={
        "decisions": dg.MetadataValue.md(table),
        "changed": dg.MetadataValue.json([d.task for d in decisions if d.changes_assignment]),
    })
