"""What the sensors watch: models listed by OpenAI-compatible and Ollama endpoints, and golden-set
fingerprints. Plain functions with short timeouts (a sensor tick must finish well within 60 s)."""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
import urllib.request
from dataclasses import replace
from pathlib import Path

import yaml

from model_eval import yaml_text
from model_eval.deployment import DiscoveryEndpoint
from model_eval.eligibility import Verdict, judge


def _get_json(endpoint: DiscoveryEndpoint, url: str, timeout_s: float, body: dict | None = None):
    headers = {"Content-Type": "application/json"} if body is not None else {}
    if endpoint.api_key_env and os.environ.get(endpoint.api_key_env):
        headers["Authorization"] = f"Bearer {os.environ[endpoint.api_key_env]}"
    data = None if body is None else json.dumps(body).encode()
    # Loopback and private endpoints must not go through a proxy from the environment.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(urllib.request.Request(url, data=data, headers=headers), timeout=timeout_s) as response:
        return json.loads(response.read())


def list_endpoint_models(endpoint: DiscoveryEndpoint, timeout_s: float = 3.0) -> list[str]:
    """Model ids the endpoint lists now: GET /v1/models (OpenAI-compatible) or /api/tags (Ollama)."""
    url = endpoint.api_base + ("/models" if endpoint.kind == "openai_compatible" else "/api/tags")
    if endpoint.kind == "openai_compatible" and not endpoint.api_base.endswith("/v1"):
        url = endpoint.api_base + "/v1/models"
    body = _get_json(endpoint, url, timeout_s)
    if endpoint.kind == "openai_compatible":
        return sorted(str(item["id"]) for item in body.get("data", []) if "id" in item)
    return sorted(str(item["name"]) for item in body.get("models", []) if "name" in item)


def ollama_capabilities(endpoint: DiscoveryEndpoint, model_id: str, timeout_s: float = 3.0) -> list[str] | None:
    """What Ollama's POST /api/show reports the model can do (completion, embedding, vision, tools, ...);
    None when the endpoint does not say (older Ollama) or cannot be asked."""
    try:
        body = _get_json(endpoint, endpoint.api_base + "/api/show", timeout_s, {"model": model_id})
    except (OSError, ValueError):
        return None
    capabilities = body.get("capabilities") if isinstance(body, dict) else None
    return [str(c) for c in capabilities] if isinstance(capabilities, list) else None


def litellm_model(endpoint: DiscoveryEndpoint, model_id: str) -> str:
    return ("openai/" if endpoint.kind == "openai_compatible" else "ollama/") + model_id


def registry_name(endpoint: DiscoveryEndpoint, model_id: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", endpoint.prefix + model_id).strip("-")[:64]


def turned_away_key(endpoint: DiscoveryEndpoint, model_id: str) -> str:
    """How the sensor remembers a model it did not evaluate, under which rules."""
    return f"{endpoint.api_base}|{model_id}|{endpoint.rules.fingerprint()}"


def eligible_models(endpoint: DiscoveryEndpoint, model_ids: list[str], known_names: set[str],
                    turned_away: set[str] = frozenset()) -> tuple[dict[str, Verdict], dict[str, Verdict]]:
    """The listed models not judged yet, split into those evaluated as chat models and the others, each with
    the verdict of the rule that decided (model_eval/eligibility.py). Registered models and those in
    `turned_away` (keys from `turned_away_key`) were judged before and are skipped: asking Ollama about
    every model at every tick would cost a call each."""
    accepted, rejected = {}, {}
    for model_id in model_ids:
        if registry_name(endpoint, model_id) in known_names or turned_away_key(endpoint, model_id) in turned_away:
            continue
        first = judge(model_id, litellm_model(endpoint, model_id), replace(endpoint.rules, require_chat=False))
        capabilities = None
        if first.eligible and endpoint.rules.require_chat and endpoint.kind == "ollama":
            capabilities = ollama_capabilities(endpoint, model_id)
        verdict = judge(model_id, litellm_model(endpoint, model_id), endpoint.rules, capabilities)
        (accepted if verdict.eligible else rejected)[model_id] = verdict
    return accepted, rejected


def registry_entry(endpoint: DiscoveryEndpoint, model_id: str, verdict: Verdict | None = None) -> dict:
    """A registry entry for a discovered model, from the endpoint's template."""
    entry = {"name": registry_name(endpoint, model_id), "model": litellm_model(endpoint, model_id),
             "api_base": endpoint.api_base, **endpoint.template}
    if verdict is not None:
        entry.setdefault("notes", f"discovered at {endpoint.api_base}; evaluated as chat: {verdict.reason}")
    if endpoint.api_key_env:
        entry.setdefault("api_key_env", endpoint.api_key_env)
    entry.setdefault("provider", "ollama" if endpoint.kind == "ollama" else "openai-compatible")
    return entry


def add_discovered(path: Path, entries: list[dict], known_names: set[str]) -> list[str]:
    """Append entries whose names are new to the discovered-models file (atomically); returns the names added."""
    existing = yaml_text.parse(path.read_text())["models"] if path.is_file() else []
    names = known_names | {e["name"] for e in existing}
    new = [e for e in entries if e["name"] not in names]
    if new:
        path.parent.mkdir(parents=True, exist_ok=True)
        header = "# Written by model_eval's new-model sensor. Move an entry to models.yaml to edit it.\n"
        with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as handle:
            handle.write(header + yaml.safe_dump({"models": existing + new}, sort_keys=False))
        os.replace(handle.name, path)
    return [e["name"] for e in new]


def golden_fingerprints(golden_dir: Path) -> dict[str, str]:
    """A content hash per task folder (task file, every cases file, a judge task's calibration file): changes when a
    version is added or edited, or when a judge's human-graded answers change."""
    prints = {}
    for folder in sorted(p for p in golden_dir.iterdir() if p.is_dir() and not p.name.startswith((".", "_"))):
        digest = hashlib.sha256()
        for file in sorted([folder / "task.yaml", *folder.glob("*.jsonl"), *(folder / "cases").glob("*.jsonl")]):
            if file.is_file():
                digest.update(file.name.encode() + b"\0" + file.read_bytes())
        prints[folder.name] = digest.hexdigest()[:16]
    return prints
