"""Dataset-level rules for a golden set, checked with Great Expectations 1.x, and when they need checking.

dagster-ge only supports GX < 1.0, so GX is called directly: an ephemeral context and pandas batches
(GX cannot read polars frames). Each failed expectation is turned into a message naming the file,
the field and the offending lines.

Memory stays flat in the size of the file: the rules that need every row at once (row count, unique
ids, both verdicts present) run on a narrow frame of ids, lines and verdicts; the per-row rules run
on chunks of `CHUNK_ROWS` rows. Only the chunk is ever copied to pandas.

Great Expectations is imported only when a file is validated (its import takes seconds);
`validation_key` says when that is needed: the key changes when the cases file, the task file or the
scorer settings change, and the ingestion step keeps the key of every file that passed.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import polars as pl

os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")

MIN_CASES = 10
VERDICTS = ["PASS", "FAIL"]
CHUNK_ROWS = 20_000
# Bump when the rules below change: every file is then validated again once.
RULES_VERSION = 3


@dataclass(frozen=True)
class ValidationOutcome:
    source_file: str
    passed: bool
    problems: list[str]
    expectations_run: int


def file_sha256(path: Path) -> str:
    """The file's SHA-256, read in blocks (a golden set can be large)."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def validation_key(cases_sha256: str, task_file: Path, scorer: str, scorer_settings: dict, output_kind: str,
                   extra_files: list[Path] = ()) -> str:
    """What a validation result depends on: the cases, the task file, the scorer and its settings, these rules,
    and any other file validated with them (a judge task's calibration file)."""
    parts = {"rules": RULES_VERSION, "min_cases": MIN_CASES, "cases": cases_sha256, "task_file": file_sha256(task_file),
             "scorer": scorer, "scorer_settings": scorer_settings, "output_kind": output_kind,
             "extra_files": [file_sha256(path) for path in extra_files]}
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32]


_names = itertools.count()


@functools.cache
def _context():
    """One ephemeral GX context per process: each new one costs time and leaves a temp folder behind."""
    # GX logs its import-time bookkeeping and temp folders at INFO: noise in run logs.
    logging.getLogger("great_expectations").setLevel(logging.WARNING)
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    context = gx.get_context(mode="ephemeral")
    # GX draws a progress bar per validation; in logs and CI output it is only noise.
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    context.data_sources.add_pandas("golden")
    return context


def _whole_file_rules(output_kind: str) -> list:
    """Rules about the file as a whole: checked once, on the narrow frame."""
    import great_expectations as gx

    rules = [
        gx.expectations.ExpectTableRowCountToBeBetween(min_value=MIN_CASES),
        gx.expectations.ExpectColumnValuesToBeUnique(column="case_id"),
        gx.expectations.ExpectColumnValuesToNotBeNull(column="case_id"),
    ]
    if output_kind == "verdict":
        rules.append(gx.expectations.ExpectColumnDistinctValuesToContainSet(column="expected_verdict", value_set=VERDICTS))
    return rules


def _per_row_rules(output_kind: str, expected_required: bool = True) -> list:
    """Rules each row passes or fails on its own: checked chunk by chunk."""
    import great_expectations as gx

    rules = [
        gx.expectations.ExpectColumnValuesToNotBeNull(column="inputs_json"),
        # Filled per case by the scorer's own check of the expected value; null means valid.
        gx.expectations.ExpectColumnValuesToBeNull(column="expected_error"),
    ]
    if not expected_required:
        return rules   # a judge task: a case may come without an expected answer (the judge grades it)
    rules.append(gx.expectations.ExpectColumnValuesToNotBeNull(column="expected_json"))
    if output_kind == "verdict":
        rules.append(gx.expectations.ExpectColumnValuesToBeInSet(column="expected_verdict", value_set=VERDICTS))
    return rules


def _validate_frame(frame, rules: list):
    """Run `rules` (new expectation objects: GX binds each to one suite) on one pandas frame; the suite
    and asset are dropped afterwards, so nothing accumulates over chunks."""
    import great_expectations as gx

    context = _context()
    name = f"cases_{next(_names)}"
    source = context.data_sources.get("golden")
    asset = source.add_dataframe_asset(name)
    batch = asset.add_batch_definition_whole_dataframe("whole_file").get_batch(batch_parameters={"dataframe": frame})
    suite = context.suites.add(gx.ExpectationSuite(name=name, expectations=rules))
    try:
        return batch.validate(suite, result_format="COMPLETE")
    finally:
        context.suites.delete(name)
        source.delete_asset(name)


@dataclass
class _Failure:
    kind: str
    column: str | None
    lines: set[int]
    details: dict
    messages: list[str]


def validate_cases(cases: pl.DataFrame, output_kind: str, source_file: str, expected_required: bool = True,
                   chunk_rows: int = CHUNK_ROWS) -> ValidationOutcome:
    """Run the expectations on one cases file's rows (as produced by golden.read_cases, or a judge task's
    calibration file by golden.read_calibration_cases, checked as a verdict task)."""
    verdict = ["expected_verdict"] if output_kind == "verdict" else []
    failures: dict[tuple[str, str | None], _Failure] = {}

    def collect(result, frame) -> None:
        for item in result.results:
            if item.success:
                continue
            config = item.expectation_config
            column = config.kwargs.get("column")
            details = item.result or {}
            indexes = [i for i in details.get("unexpected_index_list") or [] if isinstance(i, int)]
            failure = failures.setdefault((config.type, column), _Failure(config.type, column, set(), details, []))
            failure.lines |= {int(frame.iloc[i]["line"]) for i in indexes}
            if config.type == "expect_column_values_to_be_null":
                failure.messages += [str(frame.iloc[i]["expected_error"]) for i in indexes[:5]]
            elif config.type == "expect_column_values_to_be_in_set":
                failure.messages += [str(v) for v in details.get("unexpected_list", [])]

    narrow = cases.select("line", "case_id", *verdict).to_pandas()
    collect(_validate_frame(narrow, _whole_file_rules(output_kind)), narrow)
    del narrow
    for offset in range(0, cases.height, chunk_rows):
        chunk = cases.slice(offset, chunk_rows).select(
            "line", "case_id", "inputs_json", "expected_json", "expected_error", *verdict).to_pandas()
        collect(_validate_frame(chunk, _per_row_rules(output_kind, expected_required)), chunk)

    problems = []
    for failure in failures.values():
        lines = sorted(failure.lines)
        where = (f"{source_file}" + (f", line(s) {', '.join(map(str, lines[:20]))}" if lines else "")
                 + (f", field '{_field_name(failure.column)}'" if failure.column else ""))
        problems.append(f"{where}: {_describe(failure)}")
    return ValidationOutcome(source_file=source_file, passed=not failures, problems=problems,
                             expectations_run=len(_whole_file_rules(output_kind)) + len(_per_row_rules(output_kind, expected_required)))


def _field_name(column: str) -> str:
    # Report the field as the person wrote it in the JSONL file, not our column name.
    return {"case_id": "id", "inputs_json": "inputs", "expected_json": "expected",
            "expected_error": "expected", "expected_verdict": "expected"}.get(column, column)


def _describe(failure: _Failure) -> str:
    kind, details = failure.kind, failure.details
    if kind == "expect_table_row_count_to_be_between":
        return f"has {details.get('observed_value')} cases; at least {MIN_CASES} are required"
    if kind == "expect_column_values_to_be_unique":
        values = sorted({str(v) for v in details.get("unexpected_list", [])})
        return f"duplicate id(s): {', '.join(values)}"
    if kind == "expect_column_values_to_be_null":
        return "invalid expected value: " + "; ".join(failure.messages[:5])
    if kind == "expect_column_distinct_values_to_contain_set":
        return f"a verdict task needs both PASS and FAIL cases; found only {details.get('observed_value')}"
    if kind == "expect_column_values_to_be_in_set":
        return f"must be one of {', '.join(VERDICTS)}; got {sorted(set(failure.messages))}"
    if kind == "expect_column_values_to_not_be_null":
        return "required value is missing"
    return f"{kind} failed: {details}"
