"""The evaluation report, its Dagster metadata, drift in a real run, and the weekly summary.

Two real evaluation runs through a Dagster instance against the scripted OpenAI-compatible server
(a test double for hosted providers; see scripted_evaluation.py for what each model does).
"""

from __future__ import annotations

import contextlib
import io
import json
import re

import dagster as dg
import polars as pl
import pytest
from plotly.offline import get_plotlyjs

from model_eval import warehouse
from model_eval.cli import main as cli_main
from model_eval.defs.resources import EVAL_RUN_TAG, TRIGGER_TAG
from model_eval.definitions import defs
from model_eval.report import report_file
from model_eval.report.charts import pareto_front
from model_eval_tests.local_receivers import WebhookReceiver
from model_eval_tests.scripted_evaluation import TASKS, evaluate_twice


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    with WebhookReceiver() as webhook:
        mp.setenv("TEST_SUMMARY_WEBHOOK", webhook.url("/hooks/summary"))
        scripted = evaluate_twice(tmp_path_factory.mktemp("report"), mp, alerts={"webhook_url_env": "TEST_SUMMARY_WEBHOOK"})
        scripted.webhook = webhook
        yield scripted
    mp.undo()


def _cli(*args: str) -> tuple[int, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        code = cli_main(list(args))
    return code, out.getvalue()


def _query(project, sql: str, **params):
    with warehouse.read_connection(project.paths.warehouse_file) as conn:
        return conn.sql(sql, params=params or None).pl()


def test_every_evaluation_writes_a_self_contained_report_and_latest(project):
    assert all(o.ok for o in project.outcomes), [(o.error, o.failed) for o in project.outcomes]
    first, second = (o.eval_run_id for o in project.outcomes)
    reports = project.paths.reports_dir
    assert {p.name for p in reports.glob("*.html")} == {f"{first}.html", f"{second}.html", "latest.html"}
    page = (reports / "latest.html").read_text()
    assert page == (reports / f"{second}.html").read_text()
    # Offline: no external script, stylesheet or image; the Plotly library is inlined exactly once.
    assert not re.search(r"<(script|link|img)[^>]+(src|href)=[\"']?(https?:)?//", page)
    assert page.count(get_plotlyjs()[:400]) == 1
    assert page.count("Plotly.newPlot") >= 6 * len(TASKS)
    for task in TASKS:
        assert f"<h2>{task}</h2>" in page


def test_report_leaderboard_shows_case_level_figures_and_unknown_cost(project):
    page = (project.paths.reports_dir / "latest.html").read_text()
    board = _query(project, "SELECT * FROM model_task_metrics WHERE eval_run_id = $run AND task = 'grading'",
                   run=project.outcomes[1].eval_run_id)
    oracle = board.filter(pl.col("model") == "oracle-large").row(0, named=True)
    assert f"{oracle['accuracy_low']:.3f}–{oracle['accuracy_high']:.3f}" in page
    # The unpriced model's cost is "unknown" in every row of it, never $0.
    rows = re.findall(r"<tr><td>turncoat</td><td></td>.*?</tr>", page)  # leaderboard rows (no badge)
    assert len(rows) == len(TASKS) and all('class="unknown">unknown<' in row for row in rows)
    assert all("$0.0" not in row for row in rows)
    assert "cost per case (USD) unknown, not plotted: turncoat" in page


def test_report_has_gates_with_p_values_assignment_history_and_drift(project):
    second = project.outcomes[1].eval_run_id
    page = (project.paths.reports_dir / f"{second}.html").read_text()
    gates = _query(project, "SELECT * FROM promotion_gates WHERE eval_run_id = $run AND gate = 'non_inferiority' "
                            "AND task = 'grading'", run=second)
    assert gates.height == 1 and gates["p_value"][0] is not None
    row = re.search(r"<tr><td>non_inferiority</td>.*?</tr>", page.split('id="task-2"')[1]).group(0)  # grading's section
    assert f">{gates['n_cases'][0]}<" in row and gates["test"][0] in row
    history = _query(project, "SELECT action, model, stage FROM model_assignments WHERE task = 'grading' ORDER BY seq")
    assert history.rows()[:2] == [("initial", "steady-small", "full"), ("promote", "oracle-large", "shadow")]
    assert page.count('id="task-0-assignments"') == 1
    assert page.count('<span class="badge drift">drift: worse</span>') >= len(TASKS)


def test_drift_flags_the_model_that_turned_and_only_fresh_answers_count(project):
    first, second = (o.eval_run_id for o in project.outcomes)
    drift = _query(project, "SELECT * FROM model_drift WHERE metric = 'accuracy'")
    assert set(drift["eval_run_id"]) == {second} and set(drift["baseline_eval_run_id"]) == {first}
    turned = drift.filter(pl.col("model") == "turncoat")
    assert turned["drifted"].all() and set(turned["direction"]) == {"worse"}
    assert turned["current_value"].to_list() == [0.0] * len(TASKS)
    steady = drift.filter(pl.col("model") != "turncoat")
    assert not steady["drifted"].any() and (steady["change"] == 0).all()


def test_recommendations_metadata_carries_report_path_and_per_task_floats(project):
    instance = project.instance
    record = instance.fetch_materializations(dg.AssetKey("recommendations"), limit=1).records[0]
    metadata = record.asset_materialization.metadata
    second = project.outcomes[1].eval_run_id
    assert metadata["report"].value == str(report_file(project.paths.reports_dir, second))
    assert "| model | n cases | accuracy" in metadata["leaderboard"].value  # the Markdown leaderboard stays
    assert all(model in metadata["leaderboard"].value for model in ("oracle-large", "steady-small", "turncoat"))
    board = _query(project, "SELECT * FROM model_task_metrics WHERE eval_run_id = $run AND model = 'oracle-large'", run=second)
    for row in board.iter_rows(named=True):
        task = row["task"]
        assert metadata[f"{task}/champion"].value == "oracle-large"
        for key, column in (("champion_accuracy", "accuracy"), ("champion_accuracy_low", "accuracy_low"),
                            ("champion_p95_latency_ms", "p95_latency_ms"), ("champion_cost_per_case_usd", "cost_per_case_usd")):
            value = metadata[f"{task}/{key}"]
            assert isinstance(value, dg.FloatMetadataValue) and value.value == pytest.approx(row[column])


def test_metrics_metadata_has_figures_per_model_and_task_and_no_made_up_cost(project):
    record = project.instance.fetch_materializations(dg.AssetKey("model_task_metrics"), limit=1).records[0]
    metadata = record.asset_materialization.metadata
    assert metadata["turncoat/grading/accuracy"].value == 0.0
    assert metadata["steady-small/grading/cost_per_case_usd"].value > 0
    assert "turncoat/grading/cost_per_case_usd" not in metadata
    for model in ("oracle-large", "steady-small", "turncoat"):
        for task in TASKS:
            assert isinstance(metadata[f"{model}/{task}/accuracy_low"], dg.FloatMetadataValue)


def test_report_command_rewrites_a_past_run_and_leaves_latest_alone(project):
    first, second = (o.eval_run_id for o in project.outcomes)
    target = report_file(project.paths.reports_dir, first)
    target.unlink()
    latest_before = (project.paths.reports_dir / "latest.html").read_text()
    code, out = _cli("report", "--run", first)
    assert code == 0 and out.strip().endswith(str(target)) and target.exists()
    assert f"eval run <b>{first}</b>" in target.read_text()
    assert (project.paths.reports_dir / "latest.html").read_text().count(f"eval run <b>{second}</b>") == 1
    assert latest_before.count(f"eval run <b>{second}</b>") == 1
    code, out = _cli("report", "--run", "no-such-run")
    assert code == 2 and "no-such-run" in out and "has no recommendations" in out


def test_summary_on_demand_names_champions_drift_cost_and_report(project):
    sent_before = len(project.webhook.requests)
    code, out = _cli("report", "--summary")
    assert code == 0
    assert "summary to webhook: ok" in out and "summary to log_file: ok" in out
    text = project.webhook.requests[sent_before].json()["text"]
    for task in TASKS:
        assert f"- {task} (v1): oracle-large, accuracy 1.00" in text
        assert f"turncoat on {task}: accuracy worse" in text  # a regression, with evidence
    assert "Cost: unknown (" in text  # the unpriced model makes the run's cost unknown, not smaller
    assert f"Report: {report_file(project.paths.reports_dir, project.outcomes[1].eval_run_id)}" in text


def test_a_scheduled_evaluation_sends_the_summary_even_when_nothing_changed(project):
    """What `evaluation_complete` requests after the weekly schedule's runs: the recommend job, tagged schedule."""
    sent_before = len(project.webhook.requests)
    result = defs().resolve_job_def("recommend").execute_in_process(
        instance=project.instance, tags={EVAL_RUN_TAG: "weekly-test", TRIGGER_TAG: "schedule"}, raise_on_error=False)
    assert result.success
    summaries = [r.json()["text"] for r in project.webhook.requests[sent_before:] if "weekly summary" in r.json()["text"]]
    assert len(summaries) == 1
    text = summaries[0]
    assert "Evaluation run weekly-test" in text
    changes = text.split("Changes since the previous run")[1].split("Regressions:")[0]
    assert changes.strip().endswith("- none"), changes
    assert "Drift (0 paired comparison(s)" in text  # nothing was asked anew in this run
    log_lines = [json.loads(line) for line in (project.root / "alerts.log").read_text().splitlines()]
    assert log_lines[-1]["kind"] == "weekly_summary" and log_lines[-1]["facts"]["eval_run_id"] == "weekly-test"
    assert (project.paths.reports_dir / "weekly-test.html").exists()


def test_a_report_that_cannot_be_written_blocks_neither_promotion_nor_the_summary(project):
    """Fault injected: a file sits where the reports folder should be."""
    reports = project.paths.reports_dir
    kept = reports.with_name("reports-kept")
    reports.rename(kept)
    reports.write_text("not a folder")
    try:
        sent_before = len(project.webhook.requests)
        result = defs().resolve_job_def("recommend").execute_in_process(
            instance=project.instance, tags={EVAL_RUN_TAG: "weekly-broken", TRIGGER_TAG: "schedule"}, raise_on_error=False)
        assert result.success
        materialized = {event.asset_key.path[-1] for event in result.get_asset_materialization_events()}
        assert {"recommendations", "model_assignments"} <= materialized  # the promotion step ran
        summaries = [r.json()["text"] for r in project.webhook.requests[sent_before:] if "weekly summary" in r.json()["text"]]
        assert len(summaries) == 1 and "Report: not written" in summaries[0]
    finally:
        reports.unlink()
        kept.rename(reports)


@pytest.mark.parametrize("points,front", [
    ([("a", 1.0, 0.9), ("b", 2.0, 0.8)], ["a"]),                       # a is better and cheaper
    ([("a", 1.0, 0.7), ("b", 2.0, 0.8), ("c", 3.0, 0.75)], ["a", "b"]),
    ([("a", 1.0, 0.8), ("b", 1.0, 0.8)], ["a", "b"]),                  # ties dominate nobody
    ([("a", 0.0, 0.1), ("b", 5.0, 0.95), ("c", 5.0, 0.9)], ["a", "b"]),
])
def test_pareto_front(points, front):
    assert pareto_front(points) == front


def test_a_task_no_model_was_evaluated_on_still_gets_its_section(tmp_path):
    """A recommendation with no candidates (e.g. a new task no model serves yet): the report says so, no chart breaks."""
    from datetime import datetime

    from model_eval.report import write_report
    from model_eval.settings import ProjectPaths

    paths = ProjectPaths(golden_dir=tmp_path / "golden", registry_file=tmp_path / "models.yaml",
                         warehouse_file=tmp_path / "warehouse" / "w.duckdb", cache_file=tmp_path / "cache.sqlite")
    row = {"eval_run_id": "r1", "task": "summaries", "dataset_version": "v1", "policy": "strict", "is_task_policy": True,
           "champion": None, "runner_up": None, "champion_score": None, "runner_up_score": None, "confidence": None,
           "qualified": [], "candidates": [], "ranking_json": "[]", "reasoning": "no evaluated model",
           "source_eval_runs": [], "created_at": datetime(2026, 11, 1)}
    with warehouse.write_connection(paths.warehouse_file) as conn:
        conn.register("r", pl.DataFrame([row], schema_overrides={"champion": pl.String, "runner_up": pl.String,
                                                                 "champion_score": pl.Float64, "runner_up_score": pl.Float64,
                                                                 "confidence": pl.Float64, "qualified": pl.List(pl.String),
                                                                 "candidates": pl.List(pl.String),
                                                                 "source_eval_runs": pl.List(pl.String)}).to_arrow())
        conn.execute("INSERT INTO recommendations BY NAME SELECT * FROM r")
    written = write_report(paths)
    page = written.path.read_text()
    assert written.path.name == "r1.html" and (paths.reports_dir / "latest.html").exists()
    assert "No model was evaluated on this version." in page and "threshold unknown (task file gone)" in page
    assert "no model qualifies" in page and "Plotly.newPlot" not in page


def test_the_trends_axis_spans_at_least_an_hour_around_runs_minutes_apart(project):
    # The two runs of the fixture are seconds apart: the axis must not zoom to fractions of a second.
    from datetime import datetime, timedelta

    from model_eval.report import report_data
    from model_eval.report.charts import trends_chart

    data = report_data(project.paths, project.outcomes[1].eval_run_id)
    for section in data.tasks:
        figure = trends_chart(section, colours={m: "#000" for m in section.trends["model"].unique()})
        low, high = (datetime.fromisoformat(edge) for edge in figure["layout"]["xaxis"]["range"])
        shown = [datetime.fromisoformat(x) for trace in figure["data"] for x in trace["x"]]
        assert len(shown) >= 2 and high - low >= timedelta(hours=1)
        assert all(low < when < high for when in shown)


def test_every_chart_is_a_figure_plotly_accepts(project):
    """The charts are plain data (charts.py says why); Plotly's own figure classes check each one here:
    a misspelt or misplaced property raises."""
    import plotly.graph_objects as go

    from model_eval.report import report_data
    from model_eval.report.charts import (accuracy_chart, assignment_timeline, case_grid_chart, model_colours,
                                          trends_chart, tradeoff_chart)

    data = report_data(project.paths, project.outcomes[1].eval_run_id)
    checked = 0
    for section in data.tasks:
        if section.leaderboard.is_empty():
            continue
        colours = model_colours(section.leaderboard["model"].to_list() + section.trends["model"].to_list()
                                + section.assignments["model"].to_list())
        figures = [accuracy_chart(section, colours), trends_chart(section, colours), case_grid_chart(section)[0],
                   tradeoff_chart(section, colours, "p95_latency_ms", "p95 latency (ms)"),
                   tradeoff_chart(section, colours, "cost_per_case_usd", "cost per case (USD)"),
                   assignment_timeline(section, colours)]
        for figure in filter(None, figures):
            checked_figure = go.Figure(figure)   # validates every property, raising on an unknown one
            assert len(checked_figure.data) == len(figure["data"]) > 0
            checked += 1
    assert checked >= 5
