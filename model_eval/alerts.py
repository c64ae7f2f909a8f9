"""Alert channels: tell people when a run fails, a promotion gate fails, or a task's model changes.

Three channels, each optional:

* log file - one JSON object per line, appended (the default channel: always available);
* webhook  - a Slack-compatible incoming webhook (POST {"text": ...});
* SMTP     - a plain-text email.

`send_alert` tries every configured channel and returns one `DeliveryReport` per channel. An
alert is a side effect of the pipeline, never its purpose, so a broken channel is logged and
reported but NEVER raises: the others still get the alert and the run carries on.

Secrets (the webhook URL, which embeds a token, and the SMTP password) are read only from
environment variables named in the settings, and are redacted from every error message, log
line and log-file record this module writes.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import smtplib
import ssl
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from email.message import EmailMessage
from email.utils import format_datetime, make_msgid
from pathlib import Path
from typing import Any, Protocol

from model_eval.errors import InputError

SEVERITIES = ("info", "warning", "critical")

DEFAULT_LOG_FILE = "warehouse/alerts.log"
DEFAULT_TIMEOUT_S = 5.0
# A hung channel must not hold up a pipeline for long; a bigger value is almost certainly a typo.
MAX_TIMEOUT_S = 120.0
# Chat messages are for a glance; the full details stay in the log file.
_MAX_WEBHOOK_TEXT = 3000
_REDACTED = "[redacted]"
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")

_logger = logging.getLogger(__name__)


class AlertLog(Protocol):
    """What send_alert needs from a logger: a logging.Logger, Dagster's context.log, or a test double."""

    def info(self, msg: str) -> None: ...

    def warning(self, msg: str) -> None: ...


@dataclass(frozen=True)
class Alert:
    kind: str  # "run_failed" | "gate_failed" | "promotion" | "rollback" | "degradation" | ...
    title: str  # one line
    details: str  # a few lines for people
    task: str | None = None
    model: str | None = None
    severity: str = "info"  # info | warning | critical
    facts: dict[str, Any] = field(default_factory=dict)  # small JSON-able figures
    created_at: datetime = field(default_factory=lambda: datetime.now(timezone.utc))

    def __post_init__(self) -> None:
        # A wrong severity is a bug in the caller, so it fails where the alert is built, not later
        # inside send_alert (which must not raise).
        if self.severity not in SEVERITIES:
            raise ValueError(f"Alert severity must be one of {', '.join(SEVERITIES)}, got {self.severity!r}")
        # Every timestamp this module writes is UTC; a naive datetime is taken to be UTC already.
        created = self.created_at
        created = created.replace(tzinfo=timezone.utc) if created.tzinfo is None else created.astimezone(timezone.utc)
        object.__setattr__(self, "created_at", created)

    def to_record(self) -> dict[str, Any]:
        """Every field, JSON-safe (the log-file line and the webhook's structured copy)."""
        return {
            "kind": self.kind,
            "title": self.title,
            "details": self.details,
            "task": self.task,
            "model": self.model,
            "severity": self.severity,
            "facts": _json_safe(self.facts),
            "created_at": self.created_at.isoformat(),
        }


@dataclass(frozen=True)
class SmtpSettings:
    host: str
    port: int
    sender: str
    recipients: tuple[str, ...]
    username_env: str | None = None  # NAME of the env var holding the login user
    password_env: str | None = None  # NAME of the env var holding the password (a secret)
    starttls: bool = False
    timeout_s: float = DEFAULT_TIMEOUT_S


@dataclass(frozen=True)
class AlertSettings:
    log_file: Path | None  # None: no log-file channel
    webhook_url_env: str | None  # NAME of the env var holding the webhook URL (the URL is a secret)
    smtp: SmtpSettings | None
    timeout_s: float = DEFAULT_TIMEOUT_S

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any] | None, source: Path, base_dir: Path) -> AlertSettings:
        """Build settings from the `alerts:` section of a settings file.

        Missing section: only the log file, at warehouse/alerts.log. `log_file: null` turns the
        log file off. Errors raise InputError naming the field ("alerts.smtp.port").
        """
        if data is None:
            data = {}
        if not isinstance(data, Mapping):
            raise InputError(source, "must be a mapping (log_file, webhook_url_env, smtp, timeout_s)", field="alerts")
        _reject_unknown(data, ("log_file", "webhook_url_env", "smtp", "timeout_s"), "alerts", source)

        timeout_s = _timeout(data.get("timeout_s", DEFAULT_TIMEOUT_S), "alerts.timeout_s", source)

        log_file: Path | None = None
        raw_log = data.get("log_file", DEFAULT_LOG_FILE)
        if raw_log is not None:
            if not isinstance(raw_log, str) or not raw_log.strip():
                raise InputError(source, "must be a file path, or null to turn the log file off", field="alerts.log_file")
            log_file = Path(raw_log).expanduser()
            if not log_file.is_absolute():
                log_file = Path(base_dir) / log_file

        webhook_url_env = _env_name(data.get("webhook_url_env"), "alerts.webhook_url_env", source)

        smtp = None
        if data.get("smtp") is not None:
            smtp = _smtp_settings(data["smtp"], source, timeout_s)

        return cls(log_file=log_file, webhook_url_env=webhook_url_env, smtp=smtp, timeout_s=timeout_s)


@dataclass(frozen=True)
class DeliveryReport:
    channel: str  # "log_file" | "webhook" | "smtp"
    ok: bool  # False only when the channel was tried and failed
    error: str | None = None  # why it failed, secrets redacted
    skipped: bool = False  # configured but switched off on this machine (e.g. webhook env var unset)
    note: str | None = None  # why it was skipped, or where the alert went


def send_alert(alert: Alert, settings: AlertSettings, log: AlertLog | None = None) -> list[DeliveryReport]:
    """Send `alert` to every configured channel; never raises. Returns one report per channel."""
    log = log or _logger
    # Read every channel's secret before any channel runs, so each channel's errors, and a secret
    # pasted into an alert's own text, are scrubbed of all of them.
    secrets = _Secrets(settings)
    reports: list[DeliveryReport] = []
    channels = []
    if settings.log_file is not None:
        channels.append(("log_file", _send_log_file))
    if settings.webhook_url_env is not None:
        channels.append(("webhook", _send_webhook))
    if settings.smtp is not None:
        channels.append(("smtp", _send_smtp))

    what = secrets.redact(f"Alert '{alert.title}' ({alert.kind})")
    for name, send in channels:
        try:
            report = send(alert, settings, secrets)
        except Exception as exc:  # noqa: BLE001 - a broken channel must never fail the pipeline
            message = secrets.redact(f"{type(exc).__name__}: {exc}")
            report = DeliveryReport(channel=name, ok=False, error=message)
        reports.append(report)
        if not report.ok:
            log.warning(f"{what} was NOT delivered by {name}: {report.error}")
        elif report.skipped:
            log.info(f"Alert channel {name} skipped: {report.note}")
        else:
            log.info(f"{what} sent by {name}")
    return reports


# --- channels ---------------------------------------------------------------------------------


def _send_log_file(alert: Alert, settings: AlertSettings, secrets: _Secrets) -> DeliveryReport:
    assert settings.log_file is not None
    # Redacted field by field, before encoding: JSON escaping could otherwise hide a secret from
    # a plain text search (a quote or backslash in a password).
    line = json.dumps(secrets.redact_values(alert.to_record()), ensure_ascii=False, allow_nan=False)
    settings.log_file.parent.mkdir(parents=True, exist_ok=True)
    # One write of one line in append mode: concurrent runs appending to the same file do not
    # interleave inside a line.
    with settings.log_file.open("a", encoding="utf-8") as handle:
        handle.write(line + "\n")
    return DeliveryReport(channel="log_file", ok=True, note=str(settings.log_file))


def _send_webhook(alert: Alert, settings: AlertSettings, secrets: _Secrets) -> DeliveryReport:
    assert settings.webhook_url_env is not None
    url = os.environ.get(settings.webhook_url_env, "").strip()
    if not url:
        return DeliveryReport(
            channel="webhook", ok=True, skipped=True,
            note=f"environment variable {settings.webhook_url_env} is unset or empty",
        )
    # Only http(s): urllib would otherwise happily open file:// or ftp:// URLs. The URL itself is
    # never quoted back, since it carries the token.
    if urllib.parse.urlsplit(url).scheme not in ("http", "https"):
        return DeliveryReport(
            channel="webhook", ok=False,
            error=f"the URL in {settings.webhook_url_env} must start with http:// or https://",
        )

    text = f"[{alert.severity.upper()}] {alert.title}\n{alert.details}"
    if len(text) > _MAX_WEBHOOK_TEXT:
        text = text[: _MAX_WEBHOOK_TEXT - 1] + "…"
    # "text" is what Slack (and Mattermost, Rocket.Chat, ...) show; "alert" is a structured copy for
    # receivers that want the figures, and is ignored by Slack.
    body = json.dumps({"text": text, "alert": alert.to_record()}, ensure_ascii=False, allow_nan=False).encode("utf-8")
    request = urllib.request.Request(
        url, data=body, method="POST", headers={"Content-Type": "application/json; charset=utf-8"}
    )
    try:
        with _NO_REDIRECTS.open(request, timeout=settings.timeout_s) as response:
            status = response.status
            response.read(4096)  # drain a little so the server sees a complete exchange
    except urllib.error.HTTPError as exc:
        status = exc.code
        exc.close()
    if not 200 <= status < 300:
        return DeliveryReport(channel="webhook", ok=False, error=f"the webhook answered HTTP {status}")
    return DeliveryReport(channel="webhook", ok=True, note=f"HTTP {status}")


class _RefuseRedirects(urllib.request.HTTPRedirectHandler):
    """A redirect is a failure (non-2xx): following one would re-send the alert somewhere unreviewed."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        return None  # urllib then raises HTTPError with the 3xx code


_NO_REDIRECTS = urllib.request.build_opener(_RefuseRedirects)


def _send_smtp(alert: Alert, settings: AlertSettings, secrets: _Secrets) -> DeliveryReport:
    smtp = settings.smtp
    assert smtp is not None
    username = password = None
    if smtp.username_env is not None:
        username = os.environ.get(smtp.username_env)
        password = os.environ.get(smtp.password_env or "")
        # Unlike the webhook, a configured login that is missing is an error: sending without it
        # would be refused by the server anyway, and the person must learn which variable to set.
        missing = [name for name, value in ((smtp.username_env, username), (smtp.password_env, password)) if not value]
        if missing:
            return DeliveryReport(channel="smtp", ok=False, error=f"environment variable(s) {', '.join(missing)} unset or empty")

    message = EmailMessage()
    message["Subject"] = f"[model_eval] [{alert.severity.upper()}] {_one_line(alert.title)}"
    message["From"] = smtp.sender
    message["To"] = ", ".join(smtp.recipients)
    message["Date"] = format_datetime(alert.created_at)
    # make_msgid() without a domain looks up this machine's FQDN, which can hang on DNS.
    message["Message-ID"] = make_msgid(domain=smtp.sender.rpartition("@")[2] or "model-eval.invalid")
    message.set_content(_email_body(alert))

    with smtplib.SMTP(smtp.host, smtp.port, timeout=smtp.timeout_s) as client:
        if smtp.starttls:
            # Never falls back to plain text: starttls() raises if the server does not offer it.
            client.starttls(context=ssl.create_default_context())
        if username is not None:
            client.login(username, password)
        refused = client.send_message(message, to_addrs=list(smtp.recipients))
    if refused:
        return DeliveryReport(channel="smtp", ok=False, error=f"recipients refused: {', '.join(sorted(refused))}")
    return DeliveryReport(channel="smtp", ok=True, note=f"sent to {len(smtp.recipients)} recipient(s)")


def _email_body(alert: Alert) -> str:
    lines = [alert.details.rstrip(), ""]
    lines += [f"{label}: {value}" for label, value in (("kind", alert.kind), ("task", alert.task), ("model", alert.model))
              if value is not None]
    lines.append(f"severity: {alert.severity}")
    lines.append(f"at: {alert.created_at.isoformat()}")
    if alert.facts:
        lines += ["", "facts:"]
        lines += [f"  {key}: {json.dumps(value, ensure_ascii=False)}" for key, value in _json_safe(alert.facts).items()]
    return "\n".join(lines) + "\n"


# --- secrets ----------------------------------------------------------------------------------


class _Secrets:
    """The secret values this send touches, so any text leaving the module can be scrubbed of them."""

    def __init__(self, settings: AlertSettings) -> None:
        self._values: set[str] = set()
        if settings.webhook_url_env:
            url = os.environ.get(settings.webhook_url_env, "").strip()
            if url:
                self._add_url(url)
        if settings.smtp is not None and settings.smtp.password_env:
            password = os.environ.get(settings.smtp.password_env, "")
            if password:
                self._values.add(password)

    def _add_url(self, url: str) -> None:
        # Library errors may quote the URL in part (just the path, or the host and path), so the
        # whole URL, its path and query, and each long piece of them (where tokens live) are all
        # treated as secret. Short pieces ("services", "hooks") are ordinary words: left alone.
        self._values.add(url)
        try:
            parts = urllib.parse.urlsplit(url)
        except ValueError:  # e.g. a malformed IPv6 host: the whole URL is still redacted
            return
        for piece in (parts.path, parts.query, parts.netloc.rpartition("@")[0], parts.netloc + parts.path):
            if piece.strip("/"):
                self._values.add(piece)
        for token in re.split(r"[^A-Za-z0-9._~%+-]", parts.path + "?" + parts.query):
            if len(token) >= 12:
                self._values.add(token)

    def redact(self, text: str) -> str:
        # Longest first, so a URL is replaced whole rather than leaving its prefix behind.
        for value in sorted(self._values, key=len, reverse=True):
            text = text.replace(value, _REDACTED)
        return text

    def redact_values(self, value: Any) -> Any:
        """Every string inside a JSON-safe record, redacted."""
        if isinstance(value, str):
            return self.redact(value)
        if isinstance(value, dict):
            return {self.redact(k): self.redact_values(v) for k, v in value.items()}
        if isinstance(value, list):
            return [self.redact_values(v) for v in value]
        return value


# --- settings validation ----------------------------------------------------------------------


def _smtp_settings(data: Any, source: Path, default_timeout: float) -> SmtpSettings:
    allowed = ("host", "port", "sender", "recipients", "username_env", "password_env", "starttls", "timeout_s")
    if not isinstance(data, Mapping):
        raise InputError(source, f"must be a mapping ({', '.join(allowed)})", field="alerts.smtp")
    _reject_unknown(data, allowed, "alerts.smtp", source)

    def text(name: str) -> str:
        value = data.get(name)
        if not isinstance(value, str) or not value.strip():
            raise InputError(source, "required: a non-empty string", field=f"alerts.smtp.{name}")
        return value.strip()

    host = text("host")
    sender = text("sender")
    if "@" not in sender:
        raise InputError(source, "must be an email address", field="alerts.smtp.sender")

    port = data.get("port", 25)
    # bool is an int in Python; `port: yes` is a mistake, not port 1.
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise InputError(source, "must be a whole number from 1 to 65535", field="alerts.smtp.port")

    recipients = data.get("recipients")
    if isinstance(recipients, str):
        recipients = [recipients]
    if (not isinstance(recipients, list) or not recipients
            or not all(isinstance(r, str) and "@" in r for r in recipients)):
        raise InputError(source, "must be a non-empty list of email addresses", field="alerts.smtp.recipients")

    username_env = _env_name(data.get("username_env"), "alerts.smtp.username_env", source)
    password_env = _env_name(data.get("password_env"), "alerts.smtp.password_env", source)
    if (username_env is None) != (password_env is None):
        missing = "password_env" if password_env is None else "username_env"
        raise InputError(source, "username_env and password_env go together: set both or neither", field=f"alerts.smtp.{missing}")

    starttls = data.get("starttls", False)
    if not isinstance(starttls, bool):
        raise InputError(source, "must be true or false", field="alerts.smtp.starttls")

    return SmtpSettings(
        host=host,
        port=port,
        sender=sender,
        recipients=tuple(r.strip() for r in recipients),
        username_env=username_env,
        password_env=password_env,
        starttls=starttls,
        timeout_s=_timeout(data.get("timeout_s", default_timeout), "alerts.smtp.timeout_s", source),
    )


def _reject_unknown(data: Mapping, allowed: tuple[str, ...], prefix: str, source: Path) -> None:
    for key in data:
        if key not in allowed:
            raise InputError(source, f"unknown field; allowed: {', '.join(allowed)}", field=f"{prefix}.{key}")


def _timeout(value: Any, name: str, source: Path) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= MAX_TIMEOUT_S:
        raise InputError(source, f"must be a number of seconds above 0 and at most {MAX_TIMEOUT_S:g}", field=name)
    return float(value)


def _env_name(value: Any, name: str, source: Path) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not _ENV_NAME.fullmatch(value):
        # Deliberately does not quote the value: the usual mistake is pasting the secret itself here.
        raise InputError(
            source,
            "must be the NAME of an environment variable (letters, digits, _), not the secret itself",
            field=name,
        )
    return value


# --- small helpers ----------------------------------------------------------------------------


def _json_safe(value: Any) -> Any:
    """Facts as strict JSON: NaN/inf become strings (strict parsers reject them), unknown types their str()."""
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return str(value)


def _one_line(text: str) -> str:
    # Email headers may not contain line breaks (EmailMessage raises), and a title should be one line.
    return " ".join(text.split())
