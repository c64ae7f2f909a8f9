"""litellm's model map (model_prices_and_context_window_backup.json), read without importing litellm.

Importing litellm takes seconds; the map is one JSON file inside its package, the same file litellm reads
with LITELLM_LOCAL_MODEL_COST_MAP=True (how this project runs it). Used for a model's `mode` (chat,
embedding, audio_transcription, ...) and its per-token prices.
"""

from __future__ import annotations

import importlib.util
import json
from functools import lru_cache
from pathlib import Path
from typing import Any

MAP_FILE = "model_prices_and_context_window_backup.json"
FREE_PROVIDERS = {"ollama", "ollama_chat"}


@lru_cache(maxsize=1)
def model_map() -> dict[str, dict[str, Any]]:
    """The bundled map (model key -> facts); empty if litellm is not installed."""
    spec = importlib.util.find_spec("litellm")
    if spec is None or not spec.submodule_search_locations:
        return {}
    path = Path(next(iter(spec.submodule_search_locations))) / MAP_FILE
    if not path.is_file():
        return {}
    data = json.loads(path.read_text())
    return {key: value for key, value in data.items() if isinstance(value, dict) and key != "sample_spec"}


def candidate_keys(model: str) -> list[str]:
    """Keys a litellm model string may be listed under: as given, without its provider prefix, without ':latest'."""
    keys = [model]
    if "/" in model:
        keys.append(model.split("/", 1)[1])
    keys += [key.removesuffix(":latest") for key in keys if key.endswith(":latest")]
    return list(dict.fromkeys(keys))


def model_info(model: str) -> dict[str, Any] | None:
    """The map's entry for a litellm model string (e.g. openai/gpt-4o-mini), or None if it is not there."""
    table = model_map()
    return next((table[key] for key in candidate_keys(model) if key in table), None)


def mode_of(model: str) -> str | None:
    info = model_info(model)
    return None if info is None else info.get("mode")


def price_per_million(model: str) -> tuple[float, float] | None:
    """(input, output) USD per million tokens from the map; None when it has no price for both sides."""
    info = model_info(model)
    if info is None:
        # litellm prices every Ollama model it does not list at zero (they run on your own machine).
        return (0.0, 0.0) if model.split("/", 1)[0] in FREE_PROVIDERS else None
    prices = info.get("input_cost_per_token"), info.get("output_cost_per_token")
    if any(not isinstance(p, (int, float)) or isinstance(p, bool) for p in prices):
        return None
    return prices[0] * 1e6, prices[1] * 1e6
