"""Free-text answers compared with a reference by token F1.

Settings: {threshold: float (default 0.8)}; correct = value >= threshold.

Both texts are case-folded and split into word tokens (letters and digits;
punctuation dropped). The value is the F1 of the two token multisets, as in
SQuAD-style answer scoring: precision = shared / reply tokens, recall =
shared / reference tokens.

Why token F1 rather than difflib.SequenceMatcher: it ignores word order
("Paris, France" vs "France: Paris") and punctuation, which for short
reference answers are not what we want to measure; and it runs in linear
time, whereas SequenceMatcher is quadratic in the worst case, which a huge
garbage reply would hit while scoring must stay cheap and never hang.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Mapping
from typing import Any

from model_eval.scorers.base import Score, Scorer, check_fraction, register_scorer

DEFAULT_THRESHOLD = 0.8
_TOKEN = re.compile(r"[^\W_]+")  # runs of letters/digits, any script


def tokens(text: str) -> list[str]:
    return _TOKEN.findall(text.casefold())


def token_f1(reply: str, reference: str) -> tuple[float, float, float]:
    """(f1, precision, recall) of reply tokens against reference tokens."""
    got, want = Counter(tokens(reply)), Counter(tokens(reference))
    if not got and not want:
        return 1.0, 1.0, 1.0
    shared = sum((got & want).values())
    if shared == 0:
        return 0.0, 0.0, 0.0
    precision = shared / sum(got.values())
    recall = shared / sum(want.values())
    return 2 * precision * recall / (precision + recall), precision, recall


@register_scorer
class TextSimilarityScorer(Scorer):
    name = "text_similarity"
    allowed_settings = frozenset({"threshold"})

    def _score(self, text: str, expected: Any, settings: Mapping[str, Any]) -> Score:
        threshold = float(settings.get("threshold", DEFAULT_THRESHOLD))
        f1, precision, recall = token_f1(text, expected)
        f1 = min(1.0, f1)  # float rounding can give 1.0000000000000002
        correct = f1 >= threshold - 1e-9
        # Normalised tokens make repeats that differ only in case/punctuation
        # count as consistent.
        parsed = " ".join(tokens(text)) or None
        reason = (
            f"token F1 {f1:.2f} (precision {precision:.2f}, recall {recall:.2f}); "
            f"{'meets' if correct else 'below'} threshold {threshold:g}"
        )
        return Score(f1, correct, parsed, reason)

    def _validate_settings(self, settings: Mapping[str, Any]) -> str | None:
        return check_fraction(settings, "threshold")

    def _validate_expected(self, expected: Any, settings: Mapping[str, Any]) -> str | None:
        if not isinstance(expected, str) or not tokens(expected):
            return f"expected must be a string containing at least one word, got {expected!r}"
        return None
