import dagster as dg
import polars as pl

from model_eval.defs.resources import ModelEvalResource, eval_run_id
from model_eval.steps.golden import ingest_golden


@dg.asset(group_name="golden", kinds={"duckdb", "great_expectations"},
          description="Every task's versioned golden cases, validated with Great Expectations.")
def golden_cases(context: dg.AssetExecutionContext, model_eval: ModelEvalResource) -> dg.MaterializeResult:
    result = ingest_golden(model_eval.project(), eval_run_id(context), context.log)
    current = result.versions.filter(pl.col("is_current"))
    return dg.MaterializeResult(metadata={
        "tasks": len(result.tasks),
        "dataset_versions": result.versions.height,
        "new_case_rows": result.new_cases,
        "expectations_run": result.expectations_run,
        "current_versions": dg.MetadataValue.md(
            "| task | version | cases |\n|---|---|---|\n"
            + "\n".join(f"| {r['task']} | {r['dataset_version']} | {r['cases']} |" for r in current.iter_rows(named=True))),
        "dagster/row_count": int(current["cases"].sum()),
    })
