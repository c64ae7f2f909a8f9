"""Step `golden_cases`: load, check and validate every task and every dataset version, then record them."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import polars as pl

from model_eval import warehouse
from model_eval.crash_points import crash_point
from model_eval.errors import GoldenSetError
from model_eval.golden import TaskSpec, read_calibration_cases, read_cases
from model_eval.golden_validation import validate_cases
from model_eval.project import Project
from model_eval.steps._common import Log, utc_now


@dataclass(frozen=True)
class GoldenIngestion:
    tasks: list[TaskSpec]
    versions: pl.DataFrame        # one row per (task, version) file
    new_cases: int
    expectations_run: int


def ingest_golden(project: Project, eval_run_id: str, log: Log) -> GoldenIngestion:
    """Validate every version of every task; write only if all of it is valid."""
    version_rows, case_frames, expectations = [], [], 0
    for task in project.tasks:
        for version in task.versions:
            path = task.cases_file(version)
            cases = read_cases(task, version)
            outcome = validate_cases(cases, task.output_kind, str(path), expected_required=not task.is_judged)
            expectations += outcome.expectations_run
            if not outcome.passed:
                raise GoldenSetError(path, "failed validation:\n  " + "\n  ".join(outcome.problems))
            file_hash = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
            version_rows.append({"task": task.name, "dataset_version": version, "source_file": str(path),
                                 "file_hash": file_hash, "cases": cases.height, "output_kind": task.output_kind,
                                 "scorer": task.scorer, "is_current": version == task.dataset_version,
                                 "validation_passed": True, "expectations_run": outcome.expectations_run,
                                 "eval_run_id": eval_run_id, "ingested_at": utc_now()})
            case_frames.append(cases.drop("expected_error", "expected_verdict").with_columns(
                pl.lit(file_hash).alias("file_hash"), pl.lit(eval_run_id).alias("eval_run_id"),
                pl.lit(utc_now()).alias("ingested_at")))
            log.info(f"golden {task.name} {version}: {cases.height} cases valid ({outcome.expectations_run} expectations)")
    for task in project.tasks:
        if task.is_judged:
            # A judge task's human-labelled answers: the same rules as a verdict task's cases (at least 10,
            # unique ids, PASS and FAIL both present), so a judge is never calibrated on a lopsided set.
            outcome = validate_cases(read_calibration_cases(task), "verdict", str(task.calibration_file()))
            expectations += outcome.expectations_run
            if not outcome.passed:
                raise GoldenSetError(task.calibration_file(), "failed validation:\n  " + "\n  ".join(outcome.problems))
    versions = pl.DataFrame(version_rows)
    all_cases = pl.concat(case_frames)
    with warehouse.write_connection(project.paths.warehouse_file) as conn, warehouse.transaction(conn):
        new_cases = warehouse.insert_new(conn, "golden_cases", all_cases, ["task", "dataset_version", "case_id", "file_hash"])
        warehouse.insert_new(conn, "golden_versions", versions, ["task", "dataset_version", "file_hash"])
        # Exactly one file is current per task: the version the task file names (or the newest).
        conn.execute("UPDATE golden_versions SET is_current = FALSE")
        conn.register("current_files", versions.filter(pl.col("is_current")).select("task", "dataset_version", "file_hash").to_arrow())
        conn.execute("UPDATE golden_versions g SET is_current = TRUE FROM current_files c "
                     "WHERE g.task = c.task AND g.dataset_version = c.dataset_version AND g.file_hash = c.file_hash")
        crash_point("golden.write")
    return GoldenIngestion(tasks=list(project.tasks), versions=versions, new_cases=new_cases, expectations_run=expectations)
