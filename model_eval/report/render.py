"""Turn `ReportData` into one self-contained HTML file: styles and the Plotly library inlined once,
so the report opens from disk, from an e-mail attachment or an artifact store with no network."""

from __future__ import annotations

import functools
import html
from datetime import datetime, timezone

import plotly.io as pio
import polars as pl
from plotly.offline import get_plotlyjs

from model_eval.report import charts
from model_eval.report.data import ReportData, TaskSection

PLOT_CONFIG = {"displaylogo": False, "responsive": True, "displayModeBar": "hover"}

STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 0; color: #1d1d1f; background: #fafafa; }
header { background: #1f3a5f; color: white; padding: 18px 32px; }
header h1 { margin: 0 0 6px 0; font-size: 22px; }
header .facts { display: flex; flex-wrap: wrap; gap: 4px 22px; }
header .facts span { white-space: nowrap; }
main { padding: 8px 32px 40px 32px; max-width: 1400px; }
section.task { background: white; border: 1px solid #ddd; border-radius: 8px; padding: 12px 20px; margin: 18px 0; }
h2 { margin: 6px 0; } h3 { margin: 18px 0 6px 0; font-size: 16px; color: #333; }
table { border-collapse: collapse; font-size: 13px; margin: 6px 0; }
.wide { overflow-x: auto; }
th, td { border-bottom: 1px solid #e3e3e3; padding: 4px 10px; text-align: left; vertical-align: top; }
td { white-space: nowrap; } td:has(.reason) { white-space: normal; }
th { background: #f2f4f7; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.pass { color: #1e7b34; font-weight: 600; } .fail { color: #b3261e; font-weight: 600; }
.unknown { color: #b3261e; font-style: italic; }
.badge { display: inline-block; padding: 1px 8px; border-radius: 10px; font-size: 12px; background: #e8eef7; }
.badge.champion { background: #2a9d8f; color: white; } .badge.runner { background: #e9c46a; }
.badge.drift { background: #b3261e; color: white; }
.reason { color: #444; font-size: 13px; max-width: 1100px; }
.grid2 { display: grid; grid-template-columns: 1fr 1fr; gap: 10px; }
@media (max-width: 1000px) { .grid2 { grid-template-columns: 1fr; } }
.note { color: #666; font-size: 12px; }
nav a { margin-right: 14px; }
"""


def _e(value: object) -> str:
    return html.escape("" if value is None else str(value))


def _num(value: float | None, digits: int = 3, unknown: str = "-") -> str:
    return unknown if value is None else f"{value:.{digits}f}"


def _p(value: float | None) -> str:
    """p-values: small ones in scientific notation, so 0.0001 and 0.00000001 do not both read 0.0000."""
    return "-" if value is None else f"{value:.1e}" if value < 0.001 else f"{value:.4f}"


def _cost(value: float | None) -> str:
    return '<span class="unknown">unknown</span>' if value is None else f"${value:.6f}"


@functools.cache
def _plotly_library() -> str:
    """plotly.js (4.8 MB), read from Plotly's package once per process (the warm runner draws many reports)."""
    return get_plotlyjs()


@functools.cache
def _page_template() -> dict:
    """Plotly's white theme as plain data, made once: set on a figure, Plotly checks every field of
    it again for every chart (half of drawing a report took that)."""
    return pio.templates["plotly_white"].to_plotly_json()


def _figure(figure: dict, div_id: str) -> str:
    # The charts are built on the empty "none" theme; the page's white theme is added here, as data.
    spec = {"data": figure["data"], "layout": {**figure["layout"], "template": _page_template()}}
    return pio.to_html(spec, include_plotlyjs=False, full_html=False, div_id=div_id, config=PLOT_CONFIG, validate=False)


def _table(headers: list[str], rows: list[list[str]], numeric: set[int] = frozenset()) -> str:
    head = "".join(f"<th>{h}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f'<td class="num">{c}</td>' if i in numeric else f"<td>{c}</td>" for i, c in enumerate(row))
                   + "</tr>" for row in rows)
    # Wide tables scroll inside their section instead of widening the page.
    return f'<div class="wide"><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>'


# Columns other helpers may add to model_task_metrics; shown when present.
OPTIONAL_METRICS = {"repeats": "repeats", "flip_rate": "flip rate", "pass_all_k": "pass^k"}


def _evaluated_in(section: TaskSection, row: dict, eval_run_id: str) -> str:
    """Which run a leaderboard row's figures come from: a recommendation weighs each model's newest evaluation."""
    if row["eval_run_id"] == eval_run_id:
        return "this run"
    why = "unchanged, reused" if row["model"] in section.reused else "not evaluated in this run"
    return f'{_e(row["eval_run_id"])}<br><span class="note">({why})</span>'


def leaderboard_table(section: TaskSection, eval_run_id: str) -> str:
    board = section.leaderboard
    qualified = set(section.recommendation["qualified"] or [])
    extra = [c for c in OPTIONAL_METRICS if c in board.columns]
    headers = (["model", "", "accuracy", "95% interval", "cases", "calls", "consistency"]
               + [OPTIONAL_METRICS[c] for c in extra]
               + ["success", "p50 ms", "p95 ms", "cost / case", "qualified", "evaluated in"])
    rows = []
    for r in board.iter_rows(named=True):
        badge = ('<span class="badge champion">champion</span>' if r["model"] == section.champion else
                 '<span class="badge runner">runner-up</span>' if r["model"] == section.recommendation["runner_up"] else "")
        rows.append([_e(r["model"]), badge, _num(r["accuracy"]), f"{_num(r['accuracy_low'])}–{_num(r['accuracy_high'])}",
                     str(r["cases"]), str(r["calls"]), _num(r["consistency"], 2)]
                    + [str(r[c]) if c == "repeats" else _num(r[c], 2) for c in extra]
                    + [_num(r["success_rate"], 2), _num(r["p50_latency_ms"], 0), _num(r["p95_latency_ms"], 0),
                       _cost(r["cost_per_case_usd"]), "yes" if r["model"] in qualified else "no",
                       _evaluated_in(section, r, eval_run_id)])
    numeric = set(range(2, len(headers) - 2))
    return _table(headers, rows, numeric)


def stopped_table(section: TaskSection) -> str:
    """Models adaptive evaluation stopped: what it decided and why, with the rows they did answer. Never ranked."""
    rows = [[_e(r["model"]), _e(r["status"]), str(r["cases"]), str(r["calls"]), f'<span class="reason">{_e(r["status_reason"])}</span>']
            for r in section.stopped.iter_rows(named=True)]
    return _table(["model", "status", "cases answered", "calls", "why"], rows, {2, 3})


def _column(row: dict, name: str):
    """A column older warehouses lack reads as missing."""
    return row.get(name)


def gates_table(section: TaskSection) -> str:
    if section.gates.is_empty():
        return ('<p class="note">No gate was recorded for this task in this run: nothing to promote, or the promotion '
                'step did not run (see the run in the Dagster UI).</p>')
    rows = []
    for r in section.gates.iter_rows(named=True):
        low, high = _column(r, "ci_low"), _column(r, "ci_high")
        interval = f"{_num(low)}–{_num(high)}" if low is not None or high is not None else "-"
        estimate = _column(r, "estimate") if _column(r, "estimate") is not None else r["effect_size"]
        rows.append([_e(r["gate"]), '<span class="pass">pass</span>' if r["passed"] else '<span class="fail">FAIL</span>',
                     _e(r["champion"]), _e(r["incumbent"] or "-"), _e(r["test"] or "-"), _e(_column(r, "n_cases") or "-"),
                     _num(estimate), interval, _p(r["p_value"]), _p(_column(r, "p_adjusted")),
                     _num(_column(r, "detectable_difference"), 2), f'<span class="reason">{_e(r["detail"])}</span>'])
    return _table(["gate", "result", "champion", "assigned", "test", "cases", "estimate", "interval", "p-value",
                   "Holm p", "detectable", "detail"], rows, {5, 6, 8, 9, 10})


def drift_table(section: TaskSection) -> str:
    if section.drift.is_empty():
        return ('<p class="note">No drift comparison: no model was asked anew, in this run and an earlier one, the same '
                'requests on unchanged cases (answers from the cache are not evidence).</p>')
    rows = []
    for r in section.drift.iter_rows(named=True):
        flag = (f'<span class="badge drift">drift: {_e(r["direction"])}</span>' if r["drifted"] else "no")
        digits = 3 if r["metric"] == "accuracy" else 0
        rows.append([_e(r["model"]), _e(r["metric"]), _e(r["baseline_eval_run_id"]), str(r["paired_cases"]),
                     _num(r["baseline_value"], digits), _num(r["current_value"], digits),
                     f"{r['improved_cases']} / {r['worsened_cases']}", _e(r["test"]), _p(r["p_value"]),
                     _p(r["p_value_holm"]), flag])
    return _table(["model", "figure", "compared with run", "paired cases", "before", "now", "better / worse cases",
                   "test", "p-value", "Holm p", "drifted"], rows, {3, 4, 5, 8, 9})


def _task_html(section: TaskSection, colours: dict[str, str], index: int, eval_run_id: str) -> str:
    rec = section.recommendation
    anchor = f"task-{index}"
    champion = (f'<span class="badge champion">{_e(section.champion)}</span>' if section.champion
                else '<span class="badge">no model qualifies</span>')
    threshold = f"threshold {section.threshold:.2f}" if section.threshold is not None else "threshold unknown (task file gone)"
    parts = [f'<section class="task" id="{anchor}">',
             f"<h2>{_e(section.task)}</h2>",
             f'<p class="reason">{_e(section.description)}</p>',
             f"<p>version <b>{_e(section.dataset_version)}</b> · policy <b>{_e(section.policy)}</b> · {threshold} · "
             f"champion {champion} · runner-up {_e(rec['runner_up'] or '-')}"
             + (f" · confidence {rec['confidence']:.2f}" if rec["confidence"] is not None else "") + "</p>",
             f'<p class="reason">{_e(rec["reasoning"])}</p>']
    if section.leaderboard.is_empty():
        if section.stopped.is_empty():
            parts.append('<p class="note">No model was evaluated on this version.</p></section>')
        else:
            parts += ['<p class="note">No model completed an evaluation on this version.</p>',
                      "<h3>Stopped early (not ranked)</h3>", stopped_table(section), "</section>"]
        return "\n".join(parts)
    parts += ["<h3>Leaderboard</h3>", leaderboard_table(section, eval_run_id),
              '<p class="note">Accuracy is the mean over cases of each case\'s share of right repeats; its 95% interval is '
              'the one model_task_metrics stores (over cases). pass^k: share of cases right on every repeat; flip rate: '
              'share of cases whose repeats disagree.</p>',
              *([] if section.stopped.is_empty() else
                ["<h3>Stopped early (not ranked)</h3>", stopped_table(section),
                 '<p class="note">Adaptive evaluation stopped these models once an anytime-valid bound showed they could not '
                 'qualify (or not beat the champion); their partial figures never enter the ranking.</p>']),
              '<div class="grid2">',
              _figure(charts.accuracy_chart(section, colours), f"{anchor}-accuracy"),
              _figure(charts.trends_chart(section, colours), f"{anchor}-trends"),
              _figure(charts.tradeoff_chart(section, colours, "p95_latency_ms", "p95 latency (ms)"), f"{anchor}-latency"),
              _figure(charts.tradeoff_chart(section, colours, "cost_per_case_usd", "cost per case (USD)"), f"{anchor}-cost"),
              "</div>"]
    grid, note = charts.case_grid_chart(section)
    parts += ["<h3>Cases</h3>", _figure(grid, f"{anchor}-cases")]
    if note:
        parts.append(f'<p class="note">{_e(note)}</p>')
    parts += ["<h3>Promotion gates</h3>", gates_table(section), "<h3>Assignment history</h3>"]
    timeline = charts.assignment_timeline(section, colours)
    parts.append(_figure(timeline, f"{anchor}-assignments") if timeline is not None
                 else '<p class="note">No assignment recorded for this task yet.</p>')
    parts += ["<h3>Drift since the previous fresh run</h3>", drift_table(section), "</section>"]
    return "\n".join(parts)


def _header(data: ReportData) -> str:
    run = data.run
    facts = [f"eval run <b>{_e(data.eval_run_id)}</b>"]
    if run:
        facts += [f"trigger {_e(run['trigger'])}", f"started {run['started_at']:%Y-%m-%d %H:%M} UTC",
                  f"{run['calls']} calls ({run['cached_calls']} from cache, {run['failed_calls']} failed)"]
    cost = ("unknown (" + str(data.unpriced_calls) + " call(s) without a price)" if data.run_cost_usd is None
            else f"${data.run_cost_usd:.4f}")
    facts.append(f"cost of this run: {cost}")
    reused = sum(len(s.reused) for s in data.tasks)
    if reused:
        facts.append(f"{reused} evaluation(s) found unchanged and reused from earlier runs, not run again")
    spans = "".join(f"<span>{f}</span>" for f in facts)
    return f"<header><h1>model_eval report</h1><div class=\"facts\">{spans}</div></header>"


def _overview(data: ReportData) -> str:
    rows = []
    for i, s in enumerate(data.tasks):
        metrics = s.champion_metrics()
        drifted = s.drift.filter(pl.col("drifted")) if not s.drift.is_empty() else s.drift
        rows.append([f'<a href="#task-{i}">{_e(s.task)}</a>', _e(s.dataset_version),
                     f'<span class="badge champion">{_e(s.champion)}</span>' if s.champion else "no model qualifies",
                     _num(metrics["accuracy"]) if metrics else "-",
                     _num(metrics["accuracy_low"]) if metrics else "-",
                     _num(metrics["p95_latency_ms"], 0) if metrics else "-",
                     _cost(metrics["cost_per_case_usd"]) if metrics else "-",
                     f"{s.threshold:.2f}" if s.threshold is not None else "-",
                     f'<span class="badge drift">{drifted.height}</span>' if drifted.height else "none"])
    return "<h2>Decision per task</h2>" + _table(
        ["task", "version", "champion", "accuracy", "lower bound", "p95 ms", "cost / case", "threshold", "drift flags"],
        rows, {3, 4, 5, 7})


def render_report(data: ReportData) -> str:
    models = [m for s in data.tasks for m in s.trends["model"].to_list()
              + (s.assignments["model"].to_list() if "model" in s.assignments.columns else [])]
    colours = charts.model_colours([m for m in models if m is not None])
    generated = datetime.now(timezone.utc)
    tasks = "\n".join(_task_html(s, colours, i, data.eval_run_id) for i, s in enumerate(data.tasks))
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<title>model_eval report · {_e(data.eval_run_id)}</title>"
        f"<style>{STYLE}</style>"
        # The Plotly library, once for every chart; no CDN, so the file works offline.
        f"<script type=\"text/javascript\">{_plotly_library()}</script>"
        "</head><body>"
        f"{_header(data)}<main>{_overview(data)}{tasks}"
        f'<p class="note">Generated {generated:%Y-%m-%d %H:%M} UTC from the warehouse; '
        f"<code>model-eval report --run {_e(data.eval_run_id)}</code> writes it again.</p>"
        "</main></body></html>\n"
    )
