"""Scorers turn a model reply into a Score; see base.py for the contract.

Importing this package registers every scorer in it: each module in this folder is imported for its
`@register_scorer` classes, so adding a scorer is adding one module.
"""

import importlib
import pkgutil

from model_eval.scorers.base import Score, Scorer, get_scorer, register_scorer, registered_scorers

for _module in pkgutil.iter_modules(__path__):
    if _module.name != "base":
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["Score", "Scorer", "get_scorer", "register_scorer", "registered_scorers"]
