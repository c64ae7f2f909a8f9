"""Recommendation policies: which evaluated model should a task use?

Input is one row per candidate model for ONE task (see REQUIRED_COLUMNS) plus
the task's qualification threshold. Each policy decides who qualifies and how
qualifiers are ranked; everything else (tie-breaking, confidence, reasoning
text, the "nobody qualified" case) is shared here so every policy behaves the
same way at the edges.

Scores depend only on the candidate itself and fixed anchors from the task (the threshold, a latency
target and a budget per case; see `Anchors`), never on who else was evaluated: adding or removing a
model that does not win never changes the champion among the others (independence of irrelevant
alternatives; a property test checks it).

Rules shared by every policy:

* A model with no successful call (success_rate == 0) never qualifies, even at
  threshold 0: a model that never answered cannot be recommended.
* Scores within 1e-9 are equal, so accuracies computed in different ways
  (8/10 vs a mean of booleans) compare as intended against the threshold.
* Ties on the policy's own ordering are broken by TIE_BREAK_RULE and the
  reasoning says so; the result never depends on the input row order.
* If nobody qualifies there is no champion and the reasoning says why; a model
  is never crowned by default.

Adding a policy is one `@register_policy` class in this module.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

import polars as pl

from model_eval.stats import paired_confidence, prob_a_beats_b, prob_at_least

DEFAULT_LATENCY_TARGET_MS = 2000.0
DEFAULT_BUDGET_PER_CASE_USD = 0.001

REQUIRED_COLUMNS = (
    "model",
    "accuracy",
    "accuracy_low",
    "accuracy_high",
    "correctness",
    "consistency",
    "success_rate",
    "p50_latency_ms",
    "cost_per_case",
    "cases",
    "calls",
)

TIE_BREAK_RULE = "higher accuracy, then lower p50 latency, then lower cost per case (unknown last), then model name"

EPSILON = 1e-9
# Composite scores are rounded before comparison so that two candidates with
# the same figures tie exactly, whatever order the float sums were taken in.
_SCORE_DIGITS = 9


@dataclass(frozen=True)
class Candidate:
    """One model's aggregated results for the task."""

    model: str
    accuracy: float
    accuracy_low: float
    accuracy_high: float
    correctness: float
    consistency: float
    success_rate: float
    p50_latency_ms: float | None  # None: no successful call to time
    cost_per_case: float | None  # None: price unknown
    cases: int
    calls: int

    @property
    def answered(self) -> bool:
        return self.success_rate > 0


@dataclass(frozen=True)
class Anchors:
    """Fixed reference points for composite scores, from the task file (golden/README.md).

    Speed and cost scores are target / (target + value): 1 for free or instant, 0.5 exactly at the
    target, falling toward 0 beyond it, so no cut-off hides differences past the target.
    """

    latency_target_ms: float = DEFAULT_LATENCY_TARGET_MS
    budget_per_case_usd: float = DEFAULT_BUDGET_PER_CASE_USD

    def __post_init__(self):
        for name in ("latency_target_ms", "budget_per_case_usd"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"{name} must be a positive number, got {value!r}")


@dataclass(frozen=True)
class Recommendation:
    policy: str
    champion: str | None
    runner_up: str | None
    champion_score: float | None
    runner_up_score: float | None
    # Champion + runner-up: confidence the champion is truly more accurate (paired over cases when
    # per-case results are given). Lone champion: confidence its accuracy is >= threshold. None: no champion.
    confidence: float | None
    qualified: list[str]  # in ranking order
    ranking: list[tuple[str, float | None]]  # qualified models with their policy score, best first
    reasoning: str
    # What the scores mean, e.g. "p50 latency in ms (lower is better)".
    score_name: str = ""


def _tie_break_key(candidate: Candidate) -> tuple[Any, ...]:
    latency = candidate.p50_latency_ms
    cost = candidate.cost_per_case
    return (
        -candidate.accuracy,
        latency is None,
        latency if latency is not None else 0.0,
        cost is None,
        cost if cost is not None else 0.0,
        candidate.model,
    )


# --------------------------------------------------------------------------
# Formatting helpers for the reasoning text
# --------------------------------------------------------------------------


def _pct(value: float) -> str:
    return f"{value * 100:.1f}%"


def _latency(value: float | None) -> str:
    return "unknown" if value is None else f"{value:,.0f} ms"


def _cost(value: float | None) -> str:
    if value is None:
        return "cost unknown"
    if value == 0:
        return "$0 per case"
    # Three significant figures, without scientific notation: $0.000123.
    decimals = max(2, 2 - math.floor(math.log10(abs(value))))
    return f"${value:.{decimals}f} per case"


def _sentence(text: str) -> str:
    """Capitalise the first letter only (model names keep their case) and end with a period."""
    return text[:1].upper() + text[1:] + "."


def _figures(candidate: Candidate) -> str:
    return (
        f"accuracy {_pct(candidate.accuracy)} over n={candidate.cases} cases "
        f"(95% CI {_pct(candidate.accuracy_low)}-{_pct(candidate.accuracy_high)}), "
        f"p50 {_latency(candidate.p50_latency_ms)}, {_cost(candidate.cost_per_case)}"
    )


# --------------------------------------------------------------------------
# Policy contract and registry
# --------------------------------------------------------------------------


class Policy(ABC):
    """Decides who qualifies and how qualifiers are ordered."""

    name: ClassVar[str]
    #: How the winner is chosen, phrased to follow "under the X policy (...)".
    rule: ClassVar[str]
    #: What qualifies, phrased to follow "which requires ...".
    qualification: ClassVar[str] = "accuracy at or above the threshold"
    #: Meaning of the policy score, copied into Recommendation.score_name.
    score_name: ClassVar[str]
    #: Ranking direction of the score; None scores always rank last.
    higher_is_better: ClassVar[bool] = True
    #: Ranks by accuracy before anything else: then a model shown less accurate than the champion can
    #: never win, and adaptive evaluation may stop it (model_eval/adaptive.py, "cannot beat the champion").
    ranks_by_accuracy_first: ClassVar[bool] = False

    def qualifies(self, candidate: Candidate, threshold: float) -> bool:
        return candidate.accuracy >= threshold - EPSILON

    @abstractmethod
    def score(self, candidate: Candidate, threshold: float, anchors: Anchors) -> float | None:
        """The policy score of one qualified model: a function of that model and the task's fixed
        anchors only, so other candidates can never change it."""

    def scores(self, qualified: Sequence[Candidate], threshold: float, anchors: Anchors) -> dict[str, float | None]:
        return {c.model: self.score(c, threshold, anchors) for c in qualified}

    def order_key(self, candidate: Candidate, score: float | None) -> tuple[Any, ...]:
        """The policy's own ordering (smaller sorts first); ties fall through
        to the shared tie-break."""
        if score is None:
            return (1, 0.0)
        rounded = round(score, _SCORE_DIGITS)
        return (0, -rounded if self.higher_is_better else rounded)

    def format_score(self, score: float | None) -> str:
        return "n/a" if score is None else f"{score:.3f}"

    def notes(self, qualified: Sequence[Candidate]) -> list[str]:
        """Extra caveats for the reasoning (e.g. unknown costs)."""
        return []


_PolicyT = TypeVar("_PolicyT", bound=type[Policy])
_POLICIES: dict[str, Policy] = {}


def register_policy(cls: _PolicyT) -> _PolicyT:
    """Class decorator: make a policy available under `cls.name` (duplicates are an error)."""
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name:
        raise TypeError(f"{cls.__name__} needs a non-empty class attribute 'name' to be registered")
    if name in _POLICIES:
        raise ValueError(f"a policy named '{name}' is already registered")
    _POLICIES[name] = cls()
    return cls


def get_policy(name: str) -> Policy:
    try:
        return _POLICIES[name]
    except (KeyError, TypeError):
        raise KeyError(f"unknown policy {name!r}; registered policies: {', '.join(registered_policies())}") from None


def registered_policies() -> list[str]:
    return sorted(_POLICIES)


# --------------------------------------------------------------------------
# Shared scoring pieces
# --------------------------------------------------------------------------


def _unknown_cost_note(qualified: Sequence[Candidate], consequence: str) -> list[str]:
    """A note naming the qualified models whose cost per case is unknown, and what the policy does about it."""
    unknown = sorted(c.model for c in qualified if c.cost_per_case is None)
    return [f"cost per case is unknown for {', '.join(unknown)}, so {consequence}"] if unknown else []


def _accuracy_above_threshold(accuracy: float, threshold: float) -> float:
    """0 at the threshold, 1 at perfect accuracy, linear between."""
    if threshold >= 1.0 - EPSILON:
        return 1.0
    return min(1.0, max(0.0, (accuracy - threshold) / (1.0 - threshold)))


def _against_target(value: float | None, target: float) -> float:
    """target / (target + value): 1 at zero, 0.5 at the target; unknown counts as 0 (worst)."""
    if value is None:
        return 0.0
    return target / (target + max(0.0, value))


class _CompositePolicy(Policy):
    """Weighted sum of accuracy, speed and cost, each scored against the task's fixed anchors."""

    weights: ClassVar[tuple[float, float, float]]  # accuracy, speed, cost
    score_name = "composite of accuracy, speed and cost against the task's anchors (higher is better)"

    def score(self, candidate: Candidate, threshold: float, anchors: Anchors) -> float | None:
        w_accuracy, w_speed, w_cost = self.weights
        return (w_accuracy * _accuracy_above_threshold(candidate.accuracy, threshold)
                + w_speed * _against_target(candidate.p50_latency_ms, anchors.latency_target_ms)
                + w_cost * _against_target(candidate.cost_per_case, anchors.budget_per_case_usd))

    def notes(self, qualified: Sequence[Candidate]) -> list[str]:
        return _unknown_cost_note(qualified, "the cost component counts as 0 for it")


# --------------------------------------------------------------------------
# The policies
# --------------------------------------------------------------------------


@register_policy
class StrictPolicy(Policy):
    name = "strict"
    rule = "fastest p50 latency among models right on every case in every repeat with no failed calls"
    qualification = "every case right in every repeat (correctness 100%) and no failed calls"
    score_name = "p50 latency in ms (lower is better)"
    higher_is_better = False

    def qualifies(self, candidate: Candidate, threshold: float) -> bool:
        return candidate.correctness >= 1.0 - EPSILON and candidate.success_rate >= 1.0 - EPSILON

    def score(self, candidate: Candidate, threshold: float, anchors: Anchors) -> float | None:
        return candidate.p50_latency_ms

    def format_score(self, score: float | None) -> str:
        return _latency(score)


@register_policy
class WeightedPolicy(_CompositePolicy):
    name = "weighted"
    rule = ("0.5 x accuracy + 0.3 x speed + 0.2 x cost, each scored against the task's threshold, "
            "latency target and budget per case")
    weights = (0.5, 0.3, 0.2)


@register_policy
class BalancedPolicy(_CompositePolicy):
    name = "balanced"
    rule = "equal thirds of accuracy, speed and cost, each scored against the task's threshold, latency target and budget"
    weights = (1 / 3, 1 / 3, 1 / 3)


@register_policy
class SpeedPolicy(Policy):
    name = "speed"
    rule = "lowest p50 latency among qualifiers"
    score_name = "p50 latency in ms (lower is better)"
    higher_is_better = False

    def score(self, candidate: Candidate, threshold: float, anchors: Anchors) -> float | None:
        return candidate.p50_latency_ms

    def format_score(self, score: float | None) -> str:
        return _latency(score)


@register_policy
class QualityPolicy(Policy):
    name = "quality"
    rule = "highest accuracy, then correctness, then consistency"
    score_name = "accuracy (higher is better)"
    ranks_by_accuracy_first = True

    def score(self, candidate: Candidate, threshold: float, anchors: Anchors) -> float | None:
        return candidate.accuracy

    def order_key(self, candidate: Candidate, score: float | None) -> tuple[Any, ...]:
        return (
            -round(candidate.accuracy, _SCORE_DIGITS),
            -round(candidate.correctness, _SCORE_DIGITS),
            -round(candidate.consistency, _SCORE_DIGITS),
        )

    def format_score(self, score: float | None) -> str:
        return "n/a" if score is None else _pct(score)


@register_policy
class CostPolicy(Policy):
    name = "cost"
    rule = "lowest known cost per case, unknown cost ranking last"
    score_name = "cost per case in USD (lower is better; None = unknown)"
    higher_is_better = False

    def score(self, candidate: Candidate, threshold: float, anchors: Anchors) -> float | None:
        return candidate.cost_per_case

    def format_score(self, score: float | None) -> str:
        return _cost(score)

    def notes(self, qualified: Sequence[Candidate]) -> list[str]:
        return _unknown_cost_note(qualified, "it ranks last")


@register_policy
class ReliablePolicy(Policy):
    name = "reliable"
    rule = "highest success rate x consistency, then accuracy"
    score_name = "success_rate x consistency (higher is better)"

    def score(self, candidate: Candidate, threshold: float, anchors: Anchors) -> float | None:
        return candidate.success_rate * candidate.consistency

    def order_key(self, candidate: Candidate, score: float | None) -> tuple[Any, ...]:
        return (-round(score or 0.0, _SCORE_DIGITS), -round(candidate.accuracy, _SCORE_DIGITS))


# --------------------------------------------------------------------------
# Input handling
# --------------------------------------------------------------------------


def _number(value: Any, default: float | None) -> float | None:
    """Float, or `default` for null/NaN."""
    if value is None:
        return default
    number = float(value)
    return default if math.isnan(number) else number


def candidates_from_frame(candidates_df: pl.DataFrame) -> list[Candidate]:
    """Validate the frame and turn its rows into Candidates."""
    if not isinstance(candidates_df, pl.DataFrame):
        raise TypeError(f"candidates must be a polars DataFrame, got {type(candidates_df).__name__}")
    missing = [column for column in REQUIRED_COLUMNS if column not in candidates_df.columns]
    if missing:
        raise ValueError(f"candidates frame is missing column(s): {', '.join(missing)}")
    candidates = []
    for row in candidates_df.select(REQUIRED_COLUMNS).to_dicts():
        if row["model"] is None:
            raise ValueError("candidates frame has a row with a null model name")
        candidates.append(
            Candidate(
                model=str(row["model"]),
                # Null quality figures mean nothing was measured: treat as 0.
                accuracy=_number(row["accuracy"], 0.0),
                accuracy_low=_number(row["accuracy_low"], 0.0),
                accuracy_high=_number(row["accuracy_high"], 1.0),
                correctness=_number(row["correctness"], 0.0),
                consistency=_number(row["consistency"], 0.0),
                success_rate=_number(row["success_rate"], 0.0),
                p50_latency_ms=_number(row["p50_latency_ms"], None),
                cost_per_case=_number(row["cost_per_case"], None),
                cases=int(row["cases"] or 0),
                calls=int(row["calls"] or 0),
            )
        )
    names = [c.model for c in candidates]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ValueError(f"candidates frame has more than one row for model(s): {', '.join(duplicates)}")
    return candidates


# --------------------------------------------------------------------------
# Recommendation
# --------------------------------------------------------------------------


def _tie_explanation(policy: Policy, champion: Candidate, runner_up: Candidate) -> str:
    """Which tie-break step separated two candidates with equal policy order."""
    steps = [
        ("higher accuracy", champion.accuracy, runner_up.accuracy, _pct),
        ("lower p50 latency", champion.p50_latency_ms, runner_up.p50_latency_ms, _latency),
        ("lower cost per case", champion.cost_per_case, runner_up.cost_per_case, _cost),
    ]
    decided_by = f"model name (alphabetical: {champion.model} before {runner_up.model})"
    for label, mine, theirs, show in steps:
        if mine != theirs:
            decided_by = f"{label} ({show(mine)} vs {show(theirs)})"
            break
    # Starts with a lowercase word, not a model name: the first letter of the
    # sentence gets capitalised and model names must keep their spelling.
    return f"the {policy.name} rule tied {champion.model} with {runner_up.model}, so the tie was broken by {decided_by}"


def _no_champion(policy: Policy, candidates: list[Candidate], threshold: float) -> Recommendation:
    if not candidates:
        reasoning = f"No candidates were evaluated, so the {policy.name} policy cannot recommend a model."
    else:
        best = min(candidates, key=_tie_break_key)  # highest accuracy, deterministic
        reasoning = (
            f"No model qualified under the {policy.name} policy, which requires {policy.qualification}: "
            f"the best accuracy seen was {_pct(best.accuracy)} ({best.model}, 95% CI "
            f"{_pct(best.accuracy_low)}-{_pct(best.accuracy_high)}) against a threshold of {_pct(threshold)}, "
            f"so no champion is recommended."
        )
        extra = []
        if policy.name == "strict":
            most_correct = min(candidates, key=lambda c: (-c.correctness, _tie_break_key(c)))
            extra.append(f"the best correctness was {_pct(most_correct.correctness)} ({most_correct.model})")
        silent = sorted(c.model for c in candidates if not c.answered)
        if silent:
            extra.append(f"models with no successful call cannot qualify ({', '.join(silent)})")
        if extra:
            reasoning += " " + _sentence("; ".join(extra))
    return Recommendation(
        policy=policy.name,
        champion=None,
        runner_up=None,
        champion_score=None,
        runner_up_score=None,
        confidence=None,
        qualified=[],
        ranking=[],
        reasoning=reasoning,
        score_name=policy.score_name,
    )


CaseAccuracy = Mapping[str, Mapping[str, float]]  # model -> case id -> share of right repeats


def _runner_up_confidence(champion: Candidate, runner_up: Candidate, case_accuracy: CaseAccuracy | None) -> tuple[float, str]:
    """Confidence the champion is truly more accurate, and how it was computed."""
    mine = (case_accuracy or {}).get(champion.model)
    theirs = (case_accuracy or {}).get(runner_up.model)
    if mine and theirs:
        differences = [mine[case] - theirs[case] for case in sorted(mine.keys() & theirs.keys())]
        if differences:
            return paired_confidence(differences), f"paired over the {len(differences)} cases both answered"
    # Without per-case results: the two samples are treated as independent, over cases (conservative for paired data).
    return (prob_a_beats_b(champion.accuracy, champion.cases, runner_up.accuracy, runner_up.cases),
            f"unpaired, over {champion.cases} and {runner_up.cases} cases")


def _recommend(policy: Policy, candidates: list[Candidate], threshold: float, anchors: Anchors,
               case_accuracy: CaseAccuracy | None) -> Recommendation:
    qualified = [c for c in candidates if c.answered and policy.qualifies(c, threshold)]
    if not qualified:
        return _no_champion(policy, candidates, threshold)

    scores = policy.scores(qualified, threshold, anchors)
    ordered = sorted(qualified, key=lambda c: (policy.order_key(c, scores[c.model]), _tie_break_key(c)))
    champion = ordered[0]
    runner_up = ordered[1] if len(ordered) > 1 else None

    sentences = [
        f"{champion.model} is the champion under the {policy.name} policy ({policy.rule}; "
        f"score {policy.format_score(scores[champion.model])}): {_figures(champion)}."
    ]
    if runner_up is not None:
        confidence, how = _runner_up_confidence(champion, runner_up, case_accuracy)
        sentences.append(
            f"Runner-up {runner_up.model} (score {policy.format_score(scores[runner_up.model])}): "
            f"{_figures(runner_up)}; confidence {champion.model} is truly more accurate: {confidence:.2f} ({how})."
        )
    else:
        confidence = prob_at_least(champion.accuracy, champion.cases, threshold)
        sentences.append(
            f"It is the only one of {len(candidates)} candidate(s) that qualified "
            f"({policy.qualification}); confidence its true accuracy is at least {_pct(threshold)}: {confidence:.2f} "
            f"(over {champion.cases} cases)."
        )
    notes = policy.notes(qualified)
    if runner_up is not None and policy.order_key(champion, scores[champion.model]) == policy.order_key(
        runner_up, scores[runner_up.model]
    ):
        notes.insert(0, _tie_explanation(policy, champion, runner_up))
    if notes:
        sentences.append(_sentence("; ".join(notes)))

    return Recommendation(
        policy=policy.name,
        champion=champion.model,
        runner_up=runner_up.model if runner_up else None,
        champion_score=scores[champion.model],
        runner_up_score=scores[runner_up.model] if runner_up else None,
        confidence=confidence,
        qualified=[c.model for c in ordered],
        ranking=[(c.model, scores[c.model]) for c in ordered],
        reasoning=" ".join(sentences),
        score_name=policy.score_name,
    )


def _check_threshold(threshold: float) -> float:
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0.0 <= threshold <= 1.0:
        raise ValueError(f"qualification threshold must be a number between 0 and 1, got {threshold!r}")
    return float(threshold)


def recommend(candidates_df: pl.DataFrame, policy_name: str, threshold: float, anchors: Anchors | None = None,
              case_accuracy: CaseAccuracy | None = None) -> Recommendation:
    """Recommend a champion for one task under one policy.

    `case_accuracy` (model -> case -> share of right repeats) makes the runner-up confidence a paired
    comparison over the cases both models answered."""
    policy = get_policy(policy_name)
    return _recommend(policy, candidates_from_frame(candidates_df), _check_threshold(threshold), anchors or Anchors(),
                      case_accuracy)

