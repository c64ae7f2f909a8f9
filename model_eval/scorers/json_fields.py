"""Field-by-field scoring of a JSON object extracted from a reply.

Settings (from task.yaml):

    pass_threshold: 0.8          # correct = value >= pass_threshold (default 1.0)
    fields:
      title:       {weight: 2, match: normalized}
      skills:      {weight: 1, match: set_overlap}
      salary.min:  {weight: 1, match: number, tolerance: 0.05}

Field paths are dotted ("salary.min"); a numeric part indexes a list
("locations.0"). If a parent along the path is null, the path resolves to
null, so an expected `"salary": null` gives `salary.min == null` and a reply
with `"salary": null` (or `{"min": null}`) matches it. A path the reply does
not contain at all is "missing" and scores 0: the task asked for the field.

Match kinds:
    exact        values are equal (1 == 1.0, but true != 1)
    normalized   equal after case-folding and collapsing whitespace
    set_overlap  Jaccard overlap of case-folded, stripped string sets;
                 null counts as an empty set and two empty sets score 1
    number       within relative `tolerance` of expected (default 0: equal);
                 null expected and null reply score 1; numeric strings such
                 as "120,000" are accepted because models often quote numbers

The value is the weight-normalised sum of per-field scores.

Finding the object: models wrap JSON in ```json fences and prose, so fenced
blocks are tried first (json-labelled ones before the rest), then the whole
reply. Within a piece of text the first "{" at which a complete JSON object can
be decoded wins; trailing text after it is ignored. Only strict JSON is
accepted (no trailing commas or single quotes): the pipeline's consumers need
strict JSON, so a model that cannot produce it should not get credit.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from typing import Any

from model_eval.scorers.base import (
    Score,
    Scorer,
    as_settings,
    check_fraction,
    is_number,
    register_scorer,
    zero,
)

MATCH_KINDS = ("exact", "normalized", "set_overlap", "number")
DEFAULT_PASS_THRESHOLD = 1.0

# Cap on how many "{" positions are tried per piece of text. Each attempt can
# read to the end of the text, so without a cap a huge reply full of braces
# would take quadratic time; real replies hold their object near the start.
MAX_DECODE_ATTEMPTS = 200

# ``` + optional language tag + body up to the closing ```. The tag must be
# word characters only, so an inline fence such as ```{"a": 1}``` has no tag.
_FENCE = re.compile(r"```[ \t]*([A-Za-z0-9_+-]*)(.*?)```", re.DOTALL)
_DECODER = json.JSONDecoder()


class _Missing:
    """Sentinel for a path absent from an object (distinct from JSON null)."""

    def __repr__(self) -> str:
        return "<missing>"


MISSING: Any = _Missing()


def _first_object(text: str) -> dict[str, Any] | None:
    """The first JSON object that decodes, scanning "{" positions left to right."""
    start = text.find("{")
    attempts = 0
    while start != -1 and attempts < MAX_DECODE_ATTEMPTS:
        attempts += 1
        try:
            value, _end = _DECODER.raw_decode(text, start)
        except (ValueError, RecursionError):
            value = None
        if isinstance(value, dict):
            return value
        start = text.find("{", start + 1)
    return None


def extract_json_object(text: str) -> tuple[dict[str, Any] | None, str]:
    """Find the JSON object in a reply. Returns (object or None, where it was found)."""
    blocks = [(lang.lower(), body) for lang, body in _FENCE.findall(text)]
    # json-labelled fences first: a reply may show an example in another fence.
    ordered = [body for lang, body in blocks if lang == "json"] + [body for lang, body in blocks if lang != "json"]
    for body in ordered:
        found = _first_object(body)
        if found is not None:
            return found, "fenced block"
    found = _first_object(text)
    if found is not None:
        return found, "reply text"
    return None, ""


def resolve_path(obj: Any, path: str) -> Any:
    """Follow a dotted path. Null parent -> None; absent key -> MISSING."""
    current = obj
    for part in path.split("."):
        if current is None:
            return None  # a null parent makes the whole subtree null
        if isinstance(current, Mapping):
            if part not in current:
                return MISSING
            current = current[part]
        elif isinstance(current, list) and part.isdigit():
            index = int(part)
            if index >= len(current):
                return MISSING
            current = current[index]
        else:
            return MISSING  # e.g. "salary.min" when salary is a string
    return current


def _strict_equal(left: Any, right: Any) -> bool:
    """Equality that keeps JSON types apart (true != 1) but lets 1 == 1.0."""
    if isinstance(left, bool) or isinstance(right, bool):
        return isinstance(left, bool) and isinstance(right, bool) and left == right
    if is_number(left) and is_number(right):
        return left == right
    if isinstance(left, Mapping) and isinstance(right, Mapping):
        return left.keys() == right.keys() and all(_strict_equal(left[k], right[k]) for k in left)
    if isinstance(left, list) and isinstance(right, list):
        return len(left) == len(right) and all(_strict_equal(a, b) for a, b in zip(left, right))
    return type(left) is type(right) and left == right


def _normalise_text(value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        # Non-strings compare by their JSON spelling, so true matches "True".
        value = json.dumps(value, sort_keys=True, ensure_ascii=False)
    return " ".join(value.casefold().split())


def _as_string_set(value: Any) -> set[str] | None:
    """Normalised set for set_overlap; None if the value is not list-like."""
    if value is None:
        return set()
    if isinstance(value, str):
        items: list[Any] = [value]
    elif isinstance(value, list):
        items = value
    else:
        return None
    result = set()
    for item in items:
        text = _normalise_text(item)
        if text:
            result.add(text)
    return result


def _as_number(value: Any) -> float | None:
    if is_number(value):
        return float(value)
    if isinstance(value, str):
        try:
            number = float(value.replace(",", "").strip())
        except ValueError:
            return None
        return number if math.isfinite(number) else None
    return None


def score_field(got: Any, expected: Any, match: str, tolerance: float = 0.0) -> tuple[float, str]:
    """Score one field. Returns (0..1, short note for the reason)."""
    if got is MISSING:
        return 0.0, "missing"
    if match == "exact":
        return (1.0, "") if _strict_equal(got, expected) else (0.0, "differs")
    if match == "normalized":
        return (1.0, "") if _normalise_text(got) == _normalise_text(expected) else (0.0, "differs")
    if match == "set_overlap":
        got_set, expected_set = _as_string_set(got), _as_string_set(expected)
        if got_set is None:
            return 0.0, "not a list"
        if expected_set is None:
            return 0.0, "expected is not a list"
        union = got_set | expected_set
        if not union:
            return 1.0, "both empty"
        shared = len(got_set & expected_set)
        return shared / len(union), f"{shared}/{len(union)} shared"
    if match == "number":
        if expected is None:
            return (1.0, "both null") if got is None else (0.0, "expected null")
        if got is None:
            return 0.0, "null"
        got_number, expected_number = _as_number(got), _as_number(expected)
        if got_number is None:
            return 0.0, "not a number"
        if expected_number is None:
            return 0.0, "expected is not a number"
        # Relative tolerance against the expected value; a tiny absolute slack
        # absorbs float noise such as 0.1 + 0.2.
        allowed = tolerance * abs(expected_number) + 1e-9
        if abs(got_number - expected_number) <= allowed:
            return 1.0, ""
        return 0.0, f"{got_number:g} vs {expected_number:g}"
    return 0.0, f"unknown match {match!r}"


@register_scorer
class JsonFieldsScorer(Scorer):
    name = "json_fields"
    allowed_settings = frozenset({"pass_threshold", "fields"})

    def _score(self, text: str, expected: Any, settings: Mapping[str, Any]) -> Score:
        obj, where = extract_json_object(text)
        if obj is None:
            return zero("no JSON object found in the reply")
        parsed = json.dumps(obj, sort_keys=True, ensure_ascii=False, separators=(",", ":"))

        fields: Mapping[str, Mapping[str, Any]] = settings["fields"]
        total_weight = sum(float(spec.get("weight", 1.0)) for spec in fields.values())
        value = 0.0
        notes = []
        for path, spec in fields.items():
            weight = float(spec.get("weight", 1.0))
            field_value, note = score_field(
                resolve_path(obj, path),
                resolve_path(expected, path),
                spec["match"],
                float(spec.get("tolerance", 0.0)),
            )
            value += weight / total_weight * field_value
            notes.append(f"{path} {field_value:.2f}" + (f" ({note})" if note else ""))

        value = min(1.0, max(0.0, value))  # guard float drift past the bounds
        threshold = float(settings.get("pass_threshold", DEFAULT_PASS_THRESHOLD))
        correct = value >= threshold - 1e-9
        verdict = "pass" if correct else "below"
        reason = f"JSON from {where}; " + ", ".join(notes) + f" -> {value:.2f} ({verdict} threshold {threshold:g})"
        return Score(value, correct, parsed, reason)

    def _validate_settings(self, settings: Mapping[str, Any]) -> str | None:
        problem = check_fraction(settings, "pass_threshold")
        if problem:
            return problem
        fields = settings.get("fields")
        if not isinstance(fields, Mapping) or not fields:
            return "setting 'fields' must be a non-empty mapping of dotted path -> {weight, match, tolerance}"
        for path, spec in fields.items():
            where = f"fields.{path}"
            if not isinstance(path, str) or not path or any(not part for part in path.split(".")):
                return f"setting 'fields' has an invalid path {path!r}"
            if not isinstance(spec, Mapping):
                return f"setting '{where}' must be a mapping with 'match' (and optional 'weight', 'tolerance')"
            unknown = sorted(str(key) for key in spec if key not in {"weight", "match", "tolerance"})
            if unknown:
                return f"setting '{where}' has unknown key(s): {', '.join(unknown)} (allowed: match, tolerance, weight)"
            if spec.get("match") not in MATCH_KINDS:
                return f"setting '{where}.match' must be one of {', '.join(MATCH_KINDS)}, got {spec.get('match')!r}"
            weight = spec.get("weight", 1.0)
            if not is_number(weight) or weight <= 0:
                return f"setting '{where}.weight' must be a positive number, got {weight!r}"
            if "tolerance" in spec:
                tolerance = spec["tolerance"]
                if spec["match"] != "number":
                    return f"setting '{where}.tolerance' only applies to match: number"
                if not is_number(tolerance) or tolerance < 0:
                    return f"setting '{where}.tolerance' must be a non-negative number, got {tolerance!r}"
        return None

    def _validate_expected(self, expected: Any, settings: Mapping[str, Any]) -> str | None:
        if not isinstance(expected, Mapping):
            return f"expected must be a JSON object, got {type(expected).__name__}"
        for path, spec in as_settings(settings)["fields"].items():
            value = resolve_path(expected, path)
            if value is MISSING:
                return f"expected has no value at '{path}' (use null for 'no value')"
            if spec["match"] == "number" and value is not None and not is_number(value):
                return f"expected '{path}' must be a number or null for match: number, got {value!r}"
            if spec["match"] == "set_overlap" and value is not None and not isinstance(value, (list, str)):
                return f"expected '{path}' must be a list (or null) for match: set_overlap, got {value!r}"
        return None
