"""The `judge` scorer: a model from the registry grades each answer against the task's rubric.

Unlike the other scorers it needs model calls, so it is not a pure function of (reply, expected):
`score` here only refuses, and the judging step (`model_eval/steps/judging.py`, over the core in
`model_eval/judge.py`) does the work. What this class owns is the task file's contract, checked when
the task is loaded:

    scorer:
      name: judge
      settings:
        judge_model: smollm2-135m          # a registry name (any litellm model)
        rubric: |-                         # what a good answer is; the judge sees it verbatim
          ...
        calibration: calibration.jsonl     # human-labelled answers, in the task folder (golden/README.md)
        pass_threshold: 0.5                # correct = verdict score >= this (default 0.5)
        max_verdict_attempts: 2            # tries to get a parseable verdict per answer (default 3)
        min_kappa: 0.6                     # optional; default from deployment.yaml (judges.min_kappa)
        call_params: {max_tokens: 80}      # optional judge call parameters (default temperature 0)
        pairwise: {reference_model: NAME}  # optional: a win rate against this model, beside accuracy

`expected` is optional for judge tasks: when a case has one, the judge is shown it as a reference
answer (guidance, not the only right answer).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from model_eval.scorers.base import Score, Scorer, check_fraction, is_number, register_scorer, zero

DEFAULT_PASS_THRESHOLD = 0.5
DEFAULT_VERDICT_ATTEMPTS = 3
MAX_VERDICT_ATTEMPTS = 5


@register_scorer
class JudgeScorer(Scorer):
    name = "judge"
    needs_expected = False
    needs_model_calls = True
    allowed_settings = frozenset({"judge_model", "rubric", "calibration", "pass_threshold", "max_verdict_attempts",
                                  "min_kappa", "call_params", "pairwise"})

    def _score(self, text: str, expected: Any, settings: Mapping[str, Any]) -> Score:
        # Reached only by mistake: judge tasks are scored by the judging step, which calls a model.
        return zero("the judge scorer needs model calls; judge tasks are scored by the judging step")

    def _validate_settings(self, settings: Mapping[str, Any]) -> str | None:
        for key in ("judge_model", "rubric", "calibration"):
            value = settings.get(key)
            if not isinstance(value, str) or not value.strip():
                return f"setting '{key}' is required, a non-empty string"
        if problem := check_fraction(settings, "pass_threshold"):
            return problem
        attempts = settings.get("max_verdict_attempts", DEFAULT_VERDICT_ATTEMPTS)
        if isinstance(attempts, bool) or not isinstance(attempts, int) or not 1 <= attempts <= MAX_VERDICT_ATTEMPTS:
            return f"setting 'max_verdict_attempts' must be a whole number from 1 to {MAX_VERDICT_ATTEMPTS}, got {attempts!r}"
        if "min_kappa" in settings and (not is_number(settings["min_kappa"]) or not -1 <= settings["min_kappa"] <= 1):
            return f"setting 'min_kappa' must be a number between -1 and 1, got {settings['min_kappa']!r}"
        params = settings.get("call_params", {})
        if not isinstance(params, Mapping):
            return "setting 'call_params' must be a mapping of call parameters"
        if any(k in params for k in ("api_key", "api_base", "model", "messages")):
            return "setting 'call_params' may not set api_key, api_base, model or messages"
        pairwise = settings.get("pairwise")
        if pairwise is not None:
            if not isinstance(pairwise, Mapping) or set(pairwise) != {"reference_model"} \
                    or not isinstance(pairwise["reference_model"], str) or not pairwise["reference_model"].strip():
                return "setting 'pairwise' must be {reference_model: <registry name>}"
        return None

    def _validate_expected(self, expected: Any, settings: Mapping[str, Any]) -> str | None:
        # Optional; when given it is shown to the judge as a reference answer.
        if expected is None or (isinstance(expected, str) and expected.strip()) or isinstance(expected, (dict, list)):
            return None
        return f"expected, when given for a judge task, must be a non-empty string or a JSON object, got {expected!r}"
