import dagster as dg

from model_eval.defs.resources import ModelEvalResource, eval_run_id, trigger
from model_eval.steps.promotion import ingest_production_calls, promote
from model_eval.steps.report import send_run_summary, write_run_report_safely


@dg.asset(group_name="promotion", kinds={"duckdb"},
          description="Production calls logged by applications through the router (append-only files), loaded into the warehouse.")
def production_calls(context: dg.AssetExecutionContext, model_eval: ModelEvalResource) -> dg.MaterializeResult:
    added = ingest_production_calls(model_eval.project(), context.log)
    return dg.MaterializeResult(metadata={"new_rows": added})


@dg.asset(group_name="promotion", deps=["recommendations", "production_calls"], kinds={"duckdb"},
          description="Each task's assigned model: gated promotion through shadow -> partial -> full, automatic rollback.")
def model_assignments(context: dg.AssetExecutionContext, model_eval: ModelEvalResource) -> dg.MaterializeResult:
    project = model_eval.project()
    decisions = promote(project, eval_run_id(context), context.log)
    table = "| task | action | reason |\n|---|---|---|\n" + "\n".join(
        f"| {d.task} | {d.action} | {d.reason.replace('|', '/')} |" for d in decisions)
    # The report again, now with this run's gate results and assignment changes.
    report = write_run_report_safely(project, eval_run_id(context), context.log)
    summary_sent = trigger(context) == "schedule"
    if summary_sent:
        # Sent even without a report: the summary says so, and people still hear that the run happened.
        send_run_summary(project, eval_run_id(context), report.path if report else None, context.log)
    return dg.MaterializeResult(metadata={
        "decisions": dg.MetadataValue.md(table),
        "changed": dg.MetadataValue.json([d.task for d in decisions if d.changes_assignment]),
        "report": dg.MetadataValue.path(str(report.path)) if report else "not written (see the step's log)",
        "summary_sent": summary_sent,
    })
