"""The gateway's calls: routing by task, shadow and partial stages, pass-through, streaming, completion
mode, the litellm path, feedback and logging, over real HTTP (uvicorn) to the scripted test double
FakeOpenAIServer (standing in for hosted providers), with a real DuckDB file."""

from __future__ import annotations

import asyncio
import json

import openai
import pytest

from model_eval import warehouse
from model_eval.production_log import ingest_call_logs
from model_eval.registry import load_registry
from model_eval.routed_calls import RoutedCaller
from model_eval.router import CallLog, Router, bucket_for
from model_eval_tests.fake_openai_server import FakeOpenAIServer, always, hang, ok, route, server_error
from model_eval_tests.gateway_harness import ThreadedGateway, http, log_lines, make_project, publish, wait_for

MESSAGES = [{"role": "system", "content": "Grade it."}, {"role": "user", "content": "Is 2+2=4 right?"}]


@pytest.fixture
def fake():
    with FakeOpenAIServer(script=route([("slow-shadow", lambda info: hang(0.8) if info.payload.get("temperature") == 0.1
                                         else ok("PASS", 20, 3))], default=lambda info: ok("PASS right", 20, 3))) as server:
        yield server


@pytest.fixture
def project(tmp_path, fake):
    paths = make_project(tmp_path / "project", fake.api_base)
    publish(paths, {"grading": {"model": "steady"},
                    "split": {"model": "steady", "candidate": "challenger", "stage": "partial", "share": 0.5},
                    "trial": {"model": "steady", "candidate": "challenger", "stage": "shadow"},
                    "employer": {"model": "base"},
                    "other": {"model": "via-litellm"}})
    return paths


@pytest.fixture
def gateway(project):
    with ThreadedGateway(project) as gw:
        yield gw


def client(gateway) -> openai.OpenAI:
    return openai.OpenAI(base_url=gateway.base_url + "/v1", api_key="unused-without-auth", max_retries=0)


def test_a_task_is_answered_by_its_assigned_model_and_every_call_is_logged_with_cost(gateway, project, fake):
    raw = client(gateway).chat.completions.with_raw_response.create(model="task/grading", messages=MESSAGES)
    answer = raw.parse()
    call_id = raw.headers["x-model-eval-call-id"]
    assert answer.choices[0].message.content == "PASS right" and answer.model == "steady"
    assert answer.usage.prompt_tokens == 20 and answer.usage.completion_tokens == 3
    sent = fake.records[-1]
    assert sent.endpoint == "chat" and sent.last_message == "Is 2+2=4 right?"
    [line] = log_lines(project)
    assert line["call_id"] == call_id and line["task"] == "grading" and line["model"] == "steady"
    assert line["role"] == "primary" and line["stage"] == "full" and line["success"] is True
    assert (line["input_tokens"], line["output_tokens"]) == (20, 3)
    assert line["cost_usd"] == pytest.approx((20 * 1.0 + 3 * 2.0) / 1e6)   # the registry's prices
    assert line["latency_ms"] > 0


def test_partial_splits_by_the_request_key_deterministically_and_at_random_without_one(gateway):
    keys = [f"user-{i}" for i in range(24)]
    served = {}
    for i, key in enumerate(keys):
        # Half of the keys go as the `user` field, half as the header: both are the request key.
        body = {"model": "task/split", "messages": MESSAGES, **({"user": key} if i % 2 else {})}
        headers = {} if i % 2 else {"x-model-eval-request-key": key}
        reply = http("POST", gateway.base_url + "/v1/chat/completions", body, headers=headers)
        assert reply.status == 200
        served[key] = reply.headers["x-model-eval-model"]
    # Exactly the router's documented rule: the candidate answers keys whose bucket is under the share.
    assert served == {k: "challenger" if bucket_for("split", k) < 0.5 else "steady" for k in keys}
    again = http("POST", gateway.base_url + "/v1/chat/completions", {"model": "task/split", "messages": MESSAGES, "user": keys[3]})
    assert again.headers["x-model-eval-model"] == served[keys[3]]
    # No key: each request draws anew, so both models show up (probability of one model only: 2 * 0.5**30).
    anonymous = {http("POST", gateway.base_url + "/v1/chat/completions", {"model": "task/split", "messages": MESSAGES})
                 .headers["x-model-eval-model"] for _ in range(30)}
    assert anonymous == {"steady", "challenger"}


def test_in_shadow_the_candidate_is_called_off_the_request_path_and_only_logged(gateway, project, fake):
    # The candidate (temperature 0.1) hangs 0.8 s on this message; the user must not wait for it.
    messages = [{"role": "user", "content": "slow-shadow please"}]
    reply = http("POST", gateway.base_url + "/v1/chat/completions", {"model": "task/trial", "messages": messages})
    call_id = reply.headers["x-model-eval-call-id"]
    assert reply.status == 200 and reply.json()["choices"][0]["message"]["content"] == "PASS"
    assert reply.headers["x-model-eval-model"] == "steady"
    at_answer = log_lines(project)
    assert [(l["model"], l["role"]) for l in at_answer] == [("steady", "primary")]   # the shadow is still running
    assert any(r.last_message == "slow-shadow please" and r.label == "hang" for r in fake.records)
    lines = wait_for(lambda: (found := log_lines(project)) and len(found) == 2 and found)
    shadow = next(l for l in lines if l["role"] == "shadow")
    assert shadow["model"] == "challenger" and shadow["stage"] == "shadow" and shadow["success"] is True
    assert shadow["call_id"] != call_id and shadow["latency_ms"] >= 800


def test_a_registry_model_passes_through_unrouted_and_any_other_name_is_refused(gateway, project):
    answer = client(gateway).chat.completions.create(model="challenger", messages=MESSAGES)
    assert answer.model == "challenger"
    [line] = log_lines(project)
    assert line["task"] is None and line["stage"] == "direct" and line["model"] == "challenger"
    for name in ("task/nonexistent", "gpt-unknown"):
        with pytest.raises(openai.NotFoundError) as info:
            client(gateway).chat.completions.create(model=name, messages=MESSAGES)
        assert info.value.body["param"] == "model"
    assert len(log_lines(project)) == 1


def test_streaming_through_the_openai_client_logs_the_call_before_the_end(gateway, project):
    stream = client(gateway).chat.completions.create(model="task/grading", messages=MESSAGES, stream=True,
                                                    stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "PASS right"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].usage.completion_tokens == 3 and chunks[-1].usage.prompt_tokens == 20
    [line] = log_lines(project)
    assert line["success"] and line["output_tokens"] == 3 and line["cost_usd"] == pytest.approx(26 / 1e6)
    assert chunks[0].id == f"chatcmpl-{line['call_id']}"


def test_a_task_routed_to_a_base_model_is_asked_in_completion_mode_with_its_template(gateway, fake):
    answer = client(gateway).chat.completions.create(model="task/employer", messages=MESSAGES)
    assert answer.choices[0].message.content == "PASS right"
    sent = fake.records[-1]
    assert sent.endpoint == "text" and sent.last_message == "Grade it.\n\nQ: Is 2+2=4 right?\nA:"
    # Streaming works for it too, over /v1/completions.
    pieces = [c.choices[0].delta.content or "" for c in
              client(gateway).chat.completions.create(model="task/employer", messages=MESSAGES, stream=True) if c.choices]
    assert "".join(pieces) == "PASS right" and fake.records[-1].endpoint == "text"


def test_a_model_with_client_litellm_is_called_through_litellm(gateway, project, fake):
    answer = client(gateway).chat.completions.create(model="task/other", messages=MESSAGES)
    assert answer.choices[0].message.content == "PASS right"
    [line] = log_lines(project)
    assert line["model"] == "via-litellm" and line["success"] and line["cost_usd"] == pytest.approx(23 / 1e6)
    assert fake.records[-1].endpoint == "chat"


def test_feedback_reaches_production_calls_and_loading_stays_idempotent(gateway, project):
    ids = [http("POST", gateway.base_url + "/v1/chat/completions", {"model": "task/grading", "messages": MESSAGES})
           .headers["x-model-eval-call-id"] for _ in range(3)]
    for call_id, body in zip(ids, [{"thumbs": True}, {"thumbs": False, "comment": "wrong grade"}, {"rating": 0.25}]):
        reply = http("POST", gateway.base_url + "/v1/feedback", {"call_id": call_id, **body})
        assert reply.status == 200 and reply.headers["x-model-eval-call-id"] == call_id
    # A later rating replaces the earlier one.
    http("POST", gateway.base_url + "/v1/feedback", {"call_id": ids[2], "rating": 0.75})
    with warehouse.write_connection(project.warehouse_file) as conn:
        assert ingest_call_logs(project.call_log_dir, conn) == 3
        assert ingest_call_logs(project.call_log_dir, conn) == 0
        rows = dict((r[0], r[1:]) for r in conn.execute(
            "SELECT call_id, rating, rating_comment, cost_usd, stage FROM production_calls").fetchall())
    assert rows[ids[0]][0] == 1.0 and rows[ids[1]][:2] == (0.0, "wrong grade") and rows[ids[2]][0] == 0.75
    assert all(r[2] == pytest.approx(26 / 1e6) and r[3] == "full" for r in rows.values())


@pytest.mark.parametrize("body, field", [
    ({"messages": MESSAGES}, "model"),
    ({"model": "task/grading"}, "messages"),
    ({"model": "task/grading", "messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
    ({"model": "task/grading", "messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    ({"model": "task/grading", "messages": MESSAGES, "temperature": 7}, "temperature"),
    ({"model": "task/grading", "messages": MESSAGES, "max_tokens": 0}, "max_tokens"),
    ({"model": "task/grading", "messages": MESSAGES, "tools": [{"type": "function"}]}, "tools"),
    ({"model": "task/grading", "messages": MESSAGES, "temprature": 0.1}, "temprature"),
    ({"model": "task/grading", "messages": MESSAGES, "stream": "yes"}, "stream"),
])
def test_bad_requests_get_a_4xx_json_error_naming_the_field(gateway, project, body, field):
    reply = http("POST", gateway.base_url + "/v1/chat/completions", body)
    assert 400 <= reply.status < 500
    assert reply.json()["error"]["param"] == field and field in reply.json()["error"]["message"]
    assert log_lines(project) == []   # refused before any model was called


@pytest.mark.parametrize("body, field", [
    ({"call_id": "not-an-id", "thumbs": True}, "call_id"),
    ({"call_id": "0b7e0f3c-2f61-4bb3-9d5b-5f0b1ad1f0a1", "rating": 3}, "rating"),
    ({"call_id": "0b7e0f3c-2f61-4bb3-9d5b-5f0b1ad1f0a1"}, "rating"),
    ({"call_id": "0b7e0f3c-2f61-4bb3-9d5b-5f0b1ad1f0a1", "thumbs": "up"}, "thumbs"),
    ({"call_id": "0b7e0f3c-2f61-4bb3-9d5b-5f0b1ad1f0a1", "thumbs": True, "stars": 5}, "stars"),
])
def test_bad_feedback_is_refused_naming_the_field(gateway, body, field):
    reply = http("POST", gateway.base_url + "/v1/feedback", body)
    assert reply.status == 400 and reply.json()["error"]["param"] == field


def test_upstream_failures_are_reported_and_logged_as_failures(tmp_path):
    with FakeOpenAIServer(script=always(server_error(503, "overloaded"))) as down:
        paths = make_project(tmp_path / "p", down.api_base)
        publish(paths, {"grading": {"model": "steady"}})
        with ThreadedGateway(paths) as gw:
            reply = http("POST", gw.base_url + "/v1/chat/completions", {"model": "task/grading", "messages": MESSAGES})
            streamed = http("POST", gw.base_url + "/v1/chat/completions",
                            {"model": "task/grading", "messages": MESSAGES, "stream": True})
    assert reply.status == 502 and reply.json()["error"]["code"] is None and "503" in reply.json()["error"]["message"]
    assert streamed.status == 502   # nothing was streamed yet: an ordinary error response
    lines = log_lines(paths)
    assert [l["success"] for l in lines] == [False, False]
    assert lines[0]["call_id"] == reply.headers["x-model-eval-call-id"] and "overloaded" in lines[0]["error"]


def test_the_in_process_router_uses_the_same_core(project, fake):
    """No gateway: an application routes, calls and logs with RoutedCaller, the code the gateway runs."""
    async def main():
        caller = RoutedCaller(Router(project.snapshot_file), CallLog(project.call_log_dir), load_registry(project.registry_file))
        async with caller:
            decision = caller.decide("task/trial", "user-7")
            result = await caller.complete(decision, MESSAGES)
            shadow = await caller.shadow(decision, MESSAGES)
        return result, shadow

    result, shadow = asyncio.run(main())
    assert result.answer.text == "PASS right" and result.model == "steady" and shadow.model == "challenger"
    lines = {l["call_id"]: l for l in log_lines(project)}
    assert lines[result.call_id]["role"] == "primary" and lines[shadow.call_id]["role"] == "shadow"
    assert lines[result.call_id]["cost_usd"] == pytest.approx(26 / 1e6)
    assert json.dumps(lines)   # plain JSON lines, loadable by production_calls
