"""The model registry: the file people edit to list candidate models.

Each entry becomes one Dagster partition (its `name`). Keys are never stored here: an entry names
the environment variable that holds its key, and the key is read only when a call is made.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import yaml

from model_eval import yaml_text
from model_eval.errors import RegistryError
from model_eval.prompts import MODES, CompletionTemplate, TemplateError

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
ENTRY_FIELDS = {
    "name", "model", "api_base", "api_key_env", "params", "price_per_million", "provider", "family",
    "tasks", "tiers", "enabled", "local_model", "max_concurrency", "timeout_s", "max_attempts", "notes",
    "mode", "completion_template", "resources", "client",
}
RESOURCE_FIELDS = {"max_memory_mb"}
CLIENTS = ("http", "litellm")
DEFAULTS = {"max_concurrency": 4, "timeout_s": 60.0, "max_attempts": 5}


@dataclass(frozen=True)
class ModelSpec:
    name: str
    litellm_model: str
    provider: str
    family: str
    api_base: str | None = None
    api_key_env: str | None = None
    params: dict[str, Any] = field(default_factory=dict)
    # None means "ask litellm's price map"; local models declare 0.0 explicitly.
    price_input_per_million: float | None = None
    price_output_per_million: float | None = None
    tasks: tuple[str, ...] | None = None
    tiers: tuple[int, ...] | None = None
    enabled: bool = True
    local_model: str | None = None
    max_concurrency: int = 4
    timeout_s: float = 60.0
    max_attempts: int = 5
    # "chat" sends messages; "completion" lays them out as one prompt with the template (base models).
    mode: str = "chat"
    completion_template: CompletionTemplate | None = None
    # The memory this model may take on this machine (the entry's `resources`, else the registry's); None: no limit.
    max_memory_mb: float | None = None
    # "http", "litellm", or None for the rule in `transport`.
    client: str | None = None

    @property
    def transport(self) -> str:
        """How calls are sent: "http" (the lean OpenAI-compatible client) or "litellm".

        The rule (models.yaml's header and the README say the same): an explicit `client` wins;
        otherwise every `openai/` model string, which is litellm's name for OpenAI and for any
        OpenAI-compatible server, goes over HTTP, and every other provider through litellm.
        """
        if self.client is not None:
            return self.client
        return "http" if self.litellm_model.startswith("openai/") else "litellm"

    @property
    def config_hash(self) -> str:
        """Identity of what answers: a change here invalidates cached responses. Never includes the key."""
        identity = {"model": self.litellm_model, "api_base": self.api_base, "params": self.params, "local_model": self.local_model}
        if self.mode != "chat":  # only then: chat models keep the hash (and cached answers) they had before modes existed
            identity["mode"] = self.mode
            identity["completion_template"] = self.completion_template.as_record() if self.completion_template else None
        return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]

    def serves(self, task_name: str, tier: int) -> bool:
        return (self.tasks is None or task_name in self.tasks) and (self.tiers is None or tier in self.tiers)

    def api_key(self) -> str | None:
        """The key a call sends (and the engine redacts). An `openai/` model without an endpoint or a
        variable of its own uses OPENAI_API_KEY, as litellm would on its own."""
        if self.api_key_env:
            return os.environ.get(self.api_key_env)
        if self.api_base is None and self.litellm_model.startswith("openai/"):
            return os.environ.get("OPENAI_API_KEY")
        return None

    def routing_record(self) -> dict[str, Any]:
        """The model as the routing snapshot describes it (model_eval/router.py): how an application calls it."""
        return {"model": self.name, "litellm_model": self.litellm_model, "api_base": self.api_base,
                "api_key_env": self.api_key_env, "params": self.params, "mode": self.mode,
                "completion_template": self.completion_template.as_record() if self.completion_template else None}

    def public_record(self) -> dict[str, Any]:
        """The row stored in the warehouse `models` table (no secrets: only the variable's name)."""
        return {
            "model": self.name, "litellm_model": self.litellm_model, "provider": self.provider, "family": self.family,
            "api_base": self.api_base, "api_key_env": self.api_key_env, "params_json": json.dumps(self.params, sort_keys=True),
            "price_input_per_million": self.price_input_per_million, "price_output_per_million": self.price_output_per_million,
            "tasks": list(self.tasks) if self.tasks is not None else None, "tiers": list(self.tiers) if self.tiers is not None else None,
            "enabled": self.enabled, "local_model": self.local_model, "config_hash": self.config_hash,
            "mode": self.mode,
            "completion_template_json": json.dumps(self.completion_template.as_record()) if self.completion_template else None,
        }


@dataclass(frozen=True)
class LocalServerSettings:
    host: str = "127.0.0.1"
    port: int = 8765

    @property
    def api_base(self) -> str:
        return f"http://{self.host}:{self.port}/v1"


@dataclass(frozen=True)
class Registry:
    path: Path
    models: tuple[ModelSpec, ...]
    local_server: LocalServerSettings

    def get(self, name: str) -> ModelSpec:
        for spec in self.models:
            if spec.name == name:
                return spec
        raise RegistryError(self.path, f"unknown model '{name}'; registered: {', '.join(self.names())}")

    def names(self, enabled_only: bool = False) -> list[str]:
        return [m.name for m in self.models if m.enabled or not enabled_only]

    def select(self, names: list[str] | None) -> list[ModelSpec]:
        """Enabled models, or exactly the named ones (an unknown name is an error, a disabled one too)."""
        if not names:
            return [m for m in self.models if m.enabled]
        chosen = [self.get(n) for n in names]
        disabled = [m.name for m in chosen if not m.enabled]
        if disabled:
            raise RegistryError(self.path, f"model(s) {', '.join(disabled)} are disabled (set enabled: true)")
        return chosen

    def local_models(self, specs: list[ModelSpec] | None = None) -> dict[str, str]:
        """alias -> local model name, for the models the bundled llama.cpp server must serve."""
        return {m.name: m.local_model for m in (specs if specs is not None else self.models) if m.local_model}


def _top_level_line(text: str, key: str) -> int | None:
    """Line of a top-level key, so errors in its section can point at it."""
    try:
        root = yaml_text.compose(text)
    except yaml.YAMLError:
        return None
    if isinstance(root, yaml.MappingNode):
        for node, value in root.value:
            if node.value == key:
                return value.start_mark.line + 1
    return None


def _entry_lines(text: str) -> list[int]:
    """Line number of each entry under `models:`, so errors can point at it."""
    try:
        root = yaml_text.compose(text)
    except yaml.YAMLError:
        return []
    if root is None or not isinstance(root, yaml.MappingNode):
        return []
    for key, value in root.value:
        if key.value == "models" and isinstance(value, yaml.SequenceNode):
            return [item.start_mark.line + 1 for item in value.value]
    return []


def _resource_limits(raw: Any, where: str, fail) -> dict[str, float]:
    """A `resources` mapping: {max_memory_mb: positive number}; `fail(message, field)` raises."""
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise fail(f"must be a mapping with {', '.join(sorted(RESOURCE_FIELDS))}", where)
    unknown = sorted(set(raw) - RESOURCE_FIELDS)
    if unknown:
        raise fail(f"unknown field; allowed: {', '.join(sorted(RESOURCE_FIELDS))}", f"{where}.{unknown[0]}")
    limits = {}
    for key, value in raw.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise fail(f"must be a positive number of megabytes, got {value!r}", f"{where}.{key}")
        limits[key] = float(value)
    return limits


def _entry(raw: Any, index: int, line: int | None, path: Path, server: LocalServerSettings, defaults: dict,
           machine_limits: dict[str, float]) -> ModelSpec:
    def fail(message: str, name: str | None = None) -> RegistryError:
        return RegistryError(path, message, line=line, field=f"models[{index}]" + (f".{name}" if name else ""))

    if not isinstance(raw, dict):
        raise fail("each model must be a mapping of fields")
    unknown = sorted(set(raw) - ENTRY_FIELDS)
    if unknown:
        raise fail(f"unknown field; allowed: {', '.join(sorted(ENTRY_FIELDS))}", unknown[0])
    for required in ("name", "model"):
        if not isinstance(raw.get(required), str) or not raw[required].strip():
            raise fail("required, a non-empty string", required)
    name = raw["name"]
    if not NAME_PATTERN.match(name):
        raise fail(f"'{name}' must be letters, digits, '.', '_' or '-' (it is a partition key)", "name")
    params = raw.get("params") or {}
    if not isinstance(params, dict):
        raise fail("must be a mapping", "params")
    if any(k in params for k in ("api_key", "api_base", "model", "messages")):
        raise fail("may not set api_key, api_base, model or messages (use the entry's own fields; keys come from api_key_env)", "params")

    price = raw.get("price_per_million")
    price_in = price_out = None
    if price is not None:
        if not isinstance(price, dict) or set(price) != {"input", "output"}:
            raise fail("must be {input: <USD>, output: <USD>} or null for litellm's price map", "price_per_million")
        for side in ("input", "output"):
            if isinstance(price[side], bool) or not isinstance(price[side], (int, float)) or price[side] < 0:
                raise fail("must be a non-negative number", f"price_per_million.{side}")
        price_in, price_out = float(price["input"]), float(price["output"])

    local_model = raw.get("local_model")
    api_base = raw.get("api_base")
    if local_model is not None:
        if not isinstance(local_model, str):
            raise fail("must be the name of a bundled local model", "local_model")
        api_base = api_base or server.api_base
    if api_base is not None and urlparse(str(api_base)).scheme not in ("http", "https"):
        raise fail(f"'{api_base}' is not an http(s) URL", "api_base")
    key_env = raw.get("api_key_env")
    if key_env is not None and (not isinstance(key_env, str) or not re.match(r"^[A-Z_][A-Z0-9_]*$", key_env)):
        raise fail("must be the NAME of an environment variable (the key itself never goes in this file)", "api_key_env")

    def int_list(key: str) -> tuple | None:
        value = raw.get(key)
        if value is None:
            return None
        if not isinstance(value, list):
            raise fail("must be a list or null (null = all)", key)
        return tuple(value)

    settings = {**defaults}
    for key in DEFAULTS:
        if key in raw:
            settings[key] = raw[key]
    if not isinstance(settings["max_concurrency"], int) or settings["max_concurrency"] < 1:
        raise fail("must be a positive whole number", "max_concurrency")
    if not isinstance(settings["max_attempts"], int) or not 1 <= settings["max_attempts"] <= 20:
        raise fail("must be a whole number from 1 to 20", "max_attempts")
    if isinstance(settings["timeout_s"], bool) or not isinstance(settings["timeout_s"], (int, float)) or settings["timeout_s"] <= 0:
        raise fail("must be a positive number of seconds", "timeout_s")
    enabled = raw.get("enabled", True)
    if not isinstance(enabled, bool):
        raise fail("must be true or false", "enabled")
    mode = raw.get("mode", "chat")
    if mode not in MODES:
        raise fail(f"must be one of {', '.join(MODES)}, got {mode!r}", "mode")
    template = None
    if mode == "completion":
        if raw.get("completion_template") is None:
            raise fail("required with mode: completion ({system, user, assistant, stop}; see the top of this file)",
                       "completion_template")
        try:
            template = CompletionTemplate.from_mapping(raw["completion_template"])
        except TemplateError as exc:
            raise fail(str(exc), "completion_template" + (f".{exc.field}" if exc.field else "")) from None
    elif raw.get("completion_template") is not None:
        raise fail("only used with mode: completion", "completion_template")
    limits = {**machine_limits, **_resource_limits(raw.get("resources"), "resources", fail)}
    client = raw.get("client")
    if client is not None and client not in CLIENTS:
        raise fail(f"must be one of {', '.join(CLIENTS)} (omit it for the rule in this file's header), got {client!r}", "client")
    if client == "http" and api_base is None and not raw["model"].startswith("openai/"):
        raise fail("client: http needs an api_base (an OpenAI-compatible URL ending in /v1) for a model that is not openai/...",
                   "client")

    return ModelSpec(
        name=name,
        litellm_model=raw["model"],
        provider=str(raw.get("provider") or raw["model"].split("/")[0]),
        family=str(raw.get("family") or ""),
        api_base=api_base,
        api_key_env=key_env,
        params=params,
        price_input_per_million=price_in,
        price_output_per_million=price_out,
        tasks=int_list("tasks"),
        tiers=int_list("tiers"),
        enabled=enabled,
        local_model=local_model,
        max_concurrency=settings["max_concurrency"],
        timeout_s=float(settings["timeout_s"]),
        max_attempts=settings["max_attempts"],
        mode=mode,
        completion_template=template,
        max_memory_mb=limits.get("max_memory_mb"),
        client=client,
    )


def _read_yaml(path: Path) -> tuple[dict, str]:
    text = path.read_text()
    try:
        data = yaml_text.parse(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        raise RegistryError(path, f"not valid YAML: {getattr(exc, 'problem', exc)}", line=None if mark is None else mark.line + 1) from None
    if not isinstance(data, dict) or not isinstance(data.get("models"), list):
        raise RegistryError(path, "must be a mapping with a 'models' list", field="models")
    return data, text


def load_registry(path: Path, discovered: Path | None = None) -> Registry:
    """The registry file, plus the entries the new-model sensor discovered (the file people edit wins a name clash)."""
    if not path.is_file():
        raise RegistryError(path, "model registry file not found")
    data, text = _read_yaml(path)

    server_raw = data.get("local_server") or {}
    if not isinstance(server_raw, dict) or set(server_raw) - {"host", "port"}:
        raise RegistryError(path, "allowed fields: host, port", field="local_server")
    server = LocalServerSettings(host=str(server_raw.get("host", "127.0.0.1")), port=int(server_raw.get("port", 8765)))
    if server.host not in ("127.0.0.1", "localhost", "::1"):
        raise RegistryError(path, "the bundled model server only listens on the loopback address", field="local_server.host")

    def top_level_error(message: str, field: str) -> RegistryError:
        return RegistryError(path, message, line=_top_level_line(text, "resources"), field=field)

    machine_limits = _resource_limits(data.get("resources"), "resources", top_level_error)
    defaults = {**DEFAULTS, **(data.get("defaults") or {})}
    if set(defaults) - set(DEFAULTS):
        raise RegistryError(path, f"allowed fields: {', '.join(DEFAULTS)}", field="defaults")
    sources = [(path, data, text)]
    if discovered is not None and discovered.is_file():
        sources.append((discovered, *_read_yaml(discovered)))
    specs: list[ModelSpec] = []
    for source, source_data, source_text in sources:
        lines = _entry_lines(source_text)
        for index, raw in enumerate(source_data["models"]):
            line = lines[index] if index < len(lines) else None
            spec = _entry(raw, index, line, source, server, defaults, machine_limits)
            if any(s.name == spec.name for s in specs):
                if source is path:
                    raise RegistryError(source, f"duplicate model name '{spec.name}'", line=line, field=f"models[{index}].name")
                continue
            specs.append(spec)
    return Registry(path=path, models=tuple(specs), local_server=server)


def availability(spec: ModelSpec, connect_timeout_s: float = 0.5, measured_memory_mb: tuple[float, str] | None = None) -> str | None:
    """None when the model can be called now, else the reason it is skipped (for a clear log line).

    `measured_memory_mb` is (peak resident MB, eval run id) of the model's newest memory measurement:
    with a `resources.max_memory_mb` limit, a local model whose file or measured memory exceeds it is skipped."""
    if spec.local_model:
        from model_eval.local_models import local_model_path

        try:
            weights = local_model_path(spec.local_model)
        except Exception as exc:  # noqa: BLE001 - any failure to locate weights means "skip, and say why"
            return f"local model '{spec.local_model}' is not available: {exc}"
        return _exceeds_memory_limit(spec, weights.stat().st_size / 2**20, measured_memory_mb)
    if spec.api_key_env and not os.environ.get(spec.api_key_env):
        return f"environment variable {spec.api_key_env} is not set"
    if spec.api_base:
        parsed = urlparse(spec.api_base)
        port = parsed.port or (443 if parsed.scheme == "https" else 80)
        try:
            with socket.create_connection((parsed.hostname, port), timeout=connect_timeout_s):
                pass
        except OSError as exc:
            return f"endpoint {spec.api_base} is not reachable ({exc.__class__.__name__})"
    return None


def _exceeds_memory_limit(spec: ModelSpec, file_mb: float, measured: tuple[float, str] | None) -> str | None:
    limit = spec.max_memory_mb
    if limit is None:
        return None
    if file_mb > limit:
        return f"does not fit: its model file is {file_mb:.0f} MB, above resources.max_memory_mb {limit:g} MB"
    if measured is not None and measured[0] > limit:
        return (f"does not fit: its measured peak resident memory is {measured[0]:.0f} MB (eval run {measured[1]}), "
                f"above resources.max_memory_mb {limit:g} MB")
    return None


def split_by_availability(specs: list[ModelSpec], measured_memory_mb: dict[str, tuple[float, str]] | None = None
                          ) -> tuple[list[ModelSpec], dict[str, str]]:
    """The models that can be called now, and for each other one the reason it cannot.

    `measured_memory_mb`: model -> (peak resident MB, eval run id), from `capacity.measured_memory_mb`."""
    ready, skipped = [], {}
    for spec in specs:
        reason = availability(spec, measured_memory_mb=(measured_memory_mb or {}).get(spec.name))
        if reason is None:
            ready.append(spec)
        else:
            skipped[spec.name] = reason
    return ready, skipped
