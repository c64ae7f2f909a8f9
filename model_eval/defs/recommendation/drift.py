import dagster as dg

from model_eval.defs.resources import ModelEvalResource, eval_run_id
from model_eval.steps.report import detect_drift


@dg.asset(group_name="recommendation", deps=["scores"], kinds={"duckdb"},
          description="Per model and task: did the same requests, asked anew, get different accuracy or latency than "
                      "in the previous fresh run? Paired tests over unchanged cases, Holm-adjusted.")
def model_drift(context: dg.AssetExecutionContext, model_eval: ModelEvalResource) -> dg.MaterializeResult:
    frame = detect_drift(model_eval.project(), eval_run_id(context), context.log)
    flagged = frame.filter(frame["drifted"])
    return dg.MaterializeResult(metadata={
        "dagster/row_count": frame.height,
        "drift_flags": flagged.height,
        "flagged": dg.MetadataValue.md("\n".join(f"- **{r['model']}** on {r['task']}: {r['detail']}"
                                                 for r in flagged.iter_rows(named=True)) or "none"),
    })
