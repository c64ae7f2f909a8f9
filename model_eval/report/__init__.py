"""The evaluation report: one self-contained HTML file per eval run, and the summary sent after
scheduled runs. `data` reads the warehouse, `charts` and `render` draw, `summary` writes the text;
this module puts them together and writes the files."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from model_eval import warehouse
from model_eval.report.data import (
    NoRecommendationError,
    ReportData,
    load_report_data,
    load_run_changes,
    newest_recommended_run,
)
from model_eval.report.render import render_report
from model_eval.report.summary import Summary, build_summary
from model_eval.golden import TaskSpec
from model_eval.settings import ProjectPaths

__all__ = ["NoRecommendationError", "WrittenReport", "report_data", "report_file", "write_report", "summarize"]

LATEST = "latest.html"


@dataclass(frozen=True)
class WrittenReport:
    path: Path
    data: ReportData


def report_file(reports_dir: Path, eval_run_id: str) -> Path:
    """`<eval_run_id>.html`, with characters a file name cannot carry replaced."""
    return reports_dir / (re.sub(r"[^A-Za-z0-9._-]", "_", eval_run_id) + ".html")


def _write_atomically(path: Path, text: str) -> None:
    # A browser or a mail job reading the file never sees half of it.
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_text(text, encoding="utf-8")
    os.replace(temporary, path)


def _link_atomically(source: Path, path: Path, text: str) -> None:
    """`path` becomes the same file as `source` (a hard link: no second 5 MB write), or a copy of `text`
    where the file system has no hard links."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.unlink(missing_ok=True)
    try:
        os.link(source, temporary)
    except OSError:
        _write_atomically(path, text)
        return
    os.replace(temporary, path)


def write_report(paths: ProjectPaths, eval_run_id: str | None = None, tasks: tuple[TaskSpec, ...] = ()) -> WrittenReport:
    """Write `<eval_run_id>.html` (the newest recommended run when None); `latest.html` too when it is the newest.

    `tasks` supply each task's threshold and description (the warehouse does not keep them).
    """
    with warehouse.read_connection(paths.warehouse_file) as conn:
        data = load_report_data(conn, eval_run_id, tasks)
        newest = newest_recommended_run(conn)
    page = render_report(data)
    paths.reports_dir.mkdir(parents=True, exist_ok=True)
    target = report_file(paths.reports_dir, data.eval_run_id)
    _write_atomically(target, page)
    if data.eval_run_id == newest:
        _link_atomically(target, paths.reports_dir / LATEST, page)
    return WrittenReport(target, data)


def report_data(paths: ProjectPaths, eval_run_id: str | None = None, tasks: tuple[TaskSpec, ...] = ()) -> ReportData:
    """What `write_report` would draw, read from the warehouse but not drawn."""
    with warehouse.read_connection(paths.warehouse_file) as conn:
        return load_report_data(conn, eval_run_id, tasks)


def summarize(paths: ProjectPaths, eval_run_id: str | None = None, report_path: Path | None = None,
              tasks: tuple[TaskSpec, ...] = ()) -> Summary:
    with warehouse.read_connection(paths.warehouse_file) as conn:
        data = load_report_data(conn, eval_run_id, tasks)
        changes = load_run_changes(conn, data.eval_run_id)
    if report_path is None:
        written = report_file(paths.reports_dir, data.eval_run_id)
        report_path = written if written.is_file() else None
    return build_summary(data, changes, report_path)
