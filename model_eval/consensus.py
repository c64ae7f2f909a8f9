"""Consensus across models, for tasks whose cases have no expected answer.

Every model that answered a case contributes one answer: the most frequent normalised answer among
its repeats (the earliest repeat wins a tie). Two answers agree when

* label, verdict and json tasks: their normalised forms are equal (labels case-folded and stripped of
  decoration, verdicts parsed to PASS/FAIL, JSON objects compared on the task's `consensus.fields`
  with strings case-folded and whitespace collapsed, or on the whole object);
* text tasks: their token F1 (the `text_similarity` scorer's measure) is at or above
  `consensus.similarity_threshold`.

An answer's support is the number of models whose answer agrees with it (its own included). The
consensus answer is the one with the most support; its agreement is that support over the models
considered (a model with no usable answer supports nothing). When answers that do not agree with
each other tie, the designated `tie_breaker` model's answer wins if it is among them; otherwise the
case has no consensus, and the reason says so.

Each model's agreement rate is the share of cases with a consensus where its own answer agrees with
the consensus answer. Because a model's own answer helped form that consensus (with two models it
always supports half of it), a leave-one-out rate is kept beside it: agreement with the consensus
of the other models alone.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from typing import Any

from model_eval.golden import ConsensusSpec
from model_eval.scorers.base import strip_reasoning
from model_eval.scorers.json_fields import MISSING, extract_json_object, resolve_path
from model_eval.scorers.label import normalise_label
from model_eval.scorers.similarity import token_f1, tokens
from model_eval.scorers.verdict import parse_verdict


def normalise(text: str | None, output_kind: str, spec: ConsensusSpec) -> str | None:
    """The form answers are compared in; None when the reply holds no usable answer."""
    if text is None:
        return None
    text = strip_reasoning(text)
    if output_kind == "label":
        return normalise_label(text) or None
    if output_kind == "verdict":
        return parse_verdict(text)[0]
    if output_kind == "json":
        obj, _ = extract_json_object(text)
        if obj is None:
            return None
        picked = {f: _canonical(resolve_path(obj, f)) for f in spec.fields} if spec.fields else _canonical(obj)
        return json.dumps(picked, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return " ".join(tokens(text)) or None


def _canonical(value: Any) -> Any:
    if value is MISSING:
        return "<missing>"
    if isinstance(value, str):
        return " ".join(value.casefold().split())
    if isinstance(value, list):
        return [_canonical(v) for v in value]
    if isinstance(value, dict):
        return {k: _canonical(v) for k, v in value.items()}
    return value


def agree(first: str, second: str, output_kind: str, spec: ConsensusSpec) -> bool:
    if output_kind == "text":
        return token_f1(first, second)[0] >= spec.similarity_threshold - 1e-9
    return first == second


def model_answer(normalised_repeats: list[str | None]) -> str | None:
    """A model's answer to a case: its most frequent usable answer across repeats (earliest on a tie)."""
    usable = [a for a in normalised_repeats if a is not None]
    if not usable:
        return None
    counts = Counter(usable)
    best = max(counts.values())
    return next(a for a in usable if counts[a] == best)


@dataclass(frozen=True)
class CaseConsensus:
    answer: str | None
    model: str | None                 # whose answer stands for the consensus
    supporters: tuple[str, ...]
    models: int                       # models considered (answered or not)
    models_answering: int
    agreement: float | None           # supporters / models
    tie_broken_by: str | None
    reason: str


def case_consensus(answers: dict[str, str | None], output_kind: str, spec: ConsensusSpec) -> CaseConsensus:
    """The consensus of one case from each model's normalised answer (None = no usable answer)."""
    answered = {m: a for m, a in sorted(answers.items()) if a is not None}
    if not answered:
        return CaseConsensus(None, None, (), len(answers), 0, None, None, "no model gave a usable answer")
    support = {m: tuple(n for n in answered if agree(answered[m], answered[n], output_kind, spec)) for m in answered}
    best = max(len(s) for s in support.values())
    tied = [m for m in answered if len(support[m]) == best]
    rivals = [m for m in tied if not agree(answered[m], answered[tied[0]], output_kind, spec)]
    tie_broken_by = None
    if not rivals:
        # Every top answer agrees with the first: one position, whichever member stands for it.
        chosen = spec.tie_breaker if spec.tie_breaker in tied else tied[0]
    elif spec.tie_breaker in tied:
        chosen, tie_broken_by = spec.tie_breaker, spec.tie_breaker
    else:
        return CaseConsensus(None, None, (), len(answers), len(answered), None, None,
                             f"tie between {', '.join(tied)} ({best} supporter(s) each); the tie-breaker "
                             f"{spec.tie_breaker} {'gave no usable answer' if spec.tie_breaker not in answered else 'is not among them'}")
    agreement = best / len(answers)
    reason = f"{best} of {len(answers)} model(s) agree" + (f"; tie broken by {tie_broken_by}" if tie_broken_by else "")
    return CaseConsensus(answered[chosen], chosen, support[chosen], len(answers), len(answered), agreement, tie_broken_by, reason)


def agrees_with(answer: str | None, consensus: CaseConsensus, output_kind: str, spec: ConsensusSpec) -> bool:
    return answer is not None and consensus.answer is not None and agree(answer, consensus.answer, output_kind, spec)
