"""Scorers turn a model reply into a Score; see base.py for the contract.

Importing this package registers the built-in scorers. To add one, write a
module with a `@register_scorer` class and import it below.
"""

from model_eval.scorers.base import Score, Scorer, get_scorer, register_scorer, registered_scorers

# Imported for their side effect: each module registers its scorer.
from model_eval.scorers import json_fields, label, similarity, verdict  # noqa: E402,F401  isort: skip

__all__ = ["Score", "Scorer", "get_scorer", "register_scorer", "registered_scorers"]
