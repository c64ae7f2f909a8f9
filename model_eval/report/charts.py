"""The report's charts, built from a `TaskSection` (no warehouse access here).

Each chart is a Plotly figure as plain data, {"data": [traces], "layout": {...}}, the JSON plotly.js
draws. Plotly's figure classes would check every property as it is set: about 0.1 s for a task's
six charts, most of a warm run's report. The tests pass every chart through those classes instead,
so a misspelt property still fails there.
"""

from __future__ import annotations

import html
from datetime import datetime, timedelta, timezone

import polars as pl
from plotly.colors import qualitative

from model_eval.report.data import TaskSection

MAX_GRID_CASES = 300     # beyond this the grid keeps the cases the models disagree on or miss
PALETTE = qualitative.Plotly + qualitative.D3
STAGE_COLOURS = {"full": "#2a9d8f", "partial": "#e9c46a", "shadow": "#a8a8c8"}
# "none": the page's white theme is added when the figure is written (render.py), as plain data.
LAYOUT = dict(template="none", margin=dict(l=60, r=20, t=70, b=60), font=dict(size=12),
              legend=dict(orientation="h", yanchor="top", y=-0.18, x=0))


def _layout(**settings) -> dict:
    """The common layout with these settings; a dict setting (margin, legend) adds to the common one."""
    layout = {key: dict(value) if isinstance(value, dict) else value for key, value in LAYOUT.items()}
    for key, value in settings.items():
        layout[key] = {**layout[key], **value} if isinstance(value, dict) and isinstance(layout.get(key), dict) else value
    return layout


def _threshold_line(layout: dict, threshold: float, label: str | None = None) -> None:
    """A dashed line across the plot at `threshold` (what Plotly's add_hline draws)."""
    layout.setdefault("shapes", []).append(dict(type="line", xref="x domain", x0=0, x1=1, yref="y", y0=threshold,
                                                y1=threshold, line=dict(color="#c0392b", dash="dash")))
    if label:
        layout.setdefault("annotations", []).append(dict(text=label, showarrow=False, xref="x domain", x=0,
                                                         xanchor="left", yref="y", y=threshold, yanchor="bottom"))


def _title(text: str, subtitle: str | None = None) -> dict:
    title = dict(text=text, x=0.01, xanchor="left", y=0.97, yanchor="top", font=dict(size=15))
    if subtitle:
        title["subtitle"] = dict(text=subtitle, font=dict(size=11, color="#666"))
    return title


def model_colours(models: list[str]) -> dict[str, str]:
    """One colour per model, the same in every chart of the report."""
    return {model: PALETTE[i % len(PALETTE)] for i, model in enumerate(sorted(set(models)))}


def pareto_front(points: list[tuple[str, float, float]]) -> list[str]:
    """Models no other model beats on both axes: (name, cost-like x: lower is better, accuracy y: higher is better).

    A model is dominated when another is at least as good on both and strictly better on one.
    Returned in increasing x.
    """
    front = []
    for name, x, y in points:
        dominated = any(ox <= x and oy >= y and (ox < x or oy > y) for other, ox, oy in points if other != name)
        if not dominated:
            front.append((x, -y, name))
    return [name for _, _, name in sorted(front)]


def _short(text: object, limit: int = 160) -> str:
    value = "" if text is None else str(text)
    value = value if len(value) <= limit else value[: limit - 1] + "…"
    return html.escape(value, quote=False).replace("\n", " ")


def _interval_errors(board: pl.DataFrame) -> dict:
    return dict(type="data", symmetric=False, array=(board["accuracy_high"] - board["accuracy"]).to_list(),
                arrayminus=(board["accuracy"] - board["accuracy_low"]).to_list(), thickness=1.5, width=6)


def _n_label(row: dict) -> str:
    return f"{row['cases']} cases, {row['calls']} calls"


def accuracy_chart(section: TaskSection, colours: dict[str, str]) -> dict:
    board = section.leaderboard
    hover = [f"<b>{html.escape(r['model'])}</b><br>accuracy {r['accuracy']:.3f} (95% interval {r['accuracy_low']:.3f}–"
             f"{r['accuracy_high']:.3f})<br>{_n_label(r)}" for r in board.iter_rows(named=True)]
    bars = dict(type="bar", x=board["model"].to_list(), y=board["accuracy"].to_list(), error_y=_interval_errors(board),
                marker=dict(color=[colours[m] for m in board["model"]],
                            line=dict(width=[3 if m == section.champion else 0 for m in board["model"]], color="#222")),
                hovertext=hover, hoverinfo="text", name="accuracy", showlegend=False)
    layout = _layout(title=_title("Accuracy per model", "bars: accuracy; whiskers: 95% interval"
                                  + ("; outlined: champion" if section.champion else "")),
                     yaxis=dict(title=dict(text="accuracy"), range=[0, 1.05]), xaxis=dict(title=dict(text="model")), height=380)
    if section.threshold is not None:
        _threshold_line(layout, section.threshold, f"threshold {section.threshold:.2f}")
    return dict(data=[bars], layout=layout)


def tradeoff_chart(section: TaskSection, colours: dict[str, str], column: str, label: str) -> dict:
    """Accuracy against a lower-is-better figure, the Pareto front drawn through the models no one beats on both."""
    board = section.leaderboard
    known = board.filter(pl.col(column).is_not_null())
    unknown = board.filter(pl.col(column).is_null())["model"].to_list()
    traces = []
    for r in known.iter_rows(named=True):
        traces.append(dict(
            type="scatter", x=[r[column]], y=[r["accuracy"]], mode="markers+text", text=[r["model"]], textposition="top center",
            marker=dict(size=13, color=colours[r["model"]], line=dict(width=2 if r["model"] == section.champion else 0, color="#222")),
            error_y=dict(type="data", symmetric=False, array=[r["accuracy_high"] - r["accuracy"]],
                         arrayminus=[r["accuracy"] - r["accuracy_low"]], thickness=1.2, width=4),
            name=r["model"], hoverinfo="text",
            hovertext=f"<b>{html.escape(r['model'])}</b><br>accuracy {r['accuracy']:.3f} ({r['accuracy_low']:.3f}–"
                      f"{r['accuracy_high']:.3f})<br>{label}: {r[column]:.6g}<br>{_n_label(r)}"))
    front = pareto_front([(r["model"], r[column], r["accuracy"]) for r in known.iter_rows(named=True)])
    if front:
        by_model = {r["model"]: r for r in known.iter_rows(named=True)}
        traces.append(dict(type="scatter", x=[by_model[m][column] for m in front], y=[by_model[m]["accuracy"] for m in front],
                           mode="lines+markers", line=dict(color="#444", dash="dot", shape="hv"),
                           marker=dict(symbol="diamond-open", size=20, color="#444"),
                           name="Pareto front", hoverinfo="text",
                           hovertext=[f"Pareto front: {html.escape(m)}" for m in front]))
    subtitle = "diamonds: Pareto front (no other model is both better and cheaper or faster)"
    if unknown:
        subtitle = f"{subtitle}<br><span style='color:#c0392b'>{html.escape(label)} unknown, not plotted: {html.escape(', '.join(unknown))}</span>"
    layout = _layout(title=_title(f"Accuracy against {label}", subtitle), height=420,
                     xaxis=dict(title=dict(text=label), rangemode="tozero"),
                     yaxis=dict(title=dict(text="accuracy"), range=[0, 1.1]), margin=dict(t=90 if unknown else 75))
    if section.threshold is not None:
        _threshold_line(layout, section.threshold)
    return dict(data=traces, layout=layout)


def case_grid_chart(section: TaskSection) -> tuple[dict, str | None]:
    """Case x model: the share of repeats answered right, with the expected and given answers on hover.

    Returns the figure and a note when cases had to be left out.
    """
    grid = section.case_grid
    models = section.leaderboard["model"].to_list()
    # Hardest cases first: the ones most models miss.
    difficulty = grid.group_by("case_id").agg(pl.col("share_right").mean().alias("mean_right")).sort(["mean_right", "case_id"])
    note = None
    if difficulty.height > MAX_GRID_CASES:
        note = f"showing the {MAX_GRID_CASES} hardest of {difficulty.height} cases"
        difficulty = difficulty.head(MAX_GRID_CASES)
    cases = difficulty["case_id"].to_list()
    cells = {(r["case_id"], r["model"]): r for r in grid.iter_rows(named=True)}
    z, text = [], []
    for case in cases:
        z_row, text_row = [], []
        for model in models:
            cell = cells.get((case, model))
            if cell is None:
                z_row.append(None)
                text_row.append(f"case {html.escape(case)}<br>{html.escape(model)}: not evaluated")
                continue
            z_row.append(cell["share_right"])
            right = round(cell["share_right"] * cell["repeats"])
            lines = [f"<b>case {html.escape(case)}</b> · {html.escape(model)}",
                     f"right on {right} of {cell['repeats']} repeat(s)",
                     f"expected: {_short(cell['expected_json'], 120)}",
                     "answers: " + " | ".join(_short(a, 60) for a in cell["answers"])]
            if cell["share_right"] < 1 and cell["a_reason"]:
                lines.append(f"why wrong: {_short(cell['a_reason'], 120)}")
            text_row.append("<br>".join(lines))
        z.append(z_row)
        text.append(text_row)
    heatmap = dict(type="heatmap", z=z, x=models, y=cases, text=text, hoverinfo="text", zmin=0, zmax=1, xgap=2, ygap=1,
                   colorscale=[[0, "#d62728"], [0.5, "#f4d35e"], [1, "#2ca02c"]],
                   colorbar=dict(title=dict(text="share right"), thickness=12))
    layout = _layout(title=_title("Which cases each model gets wrong", "share of repeats right; hover a cell for "
                                  "the expected and given answers"),
                     height=max(320, 120 + 16 * len(cases)),
                     yaxis=dict(title=dict(text="case"), autorange="reversed", type="category"),
                     xaxis=dict(title=dict(text="model"), side="top"))
    return dict(data=[heatmap], layout=layout), note


def assignment_timeline(section: TaskSection, colours: dict[str, str], now: datetime | None = None) -> dict | None:
    """Which model served the task, and which candidate was in shadow or partial, over time."""
    history = section.assignments
    if history.is_empty():
        return None
    now = now or datetime.now(timezone.utc).replace(tzinfo=None)
    rows = history.sort("seq").to_dicts()
    bars: dict[str, dict[str, list]] = {}

    def bar(lane: str, model: str, start: datetime, end: datetime, hover: str) -> None:
        group = bars.setdefault(lane, {"y": [], "base": [], "x": [], "hover": []})
        group["y"].append(model)
        group["base"].append(start.isoformat())
        group["x"].append(max((end - start).total_seconds() * 1000, 1000.0))
        group["hover"].append(hover)

    for row, following in zip(rows, rows[1:] + [None]):
        start, end = row["assigned_at"], following["assigned_at"] if following else now
        serving = row["model"] if row["stage"] == "full" else row["previous_model"]
        reason = _short(row["reason"], 200)
        if serving:
            bar("serving", serving, start, end, f"<b>{html.escape(serving)}</b> serving<br>since {start:%Y-%m-%d %H:%M}<br>{reason}")
        if row["stage"] in ("shadow", "partial"):
            share = f" ({row['traffic_share']:.0%} of requests)" if row["stage"] == "partial" else ""
            bar(row["stage"], row["model"], start, end,
                f"<b>{html.escape(row['model'])}</b> in {row['stage']}{share}<br>since {start:%Y-%m-%d %H:%M}<br>{reason}")
    traces = [dict(type="bar", orientation="h", y=group["y"], base=group["base"], x=group["x"], name=lane,
                   marker=dict(color=STAGE_COLOURS.get(lane, STAGE_COLOURS["full"]) if lane != "serving" else STAGE_COLOURS["full"]),
                   hovertext=group["hover"], hoverinfo="text", offsetgroup=lane)
              for lane, group in bars.items()]
    traces.append(dict(
        type="scatter", x=[r["assigned_at"].isoformat() for r in rows], y=[r["model"] for r in rows], mode="markers", name="change",
        marker=dict(symbol="line-ns-open", size=22, color="#222", line=dict(width=2)), hoverinfo="text",
        hovertext=[f"<b>{html.escape(r['action'])}</b> {html.escape(r['model'])} ({r['stage']}) by {html.escape(str(r['assigned_by']))}"
                   f"<br>{r['assigned_at']:%Y-%m-%d %H:%M}<br>{_short(r['reason'], 200)}" for r in rows]))
    layout = _layout(title=_title("Assignment history", "bars: the model serving, and candidates in shadow or "
                                  "partial rollout; ticks: each recorded change"),
                     barmode="group", height=max(260, 160 + 50 * history["model"].n_unique()),
                     xaxis=dict(type="date", title=dict(text="time")), yaxis=dict(title=dict(text="model"), type="category"),
                     legend=dict(y=-0.3), margin=dict(b=90))
    return dict(data=traces, layout=layout)


def trends_chart(section: TaskSection, colours: dict[str, str]) -> dict:
    """Accuracy (with its interval) and p95 latency per model across evaluation runs: two plots, one above
    the other, sharing the time axis (the upper one's tick labels hidden, as Plotly's subplots do)."""
    trends = section.trends.with_columns(pl.coalesce("started_at", "evaluated_at").alias("when")).sort("when")
    traces = []
    for model in sorted(trends["model"].unique().to_list()):
        rows = trends.filter(pl.col("model") == model)
        when = [w.isoformat() for w in rows["when"]]
        hover = [f"<b>{html.escape(model)}</b> · run {html.escape(r['eval_run_id'])}<br>version {html.escape(r['dataset_version'])}"
                 f"<br>accuracy {r['accuracy']:.3f} ({r['accuracy_low']:.3f}–{r['accuracy_high']:.3f}), {r['cases']} cases"
                 + (f"<br>p95 {r['p95_latency_ms']:.0f} ms" if r["p95_latency_ms"] is not None else "")
                 for r in rows.iter_rows(named=True)]
        common = dict(type="scatter", mode="lines+markers", line=dict(color=colours[model]), marker=dict(color=colours[model]),
                      legendgroup=model, hovertext=hover, hoverinfo="text")
        traces.append(dict(x=when, y=rows["accuracy"].to_list(), name=model, error_y=_interval_errors(rows),
                           xaxis="x", yaxis="y", **common))
        traces.append(dict(x=when, y=rows["p95_latency_ms"].to_list(), name=model, showlegend=False,
                           xaxis="x2", yaxis="y2", **common))
    time_axis = dict(type="date", domain=[0.0, 1.0])
    if (padded := _padded_time_range(trends["when"].to_list())) is not None:
        time_axis["range"] = padded
    layout = _layout(title=_title("Trends across evaluation runs", "accuracy with its 95% interval, and p95 latency"),
                     height=560,
                     xaxis=dict(time_axis, anchor="y", matches="x2", showticklabels=False),
                     xaxis2=dict(time_axis, anchor="y2"),
                     yaxis=dict(anchor="x", domain=[0.55, 1.0], range=[0, 1.05], title=dict(text="accuracy")),
                     yaxis2=dict(anchor="x2", domain=[0.0, 0.45], rangemode="tozero", title=dict(text="p95 latency (ms)")))
    return dict(data=traces, layout=layout)


def _padded_time_range(times: list) -> list[str] | None:
    """The runs' time span with a margin of at least 30 minutes: left to itself, Plotly zooms a single
    run (or runs seconds apart) down to milliseconds and labels the axis with fractions of a second."""
    if not times:
        return None
    first, last = min(times), max(times)
    margin = max((last - first) * 0.05, timedelta(minutes=30))
    return [(first - margin).isoformat(), (last + margin).isoformat()]
