"""What the sensors watch: models listed by OpenAI-compatible and Ollama endpoints, and golden-set
fingerprints. Plain functions with short timeouts (a sensor tick must finish well within 60 s)."""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
import urllib.request
from pathlib import Path

import yaml

from model_eval.deployment import DiscoveryEndpoint


def list_endpoint_models(endpoint: DiscoveryEndpoint, timeout_s: float = 3.0) -> list[str]:
    """Model ids the endpoint lists now: GET /v1/models (OpenAI-compatible) or /api/tags (Ollama)."""
    url = endpoint.api_base + ("/models" if endpoint.kind == "openai_compatible" else "/api/tags")
    if endpoint.kind == "openai_compatible" and not endpoint.api_base.endswith("/v1"):
        url = endpoint.api_base + "/v1/models"
    headers = {}
    if endpoint.api_key_env and os.environ.get(endpoint.api_key_env):
        headers["Authorization"] = f"Bearer {os.environ[endpoint.api_key_env]}"
    # Loopback and private endpoints must not go through a proxy from the environment.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(urllib.request.Request(url, headers=headers), timeout=timeout_s) as response:
        body = json.loads(response.read())
    if endpoint.kind == "openai_compatible":
        return sorted(str(item["id"]) for item in body.get("data", []) if "id" in item)
    return sorted(str(item["name"]) for item in body.get("models", []) if "name" in item)


def registry_entry(endpoint: DiscoveryEndpoint, model_id: str) -> dict:
    """A registry entry for a discovered model, from the endpoint's template."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", endpoint.prefix + model_id).strip("-")[:64]
    prefix = "openai/" if endpoint.kind == "openai_compatible" else "ollama/"
    entry = {"name": name, "model": prefix + model_id, "api_base": endpoint.api_base, **endpoint.template}
    if endpoint.api_key_env:
        entry.setdefault("api_key_env", endpoint.api_key_env)
    entry.setdefault("provider", "ollama" if endpoint.kind == "ollama" else "openai-compatible")
    return entry


def add_discovered(path: Path, entries: list[dict], known_names: set[str]) -> list[str]:
    """Append entries whose names are new to the discovered-models file (atomically); returns the names added."""
    existing = yaml.safe_load(path.read_text())["models"] if path.is_file() else []
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
    """A content hash per task folder (task file and every cases file): changes when a version is added or edited."""
    prints = {}
    for folder in sorted(p for p in golden_dir.iterdir() if p.is_dir() and not p.name.startswith((".", "_"))):
        digest = hashlib.sha256()
        for file in sorted([folder / "task.yaml", *sorted((folder / "cases").glob("*.jsonl"))]):
            if file.is_file():
                digest.update(file.name.encode() + b"\0" + file.read_bytes())
        prints[folder.name] = digest.hexdigest()[:16]
    return prints
