"""Scorer behaviour on the replies small models actually produce."""

from __future__ import annotations

import json

import pytest

from model_eval.scorers import Score, get_scorer, register_scorer, registered_scorers
from model_eval.scorers import base
from model_eval.scorers.base import Scorer

JOB_SETTINGS = {
    "pass_threshold": 0.8,
    "fields": {
        "title": {"weight": 2, "match": "normalized"},
        "skills": {"weight": 1, "match": "set_overlap"},
        "salary.min": {"weight": 1, "match": "number", "tolerance": 0.05},
    },
}
JOB_EXPECTED = {"title": "Data Engineer", "skills": ["Python", "SQL", "Airflow"], "salary": {"min": 100000}}
LABELS = {"labels": ["Finance", "Retail", "Software", "Software Services", "E-commerce"]}

# Garbage that has broken naive parsers: control characters, lone braces and
# fences, unterminated strings, deep nesting.
GARBAGE = [
    "\x00\x01\x02",
    "{{{{{{",
    "}}}{",
    "```",
    "```json\n{\"a\": ",
    '{"a": "unterminated',
    "[" * 5000,
    "{" * 5000 + "}" * 5000,
    "<think>PASS or FAIL?",
    "🙂🙃" * 50,
]


def score(name, response, expected, settings=None) -> Score:
    return get_scorer(name).score(response, expected, settings or {})


# --------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------


def test_builtin_scorers_are_registered():
    assert {"verdict", "json_fields", "label", "text_similarity"} <= set(registered_scorers())


def test_unknown_scorer_error_lists_registered_names():
    with pytest.raises(KeyError) as info:
        get_scorer("no_such_scorer")
    message = str(info.value)
    assert "no_such_scorer" in message and "verdict" in message and "json_fields" in message


def test_duplicate_scorer_name_is_rejected(monkeypatch):
    monkeypatch.setattr(base, "_REGISTRY", dict(base._REGISTRY))

    with pytest.raises(ValueError, match="already registered"):

        @register_scorer
        class AnotherVerdict(Scorer):
            name = "verdict"

            def _score(self, text, expected, settings):
                return Score(1.0, True, None, "")

            def validate_expected(self, expected, settings):
                return None


def test_new_scorer_registers_and_is_protected_from_raising(monkeypatch):
    monkeypatch.setattr(base, "_REGISTRY", dict(base._REGISTRY))

    @register_scorer
    class Exploding(Scorer):
        name = "exploding_for_test"

        def _score(self, text, expected, settings):
            raise RuntimeError("boom")

        def _validate_expected(self, expected, settings):
            return None

    assert "exploding_for_test" in registered_scorers()
    result = get_scorer("exploding_for_test").score("anything", "x", {})
    assert (result.value, result.correct, result.parsed) == (0.0, False, None)
    assert "RuntimeError" in result.reason and "boom" in result.reason


def test_score_value_outside_range_is_a_bug():
    with pytest.raises(ValueError):
        Score(1.5, True, None, "")


# --------------------------------------------------------------------------
# Every scorer, on every kind of unusable reply: never raise, score 0
# --------------------------------------------------------------------------

SCORER_CASES = [
    ("verdict", "PASS", {}),
    ("json_fields", JOB_EXPECTED, JOB_SETTINGS),
    ("label", "Finance", LABELS),
    ("text_similarity", "the capital of france is paris", {"threshold": 0.8}),
]


@pytest.mark.parametrize(("name", "expected", "settings"), SCORER_CASES)
@pytest.mark.parametrize("reply", [None, "", "   \n\t "] + GARBAGE, ids=lambda r: repr(r)[:20])
def test_unusable_replies_score_zero_without_raising(name, expected, settings, reply):
    result = score(name, reply, expected, settings)
    assert isinstance(result, Score)
    assert result.value == 0.0 and result.correct is False
    assert result.reason


@pytest.mark.parametrize(("name", "expected", "settings"), SCORER_CASES)
def test_none_and_empty_replies_say_why(name, expected, settings):
    assert "no response" in score(name, None, expected, settings).reason
    assert "empty" in score(name, "", expected, settings).reason


@pytest.mark.parametrize(("name", "expected", "settings"), SCORER_CASES)
def test_non_string_reply_does_not_raise(name, expected, settings):
    for reply in (b"\xff\xfe PASS", 42, ["PASS"], {"title": 1}):
        assert isinstance(score(name, reply, expected, settings), Score)


@pytest.mark.parametrize(("name", "expected", "settings"), SCORER_CASES)
def test_huge_garbage_reply_is_scored_zero_without_raising(name, expected, settings):
    # How fast scoring is belongs to benchmarks/ (scoring 100,000 rows); here only that it copes.
    huge = ('{"a": "x' + "{" * 10) * 20_000 + " blah " * 100_000  # ~1 MB of braces and noise
    result = score(name, huge, expected, settings)
    assert result.correct is False and result.value == 0.0


@pytest.mark.parametrize(("name", "expected", "settings"), SCORER_CASES)
def test_invalid_settings_do_not_raise_while_scoring(name, expected, settings):
    result = score(name, "PASS", expected, {"bogus": 1})
    assert result.correct is False
    assert "bogus" in result.reason


# --------------------------------------------------------------------------
# verdict
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("reply", "parsed"),
    [
        ("PASS", "PASS"),
        ("fail", "FAIL"),
        ("PASS.", "PASS"),
        ("**PASS**", "PASS"),
        ("Verdict: pass", "PASS"),
        ("Verdict: **FAIL**\nThe function never returns.", "FAIL"),
        ("After checking the edge cases, my answer is FAIL.", "FAIL"),
        # The leading word wins even if the other appears in the explanation.
        ("PASS - nothing here would make it FAIL", "PASS"),
        ("FAIL: it does not pass the empty-input case", "FAIL"),
        # A negated mention is skipped, the plain one counts.
        ("This does not pass. FAIL", "FAIL"),
        # Punctuation ends the clause: "No" here is not negating PASS.
        ("No issues found. PASS", "PASS"),
        ("<think>Should this be PASS or FAIL? The test fails.</think>\nFAIL", "FAIL"),
    ],
)
def test_verdict_parsing(reply, parsed):
    result = score("verdict", reply, parsed)
    assert result.parsed == parsed
    assert result.correct and result.value == 1.0


def test_verdict_wrong_answer_reason():
    result = score("verdict", "Verdict: pass", "FAIL")
    assert (result.value, result.correct, result.parsed) == (0.0, False, "PASS")
    assert "PASS" in result.reason and "expected FAIL" in result.reason


@pytest.mark.parametrize(
    ("reply", "why"),
    [
        ("It could PASS or FAIL depending on input.", "both"),
        ("Looks fine to me.", "neither"),
        # Whole words only: these are not verdicts.
        ("The tests passed and nothing is failing.", "neither"),
        ("The password is stored in plain text.", "neither"),
        ("It does not pass.", "negated"),
        ("I would not FAIL this.", "negated"),
        ("This is not a pass", "negated"),
        ("**NOT** PASS", "negated"),
        ("It doesn\u2019t pass", "negated"),
    ],
)
def test_verdict_ambiguous(reply, why):
    result = score("verdict", reply, "PASS")
    assert (result.value, result.correct, result.parsed) == (0.0, False, None)
    assert "ambiguous" in result.reason
    assert why in result.reason


def test_verdict_validates_expected():
    scorer = get_scorer("verdict")
    assert scorer.validate_expected("PASS", {}) is None
    assert scorer.validate_expected("FAIL", {}) is None
    for bad in ("pass", "maybe", None, 1, {"x": 1}):
        assert "PASS" in scorer.validate_expected(bad, {})
    # A bad golden value is reported at scoring time too, never a crash.
    assert "cannot score" in scorer.score("PASS", "yes", {}).reason


def test_verdict_rejects_settings():
    assert get_scorer("verdict").validate_settings({}) is None
    assert get_scorer("verdict").validate_settings(None) is None
    assert "threshold" in get_scorer("verdict").validate_settings({"threshold": 1})


# --------------------------------------------------------------------------
# json_fields
# --------------------------------------------------------------------------

GOOD_JOB = {"title": "data engineer ", "skills": ["sql", "python", " AIRFLOW"], "salary": {"min": 101000}}


def test_json_all_fields_right_with_normalisation_and_tolerance():
    result = score("json_fields", json.dumps(GOOD_JOB), JOB_EXPECTED, JOB_SETTINGS)
    assert result.value == pytest.approx(1.0)
    assert result.correct
    # parsed is canonical JSON of what the model said, keys sorted
    assert result.parsed == json.dumps(GOOD_JOB, sort_keys=True, separators=(",", ":"))


def test_json_in_fence_with_prose():
    reply = "Sure! Here is the extraction:\n```json\n" + json.dumps(GOOD_JOB, indent=2) + "\n```\nLet me know."
    result = score("json_fields", reply, JOB_EXPECTED, JOB_SETTINGS)
    assert result.correct and "fenced" in result.reason


def test_json_fence_without_language_and_inline_fence():
    for reply in ("```\n" + json.dumps(GOOD_JOB) + "\n```", "```" + json.dumps(GOOD_JOB) + "```"):
        assert score("json_fields", reply, JOB_EXPECTED, JOB_SETTINGS).correct


def test_json_wrapped_in_prose_with_braces_before_it():
    reply = "The {job} posting parses to " + json.dumps(GOOD_JOB) + " -- hope that helps {:}"
    result = score("json_fields", reply, JOB_EXPECTED, JOB_SETTINGS)
    assert result.correct


def test_json_braces_inside_strings_do_not_confuse_extraction():
    reply = json.dumps({**GOOD_JOB, "note": "uses {curly} braces }"})
    assert score("json_fields", reply, JOB_EXPECTED, JOB_SETTINGS).correct


def test_json_prefers_json_fence_over_other_fences():
    other = "```python\nprint({'x': 1})\n```\n"
    reply = other + "```json\n" + json.dumps(GOOD_JOB) + "\n```"
    assert score("json_fields", reply, JOB_EXPECTED, JOB_SETTINGS).correct


def test_json_partial_fields_give_weighted_partial_credit():
    # title right (weight 2), skills 2 of 4 distinct (0.5, weight 1), salary missing (0, weight 1)
    reply = json.dumps({"title": "Data Engineer", "skills": ["python", "sql", "spark"]})
    result = score("json_fields", reply, JOB_EXPECTED, JOB_SETTINGS)
    assert result.value == pytest.approx((2 * 1.0 + 1 * 0.5 + 1 * 0.0) / 4)
    assert not result.correct  # 0.625 < 0.8
    assert "salary.min 0.00 (missing)" in result.reason
    assert "skills 0.50" in result.reason


def test_json_set_overlap_is_jaccard_of_normalised_strings():
    settings = {"fields": {"skills": {"match": "set_overlap"}}}
    expected = {"skills": ["Python", "SQL"]}
    cases = [
        (["python ", "sql"], 1.0),
        (["PYTHON"], 0.5),
        (["python", "sql", "go", "rust"], 0.5),
        ([], 0.0),
        ("python", 0.5),  # a lone string counts as a one-item set
        (42, 0.0),
    ]
    for got, value in cases:
        assert score("json_fields", json.dumps({"skills": got}), expected, settings).value == pytest.approx(value)
    # both empty (and null meaning empty) agree completely
    empty_expected = {"skills": []}
    assert score("json_fields", '{"skills": []}', empty_expected, settings).value == 1.0
    assert score("json_fields", '{"skills": null}', empty_expected, settings).value == 1.0


def test_json_null_salary_resolves_through_dotted_path():
    settings = {"fields": {"salary.min": {"match": "number"}, "salary.max": {"match": "number"}}}
    expected = {"salary": None}
    assert get_scorer("json_fields").validate_expected(expected, settings) is None
    assert score("json_fields", '{"salary": null}', expected, settings).value == 1.0
    assert score("json_fields", '{"salary": {"min": null, "max": null}}', expected, settings).value == 1.0
    # a number where null was expected is wrong; so is leaving the field out
    assert score("json_fields", '{"salary": {"min": 5, "max": null}}', expected, settings).value == 0.5
    assert score("json_fields", '{"title": "x"}', expected, settings).value == 0.0


def test_json_number_tolerance_and_numeric_strings():
    settings = {"fields": {"n": {"match": "number", "tolerance": 0.1}}}
    expected = {"n": 100}
    for got, value in [(110, 1.0), (90, 1.0), (111, 0.0), ("105", 1.0), ("1,00", 1.0), ("about 100", 0.0), (None, 0.0), (True, 0.0)]:
        assert score("json_fields", json.dumps({"n": got}), expected, settings).value == value, got
    exact = {"fields": {"n": {"match": "number"}}}
    assert score("json_fields", '{"n": 100.0}', expected, exact).value == 1.0
    assert score("json_fields", '{"n": 100.5}', expected, exact).value == 0.0


def test_json_exact_and_normalized_matching():
    settings = {"fields": {"a": {"match": "exact"}, "b": {"match": "normalized"}}}
    expected = {"a": 1, "b": "Remote  Only"}
    assert score("json_fields", '{"a": 1.0, "b": "remote only"}', expected, settings).value == 1.0
    assert score("json_fields", '{"a": true, "b": " REMOTE\\tONLY "}', expected, settings).value == 0.5
    assert score("json_fields", '{"a": "1", "b": "remote"}', expected, settings).value == 0.0


def test_json_parsed_is_canonical_across_key_order_and_spacing():
    first = score("json_fields", '{"title": "x", "skills": []}', JOB_EXPECTED, JOB_SETTINGS)
    second = score("json_fields", 'Result:\n{ "skills" : [ ],\n "title":"x" }', JOB_EXPECTED, JOB_SETTINGS)
    assert first.parsed == second.parsed is not None


def test_json_unparseable_reply():
    for reply in ("title: Data Engineer", "{title: 'Data Engineer'}", '{"title": "x",}', "[1, 2, 3]"):
        result = score("json_fields", reply, JOB_EXPECTED, JOB_SETTINGS)
        assert (result.value, result.parsed) == (0.0, None)
        assert "no JSON object" in result.reason


def test_json_weights_are_normalised_by_their_sum():
    settings = {"pass_threshold": 0.5, "fields": {"a": {"weight": 30, "match": "exact"}, "b": {"weight": 10, "match": "exact"}}}
    result = score("json_fields", '{"a": 1, "b": 0}', {"a": 1, "b": 2}, settings)
    assert result.value == pytest.approx(0.75) and result.correct


def test_json_pass_threshold_defaults_to_all_fields():
    settings = {"fields": {"a": {"match": "exact"}, "b": {"match": "exact"}}}
    assert not score("json_fields", '{"a": 1, "b": 0}', {"a": 1, "b": 2}, settings).correct


@pytest.mark.parametrize(
    ("settings", "names"),
    [
        ({}, "fields"),
        ({"fields": {}}, "fields"),
        ({"fields": {"a": {"match": "fuzzy"}}}, "fields.a.match"),
        ({"fields": {"a": {"match": "exact", "weight": 0}}}, "fields.a.weight"),
        ({"fields": {"a": {"match": "exact", "weight": "2"}}}, "fields.a.weight"),
        ({"fields": {"a": {"match": "exact", "tolerance": 0.1}}}, "fields.a.tolerance"),
        ({"fields": {"a": {"match": "number", "tolerance": -1}}}, "fields.a.tolerance"),
        ({"fields": {"a": {"match": "exact", "wieght": 1}}}, "wieght"),
        ({"fields": {"a..b": {"match": "exact"}}}, "a..b"),
        ({"pass_threshold": 1.5, "fields": {"a": {"match": "exact"}}}, "pass_threshold"),
        ({"threshold": 0.5, "fields": {"a": {"match": "exact"}}}, "threshold"),
    ],
)
def test_json_settings_errors_name_the_field(settings, names):
    problem = get_scorer("json_fields").validate_settings(settings)
    assert problem is not None and names in problem


def test_json_valid_settings_pass_validation():
    assert get_scorer("json_fields").validate_settings(JOB_SETTINGS) is None


def test_json_expected_validation():
    scorer = get_scorer("json_fields")
    assert scorer.validate_expected(JOB_EXPECTED, JOB_SETTINGS) is None
    assert "JSON object" in scorer.validate_expected(["not", "an", "object"], JOB_SETTINGS)
    assert "salary.min" in scorer.validate_expected({"title": "x", "skills": []}, JOB_SETTINGS)
    assert "number" in scorer.validate_expected({**JOB_EXPECTED, "salary": {"min": "lots"}}, JOB_SETTINGS)
    assert "list" in scorer.validate_expected({**JOB_EXPECTED, "skills": 3}, JOB_SETTINGS)
    assert "settings are invalid" in scorer.validate_expected(JOB_EXPECTED, {"fields": {}})


# --------------------------------------------------------------------------
# label
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "reply",
    ["Finance", "finance", "  FINANCE.\n", '"Finance"', "'finance'!", "Label: Finance", "industry: **Finance**", "`Finance`"],
)
def test_label_normalisation(reply):
    result = score("label", reply, "Finance", LABELS)
    assert result.correct and result.parsed == "Finance"
    assert "reply is the label" in result.reason


def test_label_extracted_from_longer_reply():
    result = score("label", "I would classify this company as Retail because it sells shoes.", "Retail", LABELS)
    assert result.correct and result.parsed == "Retail"
    assert "extracted from a longer reply" in result.reason


def test_label_inside_longer_label_is_not_a_second_match():
    result = score("label", "This is a software services firm.", "Software Services", LABELS)
    assert result.correct and result.parsed == "Software Services"
    # ...but the short label on its own still works
    assert score("label", "It's a software company", "Software", LABELS).parsed == "Software"


def test_label_whole_words_only():
    # "retailer" is not "Retail"
    result = score("label", "A large retailer of goods", "Retail", LABELS)
    assert not result.correct and result.parsed is None
    assert "no allowed label" in result.reason


def test_label_ambiguous_when_several_labels_occur():
    result = score("label", "Either finance or retail", "Finance", LABELS)
    assert not result.correct and result.parsed is None
    assert "ambiguous" in result.reason and "Finance" in result.reason and "Retail" in result.reason


def test_label_wrong_label():
    result = score("label", "Retail", "Finance", LABELS)
    assert (result.value, result.correct, result.parsed) == (0.0, False, "Retail")
    assert "expected 'Finance'" in result.reason


def test_label_with_hyphen():
    assert score("label", "e-commerce.", "E-commerce", LABELS).correct


def test_label_expected_and_settings_validation():
    scorer = get_scorer("label")
    assert scorer.validate_expected("Finance", LABELS) is None
    assert "one of the labels" in scorer.validate_expected("Banking", LABELS)
    assert "one of the labels" in scorer.validate_expected(None, LABELS)
    assert "labels" in scorer.validate_settings({})
    assert "labels" in scorer.validate_settings({"labels": []})
    assert "duplicates" in scorer.validate_settings({"labels": ["Retail", "retail."]})
    assert "invalid label" in scorer.validate_settings({"labels": ["ok", ""]})


# --------------------------------------------------------------------------
# text_similarity
# --------------------------------------------------------------------------


def test_similarity_ignores_case_punctuation_and_order():
    result = score("text_similarity", "Paris, France!", "france paris", {"threshold": 0.8})
    assert result.value == pytest.approx(1.0) and result.correct
    assert result.parsed == "paris france"


def test_similarity_token_f1_value():
    # reply 4 tokens, reference 3 tokens, 3 shared: P=3/4, R=1, F1=6/7
    result = score("text_similarity", "the cat sat down", "the cat sat", {"threshold": 0.9})
    assert result.value == pytest.approx(6 / 7)
    assert not result.correct  # 0.857 < 0.9
    assert "0.86" in result.reason


def test_similarity_default_threshold_is_0_8():
    # 4 of 5 tokens each way: F1 = 0.8 exactly -> correct with the default
    result = score("text_similarity", "a b c d x", "a b c d e", {})
    assert result.value == pytest.approx(0.8) and result.correct


def test_similarity_unrelated_text():
    result = score("text_similarity", "completely different words", "the answer is 42", {})
    assert result.value == 0.0 and not result.correct


def test_similarity_validation():
    scorer = get_scorer("text_similarity")
    assert scorer.validate_settings({"threshold": 0.5}) is None
    assert "threshold" in scorer.validate_settings({"threshold": 2})
    assert "threshold" in scorer.validate_settings({"threshold": "high"})
    assert scorer.validate_expected("an answer", {}) is None
    assert "string" in scorer.validate_expected("", {})
    assert "string" in scorer.validate_expected(["a"], {})
