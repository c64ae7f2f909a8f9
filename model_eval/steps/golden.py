"""Step `golden_cases`: load, check and validate every task and every dataset version, then record them.

A file is validated again only when its validation key changed (the cases file, the task file, the
scorer or its settings, and a judge task's calibration file; see `golden_validation.validation_key`). The key of every file that passed
is kept in `golden_versions.validation_key`, next to the cases it vouches for: a new warehouse
validates everything once, and an unchanged golden set neither imports nor runs Great Expectations.
"""

from __future__ import annotations

from dataclasses import dataclass

import polars as pl

from model_eval import warehouse
from model_eval.crash_points import crash_point
from model_eval.errors import GoldenSetError
from model_eval.golden import TaskSpec, read_calibration_cases, read_cases
from model_eval.golden_validation import file_sha256, validate_cases, validation_key
from model_eval.project import Project
from model_eval.steps._common import Log, utc_now

VERSION_KEY = ["task", "dataset_version", "file_hash"]


@dataclass(frozen=True)
class GoldenIngestion:
    tasks: list[TaskSpec]
    versions: pl.DataFrame        # one row per (task, version) file
    new_cases: int
    expectations_run: int         # run by this ingestion: 0 when every file's validation was reused
    validations_reused: int = 0


def _validated_files(project: Project) -> dict[tuple[str, str, str], dict]:
    """The files the warehouse already holds, by (task, version, file hash), with the key they passed under."""
    if not project.paths.warehouse_file.exists():
        return {}
    with warehouse.read_connection(project.paths.warehouse_file) as conn:
        rows = conn.sql("SELECT * FROM golden_versions").pl()
    if "validation_key" not in rows.columns:   # a warehouse from before validation keys: validate once more
        return {}
    return {(r["task"], r["dataset_version"], r["file_hash"]): r for r in rows.iter_rows(named=True)}


def ingest_golden(project: Project, eval_run_id: str, log: Log) -> GoldenIngestion:
    """Validate every version of every task whose key changed; write only if all of it is valid."""
    known = _validated_files(project)
    version_rows, case_frames, expectations, reused = [], [], 0, 0
    for task in project.tasks:
        # A judge task's calibration file vouches for its judge: part of every version's key, validated with them.
        calibration = [task.calibration_file()] if task.is_judged else []
        validated_before = len(case_frames)
        for version in task.versions:
            path = task.cases_file(version)
            cases_sha = file_sha256(path)
            file_hash = cases_sha[:16]
            key = validation_key(cases_sha, task.task_file, task.scorer, task.scorer_settings, task.output_kind,
                                 extra_files=calibration)
            row = {"task": task.name, "dataset_version": version, "source_file": str(path), "file_hash": file_hash,
                   "output_kind": task.output_kind, "scorer": task.scorer, "is_current": version == task.dataset_version,
                   "validation_passed": True, "validation_key": key, "eval_run_id": eval_run_id, "ingested_at": utc_now()}
            before = known.get((task.name, version, file_hash))
            if before is not None and before["validation_key"] == key and before["validation_passed"]:
                # Same cases, same task file, same scorer settings: the earlier result still holds.
                version_rows.append({**row, "cases": before["cases"], "expectations_run": before["expectations_run"]})
                reused += 1
                continue
            cases = read_cases(task, version)
            outcome = validate_cases(cases, task.output_kind, str(path), expected_required=not task.is_judged)
            expectations += outcome.expectations_run
            if not outcome.passed:
                raise GoldenSetError(path, "failed validation:\n  " + "\n  ".join(outcome.problems))
            version_rows.append({**row, "cases": cases.height, "expectations_run": outcome.expectations_run})
            case_frames.append(cases.drop("expected_error", "expected_verdict").with_columns(
                pl.lit(file_hash).alias("file_hash"), pl.lit(eval_run_id).alias("eval_run_id"),
                pl.lit(utc_now()).alias("ingested_at")))
            log.info(f"golden {task.name} {version}: {cases.height} cases valid ({outcome.expectations_run} expectations)")
        if calibration and len(case_frames) > validated_before:
            # The human-labelled answers get a verdict task's rules (at least 10, unique ids, PASS and FAIL
            # both present), so a judge is never calibrated on a lopsided set.
            outcome = validate_cases(read_calibration_cases(task), "verdict", str(calibration[0]))
            expectations += outcome.expectations_run
            if not outcome.passed:
                raise GoldenSetError(calibration[0], "failed validation:\n  " + "\n  ".join(outcome.problems))
    if reused:
        log.info(f"golden: {reused} unchanged file(s), validation reused")
    versions = pl.DataFrame(version_rows)
    current = {(r["task"], r["dataset_version"], r["file_hash"]) for r in version_rows if r["is_current"]}
    if not case_frames and current == {k for k, r in known.items() if r["is_current"]}:
        # Nothing new and the same files are current: nothing to write, nothing to publish.
        return GoldenIngestion(tasks=list(project.tasks), versions=versions, new_cases=0, expectations_run=0,
                               validations_reused=reused)
    with warehouse.write_connection(project.paths.warehouse_file) as conn, warehouse.transaction(conn):
        new_cases = (warehouse.insert_new(conn, "golden_cases", pl.concat(case_frames), VERSION_KEY + ["case_id"])
                     if case_frames else 0)
        warehouse.insert_new(conn, "golden_versions", versions, VERSION_KEY)
        # A file validated again under a new key (its task file or scorer settings changed) keeps its row.
        conn.register("validated_files", versions.select(*VERSION_KEY, "validation_key", "expectations_run",
                                                         "output_kind", "scorer").to_arrow())
        conn.execute("""UPDATE golden_versions g SET validation_key = v.validation_key, expectations_run = v.expectations_run,
                               output_kind = v.output_kind, scorer = v.scorer, validation_passed = TRUE
                        FROM validated_files v WHERE g.task = v.task AND g.dataset_version = v.dataset_version
                          AND g.file_hash = v.file_hash AND g.validation_key IS DISTINCT FROM v.validation_key""")
        conn.unregister("validated_files")
        # Exactly one file is current per task: the version the task file names (or the newest).
        conn.execute("UPDATE golden_versions SET is_current = FALSE")
        conn.register("current_files", versions.filter(pl.col("is_current")).select(*VERSION_KEY).to_arrow())
        conn.execute("UPDATE golden_versions g SET is_current = TRUE FROM current_files c "
                     "WHERE g.task = c.task AND g.dataset_version = c.dataset_version AND g.file_hash = c.file_hash")
        conn.unregister("current_files")
        crash_point("golden.write")
    return GoldenIngestion(tasks=list(project.tasks), versions=versions, new_cases=new_cases, expectations_run=expectations,
                           validations_reused=reused)
