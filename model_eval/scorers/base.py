"""The scorer contract and the registry every scorer joins.

A scorer turns one model reply into a `Score`. Adding a scorer is adding one
module that defines a `Scorer` subclass decorated with `@register_scorer`, and
importing that module from `model_eval/scorers/__init__.py`.

Two guarantees matter to the rest of the pipeline:

* `Scorer.score` never raises. Model output is untrusted: it can be None (the
  call failed), empty, truncated, enormous or plain garbage. A scorer that
  raised would abort a whole evaluation partition, so the public `score`
  method wraps the subclass's `_score` and turns any exception into a zero
  score whose reason says what went wrong.
* Golden data and task settings are checked up front (`validate_expected`,
  `validate_settings`) so a typo in a task file is reported as a readable
  message naming the bad field, instead of silently scoring every case 0.
"""

from __future__ import annotations

import math
import re
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar


@dataclass(frozen=True)
class Score:
    """The verdict on one reply.

    value:   0.0..1.0; partial credit is possible (e.g. json field weights).
    correct: whether the reply counts as right for accuracy.
    parsed:  the normalised answer extracted from the reply (canonical JSON
             for the json scorer). Repeats of the same case are compared on
             this to measure consistency, so it must be canonical: two replies
             that mean the same thing should produce the same string. None
             when nothing could be extracted.
    reason:  short human-readable explanation shown in reports.
    """

    value: float
    correct: bool
    parsed: str | None
    reason: str

    def __post_init__(self) -> None:
        # Catch scorer bugs early; `Scorer.score` converts this into a zero score.
        if not isinstance(self.value, (int, float)) or math.isnan(self.value):
            raise ValueError(f"score value must be a number, got {self.value!r}")
        if not 0.0 <= self.value <= 1.0:
            raise ValueError(f"score value must be within 0..1, got {self.value!r}")


def zero(reason: str, parsed: str | None = None) -> Score:
    """A failed score; the common case for unusable replies."""
    return Score(value=0.0, correct=False, parsed=parsed, reason=reason)


# Reasoning models wrap their chain of thought in <think>...</think>. The
# thought often mentions every possible answer ("PASS or FAIL?"), which would
# make any reply look ambiguous, so it is removed before scoring.
_THINK_BLOCK = re.compile(r"<(think|thinking)>.*?</\1>", re.IGNORECASE | re.DOTALL)
_THINK_OPEN = re.compile(r"<(?:think|thinking)>", re.IGNORECASE)
_THINK_CLOSE = re.compile(r"</(?:think|thinking)>", re.IGNORECASE)


def strip_reasoning(text: str) -> str:
    """Remove <think> blocks, keeping only the final answer."""
    text = _THINK_BLOCK.sub(" ", text)
    # Some chat templates put the opening tag in the prompt, so the reply holds
    # only the closing tag: the answer is whatever follows the last one.
    closes = list(_THINK_CLOSE.finditer(text))
    if closes:
        text = text[closes[-1].end():]
    # An opening tag with no closing tag means the reply was cut off while the
    # model was still thinking: there is no answer after it.
    opened = _THINK_OPEN.search(text)
    if opened:
        text = text[: opened.start()]
    return text


def as_settings(settings: Any) -> Mapping[str, Any]:
    """Task files may leave `settings:` empty, which YAML reads as None."""
    return {} if settings is None else settings


def is_number(value: Any) -> bool:
    """True for real numbers; bool is excluded even though it subclasses int."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_fraction(settings: Mapping[str, Any], key: str) -> str | None:
    """Error message unless settings[key] (when present) is a number in 0..1."""
    if key not in settings:
        return None
    value = settings[key]
    if not is_number(value) or not 0.0 <= value <= 1.0:
        return f"setting '{key}' must be a number between 0 and 1, got {value!r}"
    return None


class Scorer(ABC):
    """Base class for scorers. Subclasses implement `_score`, not `score`."""

    #: Registry key, referenced from task.yaml as `scorer: {name: ...}`.
    name: ClassVar[str]
    #: Setting keys this scorer understands; anything else is reported as a
    #: typo by `validate_settings`.
    allowed_settings: ClassVar[frozenset[str]] = frozenset()
    #: Whether golden cases must carry an `expected` answer (the judge scorer does without).
    needs_expected: ClassVar[bool] = True
    #: Whether scoring calls a model; such scorers are run by the judging step, not by `score`.
    needs_model_calls: ClassVar[bool] = False

    def score(self, response: str | None, expected: Any, settings: Mapping[str, Any] | None = None) -> Score:
        """Score one reply. Never raises, whatever the reply contains."""
        try:
            if response is None:
                return zero("no response (the call failed or returned nothing)")
            if isinstance(response, bytes):
                response = response.decode("utf-8", errors="replace")
            elif not isinstance(response, str):
                response = str(response)
            if not response.strip():
                return zero("empty response")
            text = strip_reasoning(response)
            if not text.strip():
                return zero("no answer after the model's <think> reasoning")
            # Bad settings would otherwise surface as a confusing KeyError or,
            # worse, a plausible-looking score; say what is wrong instead.
            settings_problem = self.validate_settings(settings)
            if settings_problem:
                return zero(f"cannot score: {settings_problem}")
            expected_problem = self.validate_expected(expected, as_settings(settings))
            if expected_problem:
                return zero(f"cannot score: {expected_problem}")
            return self._score(text, expected, as_settings(settings))
        except Exception as exc:  # noqa: BLE001 - the contract is "never raise"
            return zero(f"scorer error ({type(exc).__name__}: {exc})"[:500])

    @abstractmethod
    def _score(self, text: str, expected: Any, settings: Mapping[str, Any]) -> Score:
        """Score a non-empty reply (reasoning already stripped) against a valid expected value.
        May raise; `score` turns exceptions into zero scores."""

    def validate_settings(self, settings: Mapping[str, Any] | None) -> str | None:
        """Error message naming the bad field, or None if the settings are usable."""
        settings = as_settings(settings)
        if not isinstance(settings, Mapping):
            return f"scorer '{self.name}' settings must be a mapping, got {type(settings).__name__}"
        unknown = sorted(str(key) for key in settings if key not in self.allowed_settings)
        if unknown:
            allowed = ", ".join(sorted(self.allowed_settings)) or "none"
            return f"unknown setting(s) for scorer '{self.name}': {', '.join(unknown)} (allowed: {allowed})"
        return self._validate_settings(settings)

    def _validate_settings(self, settings: Mapping[str, Any]) -> str | None:
        """Scorer-specific checks; keys are already known to be allowed."""
        return None

    def validate_expected(self, expected: Any, settings: Mapping[str, Any] | None) -> str | None:
        """Error message if a golden case's expected value is unusable, else None."""
        settings_problem = self.validate_settings(settings)
        if settings_problem:
            return f"cannot check expected because the settings are invalid: {settings_problem}"
        return self._validate_expected(expected, as_settings(settings))

    @abstractmethod
    def _validate_expected(self, expected: Any, settings: Mapping[str, Any]) -> str | None:
        """Scorer-specific checks of an expected value; the settings are already known to be valid."""


_ScorerT = TypeVar("_ScorerT", bound=type[Scorer])

# name -> scorer class. Instances are created on lookup; scorers are stateless.
_REGISTRY: dict[str, type[Scorer]] = {}


def register_scorer(cls: _ScorerT) -> _ScorerT:
    """Class decorator: make a scorer available under `cls.name`.

    A duplicate name is an error rather than a silent override, so two modules
    can never fight over which scorer a task actually gets.
    """
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name:
        raise TypeError(f"{cls.__name__} needs a non-empty class attribute 'name' to be registered")
    if not (isinstance(cls, type) and issubclass(cls, Scorer)):
        raise TypeError(f"{cls!r} is not a Scorer subclass")
    if name in _REGISTRY:
        existing = _REGISTRY[name]
        raise ValueError(
            f"a scorer named '{name}' is already registered ({existing.__module__}.{existing.__qualname__})"
        )
    _REGISTRY[name] = cls
    return cls


def get_scorer(name: str) -> Scorer:
    """The scorer registered as `name`; KeyError listing the known names otherwise."""
    try:
        cls = _REGISTRY[name]
    except (KeyError, TypeError):
        known = ", ".join(registered_scorers()) or "none"
        raise KeyError(f"unknown scorer {name!r}; registered scorers: {known}") from None
    return cls()


def registered_scorers() -> list[str]:
    """Registered scorer names, sorted."""
    return sorted(_REGISTRY)
