"""Golden validation is reused while nothing it depends on changed, and runs again (in chunks) when something did."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from model_eval import warehouse
from model_eval.errors import GoldenSetError
from model_eval.golden import load_task, read_cases
from model_eval.golden_validation import validate_cases
from model_eval.project import Project
from model_eval.settings import PROJECT_ROOT
from model_eval.steps.golden import ingest_golden

# Ingests in a fresh interpreter and says what it ran and whether Great Expectations was imported.
INGEST_IN_A_FRESH_PROCESS = """
import json, logging, sys
from pathlib import Path
from model_eval.project import Project
from model_eval.settings import ProjectPaths
from model_eval.steps.golden import ingest_golden
root = Path(sys.argv[1])
paths = ProjectPaths(golden_dir=root / "golden", registry_file=Path(sys.argv[2]), warehouse_file=root / "warehouse" / "model_eval.duckdb",
                     cache_file=root / "warehouse" / "cache" / "responses.sqlite")
result = ingest_golden(Project.load(paths), "subprocess", logging.getLogger("test"))
print(json.dumps({"expectations_run": result.expectations_run, "reused": result.validations_reused,
                  "gx_imported": "great_expectations" in sys.modules}))
"""


def _ingest_in_subprocess(paths) -> dict:
    out = subprocess.run([sys.executable, "-c", INGEST_IN_A_FRESH_PROCESS, str(paths.golden_dir.parent), str(paths.registry_file)],
                         capture_output=True, text=True, timeout=300, cwd=PROJECT_ROOT, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def _files(paths) -> int:
    return sum(len(t.versions) for t in Project.load(paths).tasks)


def _validated_keys(paths) -> dict[str, str]:
    with warehouse.read_connection(paths.warehouse_file) as conn:
        return dict(conn.sql("SELECT task, validation_key FROM golden_versions WHERE is_current").fetchall())


def test_an_unchanged_golden_set_neither_imports_nor_runs_great_expectations(paths):
    first = _ingest_in_subprocess(paths)
    assert first["expectations_run"] > 0 and first["reused"] == 0 and first["gx_imported"]
    published = paths.warehouse_file.stat().st_mtime_ns
    second = _ingest_in_subprocess(paths)
    assert second == {"expectations_run": 0, "reused": _files(paths), "gx_imported": False}
    assert paths.warehouse_file.stat().st_mtime_ns == published   # nothing changed: nothing published


@pytest.mark.parametrize("change,task", [
    # the cases file: one case's notes
    (lambda g: (g / "grading" / "cases" / "v1.jsonl").write_text(
        (g / "grading" / "cases" / "v1.jsonl").read_text().replace('"id": "grading-001"', '"notes": "edited", "id": "grading-001"', 1)),
     "grading"),
    # the task file only: its description
    (lambda g: (g / "classification" / "task.yaml").write_text(
        (g / "classification" / "task.yaml").read_text().replace("description:", "description: (edited)", 1)), "classification"),
    # a scorer setting
    (lambda g: (g / "extraction" / "task.yaml").write_text(
        (g / "extraction" / "task.yaml").read_text().replace("pass_threshold: 0.8", "pass_threshold: 0.7")), "extraction"),
], ids=["cases file", "task file", "scorer setting"])
def test_a_change_validates_that_file_again_and_only_that_one(paths, log, change, task):
    ingest_golden(Project.load(paths), "first", log)
    before = _validated_keys(paths)
    change(paths.golden_dir)
    result = ingest_golden(Project.load(paths), "second", log)
    assert result.validations_reused == _files(paths) - 1
    spec = load_task(paths.golden_dir / task)
    assert result.expectations_run == validate_cases(read_cases(spec), spec.output_kind, "f").expectations_run > 0
    after = _validated_keys(paths)
    assert {t for t in after if after[t] != before[t]} == {task}
    # ...and the next run reuses the new result.
    assert ingest_golden(Project.load(paths), "third", log).expectations_run == 0


def test_a_setting_that_makes_valid_cases_invalid_is_caught_despite_the_earlier_pass(paths, log):
    ingest_golden(Project.load(paths), "first", log)
    before = paths.warehouse_file.read_bytes()
    task_file = paths.golden_dir / "classification" / "task.yaml"
    task_file.write_text(task_file.read_text().replace("      - software\n", ""))   # a label cases use
    with pytest.raises(GoldenSetError) as failure:
        ingest_golden(Project.load(paths), "second", log)
    assert "classification" in str(failure.value) and "field 'expected'" in str(failure.value)
    assert paths.warehouse_file.read_bytes() == before


def test_chunked_validation_finds_what_spans_chunks(paths):
    task = load_task(paths.golden_dir / "grading")
    cases_file = task.cases_file()
    rows = [json.loads(line) for line in cases_file.read_text().splitlines()]
    rows[-1]["id"] = rows[0]["id"]            # a duplicate id in the first and the last chunk
    rows[1]["expected"] = "MAYBE"             # bad verdicts in two different chunks
    rows[-2]["expected"] = "PERHAPS"
    cases_file.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cases = read_cases(task)
    whole = validate_cases(cases, "verdict", str(cases_file), chunk_rows=cases.height)
    chunked = validate_cases(cases, "verdict", str(cases_file), chunk_rows=3)
    assert not chunked.passed and sorted(chunked.problems) == sorted(whole.problems)
    text = "\n".join(chunked.problems)
    assert f"duplicate id(s): {rows[0]['id']}" in text
    assert f"line(s) 2, {len(rows) - 1}" in text and "MAYBE" in text and "PERHAPS" in text
    assert chunked.expectations_run == whole.expectations_run
