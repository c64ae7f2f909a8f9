"""Prices per token from litellm's bundled price map, read as the JSON file it is, without importing litellm.

Importing litellm takes seconds; a run whose answers all come from the cache, or whose calls go
elsewhere, should not pay that just to price tokens. litellm ships the map inside its package
(`model_prices_and_context_window_backup.json`); with LITELLM_LOCAL_MODEL_COST_MAP=True, which this
project always sets, that copy is also the one litellm itself reads. Only the package's location is
looked up here (`importlib.util.find_spec` does not run the package).
"""

from __future__ import annotations

import functools
import importlib.util
import json
from pathlib import Path

PRICE_MAP_FILE = "model_prices_and_context_window_backup.json"


@functools.cache
def price_map() -> dict[str, dict]:
    """litellm's bundled map (model key -> prices and limits); empty if litellm is not installed."""
    spec = importlib.util.find_spec("litellm")
    if spec is None or not spec.submodule_search_locations:
        return {}
    path = Path(next(iter(spec.submodule_search_locations))) / PRICE_MAP_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def _entry(litellm_model: str) -> dict | None:
    """The map's entry for a litellm model string: the full string, else the name after `provider/`
    when the map lists it for that provider (e.g. openai/gpt-4o-mini -> gpt-4o-mini)."""
    prices = price_map()
    if litellm_model in prices:
        return prices[litellm_model]
    provider, _, name = litellm_model.partition("/")
    entry = prices.get(name) if name else None
    if entry is not None and entry.get("litellm_provider") == provider:
        return entry
    return None


def cost_per_token(litellm_model: str, prompt_tokens: int, completion_tokens: int) -> float | None:
    """USD for one call's tokens at the map's base rates; None when the map does not price the model."""
    entry = _entry(litellm_model)
    if entry is None:
        return None
    input_rate, output_rate = entry.get("input_cost_per_token"), entry.get("output_cost_per_token")
    if input_rate is None or output_rate is None:
        return None
    return prompt_tokens * float(input_rate) + completion_tokens * float(output_rate)
