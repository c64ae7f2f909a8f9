"""PASS/FAIL verdicts from free text.

Small models rarely answer with a bare word: they write "Verdict: pass",
"**PASS**", "PASS. The code is fine" or a paragraph that ends in the verdict.
The parsing rule, in order:

1. If the first word of the reply is PASS or FAIL, that is the answer. Models
   that lead with the verdict often go on to mention the other word while
   explaining ("PASS - nothing here would FAIL"), so the lead word wins.
2. Otherwise, if exactly one of the two words occurs anywhere, that is the
   answer.
3. Otherwise (both or neither occur) the reply is ambiguous and scores 0, with
   parsed None so that ambiguous repeats do not look consistent with a real
   answer.

Matching is case-insensitive and on whole words only: "passed", "failing" or
"password" are not verdicts.

Negation: an occurrence preceded in the same clause by a negation ("not PASS",
"does not fail", "isn't a pass") is ignored rather than flipped. Reading
"not PASS" as FAIL looks tempting, but "not FAIL" as PASS is a guess about
intent, and the task asked for a plain verdict; an answer that can only be
understood by inverting it gets no credit. So "It does not pass. FAIL" is FAIL
(the negated word is skipped), while "It does not pass" alone is ambiguous and
the reason says the only verdict word was negated.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from model_eval.scorers.base import Score, Scorer, register_scorer, zero

VERDICTS = ("PASS", "FAIL")

# Words, keeping contractions together ("doesn't") so they can be recognised
# as negations. Curly apostrophes are normalised to ' before matching.
_WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")

_NEGATIONS = frozenset(
    {
        "not", "no", "never", "cannot", "nor", "neither", "without",
        "don't", "doesn't", "didn't", "isn't", "aren't", "wasn't", "weren't",
        "won't", "wouldn't", "shouldn't", "can't", "couldn't", "mustn't",
        # Apostrophe-less spellings that models (and people) produce.
        "dont", "doesnt", "didnt", "isnt", "wont", "wouldnt", "shouldnt", "cant", "couldnt",
    }
)
# Words that may sit between a negation and the verdict without breaking the
# link: "not a PASS", "would not be a pass", "does not quite pass".
_FILLERS = frozenset({"a", "an", "the", "be", "to", "it", "quite", "really", "yet", "fully", "even", "actually"})
# Characters allowed between two words of the same clause: spaces and markdown
# emphasis ("**NOT** PASS"). Anything else (".", ",", ":", newline) ends the
# clause, so "No. PASS" or "No issues: PASS" are not negations.
_SAME_CLAUSE_GAP = re.compile(r"[ \t*_`~\"'()]*")


def _tokens(text: str) -> list[re.Match[str]]:
    return list(_WORD.finditer(text))


def _is_negated(text: str, tokens: list[re.Match[str]], index: int) -> bool:
    """True if the verdict word at tokens[index] is negated within its clause."""
    position = index
    while position > 0:
        previous = tokens[position - 1]
        gap = text[previous.end(): tokens[position].start()]
        if not _SAME_CLAUSE_GAP.fullmatch(gap):
            return False  # punctuation or a line break ends the clause
        word = previous.group()
        if word in _NEGATIONS:
            return True
        if word not in _FILLERS:
            return False
        position -= 1
    return False


def parse_verdict(text: str) -> tuple[str | None, str]:
    """Return (verdict or None, explanation) following the module's rule."""
    lowered = text.replace("\u2019", "'").replace("\u2018", "'").lower()
    tokens = _tokens(lowered)
    if not tokens:
        return None, "ambiguous: no words in the reply"

    first = tokens[0].group().upper()
    if first in VERDICTS:
        return first, f"reply starts with {first}"

    found: dict[str, int] = {verdict: 0 for verdict in VERDICTS}
    negated: dict[str, int] = {verdict: 0 for verdict in VERDICTS}
    for index, token in enumerate(tokens):
        word = token.group().upper()
        if word in VERDICTS:
            if _is_negated(lowered, tokens, index):
                negated[word] += 1
            else:
                found[word] += 1

    present = [verdict for verdict in VERDICTS if found[verdict]]
    if len(present) == 1:
        return present[0], f"found {present[0]} in the reply"
    if len(present) == 2:
        return None, "ambiguous: both PASS and FAIL appear and the reply does not start with either"
    only_negated = [verdict for verdict in VERDICTS if negated[verdict]]
    if only_negated:
        words = " and ".join(only_negated)
        verb = "appears" if len(only_negated) == 1 else "appear"
        return None, f"ambiguous: {words} {verb} only negated (e.g. 'not {only_negated[0]}'), which is not read as a verdict"
    return None, "ambiguous: neither PASS nor FAIL appears as a whole word"


@register_scorer
class VerdictScorer(Scorer):
    """Expected is "PASS" or "FAIL"; the reply is parsed with `parse_verdict`."""

    name = "verdict"

    def _score(self, text: str, expected: Any, settings: Mapping[str, Any]) -> Score:
        verdict, how = parse_verdict(text)
        if verdict is None:
            return zero(how)
        if verdict == expected:
            return Score(1.0, True, verdict, f"parsed {verdict} ({how}), expected {expected}")
        return Score(0.0, False, verdict, f"parsed {verdict} ({how}), expected {expected}")

    def _validate_expected(self, expected: Any, settings: Mapping[str, Any]) -> str | None:
        if expected not in VERDICTS:
            return f"expected must be \"PASS\" or \"FAIL\", got {expected!r}"
        return None
