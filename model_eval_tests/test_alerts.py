"""Alert channels against real local receivers: what arrives, what a broken channel reports, and
that secrets never leak. Every receiver is started by the test on 127.0.0.1."""

from __future__ import annotations

import json
import logging
import time
from datetime import datetime, timezone
from pathlib import Path

import pytest

from model_eval.alerts import Alert, AlertSettings, DeliveryReport, send_alert
from model_eval.errors import InputError
from model_eval_tests.local_receivers import (
    SmtpReceiver,
    WebhookReceiver,
    closed_port,
    silent_listener,
)

WEBHOOK_ENV = "TEST_ALERTS_WEBHOOK_URL"
USER_ENV = "TEST_ALERTS_SMTP_USER"
PASSWORD_ENV = "TEST_ALERTS_SMTP_PASSWORD"
# Canaries: if either string shows up anywhere a person or a file can see it, a secret leaked.
URL_CANARY = "CANARYwebhookTOKEN7f3a9c1e"
PASSWORD_CANARY = "CANARYsmtpPASSWORD51d0b7"
SOURCE = Path("settings.yaml")


@pytest.fixture(autouse=True)
def _local_only(monkeypatch: pytest.MonkeyPatch) -> None:
    # A proxy configured on the machine must not swallow requests to the local receivers.
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    for name in (WEBHOOK_ENV, USER_ENV, PASSWORD_ENV):
        monkeypatch.delenv(name, raising=False)


def make_alert(**changes) -> Alert:
    fields = {
        "kind": "rollback",
        "title": "grading: rolled back to gemma3-270m",
        "details": "smollm2-135m fell below the gate (accuracy 0.41 < 0.60).\nPrevious champion restored.",
        "task": "grading",
        "model": "gemma3-270m",
        "severity": "critical",
        "facts": {"accuracy": 0.41, "threshold": 0.6, "cases": 120},
    }
    fields.update(changes)
    return Alert(**fields)


def settings_for(tmp_path: Path, **alerts) -> AlertSettings:
    alerts.setdefault("log_file", "alerts/alerts.log")
    return AlertSettings.from_mapping(alerts, SOURCE, tmp_path)


def smtp_section(port: int, **changes) -> dict:
    section = {
        "host": "127.0.0.1",
        "port": port,
        "sender": "model-eval@example.org",
        "recipients": ["ml-oncall@example.org", "lead@example.org"],
        "timeout_s": 2,
    }
    section.update(changes)
    return section


def log_file_records(settings: AlertSettings) -> list[dict]:
    def reject(constant: str):
        raise ValueError(f"not strict JSON: {constant}")

    assert settings.log_file is not None
    lines = settings.log_file.read_text(encoding="utf-8").splitlines()
    return [json.loads(line, parse_constant=reject) for line in lines]


def by_channel(reports: list[DeliveryReport]) -> dict[str, DeliveryReport]:
    return {report.channel: report for report in reports}


# --- delivery -----------------------------------------------------------------------------------


def test_alert_reaches_webhook_smtp_and_log_file(tmp_path, monkeypatch, log):
    with WebhookReceiver() as hook, SmtpReceiver(credentials=("alerts-bot", PASSWORD_CANARY)) as mail:
        monkeypatch.setenv(WEBHOOK_ENV, hook.url(f"/services/{URL_CANARY}"))
        monkeypatch.setenv(USER_ENV, "alerts-bot")
        monkeypatch.setenv(PASSWORD_ENV, PASSWORD_CANARY)
        settings = settings_for(
            tmp_path,
            webhook_url_env=WEBHOOK_ENV,
            smtp=smtp_section(mail.port, username_env=USER_ENV, password_env=PASSWORD_ENV),
        )
        alert = make_alert()
        reports = send_alert(alert, settings, log)

    assert [r.channel for r in reports] == ["log_file", "webhook", "smtp"]
    assert all(r.ok and not r.skipped and r.error is None for r in reports), reports

    # Webhook: one Slack-compatible JSON POST.
    assert len(hook.requests) == 1
    request = hook.requests[0]
    assert request.path == f"/services/{URL_CANARY}"
    assert request.headers["Content-Type"].startswith("application/json")
    body = request.json()
    assert body["text"] == f"[CRITICAL] {alert.title}\n{alert.details}"
    assert body["alert"]["kind"] == "rollback" and body["alert"]["facts"]["cases"] == 120

    # SMTP: logged in, right envelope, subject and plain-text body.
    assert len(mail.messages) == 1
    received = mail.messages[0]
    assert received.auth_user == "alerts-bot"
    assert received.mail_from == "model-eval@example.org"
    assert received.rcpt_tos == ["ml-oncall@example.org", "lead@example.org"]
    assert received.message["Subject"] == f"[model_eval] [CRITICAL] {alert.title}"
    assert received.message["To"] == "ml-oncall@example.org, lead@example.org"
    text = received.body()
    assert alert.details in text
    assert "task: grading" in text and "model: gemma3-270m" in text
    assert "accuracy: 0.41" in text and "threshold: 0.6" in text

    # Log file: the same alert, every field.
    [record] = log_file_records(settings)
    assert record["title"] == alert.title and record["severity"] == "critical"
    assert "sent by smtp" in log.text()


def test_log_file_gets_one_strict_json_line_per_alert(tmp_path):
    settings = AlertSettings.from_mapping(None, SOURCE, tmp_path)
    # The default channel: warehouse/alerts.log under the base directory, created on first use.
    assert settings.log_file == tmp_path / "warehouse" / "alerts.log"
    assert settings.webhook_url_env is None and settings.smtp is None

    first = make_alert(kind="run_failed", title="run 42 failed", severity="warning", task=None, model=None)
    second = make_alert(kind="degradation", facts={"accuracy": float("nan"), "at": datetime(2024, 1, 2)})
    for alert in (first, second):
        assert send_alert(alert, settings) == [DeliveryReport(channel="log_file", ok=True, note=str(settings.log_file))]

    records = log_file_records(settings)
    assert len(records) == 2
    assert set(records[0]) == {"kind", "title", "details", "task", "model", "severity", "facts", "created_at"}
    assert records[0]["kind"] == "run_failed" and records[0]["task"] is None
    assert datetime.fromisoformat(records[0]["created_at"]).tzinfo == timezone.utc
    # Figures that strict JSON cannot hold are kept as text rather than breaking the line.
    assert records[1]["facts"] == {"accuracy": "nan", "at": "2024-01-02 00:00:00"}


# --- broken channels ----------------------------------------------------------------------------


def test_webhook_answering_500_is_reported_and_other_channels_still_work(tmp_path, monkeypatch, log):
    with WebhookReceiver(status=500) as hook, SmtpReceiver() as mail:
        monkeypatch.setenv(WEBHOOK_ENV, hook.url())
        settings = settings_for(tmp_path, webhook_url_env=WEBHOOK_ENV, smtp=smtp_section(mail.port))
        reports = by_channel(send_alert(make_alert(), settings, log))

    assert len(hook.requests) == 1  # it was tried
    assert not reports["webhook"].ok and "HTTP 500" in reports["webhook"].error
    assert reports["smtp"].ok and len(mail.messages) == 1
    assert reports["log_file"].ok and len(log_file_records(settings)) == 1
    expected = "Alert 'grading: rolled back to gemma3-270m' (rollback) was NOT delivered by webhook: the webhook answered HTTP 500"
    assert ("warning", expected) in log.lines


def test_webhook_redirect_is_a_failure_not_followed(tmp_path, monkeypatch):
    with WebhookReceiver(status=302) as hook:
        monkeypatch.setenv(WEBHOOK_ENV, hook.url())
        reports = by_channel(send_alert(make_alert(), settings_for(tmp_path, webhook_url_env=WEBHOOK_ENV)))
    assert not reports["webhook"].ok and "HTTP 302" in reports["webhook"].error
    assert [r.path for r in hook.requests] == ["/hook"]  # /elsewhere was never asked


def test_closed_ports_are_reported_and_log_file_still_works(tmp_path, monkeypatch, log):
    monkeypatch.setenv(WEBHOOK_ENV, f"http://127.0.0.1:{closed_port()}/hook")
    settings = settings_for(tmp_path, webhook_url_env=WEBHOOK_ENV, smtp=smtp_section(closed_port()))

    reports = by_channel(send_alert(make_alert(), settings, log))

    assert not reports["webhook"].ok and "refused" in reports["webhook"].error.lower()
    assert not reports["smtp"].ok and "refused" in reports["smtp"].error.lower()
    assert reports["log_file"].ok and len(log_file_records(settings)) == 1
    warnings = [msg for level, msg in log.lines if level == "warning"]
    assert len(warnings) == 2 and "by webhook" in warnings[0] and "by smtp" in warnings[1]


def test_hung_servers_time_out_quickly(tmp_path, monkeypatch):
    with silent_listener() as hook_port, silent_listener() as smtp_port:
        monkeypatch.setenv(WEBHOOK_ENV, f"http://127.0.0.1:{hook_port}/hook")
        settings = settings_for(
            tmp_path, webhook_url_env=WEBHOOK_ENV, timeout_s=0.3, smtp=smtp_section(smtp_port, timeout_s=0.3)
        )
        started = time.monotonic()
        reports = by_channel(send_alert(make_alert(), settings))
        elapsed = time.monotonic() - started

    assert not reports["webhook"].ok and "timed out" in reports["webhook"].error
    assert not reports["smtp"].ok and "timed out" in reports["smtp"].error
    assert reports["log_file"].ok
    assert elapsed < 3


def test_unwritable_log_file_is_reported_not_raised(tmp_path, log):
    (tmp_path / "alerts").mkdir()
    (tmp_path / "alerts" / "alerts.log").mkdir()  # a directory where the file should be
    [report] = send_alert(make_alert(), settings_for(tmp_path), log)
    assert report.channel == "log_file" and not report.ok and "IsADirectoryError" in report.error
    assert log.lines[0][0] == "warning"


def test_unset_or_empty_webhook_env_skips_the_channel(tmp_path, monkeypatch, log):
    settings = settings_for(tmp_path, webhook_url_env=WEBHOOK_ENV)
    for value in (None, "", "   "):
        if value is not None:
            monkeypatch.setenv(WEBHOOK_ENV, value)
        report = by_channel(send_alert(make_alert(), settings, log))["webhook"]
        assert report.ok and report.skipped and report.error is None
        assert WEBHOOK_ENV in report.note
    assert f"Alert channel webhook skipped: environment variable {WEBHOOK_ENV} is unset or empty" in log.text()


def test_webhook_url_must_be_http(tmp_path, monkeypatch):
    monkeypatch.setenv(WEBHOOK_ENV, f"file:///etc/{URL_CANARY}")
    report = by_channel(send_alert(make_alert(), settings_for(tmp_path, webhook_url_env=WEBHOOK_ENV)))["webhook"]
    assert not report.ok and "http:// or https://" in report.error and URL_CANARY not in report.error


def test_starttls_never_falls_back_to_plain_text(tmp_path):
    with SmtpReceiver() as mail:  # offers no STARTTLS
        settings = settings_for(tmp_path, smtp=smtp_section(mail.port, starttls=True))
        report = by_channel(send_alert(make_alert(), settings))["smtp"]
    assert not report.ok and "STARTTLS" in report.error
    assert mail.messages == []


def test_missing_smtp_credentials_are_named(tmp_path, monkeypatch):
    monkeypatch.setenv(USER_ENV, "alerts-bot")
    with SmtpReceiver(credentials=("alerts-bot", PASSWORD_CANARY)) as mail:
        settings = settings_for(tmp_path, smtp=smtp_section(mail.port, username_env=USER_ENV, password_env=PASSWORD_ENV))
        report = by_channel(send_alert(make_alert(), settings))["smtp"]
    assert not report.ok and PASSWORD_ENV in report.error and USER_ENV not in report.error
    assert mail.messages == []


# --- secrets ------------------------------------------------------------------------------------


def test_secrets_never_appear_in_reports_logs_or_log_file(tmp_path, monkeypatch, log, caplog):
    monkeypatch.setenv(USER_ENV, "alerts-bot")
    # An alert that quotes both secrets (say, a pasted config): they must not reach the log file either.
    leaky = make_alert(details=f"config: url=.../services/{URL_CANARY} password={PASSWORD_CANARY}")
    reports: list[DeliveryReport] = []

    def send(url: str, smtp_port: int, password: str, to_log=log) -> None:
        monkeypatch.setenv(WEBHOOK_ENV, url)
        monkeypatch.setenv(PASSWORD_ENV, password)
        settings = settings_for(
            tmp_path,
            webhook_url_env=WEBHOOK_ENV,
            smtp=smtp_section(smtp_port, username_env=USER_ENV, password_env=PASSWORD_ENV),
        )
        reports.extend(send_alert(leaky, settings, to_log))

    with WebhookReceiver(status=500) as hook, SmtpReceiver(credentials=("alerts-bot", "the-right-one")) as mail:
        # Webhook fails with 500; SMTP refuses the (canary) password.
        send(hook.url(f"/services/{URL_CANARY}"), mail.port, PASSWORD_CANARY)
        # http.client quotes the URL path in its error for a path with a space.
        send(hook.url(f"/services/{URL_CANARY} x"), mail.port, PASSWORD_CANARY)
        # Both ports closed; this time through the standard logging module.
        with caplog.at_level(logging.INFO, logger="model_eval.alerts"):
            send(f"http://127.0.0.1:{closed_port()}/services/{URL_CANARY}", closed_port(), PASSWORD_CANARY, None)

    # The password really was sent, and refused: twice per send, as smtplib tries PLAIN, then LOGIN.
    assert mail.failed_logins == 4
    failures = [r for r in reports if not r.ok]
    assert {r.channel for r in failures} == {"webhook", "smtp"} and len(failures) == 6
    assert any("[redacted]" in r.error for r in failures)  # the path-with-a-space error was scrubbed
    visible = {
        "reports": repr(reports),
        "log": log.text(),
        "logging": caplog.text,
        "log file": (tmp_path / "alerts" / "alerts.log").read_text(encoding="utf-8"),
    }
    assert "NOT delivered" in visible["logging"] and len(log_file_records(settings_for(tmp_path))) == 3
    for where, text in visible.items():
        assert URL_CANARY not in text, f"webhook token leaked into {where}"
        assert PASSWORD_CANARY not in text, f"SMTP password leaked into {where}"


# --- settings -----------------------------------------------------------------------------------


def test_settings_parse_and_defaults(tmp_path):
    settings = AlertSettings.from_mapping(
        {
            "log_file": "logs/a.log",
            "webhook_url_env": "SLACK_WEBHOOK_URL",
            "timeout_s": 3,
            "smtp": {"host": "mail.example.org", "sender": "a@example.org", "recipients": "b@example.org"},
        },
        SOURCE,
        tmp_path,
    )
    assert settings.log_file == tmp_path / "logs" / "a.log"
    assert settings.timeout_s == 3.0
    assert settings.smtp is not None
    assert settings.smtp.port == 25 and settings.smtp.recipients == ("b@example.org",)
    assert settings.smtp.timeout_s == 3.0 and settings.smtp.starttls is False and settings.smtp.username_env is None

    absolute = tmp_path / "elsewhere.log"
    assert AlertSettings.from_mapping({"log_file": str(absolute)}, SOURCE, Path("/unused")).log_file == absolute
    assert AlertSettings.from_mapping({"log_file": None}, SOURCE, tmp_path).log_file is None
    assert AlertSettings.from_mapping({}, SOURCE, tmp_path).log_file == tmp_path / "warehouse" / "alerts.log"


GOOD_SMTP = {"host": "h", "sender": "a@x.org", "recipients": ["b@x.org"]}


@pytest.mark.parametrize(
    ("data", "field"),
    [
        (["not", "a", "mapping"], "alerts"),
        ({"log_fiel": "x.log"}, "alerts.log_fiel"),
        ({"log_file": ""}, "alerts.log_file"),
        ({"log_file": 3}, "alerts.log_file"),
        ({"timeout_s": 0}, "alerts.timeout_s"),
        ({"timeout_s": "5"}, "alerts.timeout_s"),
        ({"timeout_s": 10_000}, "alerts.timeout_s"),
        ({"webhook_url_env": "has space"}, "alerts.webhook_url_env"),
        ({"smtp": "mail.example.org"}, "alerts.smtp"),
        ({"smtp": {**GOOD_SMTP, "hots": "h"}}, "alerts.smtp.hots"),
        ({"smtp": {**GOOD_SMTP, "host": ""}}, "alerts.smtp.host"),
        ({"smtp": {**GOOD_SMTP, "port": 70000}}, "alerts.smtp.port"),
        ({"smtp": {**GOOD_SMTP, "port": True}}, "alerts.smtp.port"),
        ({"smtp": {**GOOD_SMTP, "sender": "nobody"}}, "alerts.smtp.sender"),
        ({"smtp": {**GOOD_SMTP, "recipients": []}}, "alerts.smtp.recipients"),
        ({"smtp": {**GOOD_SMTP, "recipients": ["ok@x.org", 5]}}, "alerts.smtp.recipients"),
        ({"smtp": {**GOOD_SMTP, "starttls": "yes"}}, "alerts.smtp.starttls"),
        ({"smtp": {**GOOD_SMTP, "username_env": "U"}}, "alerts.smtp.password_env"),
        ({"smtp": {**GOOD_SMTP, "password_env": "P"}}, "alerts.smtp.username_env"),
        ({"smtp": {**GOOD_SMTP, "timeout_s": -1}}, "alerts.smtp.timeout_s"),
    ],
)
def test_settings_errors_name_the_field(tmp_path, data, field):
    with pytest.raises(InputError) as caught:
        AlertSettings.from_mapping(data, SOURCE, tmp_path)
    assert caught.value.field == field
    assert caught.value.path == str(SOURCE)
    assert f"field '{field}'" in str(caught.value)


def test_a_secret_pasted_into_an_env_name_field_is_not_echoed(tmp_path):
    with pytest.raises(InputError) as caught:
        AlertSettings.from_mapping({"webhook_url_env": f"https://hooks.example.org/services/{URL_CANARY}"}, SOURCE, tmp_path)
    assert caught.value.field == "alerts.webhook_url_env"
    assert "NAME of an environment variable" in str(caught.value) and URL_CANARY not in str(caught.value)


def test_alert_validates_severity_and_keeps_utc():
    with pytest.raises(ValueError, match="severity"):
        make_alert(severity="urgent")
    naive = make_alert(created_at=datetime(2024, 5, 1, 12, 0))
    assert naive.created_at == datetime(2024, 5, 1, 12, 0, tzinfo=timezone.utc)
    assert make_alert().created_at.tzinfo == timezone.utc


def test_a_password_with_json_special_characters_is_redacted_in_the_log_file(tmp_path, monkeypatch):
    password = f'pa"ss\\{PASSWORD_CANARY}'
    monkeypatch.setenv(USER_ENV, "alerts-bot")
    monkeypatch.setenv(PASSWORD_ENV, password)
    settings = settings_for(
        tmp_path, smtp=smtp_section(closed_port(), username_env=USER_ENV, password_env=PASSWORD_ENV)
    )
    send_alert(make_alert(details=f"password={password}"), settings)
    written = settings.log_file.read_text(encoding="utf-8")
    assert PASSWORD_CANARY not in written and json.loads(written)["details"] == "password=[redacted]"
