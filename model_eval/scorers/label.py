"""One label out of a fixed set (classification tasks).

Settings: {labels: [..]}; the expected value must be one of the labels.

Replies are normalised before comparison: case-folded, whitespace collapsed,
and stripped of surrounding quotes/backticks/markdown emphasis, trailing
punctuation and a leading "label:"-style prefix (label, industry, category,
class, answer). Allowed labels go through the same normalisation, so a label
written "E-commerce" matches the reply '"e-commerce."'.

If the normalised reply is not itself an allowed label, the scorer looks for
allowed labels occurring as whole words inside it ("I would classify this as
finance because ..."). Exactly one such label is taken as the answer and the
reason says it was extracted; zero or several is a wrong answer. A label that
only occurs inside a longer matching label ("software" within "software
services") does not count as a separate occurrence.
"""

from __future__ import annotations

import bisect
import re
from collections.abc import Mapping
from typing import Any

from model_eval.scorers.base import Score, Scorer, as_settings, register_scorer, zero

_PREFIX = re.compile(r"^(?:label|industry|category|class|answer)\s*[:=\-]\s*")
_EDGE_CHARS = " \t\r\n\"'`*_\u201c\u201d\u2018\u2019"
_TRAILING_PUNCTUATION = ".,;:!?"


def normalise_label(text: str) -> str:
    """Canonical form used on both replies and allowed labels."""
    value = " ".join(text.casefold().split())
    # Strip layers repeatedly: '"Label: **Finance**."' needs quotes, then the
    # prefix, then punctuation, then emphasis, in an order that depends on
    # how the model decorated it.
    for _ in range(10):
        before = value
        value = value.strip(_EDGE_CHARS)
        value = _PREFIX.sub("", value)
        value = value.rstrip(_TRAILING_PUNCTUATION)
        if value == before:
            break
    return value


def _spans(text: str, label: str) -> list[tuple[int, int]]:
    """Whole-word occurrences of `label` in `text` (both normalised)."""
    pattern = re.compile(r"(?<!\w)" + re.escape(label) + r"(?!\w)")
    return [match.span() for match in pattern.finditer(text)]


def _all_covered(spans: list[tuple[int, int]], others: list[tuple[int, int]]) -> bool:
    """True if every span lies inside some span of `others`.

    Uses sorted starts with a running maximum of ends, so a huge reply that
    repeats labels thousands of times stays O(n log n) rather than O(n^2).
    """
    if not others:
        return False
    others = sorted(others)
    starts = [start for start, _ in others]
    furthest_end = []
    running = -1
    for _, end in others:
        running = max(running, end)
        furthest_end.append(running)
    for start, end in spans:
        index = bisect.bisect_right(starts, start)
        if index == 0 or furthest_end[index - 1] < end:
            return False
    return True


def find_labels(text: str, labels: list[str]) -> list[str]:
    """Allowed labels that occur as whole words in the reply, in label order."""
    normalised = normalise_label(text)
    occurrences = {label: _spans(normalised, normalise_label(label)) for label in labels}
    occurrences = {label: spans for label, spans in occurrences.items() if spans}
    # Drop labels whose every occurrence sits inside a longer label's match
    # ("software" inside "software services"). Distinct labels have distinct
    # normal forms, so a covering span is always a strictly longer one.
    return [
        label
        for label, spans in occurrences.items()
        if not _all_covered(spans, [span for other, s in occurrences.items() if other != label for span in s])
    ]


@register_scorer
class LabelScorer(Scorer):
    name = "label"
    allowed_settings = frozenset({"labels"})

    def _score(self, text: str, expected: Any, settings: Mapping[str, Any]) -> Score:
        labels: list[str] = list(settings["labels"])
        by_normal_form = {normalise_label(label): label for label in labels}

        reply = normalise_label(text)
        if reply in by_normal_form:
            answer = by_normal_form[reply]
            how = "reply is the label"
        else:
            found = find_labels(text, labels)
            if not found:
                shown = reply if len(reply) <= 60 else reply[:57] + "..."
                return zero(f"no allowed label in the reply ({shown!r})")
            if len(found) > 1:
                return zero(f"ambiguous: several allowed labels occur in the reply ({', '.join(found)})")
            answer = found[0]
            how = "extracted from a longer reply"

        if normalise_label(answer) == normalise_label(expected):
            return Score(1.0, True, answer, f"label {answer!r} ({how}), expected {expected!r}")
        return Score(0.0, False, answer, f"label {answer!r} ({how}), expected {expected!r}")

    def _validate_settings(self, settings: Mapping[str, Any]) -> str | None:
        labels = settings.get("labels")
        if not isinstance(labels, list) or not labels:
            return "setting 'labels' must be a non-empty list of strings"
        seen: dict[str, str] = {}
        for label in labels:
            if not isinstance(label, str) or not normalise_label(label):
                return f"setting 'labels' contains an invalid label {label!r} (need non-empty strings)"
            key = normalise_label(label)
            if key in seen:
                return f"setting 'labels' has duplicates once normalised: {seen[key]!r} and {label!r}"
            seen[key] = label
        return None

    def _validate_expected(self, expected: Any, settings: Mapping[str, Any]) -> str | None:
        labels = as_settings(settings)["labels"]
        if not isinstance(expected, str) or expected not in labels:
            return f"expected must be one of the labels ({', '.join(labels)}), got {expected!r}"
        return None
