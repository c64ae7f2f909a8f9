"""deployment.yaml: initial assignments, promotion gates, rollout stages, rollback thresholds,
alerts, the schedule, model discovery and adaptive evaluation. Every bad field is reported by name and line."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from model_eval import yaml_text
from model_eval.drift import DriftSettings
from model_eval.eligibility import EligibilityRules, Pattern, default_non_chat_patterns
from model_eval.errors import InputError

DEFAULT_SCHEDULE_CRON = "0 1 * * 0"  # Sundays 01:00


@dataclass(frozen=True)
class Gates:
    min_cases: int = 10
    min_repeats: int = 2
    significance: float = 0.05             # one-sided level of the non-inferiority test (and of Holm's correction)
    non_inferiority_margin: float = 0.05   # the champion may be at most this much less accurate than the assigned model


@dataclass(frozen=True)
class Rollout:
    partial_share: float = 0.1
    min_hours_in_stage: float = 24.0
    min_production_calls: int = 200        # the candidate's logged calls in its stage before it may advance
    rollback_cooldown_hours: float = 168.0  # no re-promotion of a rolled-back model before this, unless the cases change


@dataclass(frozen=True)
class Degradation:
    max_accuracy_drop: float = 0.10
    min_success_rate: float = 0.90
    max_p95_latency_ratio: float = 2.0
    production_window_hours: float = 24.0
    min_production_calls: int = 100        # production success rate is judged only on at least this many calls
    min_latency_calls: int = 50            # production p95 is judged only on at least this many successful calls
    min_rated_calls: int = 30              # a rating comparison needs at least this many rated calls on each side
    significance: float = 0.05             # one-sided level of the production and re-evaluation tests


@dataclass(frozen=True)
class Judges:
    # Cohen's kappa a judge needs with human verdicts before it may score a task (docs/decisions.md,
    # section 10); a task's judge settings can set their own `min_kappa`.
    min_kappa: float = 0.6


@dataclass(frozen=True)
class Adaptive:
    """Adaptive evaluation (model_eval/adaptive.py, docs/decisions.md section 11): off unless turned on."""

    enabled: bool = False        # `model-eval run`, the UI and the new-model sensor; `--adaptive` / `--no-adaptive` override it
    schedule: bool = False       # the weekly re-evaluation stays exhaustive unless this is true
    alpha: float = 0.05          # the chance the bound stops a model that would in fact have qualified (or won)


ADAPTIVE_FIELDS = ("enabled", "schedule", "alpha")


def _adaptive(data: dict, path: Path) -> Adaptive:
    raw = data.get("adaptive")
    if raw is None:
        return Adaptive()
    if not isinstance(raw, dict):
        raise InputError(path, "must be a mapping (enabled, schedule, alpha)", field="adaptive")
    unknown = sorted(set(raw) - set(ADAPTIVE_FIELDS))
    if unknown:
        raise InputError(path, f"unknown setting; allowed: {', '.join(ADAPTIVE_FIELDS)}", field=f"adaptive.{unknown[0]}")
    for key in ("enabled", "schedule"):
        if key in raw and not isinstance(raw[key], bool):
            raise InputError(path, f"must be true or false, got {raw[key]!r}", field=f"adaptive.{key}")
    alpha = raw.get("alpha", Adaptive.alpha)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 < alpha < 1:
        raise InputError(path, f"must be a number strictly between 0 and 1, got {alpha!r}", field="adaptive.alpha")
    return Adaptive(enabled=raw.get("enabled", False), schedule=raw.get("schedule", False), alpha=float(alpha))


@dataclass(frozen=True)
class DiscoveryEndpoint:
    kind: str                    # "openai_compatible" | "ollama"
    api_base: str
    prefix: str
    template: dict[str, Any]
    api_key_env: str | None = None
    rules: EligibilityRules = field(default_factory=EligibilityRules)   # which listed models are evaluated


@dataclass(frozen=True)
class Deployment:
    path: Path
    initial_assignments: dict[str, str]
    gates: Gates
    rollout: Rollout
    degradation: Degradation
    alerts: Any                  # model_eval.alerts.AlertSettings
    schedule_cron: str
    schedule_timezone: str
    discovery: tuple[DiscoveryEndpoint, ...] = field(default=())
    drift: DriftSettings = field(default_factory=DriftSettings)
    judges: Judges = field(default_factory=Judges)
    adaptive: Adaptive = field(default_factory=Adaptive)


def _section(data: dict, name: str, cls, path: Path):
    raw = data.get(name) or {}
    if not isinstance(raw, dict):
        raise InputError(path, "must be a mapping", field=name)
    defaults = cls()
    values = {}
    for key, value in raw.items():
        if not hasattr(defaults, key):
            raise InputError(path, f"unknown setting; allowed: {', '.join(defaults.__dataclass_fields__)}", field=f"{name}.{key}")
        expected = type(getattr(defaults, key))
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (expected is int and not isinstance(value, int)):
            raise InputError(path, f"must be a {'whole ' if expected is int else ''}number, got {value!r}", field=f"{name}.{key}")
        if value < 0:
            raise InputError(path, "must not be negative", field=f"{name}.{key}")
        values[key] = expected(value)
    result = cls(**values)
    for key in ("partial_share", "min_success_rate", "max_accuracy_drop", "non_inferiority_margin", "min_kappa"):
        if hasattr(result, key) and not 0 <= getattr(result, key) <= 1:
            raise InputError(path, "must be between 0 and 1", field=f"{name}.{key}")
    if hasattr(result, "significance") and not 0 < result.significance < 1:
        raise InputError(path, "must be strictly between 0 and 1", field=f"{name}.significance")
    return result


def _line_of(text: str, field: str) -> int | None:
    """The line where a dotted field such as `discovery.ollama[0].api_base` stands in the YAML text."""
    node = yaml_text.compose(text)
    for part in re.findall(r"\[\d+\]|[^.\[\]]+", field):
        if part.startswith("[") and isinstance(node, yaml.SequenceNode):
            index = int(part[1:-1])
            node = node.value[index] if index < len(node.value) else None
        elif isinstance(node, yaml.MappingNode):
            node = next((value for key, value in node.value if key.value == part), None)
        else:
            node = None
        if node is None:
            return None
    return node.start_mark.line + 1


def load_deployment(path: Path, base_dir: Path) -> Deployment:
    if not path.is_file():
        raise InputError(path, "deployment file not found")
    text = path.read_text()
    try:
        data = yaml_text.parse(text) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        raise InputError(path, f"not valid YAML: {getattr(exc, 'problem', exc)}", line=None if mark is None else mark.line + 1) from None
    try:
        return _parse(data, path, base_dir)
    except InputError as exc:
        if exc.line is not None or exc.field is None:
            raise
        raise InputError(exc.path, exc.message, line=_line_of(text, exc.field), field=exc.field) from None


DISCOVERY_FIELDS = {"api_base", "prefix", "template", "api_key_env", "include", "exclude", "require_chat", "non_chat_patterns"}


def _patterns(raw: dict, key: str, where: str, path: Path) -> tuple[Pattern, ...] | None:
    """A list of regular expressions, each checked here so a bad one is reported by file, line and field."""
    if key not in raw:
        return None
    value = raw[key]
    if not isinstance(value, list) or not all(isinstance(item, str) and item for item in value):
        raise InputError(path, "must be a list of regular expressions (non-empty strings)", field=f"{where}.{key}")
    patterns = []
    for index, text in enumerate(value):
        try:
            patterns.append(Pattern.compile(text))
        except re.error as exc:
            raise InputError(path, f"'{text}' is not a valid regular expression: {exc}", field=f"{where}.{key}[{index}]") from None
    return tuple(patterns)


def _eligibility_rules(raw: dict, where: str, path: Path) -> EligibilityRules:
    require_chat = raw.get("require_chat", True)
    if not isinstance(require_chat, bool):
        raise InputError(path, "must be true or false", field=f"{where}.require_chat")
    non_chat = _patterns(raw, "non_chat_patterns", where, path)
    return EligibilityRules(include=_patterns(raw, "include", where, path) or (),
                            exclude=_patterns(raw, "exclude", where, path) or (), require_chat=require_chat,
                            non_chat_patterns=default_non_chat_patterns() if non_chat is None else non_chat)


def _parse(data, path: Path, base_dir: Path) -> Deployment:
    from model_eval.alerts import AlertSettings
    if not isinstance(data, dict):
        raise InputError(path, "must be a mapping of sections")
    known = {"initial_assignments", "gates", "rollout", "degradation", "alerts", "schedule", "discovery", "drift", "judges", "adaptive"}
    unknown = sorted(set(data) - known)
    if unknown:
        raise InputError(path, f"unknown section; allowed: {', '.join(sorted(known))}", field=unknown[0])

    assignments = data.get("initial_assignments") or {}
    if not isinstance(assignments, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in assignments.items()):
        raise InputError(path, "must map task names to model names", field="initial_assignments")

    schedule = data.get("schedule") or {}
    cron = schedule.get("cron", DEFAULT_SCHEDULE_CRON)
    if not isinstance(cron, str) or len(cron.split()) != 5:
        raise InputError(path, f"must be a 5-field cron expression, got {cron!r}", field="schedule.cron")

    endpoints = []
    discovery = data.get("discovery") or {}
    for kind in ("openai_compatible", "ollama"):
        for index, raw in enumerate(discovery.get(kind) or []):
            where = f"discovery.{kind}[{index}]"
            if not isinstance(raw, dict) or not isinstance(raw.get("api_base"), str):
                raise InputError(path, "needs an api_base URL", field=where)
            template = raw.get("template") or {}
            if not isinstance(template, dict):
                raise InputError(path, "must be a mapping of registry fields", field=f"{where}.template")
            unknown = sorted(set(raw) - DISCOVERY_FIELDS)
            if unknown:
                raise InputError(path, f"unknown field; allowed: {', '.join(sorted(DISCOVERY_FIELDS))}", field=f"{where}.{unknown[0]}")
            endpoints.append(DiscoveryEndpoint(kind=kind, api_base=raw["api_base"].rstrip("/"), prefix=str(raw.get("prefix", "")),
                                               template=template, api_key_env=raw.get("api_key_env"),
                                               rules=_eligibility_rules(raw, where, path)))

    return Deployment(
        path=path,
        initial_assignments=dict(assignments),
        gates=_section(data, "gates", Gates, path),
        rollout=_section(data, "rollout", Rollout, path),
        degradation=_section(data, "degradation", Degradation, path),
        alerts=AlertSettings.from_mapping(data.get("alerts"), path, base_dir),
        schedule_cron=cron,
        schedule_timezone=str(schedule.get("timezone", "UTC")),
        discovery=tuple(endpoints),
        drift=_section(data, "drift", DriftSettings, path),
        judges=_section(data, "judges", Judges, path),
        adaptive=_adaptive(data, path),
    )
