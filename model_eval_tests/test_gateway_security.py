"""The gateway's security: tokens and their levels, the bind rules, body and rate limits, and provider keys
that never leave the server. Real uvicorn over real HTTP; the provider is the test double FakeOpenAIServer."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from model_eval.gateway.app import GatewaySettings
from model_eval.gateway.security import Access, GatewayConfigError, TokenBucket, check_bind
from model_eval.settings import PROJECT_ROOT
from model_eval_tests.fake_openai_server import FakeOpenAIServer, always, ok, server_error
from model_eval_tests.gateway_harness import (
    READ_TOKEN,
    WRITE_TOKEN,
    ThreadedGateway,
    http,
    log_lines,
    make_project,
    publish,
    serve_process,
)
from model_eval_tests.test_security import CANARY

MESSAGES = [{"role": "user", "content": "hello"}]
READS = ["/v1/tasks", "/v1/tasks/grading", "/v1/tasks/grading/leaderboard", "/v1/models/steady/stats", "/docs", "/openapi.json"]
WRITES = [("/v1/chat/completions", {"model": "task/grading", "messages": MESSAGES}),
          ("/v1/feedback", {"call_id": "0b7e0f3c-2f61-4bb3-9d5b-5f0b1ad1f0a1", "thumbs": True})]


@pytest.fixture
def tokens(monkeypatch):
    monkeypatch.setenv("MODEL_EVAL_API_TOKEN", WRITE_TOKEN)
    monkeypatch.setenv("MODEL_EVAL_API_READ_TOKEN", READ_TOKEN)
    return Access.from_env()


def test_every_endpoint_but_health_needs_a_token_and_the_read_token_cannot_write(tmp_path, tokens):
    with FakeOpenAIServer() as fake:
        paths = make_project(tmp_path / "p", fake.api_base)
        publish(paths, {"grading": {"model": "steady"}})
        with ThreadedGateway(paths, tokens) as gw:
            assert http("GET", gw.base_url + "/v1/health").status == 200
            for path in READS:
                for token in (None, "wrong-token-wrong-token-wrong", WRITE_TOKEN[:-1]):
                    reply = http("GET", gw.base_url + path, token=token)
                    assert reply.status == 401 and reply.headers["www-authenticate"] == "Bearer", (path, token)
                    assert reply.json()["error"]["type"] == "authentication_error"
                assert http("GET", gw.base_url + path, token=READ_TOKEN).status == 200, path
                assert http("GET", gw.base_url + path, token=WRITE_TOKEN).status == 200, path
            for path, body in WRITES:
                assert http("POST", gw.base_url + path, body).status == 401
                assert http("POST", gw.base_url + path, body, token=READ_TOKEN).status == 403
                assert http("POST", gw.base_url + path, body, token=WRITE_TOKEN).status == 200
            docs = http("GET", gw.base_url + "/docs", token=READ_TOKEN).body.decode()
            assert "/v1/chat/completions" in docs   # the OpenAPI document is inlined in the page
        # Only the authorised call reached a model, and only the authorised rating was written.
        assert sorted(l["event"] for l in log_lines(paths)) == ["call", "rating"] and fake.total == 1


def test_the_lean_chat_route_answers_as_fastapis_route_does(tmp_path, tokens):
    """LeanChatRoute serves chat completions ahead of FastAPI; with it off, FastAPI's declared route does.
    Both must check the token and the body alike and give the same answers."""
    url = "/v1/chat/completions"
    body = {"model": "task/grading", "messages": MESSAGES}
    outcomes = {}
    with FakeOpenAIServer() as fake:
        for lean in (True, False):
            paths = make_project(tmp_path / str(lean), fake.api_base)
            publish(paths, {"grading": {"model": "steady"}})
            with ThreadedGateway(paths, tokens, GatewaySettings(rate_per_s=0, lean_chat_route=lean)) as gw:
                replies = [http("POST", gw.base_url + url, body), http("POST", gw.base_url + url, body, token=READ_TOKEN),
                           http("POST", gw.base_url + url, {**body, "temperature": 9}, token=WRITE_TOKEN),
                           http("POST", gw.base_url + url, raw=b"{not json", token=WRITE_TOKEN),
                           http("POST", gw.base_url + url, body, token=WRITE_TOKEN)]
            answered = replies[-1]
            [line] = log_lines(paths)
            assert line["call_id"] == answered.headers["x-model-eval-call-id"] and line["model"] == "steady"
            outcomes[lean] = ([(r.status, r.headers.get("www-authenticate"), r.json()["error"]) for r in replies[:-1]],
                              answered.status, answered.headers["x-model-eval-model"],
                              answered.json()["choices"][0]["message"], answered.headers["content-type"])
    assert outcomes[True] == outcomes[False]
    assert [status for status, _, _ in outcomes[True][0]] == [401, 403, 400, 400] and outcomes[True][1] == 200


def test_the_bind_rules_refuse_every_exposed_configuration(monkeypatch):
    no_tokens = Access(None, None)
    with pytest.raises(GatewayConfigError, match="no token configured"):
        check_bind("127.0.0.1", no_tokens, allow_remote=False)
    with pytest.raises(GatewayConfigError, match="loopback"):
        check_bind("0.0.0.0", Access(None, None, no_auth=True), allow_remote=True)
    with_token = Access(b"x" * 32, None)
    with pytest.raises(GatewayConfigError, match="--allow-remote"):
        check_bind("0.0.0.0", with_token, allow_remote=False)
    check_bind("0.0.0.0", with_token, allow_remote=True)
    check_bind("127.0.0.1", Access(None, None, no_auth=True), allow_remote=False)
    with pytest.raises(GatewayConfigError, match="no token configured"):
        check_bind("0.0.0.0", no_tokens, allow_remote=True)   # remote needs a token, whatever the flag
    monkeypatch.setenv("MODEL_EVAL_API_TOKEN", "short")
    with pytest.raises(GatewayConfigError, match="shorter"):
        Access.from_env()


def test_the_cli_refuses_to_start_without_a_token():
    env = {k: v for k, v in os.environ.items() if not k.startswith("MODEL_EVAL_API")}
    done = subprocess.run([sys.executable, "-m", "model_eval.cli", "serve", "--port", "0"], env=env, cwd=PROJECT_ROOT,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "no token configured" in done.stderr
    done = subprocess.run([sys.executable, "-m", "model_eval.cli", "serve", "--host", "0.0.0.0", "--no-auth", "--port", "0"],
                          env=env, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "loopback" in done.stderr


def test_body_size_and_rate_limits(tmp_path):
    with FakeOpenAIServer() as fake:
        paths = make_project(tmp_path / "p", fake.api_base)
        publish(paths, {"grading": {"model": "steady"}})
        settings = GatewaySettings(max_body_bytes=2000, rate_per_s=1.0, burst=3)
        with ThreadedGateway(paths, settings=settings) as gw:
            big = {"model": "task/grading", "messages": [{"role": "user", "content": "x" * 3000}]}
            reply = http("POST", gw.base_url + "/v1/chat/completions", big)
            assert reply.status == 413 and reply.json()["error"]["param"] == "body"
            statuses = [http("POST", gw.base_url + "/v1/chat/completions", {"model": "task/grading", "messages": MESSAGES})
                        for _ in range(4)]
            # The 413 took one token of the burst of 3: two calls pass, the rest wait for the refill.
            assert [r.status for r in statuses] == [200, 200, 429, 429]
            assert int(statuses[-1].headers["retry-after"]) >= 1
            assert http("GET", gw.base_url + "/v1/health").status == 200   # health is never rate limited
    assert fake.total == 2


def test_the_token_bucket_refills_at_its_rate():
    bucket = TokenBucket(rate=2.0, burst=2)
    assert [bucket.take("a", now=0.0) for _ in range(3)] == [0.0, 0.0, pytest.approx(0.5)]
    assert bucket.take("b", now=0.0) == 0.0            # per client
    assert bucket.take("a", now=0.5) == 0.0 and bucket.take("a", now=0.5) > 0


def test_provider_keys_never_leave_the_server(tmp_path, monkeypatch):
    monkeypatch.setenv("GATEWAY_CANARY_KEY", CANARY)
    # The provider echoes the key it received in its error message, as some do.
    with FakeOpenAIServer(script=always(server_error(401, "invalid key", echo_key=True))) as failing, \
            FakeOpenAIServer(script=always(ok("fine"))) as working:
        canary_model = {"name": "keyed", "model": "openai/fake", "api_base": failing.api_base, "api_key_env": "GATEWAY_CANARY_KEY",
                        "price_per_million": {"input": 1.0, "output": 1.0}, "provider": "test-double"}
        paths = make_project(tmp_path / "p", working.api_base, [canary_model,
                                                                {**canary_model, "name": "keyed-ok", "api_base": working.api_base}])
        publish(paths, {"grading": {"model": "keyed"}, "ok": {"model": "keyed-ok"}})
        with ThreadedGateway(paths) as gw:
            replies = [http("POST", gw.base_url + "/v1/chat/completions", {"model": model, "messages": MESSAGES, **extra})
                       for model in ("task/grading", "keyed", "task/ok") for extra in ({}, {"stream": True})]
            reads = [http("GET", gw.base_url + path) for path in READS + ["/v1/health", "/v1/models/keyed/stats"]]
        assert failing.records[0].label == "401" and working.total == 2   # the key was sent to the provider...
    assert [r.status for r in replies] == [502, 502, 502, 502, 200, 200]
    texts = [r.body.decode() + str(r.headers) for r in replies + reads]
    texts += [f.read_text() for f in paths.call_log_dir.glob("*.jsonl")]
    assert all(CANARY not in text and CANARY[:12] not in text for text in texts)   # ...and is nowhere else
    assert any("[REDACTED]" in l["error"] or "***" in l["error"] for l in log_lines(paths) if l["error"])


def test_a_client_cannot_pick_its_rate_limit_key_with_x_forwarded_for(tmp_path):
    # A real `model-eval serve` (uvicorn's own settings are under test): the limit keys on the peer address,
    # so five requests from one address claiming five different forwarded addresses share one bucket of 2.
    paths = make_project(tmp_path / "p", "http://127.0.0.1:9/v1")
    service, base = serve_process(paths, tmp_path, "--rate-limit", "0.001", "--rate-burst", "2")
    try:
        statuses = [http("GET", base + "/v1/tasks", headers={"X-Forwarded-For": f"203.0.113.{i}"}).status for i in range(5)]
    finally:
        service.kill()
        service.wait(10)
    assert statuses[-3:] == [429, 429, 429], statuses
