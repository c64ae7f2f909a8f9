"""`model-eval`: run evaluations through the Dagster instance, open the UI, query the warehouse."""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

from model_eval.settings import PROJECT_ROOT, ProjectPaths


def _prepare_dagster_home() -> Path:
    """A persistent instance folder inside the checkout, so run history survives UI restarts.

    The tracked dagster.yaml at the top of the checkout is the instance configuration; it is copied
    into the (git-ignored) instance folder, which is where Dagster reads it from.
    """
    home = Path(os.environ.get("DAGSTER_HOME") or PROJECT_ROOT / ".dagster_home").resolve()
    home.mkdir(parents=True, exist_ok=True)
    source = PROJECT_ROOT / "dagster.yaml"
    target = home / "dagster.yaml"
    if source.is_file() and source.resolve() != target.resolve() and (not target.exists() or target.read_text() != source.read_text()):
        shutil.copyfile(source, target)
    os.environ["DAGSTER_HOME"] = str(home)
    os.environ.setdefault("DAGSTER_DISABLE_TELEMETRY", "1")
    return home


def _split(value: str | None) -> list[str] | None:
    return [v.strip() for v in value.split(",") if v.strip()] if value else None


def _fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


def cmd_run(args: argparse.Namespace) -> int:
    """Through this instance's warm runner when there is one (runner_client.py), else in this process."""
    home = _prepare_dagster_home()
    if not args.in_process:
        from model_eval.runner_client import run_warm

        code = run_warm(["run", "--in-process", *args.argv[1:]], home)
        if code is not None:
            return code
    return run_in_process(args)


def run_with_loaded_dagster(argv: list[str], loaded) -> int:
    """The warm runner's entry: `model-eval run` with its Dagster instance and definitions."""
    args = build_parser().parse_args(argv)
    return run_in_process(args, instance=loaded.instance, definitions=loaded.definitions())


def run_in_process(args: argparse.Namespace, instance=None, definitions=None) -> int:
    from model_eval.errors import ModelEvalError
    from model_eval.project import Project
    from model_eval.capacity import measured_memory_mb
    from model_eval.registry import split_by_availability

    paths = ProjectPaths.from_env()
    try:
        project = Project.load(paths)
        tasks = project.select_tasks(_split(args.tasks))
        chosen = project.registry.select(_split(args.models))
    except ModelEvalError as exc:
        return _fail(str(exc))
    runnable, skipped = split_by_availability(chosen, measured_memory_mb(paths.warehouse_file, chosen))
    for name, reason in skipped.items():
        if args.models:  # a model asked for by name must run
            return _fail(f"model {name} cannot run: {reason}")
        print(f"skip {name}: {reason}")
    if not runnable:
        return _fail("no enabled model can run (see the skip lines above)")
    if args.max_cost is not None:
        from model_eval.planning import budget_refusal, plan_run

        plan = plan_run(project, runnable, tasks, cache_max_age_s=_cache_age_s(args))
        refusal = budget_refusal(plan, args.max_cost, args.allow_unknown_cost)
        if refusal:
            return _fail(f"not started: {refusal} (details: model-eval plan)")
        unknown = f" (+ {len(plan.unknown_cost)} unknown, allowed)" if plan.unknown_cost else ""
        print(f"expected cost {plan.known_cost_usd:.6f} USD{unknown}, within --max-cost {args.max_cost:g} USD")

    home = _prepare_dagster_home()
    from model_eval.dagster_sqlite import open_instance, relax_instance_sync
    from model_eval.definitions import defs
    from model_eval.orchestration import run_evaluation

    relax_instance_sync(home)   # the run's Dagster events without an fsync each (dagster_sqlite.py)

    task_names = [t.name for t in tasks]
    instance = instance or open_instance()
    print(f"{len(runnable)} model(s) x {len(task_names)} task(s); Dagster instance {os.environ['DAGSTER_HOME']}", flush=True)
    started = time.perf_counter()
    outcome = run_evaluation(definitions or defs(), instance, project, runnable, task_names, trigger="cli",
                             log_level="WARNING" if args.quiet else "INFO",
                             max_cache_age_hours=0.0 if args.fresh else args.max_cache_age_hours, adaptive=args.adaptive)
    if outcome.error:
        for model, error in outcome.failed.items():
            print(f"error: {model}: {error}", file=sys.stderr)
        return _fail(outcome.error)
    _print_leaderboard(paths, outcome.eval_run_id, task_names)
    _print_assignments(paths)
    from model_eval.report import report_file

    report = report_file(paths.reports_dir, outcome.eval_run_id)
    if report.exists():
        print(f"\nreport: {report}")
    if outcome.blocked:
        print(f"\npromotion held back by gate(s) (other tasks were not affected): {outcome.blocked}")
    print(f"\neval run {outcome.eval_run_id} finished in {time.perf_counter() - started:.1f} s; warehouse: {paths.warehouse_file}")
    if outcome.failed:
        for model, error in outcome.failed.items():
            print(f"error: {model}: {error}", file=sys.stderr)
        return 1
    return 0


def _cache_age_s(args: argparse.Namespace) -> float | None:
    hours = 0.0 if args.fresh else args.max_cache_age_hours
    return None if hours is None else hours * 3600


def cmd_plan(args: argparse.Namespace) -> int:
    """Calls, tokens, cost and time per model and task, before a run (model_eval/planning.py)."""
    from model_eval.errors import ModelEvalError
    from model_eval.planning import format_plan, plan_selection
    from model_eval.project import Project

    try:
        plan = plan_selection(Project.load(ProjectPaths.from_env()), _split(args.models), _split(args.tasks), _cache_age_s(args))
        print(format_plan(plan))
    except ModelEvalError as exc:
        return _fail(str(exc))
    return 0


def _print_leaderboard(paths: ProjectPaths, eval_run_id: str, task_names: list[str]) -> None:
    import polars as pl

    from model_eval.metrics import leaderboard
    from model_eval.open_ended import task_notes
    from model_eval.warehouse import read_connection

    with read_connection(paths.warehouse_file) as conn:
        board = leaderboard(conn)
        recs = conn.sql("SELECT * FROM recommendations WHERE eval_run_id = $id AND is_task_policy",
                        params={"id": eval_run_id}).pl()
        # Judge calibration, win rates and consensus agreement: reported beside accuracy, never as it.
        notes = {r["task"]: task_notes(conn, r["task"], r["dataset_version"], with_judge=False) for r in recs.iter_rows(named=True)}
    for rec in recs.sort("task").iter_rows(named=True):
        if rec["task"] not in task_names:
            continue
        print(f"\n== {rec['task']} (version {rec['dataset_version']}, policy {rec['policy']})")
        rows = board.filter((pl.col("task") == rec["task"]) & (pl.col("dataset_version") == rec["dataset_version"])
                            & pl.col("model").is_in(rec["candidates"]))
        # n = cases: every accuracy figure and interval is over cases, repeats only measure consistency.
        print(f"  {'model':<22}{'n':>4}  {'accuracy (95% CI)':<22}{'flip':>6}{'consistent':>11}{'success':>9}"
              f"{'p50 ms':>9}{'p95 ms':>9}{'cost/case':>12}{'tok/s':>8}{'mem MB':>9}")
        for r in rows.iter_rows(named=True):
            cost = "unknown" if r["cost_per_case_usd"] is None else f"{r['cost_per_case_usd']:.6f}"
            p50 = "-" if r["p50_latency_ms"] is None else f"{r['p50_latency_ms']:.0f}"
            p95 = "-" if r["p95_latency_ms"] is None else f"{r['p95_latency_ms']:.0f}"
            acc = f"{r['accuracy']:.2f} ({r['accuracy_low']:.2f}-{r['accuracy_high']:.2f})"
            rate = "-" if r["output_tokens_per_s"] is None else f"{r['output_tokens_per_s']:.1f}"
            memory = "unknown" if r["peak_memory_mb"] is None else f"{r['peak_memory_mb']:.0f}"
            print(f"  {r['model']:<22}{r['cases']:>4}  {acc:<22}{r['flip_rate']:>6.2f}{r['consistency']:>11.2f}"
                  f"{r['success_rate']:>9.2f}{p50:>9}{p95:>9}{cost:>12}{rate:>8}{memory:>9}")
        # Stopped by adaptive evaluation: shown with the case it stopped at and why, never ranked.
        stopped = board.filter((pl.col("task") == rec["task"]) & (pl.col("dataset_version") == rec["dataset_version"])
                               & pl.col("model").is_in(rec["stopped"] or []))
        for r in stopped.iter_rows(named=True):
            print(f"  {r['model']:<22}{'-':>4}  {r['status']}, not ranked: {r['status_reason']}")
        champion = rec["champion"] or "none qualified"
        print(f"  champion: {champion}; runner-up: {rec['runner_up'] or '-'}"
              + (f"; confidence {rec['confidence']:.2f}" if rec["confidence"] is not None else ""))
        print(f"  why: {rec['reasoning']}")
        for line in notes[rec["task"]]:
            print(f"  {line}")


def _print_assignments(paths: ProjectPaths) -> None:
    from model_eval.promotion import current_assignments
    from model_eval.warehouse import read_connection

    with read_connection(paths.warehouse_file) as conn:
        states = current_assignments(conn)
        latest = conn.sql("""SELECT task, action, reason FROM model_assignments
                             QUALIFY row_number() OVER (PARTITION BY task ORDER BY seq DESC) = 1""").fetchall()
    if not states:
        return
    print("\n== assignments")
    reasons = {task: (action, reason) for task, action, reason in latest}
    for task, state in sorted(states.items()):
        rollout = "" if state.stage == "full" else f"; {state.model} in {state.stage} ({state.traffic_share:.0%} of traffic)"
        pin = " [pinned]" if state.pinned else ""
        print(f"  {task}: {state.serving}{rollout}{pin} (last change: {reasons[task][0]}: {reasons[task][1]})")


def cmd_assign(args: argparse.Namespace) -> int:
    """Show assignments, or pin / unpin / force a promotion / roll back a task, recorded with who and why."""
    import getpass

    from model_eval.errors import ModelEvalError
    from model_eval.project import Project
    from model_eval.promotion import history, manual_action
    from model_eval.steps.models import publish_assignments
    from model_eval.warehouse import read_connection, transaction, write_connection

    paths = ProjectPaths.from_env()
    if args.action == "show":
        try:
            with read_connection(paths.warehouse_file) as conn:
                frame = history(conn, args.task)
        except FileNotFoundError as exc:
            return _fail(str(exc))
        columns = ["assigned_at", "task", "action", "model", "stage", "traffic_share", "previous_model", "pinned", "assigned_by", "reason"]
        import polars as pl

        with pl.Config(tbl_rows=-1, fmt_str_lengths=90, tbl_width_chars=250):
            print(frame.select(columns).tail(args.limit))
        return 0
    if not args.task:
        return _fail(f"{args.action} needs a task: model-eval assign {args.action} TASK ...")
    try:
        project = Project.load(paths)
        task = project.task(args.task)
    except ModelEvalError as exc:
        return _fail(str(exc))
    who = args.by or os.environ.get("USER") or getpass.getuser()
    with write_connection(paths.warehouse_file) as conn:
        try:
            with transaction(conn):
                summary = manual_action(conn, args.action, task, project.registry, model=args.model, by=who, reason=args.reason or "")
        except ValueError as exc:
            return _fail(str(exc))
        publish_assignments(project, conn)
    print(f"{summary} (by {who}: {args.reason})")
    return 0


def cmd_ui(args: argparse.Namespace) -> int:
    from model_eval.supervise import run_service

    home = _prepare_dagster_home()
    print(f"Dagster instance: {home}")
    command = [sys.executable, "-m", "dagster", "dev", "-w", str(PROJECT_ROOT / "workspace.yaml"), "-h", "127.0.0.1", "-p", str(args.port)]
    # SIGTERM or Ctrl-C stops dagster dev, its webserver, daemon, code server and run workers within seconds.
    return run_service(command, cwd=PROJECT_ROOT)


def cmd_serve(args: argparse.Namespace) -> int:
    """The task-aware HTTP gateway (model_eval/gateway): refuses to start in an exposed configuration."""
    from model_eval.errors import ModelEvalError
    from model_eval.gateway.app import GatewaySettings, serve

    settings = GatewaySettings(max_body_bytes=args.max_body_bytes, rate_per_s=args.rate_limit, burst=args.rate_burst)
    try:
        return serve(args.host, args.port, no_auth=args.no_auth, allow_remote=args.allow_remote, settings=settings)
    except ModelEvalError as exc:
        return _fail(str(exc))


def cmd_report(args: argparse.Namespace) -> int:
    """Write a run's HTML report again (the newest run by default) and print its path; --summary also sends the summary."""
    from model_eval.errors import ModelEvalError
    from model_eval.project import Project
    from model_eval.report import NoRecommendationError
    from model_eval.steps._common import logger
    from model_eval.steps.report import send_run_summary, write_run_report

    try:
        project = Project.load(ProjectPaths.from_env())
        report = write_run_report(project, args.run)
        if args.summary:
            summary, deliveries = send_run_summary(project, report.data.eval_run_id, report.path, logger())
            print(summary.title)
            print(summary.text)
            for delivery in deliveries:
                outcome = "skipped: " + (delivery.note or "") if delivery.skipped else "ok" if delivery.ok else f"failed: {delivery.error}"
                print(f"summary to {delivery.channel}: {outcome}")
    except (NoRecommendationError, FileNotFoundError, ModelEvalError) as exc:
        return _fail(str(exc))
    print(report.path)
    return 0


def cmd_sql(args: argparse.Namespace) -> int:
    """Run SQL against the warehouse, read-only unless --write is given."""
    import duckdb

    from model_eval.warehouse import read_connection, write_connection

    paths = ProjectPaths.from_env()
    query = args.query if args.query != "-" else sys.stdin.read()
    opener = write_connection if args.write else read_connection
    try:
        with opener(paths.warehouse_file) as conn:
            relation = conn.sql(query)
            if relation is not None:
                import polars as pl

                with pl.Config(tbl_rows=100, fmt_str_lengths=80):
                    print(relation.pl())
    except (duckdb.Error, FileNotFoundError) as exc:
        return _fail(str(exc))
    return 0


def cmd_runner(args: argparse.Namespace) -> int:
    """Show or stop this instance's warm runner."""
    from model_eval.runner_client import runner_is_up, socket_path, stop_runner

    home = _prepare_dagster_home()
    if args.action == "stop":
        print("stopped" if stop_runner(home) else "no warm runner was running")
        return 0
    state = "running" if runner_is_up(home) else "not running"
    print(f"warm runner for {home}: {state} (socket {socket_path(home)}; log {home / 'runner.log'})")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    return args.func(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="model-eval", description="Decide, with evidence, which LLM each task should use.")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="evaluate enabled models on every task through the Dagster instance")
    run.add_argument("--models", help="comma-separated model names from the registry (default: every enabled model)")
    run.add_argument("--tasks", help="comma-separated task names (default: every task)")
    run.add_argument("--fresh", action="store_true", help="ask every model again instead of reusing cached answers")
    run.add_argument("--max-cache-age-hours", type=float, default=None, help="reuse cached answers only if younger than this")
    run.add_argument("-q", "--quiet", action="store_true", help="only per-model progress, warnings and the leaderboard")
    run.add_argument("--max-cost", type=float, default=None, metavar="USD",
                     help="refuse to start if the expected cost (model-eval plan) is above this")
    run.add_argument("--allow-unknown-cost", action="store_true", help="with --max-cost: start even if some costs are unknown")
    run.add_argument("--adaptive", action=argparse.BooleanOptionalAction, default=None,
                     help="stop evaluating a model on a task once it provably cannot qualify or beat the champion, and skip "
                          "repeats of settled cases (default: deployment.yaml's adaptive.enabled, off unless set)")
    run.add_argument("--in-process", action="store_true",
                     help="run in this process, not in the instance's warm runner (as MODEL_EVAL_RUNNER=off does)")
    run.set_defaults(func=cmd_run)
    runner = sub.add_parser("runner", help="show or stop the warm runner that keeps Dagster loaded between runs")
    runner.add_argument("action", choices=["status", "stop"])
    runner.set_defaults(func=cmd_runner)
    plan = sub.add_parser("plan", help="calls, expected tokens, cost and time per model and task, before a run")
    plan.add_argument("--models", help="comma-separated model names from the registry (default: every enabled model)")
    plan.add_argument("--tasks", help="comma-separated task names (default: every task)")
    plan.add_argument("--fresh", action="store_true", help="plan a run that asks every model again (nothing cached)")
    plan.add_argument("--max-cache-age-hours", type=float, default=None, help="count cached answers only if younger than this")
    plan.set_defaults(func=cmd_plan)
    assign = sub.add_parser("assign", help="show assignments; pin, unpin, force a promotion or roll back a task")
    assign.add_argument("action", choices=["show", "pin", "unpin", "promote", "rollback"])
    assign.add_argument("task", nargs="?", help="task name (optional for show)")
    assign.add_argument("model", nargs="?", help="model name (pin, promote)")
    assign.add_argument("--reason", help="why: recorded with the change (required for changes)")
    assign.add_argument("--by", help="who (default: $USER)")
    assign.add_argument("--limit", type=int, default=30, help="rows of history to show")
    assign.set_defaults(func=cmd_assign)
    ui = sub.add_parser("ui", help="open the Dagster UI on this checkout's instance")
    ui.add_argument("--port", type=int, default=3000)
    ui.set_defaults(func=cmd_ui)
    serve = sub.add_parser("serve", help="the HTTP gateway: OpenAI-compatible calls routed by task, feedback, statistics")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1; others need --allow-remote)")
    serve.add_argument("--port", type=int, default=8787)
    serve.add_argument("--no-auth", action="store_true", help="no tokens (loopback only); otherwise set MODEL_EVAL_API_TOKEN "
                                                               "and/or MODEL_EVAL_API_READ_TOKEN")
    serve.add_argument("--allow-remote", action="store_true", help="allow binding a non-loopback address (needs a token)")
    serve.add_argument("--max-body-bytes", type=int, default=1_000_000, help="largest request body accepted (413 above)")
    serve.add_argument("--rate-limit", type=float, default=1000.0, help="requests per second per client address (0: no limit)")
    serve.add_argument("--rate-burst", type=int, default=2000, help="requests a client may send at once above the rate")
    serve.set_defaults(func=cmd_serve)
    report = sub.add_parser("report", help="write an evaluation run's HTML report again and print its path")
    report.add_argument("--run", help="eval run id (default: the newest run with recommendations)")
    report.add_argument("--summary", action="store_true", help="also send the run's summary to the alert channels and print it")
    report.set_defaults(func=cmd_report)
    sql = sub.add_parser("sql", help="query the warehouse (read-only unless --write)")
    sql.add_argument("query", help="SQL text, or - to read it from standard input")
    sql.add_argument("--write", action="store_true", help="open the warehouse for writing")
    sql.set_defaults(func=cmd_sql)
    return parser


if __name__ == "__main__":
    sys.exit(main())
