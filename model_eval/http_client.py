"""The lean path: OpenAI-compatible endpoints called over one reused aiohttp session per model per run.

litellm costs about 5-9 ms of CPU a call on this project's machines (request building, its logging
and cost hooks, the OpenAI SDK's models), which caps a 2-core run near 150 calls/s. An
OpenAI-compatible endpoint (OpenAI, vLLM, llama.cpp, Ollama's /v1, most gateways) needs none of
that: the body is `prompts.ModelInput.openai_body`, the answer is `choices[0]` and `usage`.

Failures raise `EndpointError` subclasses named like litellm's exceptions for the same fault, so the
`error_class` written to the warehouse does not depend on the path (the engine's tests compare the
two paths fault by fault). The engine's retry rules read `status_code` and `headers` (Retry-After)
from these exceptions as they do from litellm's.
"""

from __future__ import annotations

import json
import re
import urllib.parse
import urllib.request
from dataclasses import dataclass
from typing import Any, AsyncIterator, Mapping

import aiohttp

from model_eval.plain_http import PlainHTTPPool
from model_eval.prompts import ModelInput
from model_eval.registry import ModelSpec

OPENAI_API_BASE = "https://api.openai.com/v1"


@dataclass(frozen=True)
class Answer:
    """What the engine keeps of one successful call, whichever path made it."""

    text: str | None
    finish_reason: str | None
    input_tokens: int | None
    output_tokens: int | None


# ---------------------------------------------------------------- errors, named as litellm names them
class EndpointError(Exception):
    """A failed call on the lean path; `status_code` and `headers` feed the engine's retry rules."""

    def __init__(self, message: str, status_code: int | None = None, headers: Mapping[str, str] | None = None):
        super().__init__(message)
        self.status_code = status_code
        self.headers = headers


class APIError(EndpointError):
    """Any status without a more specific class (403, 409, 5xx other than 500/502/503/504...)."""


class BadRequestError(EndpointError):
    pass


class ContextWindowExceededError(BadRequestError):
    pass


class ContentPolicyViolationError(BadRequestError):
    pass


class AuthenticationError(EndpointError):
    pass


class NotFoundError(EndpointError):
    pass


class Timeout(EndpointError):  # noqa: N818 - litellm's name, so error_class is the same on both paths
    pass


class RateLimitError(EndpointError):
    pass


class InternalServerError(EndpointError):
    pass


class BadGatewayError(EndpointError):
    pass


class ServiceUnavailableError(EndpointError):
    pass


BY_STATUS: dict[int, type[EndpointError]] = {
    400: BadRequestError, 401: AuthenticationError, 404: NotFoundError, 408: Timeout, 422: BadRequestError,
    429: RateLimitError, 500: InternalServerError, 502: BadGatewayError, 503: ServiceUnavailableError, 504: Timeout,
}
# What providers write when the prompt is too long or was refused; litellm reclassifies these too.
CONTEXT_WINDOW_MARKERS = ("maximum context length", "context_length_exceeded", "exceeds the available context size",
                          "maximum context limit", "longer than the model's context length", "exceed context limit")
CONTENT_POLICY_MARKERS = ("content_policy_violation", "violating our usage policy", "rejected as a result of the safety system")
RATE_LIMIT_WORDS = re.compile(r"rate[\s_-]*limit")


def error_for(status: int, body: str, headers: Mapping[str, str] | None = None) -> EndpointError:
    """The exception for an HTTP error reply: by the body's wording first (as litellm does), then by status."""
    lowered = body.lower()
    if status == 429 or RATE_LIMIT_WORDS.search(lowered):
        kind: type[EndpointError] = RateLimitError
    elif any(marker in lowered for marker in CONTEXT_WINDOW_MARKERS):
        kind = ContextWindowExceededError
    elif any(marker in lowered for marker in CONTENT_POLICY_MARKERS):
        kind = ContentPolicyViolationError
    else:
        kind = BY_STATUS.get(status, APIError)
    return kind(f"{kind.__name__}: HTTP {status} - {_server_message(body)}", status, headers)


def _server_message(body: str) -> str:
    """The provider's own message (`{"error": {"message": ...}}`), else the body's start."""
    try:
        parsed = json.loads(body)
    except ValueError:
        return body[:500]
    error = parsed.get("error") if isinstance(parsed, dict) else None
    if isinstance(error, dict) and isinstance(error.get("message"), str):
        return error["message"]
    if isinstance(error, str):
        return error
    return body[:500]


def parse_answer(body: bytes, mode: str) -> Answer:
    """A 2xx body as an Answer; a body that is not a completion is an InternalServerError (retried)."""
    try:
        parsed = json.loads(body)
    except ValueError:
        raise InternalServerError(f"InternalServerError: invalid response body, not JSON: {body[:200]!r}", 500) from None
    if not isinstance(parsed, dict):
        raise InternalServerError(f"InternalServerError: invalid response body: {body[:200]!r}", 500)
    choices = parsed.get("choices")
    if choices is None and "error" in parsed:
        # Some servers answer 200 with an error object; litellm reports it as a bad request.
        raise BadRequestError(f"BadRequestError: {_server_message(body.decode(errors='replace'))}", 422)
    if not isinstance(choices, list):
        raise InternalServerError(f"InternalServerError: 'choices' is not a list in {body[:200]!r}", 500)
    return _answer_of(parsed, mode, "message")


def _answer_of(parsed: dict, mode: str, chat_key: str) -> Answer:
    """The first choice's text (a chat answer's `message` or a stream piece's `delta`; `text` in completion mode) and usage."""
    usage = parsed.get("usage") if isinstance(parsed.get("usage"), dict) else {}
    text = finish = None
    choices = parsed.get("choices")
    if isinstance(choices, list) and choices and isinstance(choices[0], dict):
        first = choices[0]
        if mode == "chat":
            message = first.get(chat_key)
            text = message.get("content") if isinstance(message, dict) else None
        else:
            text = first.get("text")
        finish = first.get("finish_reason")
    return Answer(text, finish, usage.get("prompt_tokens"), usage.get("completion_tokens"))


# ---------------------------------------------------------------- the client
def proxy_for(url: str) -> str | None:
    """The proxy HTTP(S)_PROXY / NO_PROXY give for `url`, as litellm's httpx client would use.

    Decided once per run: aiohttp's own `trust_env` looks the environment (and ~/.netrc) up again on
    every request; measured here (6 x 1,000 requests each way, alternated), that took bare aiohttp
    from 0.13-0.22 to 0.38-0.70 ms of CPU a request."""
    parts = urllib.parse.urlsplit(url)
    proxies = urllib.request.getproxies()
    if parts.scheme not in proxies or urllib.request.proxy_bypass(parts.hostname or ""):
        return None
    return proxies[parts.scheme]


def endpoint_of(spec: ModelSpec) -> tuple[str, str]:
    """(base URL, model id the endpoint knows): the model string after its provider prefix."""
    base = (spec.api_base or OPENAI_API_BASE).rstrip("/")
    _, _, model_id = spec.litellm_model.partition("/")
    return base, model_id or spec.litellm_model


class OpenAICompatibleClient:
    """One aiohttp session (a pool of kept-alive connections) for one model's run; for a plain
    `http://` endpoint without a proxy, non-streamed calls go over `plain_http` instead (a quarter of
    the CPU a call; HTTPS, proxies and streams keep aiohttp).

    Use as `async with OpenAICompatibleClient(spec) as client: answer = await client(model_input, params)`.
    The timeout applies per connect and per read, as httpx applies litellm's; the engine's own
    deadline bounds the whole call.
    """

    def __init__(self, spec: ModelSpec):
        self.spec = spec
        self.base, self.model_id = endpoint_of(spec)
        self.key = spec.api_key()
        self.proxy = proxy_for(self.base)
        self._session: aiohttp.ClientSession | None = None
        self._plain: PlainHTTPPool | None = None

    async def __aenter__(self) -> "OpenAICompatibleClient":
        headers = {"Content-Type": "application/json"}
        if self.key:
            headers["Authorization"] = f"Bearer {self.key}"
        timeout = aiohttp.ClientTimeout(total=None, connect=self.spec.timeout_s, sock_connect=self.spec.timeout_s,
                                        sock_read=self.spec.timeout_s)
        # No connection cap here: the engine's adaptive limit decides how many calls are in flight.
        connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=30)
        self._session = aiohttp.ClientSession(headers=headers, timeout=timeout, connector=connector)
        parts = urllib.parse.urlsplit(self.base)
        if parts.scheme == "http" and self.proxy is None and not parts.query and not parts.username:
            self._plain = PlainHTTPPool(self.base, headers, self.spec.timeout_s)
        return self

    async def __aexit__(self, *exc) -> None:
        if self._plain is not None:
            self._plain.close()
            self._plain = None
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def __call__(self, model_input: ModelInput, params: Mapping[str, Any]) -> Answer:
        if self._session is None:
            raise RuntimeError("use the client inside `async with`")
        payload = json.dumps(model_input.openai_body(self.model_id, params), ensure_ascii=False).encode()
        try:
            if self._plain is not None:
                status, headers, body = await self._plain.post(model_input.endpoint_path, payload)
            else:
                async with self._session.post(self.base + model_input.endpoint_path, data=payload,
                                              proxy=self.proxy) as response:
                    body = await response.read()
                    status = response.status
                    headers = response.headers
        except TimeoutError:   # connect and read timeouts (the engine's deadline cancels instead)
            raise Timeout(f"Timeout: no answer within {self.spec.timeout_s:g} s", 408) from None
        except (aiohttp.ClientError, OSError) as exc:   # refused, reset, truncated: litellm reports these as server errors
            raise InternalServerError(f"InternalServerError: connection error: {exc.__class__.__name__}: {exc}", 500) from None
        if status >= 400:
            raise error_for(status, body.decode(errors="replace"), headers)
        return parse_answer(body, model_input.mode)

    async def stream(self, model_input: ModelInput, params: Mapping[str, Any]) -> AsyncIterator[Answer]:
        """The answer as server-sent events: one `Answer` per piece (its `text` is the new text only).

        `stream_options.include_usage` asks for the token counts in a last event; servers that ignore
        it (llama-cpp-python does) send none, and the pieces carry None counts.
        """
        if self._session is None:
            raise RuntimeError("use the client inside `async with`")
        body = {**model_input.openai_body(self.model_id, params), "stream": True, "stream_options": {"include_usage": True}}
        try:
            async with self._session.post(self.base + model_input.endpoint_path, data=json.dumps(body, ensure_ascii=False).encode(),
                                          proxy=self.proxy) as response:
                if response.status >= 400:
                    raise error_for(response.status, (await response.read()).decode(errors="replace"), response.headers)
                async for line in response.content:
                    piece = parse_stream_line(line, model_input.mode)
                    if piece is STREAM_DONE:
                        return
                    if piece is not None:
                        yield piece
        except TimeoutError:
            raise Timeout(f"Timeout: no answer within {self.spec.timeout_s:g} s", 408) from None
        except aiohttp.ClientError as exc:
            raise InternalServerError(f"InternalServerError: connection error: {exc.__class__.__name__}: {exc}", 500) from None


STREAM_DONE = Answer(None, None, None, None)   # the `data: [DONE]` sentinel


def parse_stream_line(line: bytes, mode: str) -> Answer | None:
    """One line of an SSE body: a piece of the answer, STREAM_DONE, or None (blank lines, comments, no choice)."""
    line = line.strip()
    if not line.startswith(b"data:"):
        return None
    data = line[5:].strip()
    if data == b"[DONE]":
        return STREAM_DONE
    try:
        event = json.loads(data)
    except ValueError:
        raise InternalServerError(f"InternalServerError: invalid stream event, not JSON: {data[:200]!r}", 500) from None
    if not isinstance(event, dict):
        return None
    if "error" in event and "choices" not in event:
        raise APIError(f"APIError: error in stream: {_server_message(data.decode(errors='replace'))}", 500)
    piece = _answer_of(event, mode, "delta")
    if piece.text is None and piece.finish_reason is None and piece.input_tokens is None and piece.output_tokens is None:
        return None
    return piece
