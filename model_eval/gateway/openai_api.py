"""The OpenAI chat-completions wire format: checking a request, and shaping answers and stream events.

Checked by hand rather than by a pydantic model on the route: a call's budget here is a couple of
milliseconds, and the errors must name the field the way the rest of model_eval does
(`messages[2].content`), in OpenAI's error shape so the openai client shows them as they are.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from typing import Any

from model_eval.http_client import Answer

ROLES = ("system", "user", "assistant")
# Sampling parameters passed on to the model (the task's evaluated parameters win on conflict).
PASSED_PARAMS = {"temperature": (0.0, 2.0), "top_p": (0.0, 1.0), "presence_penalty": (-2.0, 2.0),
                 "frequency_penalty": (-2.0, 2.0)}
INT_PARAMS = ("max_tokens", "max_completion_tokens", "seed")
# Accepted and not passed on: they change nothing about the answer's content.
IGNORED = ("n", "stream_options", "user", "logprobs", "metadata", "store", "service_tier")
UNSUPPORTED = ("tools", "tool_choice", "functions", "function_call", "parallel_tool_calls", "audio", "modalities",
               "prediction", "logit_bias", "top_logprobs")
UNSUPPORTED_SET = frozenset(UNSUPPORTED)
KNOWN = {"model", "messages", "stream", "stop", "response_format", *PASSED_PARAMS, *INT_PARAMS, *IGNORED, *UNSUPPORTED}


class RequestError(ValueError):
    """A request the gateway cannot serve; `field` names the JSON field (OpenAI's `param`)."""

    def __init__(self, field: str | None, message: str, status: int = 400):
        super().__init__(message)
        self.field = field
        self.status = status


@dataclass(frozen=True)
class ChatRequest:
    model: str
    messages: list[dict[str, str]]
    params: dict[str, Any] = field(default_factory=dict)
    stream: bool = False
    include_usage: bool = False
    user: str | None = None


def _text_of(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):   # the parts form: only text parts can be sent to a text model
        parts = []
        for index, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise RequestError(f"{where}[{index}]", "only text parts ({\"type\": \"text\", \"text\": ...}) are supported")
            parts.append(part["text"])
        return "".join(parts)
    raise RequestError(where, f"must be a string, got {type(content).__name__}")


def parse_chat_request(body: bytes) -> ChatRequest:
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise RequestError("body", f"is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise RequestError("body", "must be a JSON object")
    if not KNOWN.issuperset(data):
        raise RequestError(sorted(set(data) - KNOWN)[0], "unknown field for /v1/chat/completions")
    if not UNSUPPORTED_SET.isdisjoint(data):   # set checks first: most requests name none of these fields
        for name in UNSUPPORTED:
            if data.get(name) not in (None, [], {}):
                raise RequestError(name, "is not supported by the gateway (models are evaluated on text answers only)")
    model = data.get("model")
    if not isinstance(model, str) or not model:
        raise RequestError("model", "is required: task/<task> (routed) or a registry model name")
    messages = data.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError("messages", "is required: a non-empty list of {role, content}")
    checked = []
    for index, message in enumerate(messages):
        where = f"messages[{index}]"
        if not isinstance(message, dict):
            raise RequestError(where, "must be an object with role and content")
        role = message.get("role")
        if role == "developer":   # OpenAI's newer name for the system role
            role = "system"
        if role not in ROLES:
            raise RequestError(f"{where}.role", f"must be one of {', '.join(ROLES)}, got {role!r}")
        checked.append({"role": role, "content": _text_of(message.get("content"), f"{where}.content")})
    params: dict[str, Any] = {}
    for name, (low, high) in PASSED_PARAMS.items():
        value = data.get(name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not low <= value <= high:
            raise RequestError(name, f"must be a number between {low:g} and {high:g}, got {value!r}")
        params[name] = value
    for name in INT_PARAMS:
        value = data.get(name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or (name != "seed" and value < 1):
            raise RequestError(name, f"must be a{' positive' if name != 'seed' else 'n'} integer, got {value!r}")
        params[name] = value
    stop = data.get("stop")
    if stop is not None:
        # A completion-mode model keeps its template's stop sequences (they end its answer where it was evaluated).
        if isinstance(stop, str):
            stop = [stop]
        if not isinstance(stop, list) or not 1 <= len(stop) <= 4 or not all(isinstance(s, str) and s for s in stop):
            raise RequestError("stop", "must be a string or a list of 1 to 4 non-empty strings")
        params["stop"] = stop
    response_format = data.get("response_format")
    if response_format is not None:
        if not isinstance(response_format, dict) or not isinstance(response_format.get("type"), str):
            raise RequestError("response_format", "must be an object with a type (e.g. {\"type\": \"json_object\"})")
        params["response_format"] = response_format
    if "max_completion_tokens" in params:   # the newer name; OpenAI-compatible servers know max_tokens
        params["max_tokens"] = params.pop("max_completion_tokens")
    if data.get("n") not in (None, 1):
        raise RequestError("n", "only n=1 is supported")
    stream = data.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise RequestError("stream", f"must be true or false, got {stream!r}")
    options = data.get("stream_options") or {}
    if not isinstance(options, dict):
        raise RequestError("stream_options", "must be an object")
    user = data.get("user")
    if user is not None and not isinstance(user, str):
        raise RequestError("user", f"must be a string, got {type(user).__name__}")
    return ChatRequest(model=model, messages=checked, params=params, stream=stream,
                       include_usage=bool(options.get("include_usage")), user=user or None)


def _usage(answer: Answer) -> dict[str, int] | None:
    if answer.input_tokens is None and answer.output_tokens is None:
        return None
    prompt, completion = answer.input_tokens or 0, answer.output_tokens or 0
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def completion_body(call_id: str, model: str, answer: Answer) -> bytes:
    """A chat.completion object; `model` is the registry model that answered."""
    body = {"id": f"chatcmpl-{call_id}", "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": answer.text or ""},
                         "logprobs": None, "finish_reason": answer.finish_reason or "stop"}],
            "usage": _usage(answer)}
    return json.dumps(body, ensure_ascii=False).encode()


def chunk_event(call_id: str, model: str, created: int, delta: dict[str, Any], finish_reason: str | None) -> bytes:
    body = {"id": f"chatcmpl-{call_id}", "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]}
    return b"data: " + json.dumps(body, ensure_ascii=False).encode() + b"\n\n"


def usage_event(call_id: str, model: str, created: int, answer: Answer) -> bytes:
    body = {"id": f"chatcmpl-{call_id}", "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [], "usage": _usage(answer)}
    return b"data: " + json.dumps(body).encode() + b"\n\n"


def error_event(message: str, code: str | None) -> bytes:
    return b"data: " + json.dumps({"error": {"message": message, "type": "upstream_error", "param": None,
                                             "code": code}}).encode() + b"\n\n"


DONE_EVENT = b"data: [DONE]\n\n"
