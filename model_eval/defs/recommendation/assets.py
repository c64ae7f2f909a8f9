import dagster as dg
import polars as pl

from model_eval.defs.resources import ModelEvalResource, eval_run_id, is_orchestrated
from model_eval.metrics import leaderboard
from model_eval.open_ended import task_notes
from model_eval.report.data import current_leaderboard
from model_eval.report.metadata import metrics_figures, recommendation_figures
from model_eval.steps.consensus import compute_consensus
from model_eval.steps.pairwise import compute_win_rates
from model_eval.steps.recommendation import recommend_tasks, refresh_metrics
from model_eval.report import report_file
from model_eval.steps.report import run_report_data
from model_eval.warehouse import read_connection


@dg.asset(group_name="recommendation", deps=["scores"], kinds={"duckdb"},
          description="For tasks with a consensus section: each case's consensus answer across models and each model's agreement with it.")
def consensus(context: dg.AssetExecutionContext, model_eval: ModelEvalResource) -> dg.MaterializeResult:
    # Like the metrics: complete evaluations, and this one when its partitions have all finished.
    result = compute_consensus(model_eval.project(), eval_run_id(context), context.log,
                               completing=eval_run_id(context) if is_orchestrated(context) else None)
    return dg.MaterializeResult(metadata={
        "dagster/row_count": result.answers.height,
        "agreement": dg.MetadataValue.json({f"{r['task']}/{r['model']}": {"agreement_rate": r["agreement_rate"], "cases": r["cases"],
                                                                          "loo_agreement_rate": r["loo_agreement_rate"]}
                                            for r in result.agreement.iter_rows(named=True)}),
    })


@dg.asset(group_name="recommendation", deps=["scores"], kinds={"litellm", "duckdb"},
          description="Judge tasks with a pairwise reference model: each model's win rate against it (both orders "
                      "judged), reported beside accuracy.")
def pairwise_win_rates(context: dg.AssetExecutionContext, model_eval: ModelEvalResource) -> dg.MaterializeResult:
    outcome = compute_win_rates(model_eval.project(), eval_run_id(context), context.log,
                                completing=eval_run_id(context) if is_orchestrated(context) else None)
    return dg.MaterializeResult(metadata={"dagster/row_count": outcome.win_rates.height, "judge_calls_sent": outcome.calls_sent,
                                          "tasks": dg.MetadataValue.json(outcome.notes)})


@dg.asset(group_name="recommendation", deps=["scores"], kinds={"duckdb"},
          description="Per (eval run, model, task): accuracy over cases with a 95% Wilson interval (n = cases), pass^k, "
                      "flip rate, consistency, latency percentiles, tokens, cost.")
def model_task_metrics(context: dg.AssetExecutionContext, model_eval: ModelEvalResource) -> dg.MaterializeResult:
    project = model_eval.project()
    # An evaluation's recommend run starts once all its partitions have finished: its scores join the metrics.
    metrics = refresh_metrics(project, context.log, completing=eval_run_id(context) if is_orchestrated(context) else None)
    with read_connection(project.paths.warehouse_file) as conn:
        board = current_leaderboard(conn)
    return dg.MaterializeResult(metadata={"dagster/row_count": metrics.height,
                                          "eval_runs": metrics["eval_run_id"].n_unique() if metrics.height else 0,
                                          **metrics_figures(board)})


def leaderboard_markdown(board: pl.DataFrame, champions: dict[str, tuple[str | None, str | None, str]],
                         notes: dict[str, list[str]] | None = None) -> str:
    lines = []
    for task in sorted(set(board["task"].unique().to_list()) | set(notes or {})):
        champion, runner_up, policy = champions.get(task, (None, None, "?"))
        lines += [f"### {task} (policy `{policy}`): champion **{champion or 'none qualified'}**, runner-up {runner_up or '-'}", "",
                  "| model | n cases | accuracy (95% CI over cases) | pass^k | flip rate | consistency | success | p50 ms | p95 ms | cost/case |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for r in board.filter(pl.col("task") == task).iter_rows(named=True):
            cost = "unknown" if r["cost_per_case_usd"] is None else f"${r['cost_per_case_usd']:.6f}"
            p50 = "-" if r["p50_latency_ms"] is None else f"{r['p50_latency_ms']:.0f}"
            p95 = "-" if r["p95_latency_ms"] is None else f"{r['p95_latency_ms']:.0f}"
            # A model adaptive evaluation stopped: its partial figures are shown, marked, and never ranked.
            model = r["model"] if r.get("status", "complete") == "complete" else f"{r['model']} ({r['status']}; not ranked)"
            lines.append(f"| {model} | {r['cases']} | {r['accuracy']:.2f} ({r['accuracy_low']:.2f}-{r['accuracy_high']:.2f}) | "
                         f"{r['pass_all_k']:.2f} (k={r['repeats']}) | {r['flip_rate']:.2f} | {r['consistency']:.2f} | "
                         f"{r['success_rate']:.2f} | {p50} | {p95} | {cost} |")
        # Open-ended tasks: the judge's calibration, win rates and consensus agreement, beside accuracy.
        lines += [""] + [f"- {note}" for note in (notes or {}).get(task, [])]
        lines.append("")
    return "\n".join(lines)


@dg.asset(group_name="recommendation", deps=["model_task_metrics", "model_drift", "consensus", "pairwise_win_rates"], kinds={"duckdb"},
          description="A champion and runner-up per task under every policy, with reasoning and confidence.")
def recommendations(context: dg.AssetExecutionContext, model_eval: ModelEvalResource) -> dg.MaterializeResult:
    project = model_eval.project()
    frame = recommend_tasks(project, eval_run_id(context), context.log)
    chosen = frame.filter(pl.col("is_task_policy"))
    champions = {r["task"]: (r["champion"], r["runner_up"], r["policy"]) for r in chosen.iter_rows(named=True)}
    with read_connection(project.paths.warehouse_file) as conn:
        board = leaderboard(conn)
        notes = {r["task"]: task_notes(conn, r["task"], r["dataset_version"]) for r in chosen.iter_rows(named=True)}
        notes = {task: lines for task, lines in notes.items() if lines}
    for r in chosen.iter_rows(named=True):
        context.log.info(f"{r['task']}: {r['reasoning']}")
    # The report itself is drawn once, by model_assignments, when this run's gates and assignments are
    # known (drawing it takes about half a second); its figures are shown here already.
    data = run_report_data(project, eval_run_id(context), context.log)
    return dg.MaterializeResult(metadata={
        "dagster/row_count": frame.height,
        "champions": dg.MetadataValue.json({t: c[0] for t, c in champions.items()}),
        "leaderboard": dg.MetadataValue.md(leaderboard_markdown(board, champions, notes) if board.height or notes else "no metrics yet"),
        "report": dg.MetadataValue.path(str(report_file(project.paths.reports_dir, data.eval_run_id))) if data
                  else "not readable (see the step's log)",
        **(recommendation_figures(data) if data else {}),
    })
