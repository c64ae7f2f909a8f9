"""Golden sets: load task files and versioned case files, check their structure line by line.

A task is data only (see golden/README.md). Structural problems are reported here with the file,
line and field; dataset-level rules (unique ids, both verdicts present, enough cases...) are checked
with Great Expectations in `golden_validation.py`.
"""

from __future__ import annotations

import hashlib
import json
import re
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import polars as pl
import yaml

from model_eval import yaml_text
from model_eval.errors import GoldenSetError
from model_eval.scorers import get_scorer, registered_scorers

OUTPUT_KINDS = ("verdict", "json", "label", "text")
CASE_FIELDS_REQUIRED = ("id", "inputs")          # and `expected`, unless the scorer does without (judge)
CASE_FIELDS_OPTIONAL = ("expected", "difficulty", "kind", "tags", "notes")
CALIBRATION_FIELDS_REQUIRED = ("id", "inputs", "answer", "human_verdict")
CALIBRATION_FIELDS_OPTIONAL = ("notes",)
DIFFICULTIES = ("easy", "medium", "hard")
EXAMPLE_FIELDS = ("inputs", "output", "notes")
# An example's text field this long or longer may not also appear in a case: a shared posting is a
# leaked case even with another summary beside it. Shorter values (a language, a label) may recur.
SHARED_TEXT_MIN_CHARS = 40


DEFAULT_CONSENSUS_SIMILARITY = 0.6


@dataclass(frozen=True)
class ConsensusSpec:
    """How the answers of several models to one case are compared (model_eval/consensus.py)."""

    tie_breaker: str                       # registry name whose answer wins a tie
    similarity_threshold: float = DEFAULT_CONSENSUS_SIMILARITY   # text answers: token F1 at or above this agree
    fields: tuple[str, ...] = ()           # json answers: compare only these dotted fields (all when empty)


@dataclass(frozen=True)
class FewShotExample:
    """A solved example shown to the model before each case, as an earlier user/assistant exchange."""

    inputs: dict[str, Any]
    output: str               # the answer as the model should write it (JSON text for json tasks)


@dataclass(frozen=True)
class TaskSpec:
    name: str
    description: str
    tier: int
    output_kind: str
    system_prompt: str
    prompt_template: str
    scorer: str
    scorer_settings: dict[str, Any]
    repeats: int
    qualification_threshold: float
    policy: str
    call_params: dict[str, Any]
    dataset_version: str
    versions: tuple[str, ...]
    folder: Path
    placeholders: tuple[str, ...] = field(default=())
    # Fixed anchors for composite policies (see golden/README.md): never relative to other candidates.
    latency_target_ms: float = 2000.0
    budget_per_case_usd: float = 0.001
    examples: tuple[FewShotExample, ...] = field(default=())
    threshold_reason: str = ""
    consensus: ConsensusSpec | None = None

    @property
    def is_judged(self) -> bool:
        """Scored by a judge model (the judging step) rather than by a pure scorer."""
        return get_scorer(self.scorer).needs_model_calls

    def calibration_file(self) -> Path:
        return self.folder / self.scorer_settings["calibration"]

    @property
    def task_file(self) -> Path:
        return self.folder / "task.yaml"

    def cases_file(self, version: str | None = None) -> Path:
        return self.folder / "cases" / f"{version or self.dataset_version}.jsonl"

    def render_messages(self, inputs: dict[str, Any]) -> list[dict[str, str]]:
        """System prompt, then each few-shot example as a user turn and its answer, then the case."""
        messages = []
        if self.system_prompt.strip():
            messages.append({"role": "system", "content": self.system_prompt.strip()})
        for example in self.examples:
            messages.append({"role": "user", "content": self.prompt_template.format_map(example.inputs).strip()})
            messages.append({"role": "assistant", "content": example.output})
        messages.append({"role": "user", "content": self.prompt_template.format_map(inputs).strip()})
        return messages


def _version_sort_key(version: str) -> tuple:
    # "v10" sorts after "v9": compare the numeric runs as numbers.
    return tuple(int(part) if part.isdigit() else part for part in re.split(r"(\d+)", version))


def _require(data: dict, key: str, kind: type | tuple[type, ...], path: Path) -> Any:
    if key not in data:
        raise GoldenSetError(path, "required field is missing", field=key)
    value = data[key]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    # bool is a subclass of int in Python: "repeats: true" must not pass as 1.
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        expected = " or ".join(k.__name__ for k in kinds)
        raise GoldenSetError(path, f"expected {expected}, got {type(value).__name__} {value!r}", field=key)
    return value


def load_task(folder: Path) -> TaskSpec:
    """Read and check `<folder>/task.yaml`; raises GoldenSetError naming the field."""
    from model_eval.policies import registered_policies  # local: policies import scorers' stats only

    path = folder / "task.yaml"
    if not path.is_file():
        raise GoldenSetError(path, "task file not found (every task folder needs a task.yaml)")
    try:
        data = yaml_text.parse(path.read_text())
    except yaml.YAMLError as exc:
        line = getattr(getattr(exc, "problem_mark", None), "line", None)
        raise GoldenSetError(path, f"not valid YAML: {getattr(exc, 'problem', exc)}", line=None if line is None else line + 1) from None
    if not isinstance(data, dict):
        raise GoldenSetError(path, "must be a mapping of fields")

    name = _require(data, "name", str, path)
    if name != folder.name:
        raise GoldenSetError(path, f"name '{name}' must equal the folder name '{folder.name}'", field="name")
    tier = _require(data, "tier", int, path)
    if tier not in (1, 2, 3):
        raise GoldenSetError(path, f"tier must be 1, 2 or 3, got {tier}", field="tier")
    output_kind = _require(data, "output_kind", str, path)
    if output_kind not in OUTPUT_KINDS:
        raise GoldenSetError(path, f"must be one of {', '.join(OUTPUT_KINDS)}, got '{output_kind}'", field="output_kind")
    template = _require(data, "prompt_template", str, path)
    try:
        placeholders = tuple(sorted({f for _, f, _, _ in string.Formatter().parse(template) if f}))
    except ValueError as exc:
        raise GoldenSetError(path, f"template does not parse ({exc}); write literal braces as {{{{ and }}}}", field="prompt_template") from None

    scorer_block = _require(data, "scorer", dict, path)
    scorer_name = _require(scorer_block, "name", str, path)
    if scorer_name not in registered_scorers():
        raise GoldenSetError(path, f"unknown scorer '{scorer_name}'; registered: {', '.join(registered_scorers())}", field="scorer.name")
    scorer_settings = scorer_block.get("settings") or {}
    if not isinstance(scorer_settings, dict):
        raise GoldenSetError(path, "must be a mapping", field="scorer.settings")
    problem = get_scorer(scorer_name).validate_settings(scorer_settings)
    if problem:
        raise GoldenSetError(path, problem, field="scorer.settings")

    repeats = _require(data, "repeats", int, path)
    if not 1 <= repeats <= 100:
        raise GoldenSetError(path, f"must be between 1 and 100, got {repeats}", field="repeats")
    threshold = _require(data, "qualification_threshold", (int, float), path)
    if not 0 <= threshold <= 1:
        raise GoldenSetError(path, f"must be between 0 and 1, got {threshold}", field="qualification_threshold")
    policy = _require(data, "policy", str, path)
    if policy not in registered_policies():
        raise GoldenSetError(path, f"unknown policy '{policy}'; registered: {', '.join(registered_policies())}", field="policy")
    call_params = data.get("call_params") or {}
    if not isinstance(call_params, dict):
        raise GoldenSetError(path, "must be a mapping", field="call_params")
    threshold_reason = data.get("threshold_reason", "")
    if not isinstance(threshold_reason, str):
        raise GoldenSetError(path, "must be text: why this threshold is what the task's users need", field="threshold_reason")
    examples = _load_examples(data.get("examples"), path, placeholders, output_kind, scorer_name, scorer_settings)

    anchors = {}
    for key in ("latency_target_ms", "budget_per_case_usd"):
        if key in data:
            value = data[key]
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise GoldenSetError(path, f"must be a positive number, got {value!r}", field=key)
            anchors[key] = float(value)

    consensus = _consensus(data.get("consensus"), path)

    cases_dir = folder / "cases"
    versions = tuple(sorted((p.stem for p in cases_dir.glob("*.jsonl")), key=_version_sort_key))
    if not versions:
        raise GoldenSetError(cases_dir, "no cases files (<version>.jsonl) found")
    version = data.get("dataset_version") or versions[-1]
    if version not in versions:
        raise GoldenSetError(path, f"version '{version}' has no file; found {', '.join(versions)}", field="dataset_version")

    return TaskSpec(
        name=name,
        description=str(data.get("description", "")),
        tier=tier,
        output_kind=output_kind,
        system_prompt=str(data.get("system_prompt", "")),
        prompt_template=template,
        scorer=scorer_name,
        scorer_settings=scorer_settings,
        repeats=repeats,
        qualification_threshold=float(threshold),
        policy=policy,
        call_params=call_params,
        dataset_version=str(version),
        versions=versions,
        folder=folder,
        placeholders=placeholders,
        **anchors,
        examples=examples,
        threshold_reason=threshold_reason.strip(),
        consensus=consensus,
    )


def _consensus(raw: Any, path: Path) -> ConsensusSpec | None:
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise GoldenSetError(path, "must be a mapping: {tie_breaker: <model>, similarity_threshold: 0..1, fields: [...]}", field="consensus")
    unknown = sorted(set(raw) - {"tie_breaker", "similarity_threshold", "fields"})
    if unknown:
        raise GoldenSetError(path, "unknown setting; allowed: tie_breaker, similarity_threshold, fields", field=f"consensus.{unknown[0]}")
    tie_breaker = raw.get("tie_breaker")
    if not isinstance(tie_breaker, str) or not tie_breaker.strip():
        raise GoldenSetError(path, "required: the registry name of the model whose answer breaks a tie", field="consensus.tie_breaker")
    threshold = raw.get("similarity_threshold", DEFAULT_CONSENSUS_SIMILARITY)
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 < threshold <= 1:
        raise GoldenSetError(path, f"must be a number in (0, 1], got {threshold!r}", field="consensus.similarity_threshold")
    fields = raw.get("fields") or []
    if not isinstance(fields, list) or not all(isinstance(f, str) and f for f in fields):
        raise GoldenSetError(path, "must be a list of dotted field names", field="consensus.fields")
    return ConsensusSpec(tie_breaker=tie_breaker, similarity_threshold=float(threshold), fields=tuple(fields))


def _load_examples(raw: Any, path: Path, placeholders: tuple[str, ...], output_kind: str, scorer_name: str,
                   scorer_settings: dict[str, Any]) -> tuple[FewShotExample, ...]:
    """Check the task's few-shot examples: each fills the template and has an answer its scorer would accept."""
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise GoldenSetError(path, "must be a list of {inputs, output}", field="examples")
    examples = []
    for index, item in enumerate(raw):
        where = f"examples[{index}]"
        if not isinstance(item, dict):
            raise GoldenSetError(path, "must be a mapping with inputs and output", field=where)
        unknown = sorted(set(item) - set(EXAMPLE_FIELDS))
        if unknown:
            raise GoldenSetError(path, f"unknown field; allowed: {', '.join(EXAMPLE_FIELDS)}", field=f"{where}.{unknown[0]}")
        inputs = item.get("inputs")
        if not isinstance(inputs, dict):
            raise GoldenSetError(path, "required, a mapping of template variables", field=f"{where}.inputs")
        for name in placeholders:
            if name not in inputs:
                raise GoldenSetError(path, f"the prompt template needs '{name}'", field=f"{where}.inputs.{name}")
        if "output" not in item:
            raise GoldenSetError(path, "required: the answer the model should give", field=f"{where}.output")
        output = item["output"]
        problem = get_scorer(scorer_name).validate_expected(output, scorer_settings)
        if problem:
            raise GoldenSetError(path, problem, field=f"{where}.output")
        text = json.dumps(output, ensure_ascii=False) if output_kind == "json" else str(output)
        examples.append(FewShotExample(inputs=inputs, output=text))
    return tuple(examples)


def _comparable(value: Any) -> str:
    return " ".join(str(value).casefold().split())


def check_examples_are_not_cases(task: TaskSpec, cases: list[tuple[int, dict[str, Any]]], cases_path: Path) -> None:
    """Few-shot examples must never be cases being scored: the model would be shown the answer.

    An example leaks a case when it has the same inputs, or shares any text field of at least
    SHARED_TEXT_MIN_CHARS characters with it (compared case- and whitespace-insensitively).
    """
    for index, example in enumerate(task.examples):
        example_texts = {name: _comparable(value) for name, value in example.inputs.items()}
        for line_no, case in cases:
            inputs = case.get("inputs")
            if not isinstance(inputs, dict):
                continue
            same_all = {k: _comparable(v) for k, v in inputs.items()} == example_texts
            shared = [name for name, text in example_texts.items()
                      if len(text) >= SHARED_TEXT_MIN_CHARS and any(_comparable(v) == text for v in inputs.values())]
            if same_all or shared:
                what = "the same inputs" if same_all else f"the same '{shared[0]}'"
                raise GoldenSetError(
                    task.task_file,
                    f"has {what} as case '{case.get('id')}' ({cases_path.name} line {line_no}): few-shot examples "
                    "must not be drawn from the cases being scored",
                    field=f"examples[{index}].inputs" + ("" if same_all else f".{shared[0]}"))


def load_tasks(golden_dir: Path, only: list[str] | None = None) -> list[TaskSpec]:
    """Every task folder under `golden_dir` (sorted by name); `only` narrows and rejects unknown names."""
    if not golden_dir.is_dir():
        raise GoldenSetError(golden_dir, "golden-set folder not found")
    folders = sorted(p for p in golden_dir.iterdir() if p.is_dir() and not p.name.startswith((".", "_")))
    names = [p.name for p in folders]
    if only:
        unknown = sorted(set(only) - set(names))
        if unknown:
            raise GoldenSetError(golden_dir, f"unknown task(s) {', '.join(unknown)}; available: {', '.join(names)}")
        folders = [p for p in folders if p.name in only]
    return [load_task(p) for p in folders]


def case_content_hash(case: dict[str, Any]) -> str:
    canonical = json.dumps(case, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def _case_lines(task: TaskSpec, path: Path, required: tuple[str, ...], allowed: tuple[str, ...]):
    """(line number, object) for each non-blank line, after the checks every case file shares."""
    with path.open(encoding="utf-8") as handle:
        for line_no, raw in enumerate(handle, start=1):
            if not raw.strip():
                continue
            try:
                case = json.loads(raw)
            except json.JSONDecodeError as exc:
                raise GoldenSetError(path, f"not valid JSON ({exc.msg} at column {exc.colno})", line=line_no) from None
            if not isinstance(case, dict):
                raise GoldenSetError(path, "each line must be a JSON object", line=line_no)
            for key in required:
                if key not in case:
                    raise GoldenSetError(path, "required field is missing", line=line_no, field=key)
            unknown = sorted(set(case) - set(allowed))
            if unknown:
                raise GoldenSetError(path, f"unknown field(s); allowed: {', '.join(allowed)}", line=line_no, field=unknown[0])
            if not isinstance(case["id"], str) or not case["id"].strip():
                raise GoldenSetError(path, "must be a non-empty string", line=line_no, field="id")
            if not isinstance(case["inputs"], dict):
                raise GoldenSetError(path, "must be an object of template variables", line=line_no, field="inputs")
            for name in task.placeholders:
                if name not in case["inputs"]:
                    raise GoldenSetError(path, f"the prompt template needs '{name}'", line=line_no, field=f"inputs.{name}")
            yield line_no, case


def read_cases(task: TaskSpec, version: str | None = None) -> pl.DataFrame:
    """Parse one cases file; each problem names the file, the line and the field.

    Returns one row per case with the case serialised as JSON columns, ready for the warehouse.
    Dataset-level rules (uniqueness, balance, size) are left to Great Expectations.
    """
    version = version or task.dataset_version
    path = task.cases_file(version)
    scorer = get_scorer(task.scorer)
    rows = []
    parsed: list[tuple[int, dict[str, Any]]] = []
    required = CASE_FIELDS_REQUIRED + (("expected",) if scorer.needs_expected else ())
    for line_no, case in _case_lines(task, path, required, CASE_FIELDS_REQUIRED + CASE_FIELDS_OPTIONAL):
        difficulty = case.get("difficulty")
        if difficulty is not None and difficulty not in DIFFICULTIES:
            raise GoldenSetError(path, f"must be one of {', '.join(DIFFICULTIES)}", line=line_no, field="difficulty")
        tags = case.get("tags") or []
        if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
            raise GoldenSetError(path, "must be a list of strings", line=line_no, field="tags")
        parsed.append((line_no, case))
        rows.append(
            {
                "task": task.name,
                "dataset_version": version,
                "case_id": case["id"],
                "line": line_no,
                "inputs_json": json.dumps(case["inputs"], ensure_ascii=False, sort_keys=True),
                # NULL for a judge task's case without a reference answer.
                "expected_json": json.dumps(case["expected"], ensure_ascii=False, sort_keys=True) if "expected" in case else None,
                # Checked per case, judged by GX: keeps "expected value valid for the output kind"
                # in the same validation report as the other dataset rules.
                "expected_error": scorer.validate_expected(case.get("expected"), task.scorer_settings),
                "expected_verdict": case.get("expected") if task.output_kind == "verdict" and isinstance(case.get("expected"), str) else None,
                "difficulty": difficulty,
                "kind": case.get("kind"),
                "tags": tags,
                "notes": case.get("notes"),
                "content_hash": case_content_hash(case),
                "source_file": str(path),
            }
        )
    check_examples_are_not_cases(task, parsed, path)
    schema = {
        "task": pl.String, "dataset_version": pl.String, "case_id": pl.String, "line": pl.Int64,
        "inputs_json": pl.String, "expected_json": pl.String, "expected_error": pl.String,
        "expected_verdict": pl.String, "difficulty": pl.String, "kind": pl.String,
        "tags": pl.List(pl.String), "notes": pl.String, "content_hash": pl.String, "source_file": pl.String,
    }
    return pl.DataFrame(rows, schema=schema)


def read_calibration_cases(task: TaskSpec) -> pl.DataFrame:
    """Parse a judge task's calibration file: answers with a human PASS/FAIL verdict, one JSON object a line.

    The frame has read_cases' columns (so the same Great Expectations rules check it, with the human
    verdict as the expected verdict) plus `answer` and `human_verdict`.
    """
    path = task.calibration_file()
    if not path.is_file():
        raise GoldenSetError(task.folder / "task.yaml", f"calibration file {path.name} not found in {task.folder}",
                             field="scorer.settings.calibration")
    rows = []
    for line_no, case in _case_lines(task, path, CALIBRATION_FIELDS_REQUIRED, CALIBRATION_FIELDS_REQUIRED + CALIBRATION_FIELDS_OPTIONAL):
        if not isinstance(case["answer"], str) or not case["answer"].strip():
            raise GoldenSetError(path, "must be the answer being judged, a non-empty string", line=line_no, field="answer")
        verdict = case["human_verdict"] if isinstance(case["human_verdict"], str) else repr(case["human_verdict"])
        rows.append({
            "task": task.name, "case_id": case["id"], "line": line_no,
            "inputs_json": json.dumps(case["inputs"], ensure_ascii=False, sort_keys=True),
            "expected_json": json.dumps(case["answer"], ensure_ascii=False),
            "expected_error": None,
            # Checked by GX like a verdict task's expected value: PASS or FAIL, and both present.
            "expected_verdict": verdict,
            "answer": case["answer"], "human_verdict": verdict, "source_file": str(path),
        })
    schema = {"task": pl.String, "case_id": pl.String, "line": pl.Int64, "inputs_json": pl.String, "expected_json": pl.String,
              "expected_error": pl.String, "expected_verdict": pl.String, "answer": pl.String, "human_verdict": pl.String,
              "source_file": pl.String}
    return pl.DataFrame(rows, schema=schema)
