"""Dataset-level rules for a golden set, checked with Great Expectations 1.x.

dagster-ge only supports GX < 1.0, so GX is called directly: an ephemeral context and a pandas
batch per cases file (GX cannot read polars frames). Each failed expectation is turned into a
message naming the file, the field and the offending lines.
"""

from __future__ import annotations

import functools
import itertools
import logging
import os
from dataclasses import dataclass

import polars as pl

os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")

MIN_CASES = 10
VERDICTS = ["PASS", "FAIL"]


@dataclass(frozen=True)
class ValidationOutcome:
    source_file: str
    passed: bool
    problems: list[str]
    expectations_run: int


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


def _expectations(output_kind: str, n_rows: int, expected_required: bool = True):
    import great_expectations as gx

    rules = [
        gx.expectations.ExpectTableRowCountToBeBetween(min_value=MIN_CASES),
        gx.expectations.ExpectColumnValuesToBeUnique(column="case_id"),
        gx.expectations.ExpectColumnValuesToNotBeNull(column="case_id"),
        gx.expectations.ExpectColumnValuesToNotBeNull(column="inputs_json"),
        # Filled per case by the scorer's own check of the expected value; null means valid.
        gx.expectations.ExpectColumnValuesToBeNull(column="expected_error"),
    ]
    if not expected_required:
        return rules   # a judge task: a case may come without an expected answer (the judge grades it)
    rules.append(gx.expectations.ExpectColumnValuesToNotBeNull(column="expected_json"))
    if output_kind == "verdict":
        rules += [
            gx.expectations.ExpectColumnValuesToBeInSet(column="expected_verdict", value_set=VERDICTS),
            gx.expectations.ExpectColumnDistinctValuesToContainSet(column="expected_verdict", value_set=VERDICTS),
        ]
    return rules


def validate_cases(cases: pl.DataFrame, output_kind: str, source_file: str, expected_required: bool = True) -> ValidationOutcome:
    """Run the expectations on one cases file's rows (as produced by golden.read_cases, or a judge task's
    calibration file by golden.read_calibration_cases, checked as a verdict task)."""
    import great_expectations as gx

    frame = cases.select("line", "case_id", "inputs_json", "expected_json", "expected_error", "expected_verdict").to_pandas()
    context = _context()
    name = f"cases_{next(_names)}"
    batch = (
        context.data_sources.get("golden")
        .add_dataframe_asset(name)
        .add_batch_definition_whole_dataframe("whole_file")
        .get_batch(batch_parameters={"dataframe": frame})
    )
    suite = context.suites.add(gx.ExpectationSuite(name=name, expectations=_expectations(output_kind, len(frame), expected_required)))
    result = batch.validate(suite, result_format="COMPLETE")

    problems = []
    for item in result.results:
        if item.success:
            continue
        config = item.expectation_config
        column = config.kwargs.get("column")
        kind = config.type
        details = item.result or {}
        indexes = details.get("unexpected_index_list") or []
        lines = sorted({int(frame.iloc[i]["line"]) for i in indexes if isinstance(i, int)})
        where = f"{source_file}" + (f", line(s) {', '.join(map(str, lines[:20]))}" if lines else "") + (f", field '{_field_name(column)}'" if column else "")
        problems.append(f"{where}: {_describe(kind, details, frame, indexes)}")
    return ValidationOutcome(source_file=source_file, passed=result.success, problems=problems, expectations_run=len(result.results))


def _field_name(column: str) -> str:
    # Report the field as the person wrote it in the JSONL file, not our column name.
    return {"case_id": "id", "inputs_json": "inputs", "expected_json": "expected",
            "expected_error": "expected", "expected_verdict": "expected"}.get(column, column)


def _describe(kind: str, details: dict, frame, indexes: list) -> str:
    if kind == "expect_table_row_count_to_be_between":
        return f"has {details.get('observed_value')} cases; at least {MIN_CASES} are required"
    if kind == "expect_column_values_to_be_unique":
        values = sorted({str(v) for v in details.get("unexpected_list", [])})
        return f"duplicate id(s): {', '.join(values)}"
    if kind == "expect_column_values_to_be_null":
        messages = [str(frame.iloc[i]["expected_error"]) for i in indexes[:5] if isinstance(i, int)]
        return "invalid expected value: " + "; ".join(messages)
    if kind == "expect_column_distinct_values_to_contain_set":
        return f"a verdict task needs both PASS and FAIL cases; found only {details.get('observed_value')}"
    if kind == "expect_column_values_to_be_in_set":
        return f"must be one of {', '.join(VERDICTS)}; got {sorted({str(v) for v in details.get('unexpected_list', [])})}"
    if kind == "expect_column_values_to_not_be_null":
        return "required value is missing"
    return f"{kind} failed: {details}"
