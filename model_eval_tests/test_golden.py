"""Golden sets: the shipped ones are valid; every kind of malformed file is named precisely and changes nothing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from model_eval import warehouse
from model_eval.errors import GoldenSetError
from model_eval.golden import load_tasks, read_cases
from model_eval.project import Project
from model_eval.steps.golden import ingest_golden


def _snapshot(path: Path) -> dict[str, list]:
    with warehouse.read_connection(path) as conn:
        return {t: sorted(map(repr, conn.sql(f"SELECT * FROM {t}").fetchall())) for t in ("golden_cases", "golden_versions")}


def _rewrite_line(cases_file: Path, line_no: int, change) -> None:
    lines = cases_file.read_text().splitlines()
    lines[line_no - 1] = change(lines[line_no - 1])
    cases_file.write_text("\n".join(lines) + "\n")


def test_shipped_golden_sets_meet_the_brief(paths):
    tasks = {t.name: t for t in load_tasks(paths.golden_dir)}
    assert set(tasks) == {"grading", "extraction", "classification", "employer"}
    for task in tasks.values():
        cases = read_cases(task)
        assert cases.height >= 12, task.name
        assert cases["case_id"].n_unique() == cases.height
        assert cases["expected_error"].null_count() == cases.height, cases["expected_error"].drop_nulls().to_list()
    verdicts = read_cases(tasks["grading"])["expected_verdict"].value_counts()
    counts = dict(zip(verdicts["expected_verdict"], verdicts["count"]))
    assert counts["PASS"] == counts["FAIL"]


def test_ingestion_records_version_and_hash_and_is_idempotent(paths, log):
    first = ingest_golden(Project.load(paths), "run-1", log)
    assert first.new_cases == sum(first.versions["cases"])
    again = ingest_golden(Project.load(paths), "run-2", log)
    assert again.new_cases == 0  # unchanged files add nothing
    with warehouse.read_connection(paths.warehouse_file) as conn:
        rows = conn.sql("SELECT task, dataset_version, count(*), count(DISTINCT content_hash) FROM golden_cases GROUP BY ALL").fetchall()
    assert all(version == "v1" and n == distinct for _, version, n, distinct in rows)


def test_new_version_becomes_current_and_old_one_is_kept(paths, log):
    ingest_golden(Project.load(paths), "run-1", log)
    cases_dir = paths.golden_dir / "classification" / "cases"
    (cases_dir / "v2.jsonl").write_text((cases_dir / "v1.jsonl").read_text())
    ingest_golden(Project.load(paths), "run-2", log)
    with warehouse.read_connection(paths.warehouse_file) as conn:
        current = conn.sql("SELECT dataset_version FROM golden_versions WHERE task = 'classification' AND is_current").fetchall()
        versions = conn.sql("SELECT DISTINCT dataset_version FROM golden_cases WHERE task = 'classification' ORDER BY 1").fetchall()
    assert current == [("v2",)]
    assert versions == [("v1",), ("v2",)]


BREAKAGES = [
    # (task, how to break line 3, expected words in the error)
    ("grading", lambda line: line[:-5], ["grading", "v1.jsonl", "line 3", "not valid JSON"]),
    ("grading", lambda line: json.dumps({k: v for k, v in json.loads(line).items() if k != "expected"}), ["line 3", "field 'expected'"]),
    ("grading", lambda line: json.dumps({**json.loads(line), "expected": "MAYBE"}), ["line(s) 3", "field 'expected'", "PASS"]),
    ("grading", lambda line: json.dumps({**json.loads(line), "inputs": {"posting": "x"}}), ["line 3", "field 'inputs.summary'"]),
    ("classification", lambda line: json.dumps({**json.loads(line), "expected": "astrology"}), ["line(s) 3", "field 'expected'"]),
    ("extraction", lambda line: json.dumps({**json.loads(line), "id": "extraction-001"}), ["line(s)", "field 'id'", "duplicate id(s): extraction-001"]),
    ("classification", lambda line: json.dumps({**json.loads(line), "difficulty": "brutal"}), ["line 3", "field 'difficulty'"]),
]


@pytest.mark.parametrize("task,breakage,words", BREAKAGES)
def test_malformed_cases_file_names_file_line_field_and_leaves_warehouse_untouched(paths, log, task, breakage, words):
    ingest_golden(Project.load(paths), "run-1", log)
    before = _snapshot(paths.warehouse_file)
    _rewrite_line(paths.golden_dir / task / "cases" / "v1.jsonl", 3, breakage)
    with pytest.raises(GoldenSetError) as caught:
        ingest_golden(Project.load(paths), "run-2", log)
    for word in words:
        assert word in str(caught.value), str(caught.value)
    assert _snapshot(paths.warehouse_file) == before


def test_verdict_task_with_one_verdict_only_fails(paths, log):
    cases_file = paths.golden_dir / "grading" / "cases" / "v1.jsonl"
    rows = [json.loads(line) for line in cases_file.read_text().splitlines()]
    cases_file.write_text("".join(json.dumps({**r, "expected": "PASS"}) + "\n" for r in rows))
    with pytest.raises(GoldenSetError, match="both PASS and FAIL"):
        ingest_golden(Project.load(paths), "run-1", log)
    assert not paths.warehouse_file.exists()  # nothing was written, not even an empty file


def test_too_few_cases_fails(paths, log):
    cases_file = paths.golden_dir / "classification" / "cases" / "v1.jsonl"
    cases_file.write_text("".join(cases_file.read_text().splitlines(keepends=True)[:9]))
    with pytest.raises(GoldenSetError, match="has 9 cases; at least 10"):
        ingest_golden(Project.load(paths), "run-1", log)


@pytest.mark.parametrize("field,value,words", [
    ("scorer", {"name": "telepathy"}, ["field 'scorer.name'", "unknown scorer 'telepathy'"]),
    ("repeats", 0, ["field 'repeats'"]),
    ("repeats", True, ["field 'repeats'", "expected int"]),
    ("policy", "vibes", ["field 'policy'", "unknown policy"]),
    ("output_kind", "poem", ["field 'output_kind'"]),
    ("qualification_threshold", 1.5, ["field 'qualification_threshold'"]),
    ("prompt_template", "Posting: {posting", ["field 'prompt_template'", "{{"]),
    ("latency_target_ms", 0, ["field 'latency_target_ms'", "positive number"]),
    ("budget_per_case_usd", "cheap", ["field 'budget_per_case_usd'", "positive number"]),
])
def test_bad_task_settings_name_the_field(paths, log, field, value, words):
    import yaml

    task_file = paths.golden_dir / "grading" / "task.yaml"
    data = yaml.safe_load(task_file.read_text())
    data[field] = value
    task_file.write_text(yaml.safe_dump(data))
    with pytest.raises(GoldenSetError) as caught:
        ingest_golden(Project.load(paths), "run-1", log)
    message = str(caught.value)
    assert "grading/task.yaml" in message
    for word in words:
        assert word in message, message


def test_unknown_task_name_is_rejected(paths):
    with pytest.raises(GoldenSetError, match="unknown task.*summarise"):
        load_tasks(paths.golden_dir, only=["summarise"])


def test_policy_anchors_default_and_can_be_set(paths):
    import yaml

    from model_eval.golden import load_task

    task_file = paths.golden_dir / "grading" / "task.yaml"
    assert (load_task(task_file.parent).latency_target_ms, load_task(task_file.parent).budget_per_case_usd) == (2000.0, 0.001)
    data = yaml.safe_load(task_file.read_text())
    task_file.write_text(yaml.safe_dump({**data, "latency_target_ms": 800, "budget_per_case_usd": 0.0002}))
    task = load_task(task_file.parent)
    assert (task.latency_target_ms, task.budget_per_case_usd) == (800.0, 0.0002)


# ---------------------------------------------------------------- few-shot examples
def _edit_task(paths, task: str, change) -> Path:
    import yaml

    task_file = paths.golden_dir / task / "task.yaml"
    data = yaml.safe_load(task_file.read_text())
    change(data)
    task_file.write_text(yaml.safe_dump(data, sort_keys=False))
    return task_file


def test_examples_are_rendered_as_earlier_turns_before_the_case(paths):
    task = {t.name: t for t in load_tasks(paths.golden_dir)}["classification"]
    assert len(task.examples) == 6
    messages = task.render_messages({"posting": "Barista - Blue Fig Cafe"})
    assert [m["role"] for m in messages] == ["system"] + ["user", "assistant"] * 6 + ["user"]
    for example, (asked, answered) in zip(task.examples, zip(messages[1:-1:2], messages[2:-1:2])):
        assert asked["content"] == task.prompt_template.format_map(example.inputs).strip()
        assert answered["content"] == example.output
    assert messages[-1]["content"].endswith("Barista - Blue Fig Cafe\n\nLabel:")


def test_json_example_answers_are_written_as_json(paths):
    expected = {"skills": ["go"], "industry": "software", "salary": None, "is_authentic": True}
    _edit_task(paths, "extraction", lambda d: d.update(examples=[{"inputs": {"posting": "Go developer at Pinewood"}, "output": expected}]))
    task = {t.name: t for t in load_tasks(paths.golden_dir)}["extraction"]
    assert json.loads(task.render_messages({"posting": "x"})[2]["content"]) == expected


def test_an_example_taken_from_the_cases_is_refused_with_file_field_and_case(paths, log):
    ingest_golden(Project.load(paths), "run-1", log)
    before = _snapshot(paths.warehouse_file)
    case = json.loads((paths.golden_dir / "employer" / "cases" / "v1.jsonl").read_text().splitlines()[4])
    # The same posting with different spacing and case is still the same posting.
    leaked = {"posting": "  " + case["inputs"]["posting"].upper().replace("\n\n", "\n")}
    _edit_task(paths, "employer", lambda d: d["examples"].append({"inputs": leaked, "output": case["expected"]}))
    with pytest.raises(GoldenSetError) as caught:
        ingest_golden(Project.load(paths), "run-2", log)
    message = str(caught.value)
    for words in ("employer/task.yaml", "field 'examples[6].inputs'", f"case '{case['id']}'", "v1.jsonl line 5",
                  "must not be drawn from the cases being scored"):
        assert words in message, message
    assert _snapshot(paths.warehouse_file) == before


def test_an_example_sharing_a_cases_posting_under_another_summary_is_refused(paths, log):
    case = json.loads((paths.golden_dir / "grading" / "cases" / "v1.jsonl").read_text().splitlines()[0])
    example = {"inputs": {"posting": case["inputs"]["posting"], "summary": "A different summary."}, "output": "FAIL"}
    _edit_task(paths, "grading", lambda d: d.update(examples=[example]))
    with pytest.raises(GoldenSetError, match=r"field 'examples\[0\].inputs.posting'.*same 'posting'|same 'posting'.*examples\[0\]"):
        ingest_golden(Project.load(paths), "run-1", log)
    assert not paths.warehouse_file.exists()


@pytest.mark.parametrize("examples,field,words", [
    ("not a list", "examples", "must be a list"),
    ([{"inputs": {"posting": "x"}}], "examples[0].output", "required"),
    ([{"inputs": {"text": "x"}, "output": "finance"}], "examples[0].inputs.posting", "needs 'posting'"),
    ([{"inputs": {"posting": "x"}, "output": "astrology"}], "examples[0].output", "one of the labels"),
    ([{"inputs": {"posting": "x"}, "output": "finance", "label": "y"}], "examples[0].label", "unknown field"),
])
def test_malformed_examples_name_the_field(paths, examples, field, words):
    _edit_task(paths, "classification", lambda d: d.update(examples=examples))
    with pytest.raises(GoldenSetError) as caught:
        load_tasks(paths.golden_dir)
    message = str(caught.value)
    assert "classification/task.yaml" in message and f"field '{field}'" in message and words in message, message


def test_threshold_reason_is_read_and_must_be_text(paths):
    task = {t.name: t for t in load_tasks(paths.golden_dir)}["employer"]
    assert task.qualification_threshold == 0.8 and "four times in five" in task.threshold_reason
    _edit_task(paths, "employer", lambda d: d.update(threshold_reason=["a", "list"]))
    with pytest.raises(GoldenSetError, match="field 'threshold_reason'"):
        load_tasks(paths.golden_dir)
