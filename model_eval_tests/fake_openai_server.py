"""TEST DOUBLE: a scripted, local, OpenAI-compatible chat- and text-completions server.

This is not a model and not part of the product. It exists so the inference engine can be tested
and benchmarked through the real litellm client (the same code path a hosted provider uses) while
every answer, failure and delay is decided by the test.

    from model_eval_tests.fake_openai_server import FakeOpenAIServer, fail_first, rate_limited, ok

    with FakeOpenAIServer(script=fail_first(1, rate_limited(retry_after=0.1))) as server:
        litellm.completion(model="openai/fake", api_base=server.api_base, api_key="x", messages=...)
        assert server.count(429) == 1 and server.count(200) == 1

Endpoints (on 127.0.0.1, ephemeral port, in a background thread with its own event loop):

* ``POST /v1/chat/completions`` - answered as the script says (see `Reply`).
* ``POST /v1/completions``      - the same, as a text completion (``choices[0].text``); scripts see
                                  the prompt as `last_message` and the endpoint as `endpoint`.
                                  With ``"stream": true`` both answer "ok" replies as server-sent
                                  events (a word a piece, usage last if ``stream_options`` asks).
* ``GET  /v1/models``           - lists the model id (``fake`` by default), or every id of ``listed_models``
                                  (an endpoint serving a mix of chat, embedding and speech models).
* ``GET  /_fake/stats``         - the counters as JSON; used when the server runs in another
                                  process (``benchmarks/fake_endpoint.py`` runs it that way).

Replies: `ok(text, tokens)`, `nonsense()`, `rate_limited(retry_after)`, `server_error(status)`,
`hang(seconds)`, `slow_body(seconds)` and `garbage(body)`; see `Reply` for what each sends.

A *script* is any callable ``(RequestInfo) -> Reply``. Ready-made ones:

* `always(reply)`                         - the same reply every time (default: instant success).
* `fail_first(n, failure, then=ok())`     - per distinct request body: the first ``n`` attempts get
                                            ``failure``, later ones ``then``. Repeats of one case send
                                            the same body, so they share the count.
* `random_mix(seed, {reply: fraction})`   - seeded, and decided by hashing (seed, body, attempt), so
                                            the outcome of a given attempt does not depend on the
                                            order in which concurrent requests arrive.
* `route([(substring, script), ...])`     - pick a script by a substring of the last message.

Counters (`total`, `count(200)` / `count("hang")`, `attempts_of(body_key)`, `records`, `stats()`)
are updated under a lock and are exact: tests assert call counts with them. `reset()` zeroes them.

aiohttp is used (litellm already depends on it): one event loop serves every connection without a
thread each, and answers ~1,300 requests/s on this 2-core machine even when it shares its process
with an aiohttp client, ten times what litellm can send (~100-150 calls/s), so in the benchmark the
server is never the bottleneck.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import json
import socket
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

from aiohttp import web

MODEL_ID = "fake"


# ---------------------------------------------------------------- what one request gets
@dataclass(frozen=True)
class Reply:
    """The server's answer to one request.

    kind:
      "ok"       - a valid chat completion whose content is `text` (also used for nonsense text).
      "error"    - an OpenAI-style JSON error body with HTTP `status` (e.g. 429, 500, 401).
      "hang"     - wait `hang_s` seconds (longer than the client's timeout), then answer "ok".
      "garbage"  - HTTP 200 whose body is `body` (not JSON), with `content_type`.
      "drip"     - a valid completion sent in `drip_chunks` pieces, `drip_interval_s` apart: every
                   read is quick, the whole answer slow (a per-read timeout never fires).
    retry_after: sent as a Retry-After header (seconds) when not None.
    echo_key:    for "error": append the Authorization header the client sent to the message, the
                 way some providers echo a bad key back; tests check the engine redacts it.
    """

    kind: str = "ok"
    text: str = "PASS"
    prompt_tokens: int = 12
    completion_tokens: int = 1
    finish_reason: str = "stop"
    status: int = 200
    message: str = "scripted failure"
    retry_after: float | None = None
    echo_key: bool = False
    hang_s: float = 5.0
    body: str = "<html>this is not JSON</html>"
    content_type: str = "text/html"
    drip_chunks: int = 10
    drip_interval_s: float = 0.2

    def __post_init__(self) -> None:
        if self.kind not in ("ok", "error", "hang", "garbage", "drip"):
            raise ValueError(f"unknown reply kind {self.kind!r}")

    @property
    def label(self) -> str:
        """A short name for the counters: ok, 429, 500, hang, garbage..."""
        return str(self.status) if self.kind == "error" else self.kind


def ok(text: str = "PASS", prompt_tokens: int = 12, completion_tokens: int = 1, finish_reason: str = "stop") -> Reply:
    return Reply(kind="ok", text=text, prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                 finish_reason=finish_reason)


def nonsense(text: str = "purple monkey dishwasher }{ 42 ¯\\_(ツ)_/¯") -> Reply:
    """A perfectly valid completion whose content means nothing: a successful call, a bad answer."""
    return ok(text=text, completion_tokens=9)


def rate_limited(retry_after: float | None = 0.1, message: str = "Rate limit reached, slow down") -> Reply:
    return Reply(kind="error", status=429, message=message, retry_after=retry_after)


def server_error(status: int = 500, message: str = "The server had an error processing your request",
                 echo_key: bool = False, retry_after: float | None = None) -> Reply:
    return Reply(kind="error", status=status, message=message, echo_key=echo_key, retry_after=retry_after)


def hang(seconds: float = 5.0) -> Reply:
    return Reply(kind="hang", hang_s=seconds)


def slow_body(seconds: float = 2.0, chunks: int = 10, text: str = "PASS") -> Reply:
    """Headers at once, then the body trickled out over `seconds`."""
    return Reply(kind="drip", text=text, drip_chunks=chunks, drip_interval_s=seconds / chunks)


def garbage(body: str = "<html>502 upstream confused</html>", content_type: str = "text/html") -> Reply:
    return Reply(kind="garbage", body=body, content_type=content_type)


# ---------------------------------------------------------------- what a script sees
@dataclass(frozen=True)
class RequestInfo:
    index: int              # 1-based arrival number over the server's life
    attempt: int            # 1-based arrival number of this exact body (messages + params)
    body_key: str           # hash of the request body, identifies "the same call"
    payload: dict[str, Any]
    authorization: str | None
    endpoint: str = "chat"  # "chat" for /v1/chat/completions, "text" for /v1/completions

    @property
    def last_message(self) -> str:
        """The last chat message, or a text completion's whole prompt."""
        if self.endpoint == "text":
            prompt = self.payload.get("prompt", "")
            return prompt if isinstance(prompt, str) else json.dumps(prompt)
        messages = self.payload.get("messages") or []
        content = messages[-1].get("content", "") if messages else ""
        return content if isinstance(content, str) else json.dumps(content)


Script = Callable[[RequestInfo], Reply]


def always(reply: Reply | None = None) -> Script:
    chosen = reply or ok()
    return lambda info: chosen


def fail_first(n: int, failure: Reply, then: Reply | None = None) -> Script:
    """The first `n` attempts of each distinct request body fail with `failure`; later ones get `then`."""
    success = then or ok()
    return lambda info: failure if info.attempt <= n else success


def random_mix(seed: int, fractions: dict[Reply, float], otherwise: Reply | None = None) -> Script:
    """Each attempt draws one reply: `fractions` maps a reply to its share (shares must sum <= 1).

    The draw is a hash of (seed, body, attempt) rather than a shared random.Random, so a rerun with
    the same seed gives every call the same fate however the concurrent requests interleave.
    """
    total = sum(fractions.values())
    if total > 1 + 1e-9 or any(f < 0 for f in fractions.values()):
        raise ValueError(f"fractions must be >= 0 and sum to at most 1, got {total}")
    success = otherwise or ok()
    bands = list(itertools.accumulate(fractions.values()))
    replies = list(fractions)

    def choose(info: RequestInfo) -> Reply:
        digest = hashlib.sha256(f"{seed}:{info.body_key}:{info.attempt}".encode()).digest()
        u = int.from_bytes(digest[:8], "big") / 2**64
        for upper, reply in zip(bands, replies):
            if u < upper:
                return reply
        return success

    return choose


def route(rules: Iterable[tuple[str, Script]], default: Script | None = None) -> Script:
    """The first rule whose substring occurs in the last message decides; else `default`."""
    rules = list(rules)
    fallback = default or always()

    def choose(info: RequestInfo) -> Reply:
        text = info.last_message
        for needle, script in rules:
            if needle in text:
                return script(info)
        return fallback(info)

    return choose


# ---------------------------------------------------------------- the server
@dataclass(frozen=True)
class RequestRecord:
    index: int
    attempt: int
    body_key: str
    last_message: str
    label: str               # ok, hang, garbage, or the error status
    status: int              # HTTP status sent (a hang that the client abandoned still counts as 200)
    arrived: float           # time.monotonic() at arrival; comparable with the test's own clock
    endpoint: str = "chat"   # "chat" or "text" (/v1/completions)


@dataclass
class _Counters:
    total: int = 0
    by_status: Counter = field(default_factory=Counter)
    by_kind: Counter = field(default_factory=Counter)
    attempts: Counter = field(default_factory=Counter)   # body_key -> arrivals
    records: list[RequestRecord] = field(default_factory=list)


def body_key_of(payload: dict[str, Any]) -> str:
    """Identity of a call: the request body without the fields that vary per attempt."""
    material = {k: v for k, v in payload.items() if k not in ("stream_options", "user")}
    return hashlib.sha256(json.dumps(material, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:20]


class FakeOpenAIServer:
    """The scripted server; use as a context manager or call start()/stop()."""

    def __init__(self, script: Script | None = None, *, host: str = "127.0.0.1", port: int = 0,
                 model_id: str = MODEL_ID, keep_records: bool = True, listed_models: list[str] | None = None):
        if host not in ("127.0.0.1", "localhost", "::1"):
            raise ValueError("the fake server only listens on the loopback address")
        self.script: Script = script or always()
        self.host = host
        self.port = port
        self.model_id = model_id
        self.listed_models = list(listed_models) if listed_models is not None else [model_id]
        # The benchmark sends thousands of calls and only needs the counts, not a record of each.
        self.keep_records = keep_records
        self._lock = threading.Lock()
        self._counters = _Counters()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: web.AppRunner | None = None
        self._stopping: asyncio.Event | None = None
        self._ready = threading.Event()
        self._startup_error: BaseException | None = None
        self._ids = itertools.count(1)

    # ------------------------------------------------------------ lifecycle
    @property
    def api_base(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    def start(self, timeout_s: float = 10.0) -> "FakeOpenAIServer":
        if self._thread is not None:
            raise RuntimeError("already started")
        self._thread = threading.Thread(target=self._serve, name="fake-openai-server", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout_s):
            raise RuntimeError(f"fake server did not start within {timeout_s} s")
        if self._startup_error is not None:
            raise RuntimeError("fake server failed to start") from self._startup_error
        return self

    def stop(self, timeout_s: float = 10.0) -> None:
        if self._thread is None or self._loop is None:
            return
        # Wake any "hang" handler at once instead of letting it sleep out its hang_s.
        self._loop.call_soon_threadsafe(self._stopping.set)
        future = asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop)
        try:
            future.result(timeout_s)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout_s)
            self._thread = None

    def __enter__(self) -> "FakeOpenAIServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _serve(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(self._startup())
        except BaseException as exc:  # noqa: BLE001 - reported to start() in the caller's thread
            self._startup_error = exc
            self._ready.set()
            loop.close()
            return
        self._ready.set()
        try:
            loop.run_forever()
        finally:
            loop.close()

    async def _startup(self) -> None:
        self._stopping = asyncio.Event()
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_post("/chat/completions", self._chat)   # clients that drop the /v1
        app.router.add_post("/v1/completions", self._text)
        app.router.add_post("/completions", self._text)
        app.router.add_get("/v1/models", self._models)
        app.router.add_get("/_fake/stats", self._stats)
        # access_log=None: logging every request would cost more than answering it.
        # handler_cancellation: a client that gives up on a hanging request frees its handler at once.
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=1.0,
                                     handler_cancellation=True)
        await self._runner.setup()
        # Bind the socket ourselves so the OS-chosen ephemeral port is known without private attributes.
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, self.port))
        self.port = sock.getsockname()[1]
        site = web.SockSite(self._runner, sock, backlog=1024)
        await site.start()

    async def _shutdown(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    # ------------------------------------------------------------ counters
    def reset(self) -> None:
        with self._lock:
            self._counters = _Counters()

    @property
    def total(self) -> int:
        """Chat-completion requests received (every attempt counts)."""
        with self._lock:
            return self._counters.total

    def count(self, status_or_kind: int | str) -> int:
        """Requests answered with an HTTP status (int) or of a reply kind/label ("hang", "garbage", "429")."""
        with self._lock:
            if isinstance(status_or_kind, int):
                return self._counters.by_status[status_or_kind]
            return self._counters.by_kind[status_or_kind]

    def attempts_of(self, body_key: str) -> int:
        with self._lock:
            return self._counters.attempts[body_key]

    @property
    def records(self) -> list[RequestRecord]:
        with self._lock:
            return list(self._counters.records)

    def stats(self) -> dict[str, Any]:
        with self._lock:
            c = self._counters
            return {"total": c.total, "by_status": {str(k): v for k, v in c.by_status.items()},
                    "by_kind": dict(c.by_kind), "distinct_bodies": len(c.attempts)}

    # ------------------------------------------------------------ handlers
    async def _models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [
            {"id": model_id, "object": "model", "created": 0, "owned_by": "fake-openai-server"} for model_id in self.listed_models]})

    async def _stats(self, request: web.Request) -> web.Response:
        return web.json_response(self.stats())

    async def _text(self, request: web.Request) -> web.StreamResponse:
        return await self._chat(request, endpoint="text")

    async def _chat(self, request: web.Request, endpoint: str = "chat") -> web.StreamResponse:
        arrived = time.monotonic()
        raw = await request.read()
        try:
            payload = json.loads(raw)
            if not isinstance(payload, dict):
                raise ValueError("body is not an object")
        except ValueError:
            # A malformed request is the client's bug, not part of any script: answer 400 and count it.
            self._record(None, "bad_request", 400, arrived, "", endpoint)
            return _error_response(400, "request body is not a JSON object", "invalid_request_error")
        key = body_key_of(payload)
        with self._lock:
            self._counters.attempts[key] += 1
            attempt = self._counters.attempts[key]
            index = self._counters.total + 1
        info = RequestInfo(index=index, attempt=attempt, body_key=key, payload=payload,
                           authorization=request.headers.get("Authorization"), endpoint=endpoint)
        reply = self.script(info)
        status = reply.status if reply.kind == "error" else 200
        self._record(info, reply.label, status, arrived, info.last_message, endpoint)

        if reply.kind == "hang":
            try:
                await asyncio.wait_for(self._stopping.wait(), timeout=reply.hang_s)
            except asyncio.TimeoutError:
                pass
            if self._stopping.is_set():
                return web.Response(status=503, text="shutting down")
        if reply.kind in ("ok", "hang") and payload.get("stream") is True:
            return await self._sse(request, payload, reply, endpoint)
        if reply.kind in ("ok", "hang"):
            return web.json_response(self._completion(payload, reply, endpoint))
        if reply.kind == "drip":
            return await self._drip(request, payload, reply, endpoint)
        if reply.kind == "garbage":
            return web.Response(status=200, body=reply.body.encode(), content_type=reply.content_type)
        message = reply.message
        if reply.echo_key and info.authorization:
            message = f"{message} (received credentials: {info.authorization.removeprefix('Bearer ')})"
        headers = {"Retry-After": _format_seconds(reply.retry_after)} if reply.retry_after is not None else None
        return _error_response(reply.status, message, _error_type(reply.status), headers)

    async def _drip(self, request: web.Request, payload: dict[str, Any], reply: Reply, endpoint: str) -> web.StreamResponse:
        body = json.dumps(self._completion(payload, reply, endpoint)).encode()
        response = web.StreamResponse(status=200, headers={"Content-Type": "application/json"})
        response.content_length = len(body)
        await response.prepare(request)
        step = max(1, -(-len(body) // reply.drip_chunks))   # ceiling division: exactly drip_chunks pieces
        for start in range(0, len(body), step):
            await response.write(body[start:start + step])
            if start + step < len(body):
                try:   # a stop() wakes us; the client then sees a truncated body
                    await asyncio.wait_for(self._stopping.wait(), timeout=reply.drip_interval_s)
                    return response
                except asyncio.TimeoutError:
                    pass
        await response.write_eof()
        return response

    async def _sse(self, request: web.Request, payload: dict[str, Any], reply: Reply, endpoint: str) -> web.StreamResponse:
        """`stream: true`: the text as server-sent events, one word a piece, as OpenAI streams; the usage
        in a last event when `stream_options.include_usage` asks for it."""
        response = web.StreamResponse(status=200, headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        ident, created, model = f"chatcmpl-fake-{next(self._ids)}", int(time.time()), payload.get("model") or self.model_id
        words = reply.text.split(" ")
        pieces = [w if i == 0 else " " + w for i, w in enumerate(words)]

        def event(choice: dict[str, Any] | None, usage: dict[str, int] | None = None) -> bytes:
            body = {"id": ident, "object": "chat.completion.chunk" if endpoint == "chat" else "text_completion",
                    "created": created, "model": model, "choices": [choice] if choice else []}
            if usage is not None:
                body["usage"] = usage
            return b"data: " + json.dumps(body).encode() + b"\n\n"

        for piece in pieces:
            choice = ({"index": 0, "delta": {"content": piece}, "finish_reason": None} if endpoint == "chat"
                      else {"index": 0, "text": piece, "finish_reason": None})
            await response.write(event(choice))
        final = ({"index": 0, "delta": {}, "finish_reason": reply.finish_reason} if endpoint == "chat"
                 else {"index": 0, "text": "", "finish_reason": reply.finish_reason})
        await response.write(event(final))
        if (payload.get("stream_options") or {}).get("include_usage"):
            await response.write(event(None, {"prompt_tokens": reply.prompt_tokens, "completion_tokens": reply.completion_tokens,
                                              "total_tokens": reply.prompt_tokens + reply.completion_tokens}))
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    def _record(self, info: RequestInfo | None, label: str, status: int, arrived: float, last_message: str,
                endpoint: str) -> None:
        with self._lock:
            c = self._counters
            c.total += 1
            c.by_status[status] += 1
            c.by_kind[label] += 1
            if self.keep_records:
                c.records.append(RequestRecord(index=c.total, attempt=info.attempt if info else 0,
                                               body_key=info.body_key if info else "", last_message=last_message,
                                               label=label, status=status, arrived=arrived, endpoint=endpoint))

    def _completion(self, payload: dict[str, Any], reply: Reply, endpoint: str = "chat") -> dict[str, Any]:
        usage = {"prompt_tokens": reply.prompt_tokens, "completion_tokens": reply.completion_tokens,
                 "total_tokens": reply.prompt_tokens + reply.completion_tokens}
        if endpoint == "text":
            return {"id": f"cmpl-fake-{next(self._ids)}", "object": "text_completion", "created": int(time.time()),
                    "model": payload.get("model") or self.model_id,
                    "choices": [{"index": 0, "text": reply.text, "logprobs": None, "finish_reason": reply.finish_reason}],
                    "usage": usage}
        return {
            "id": f"chatcmpl-fake-{next(self._ids)}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": payload.get("model") or self.model_id,
            "system_fingerprint": "fake",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": reply.text},
                         "logprobs": None, "finish_reason": reply.finish_reason}],
            "usage": usage,
        }


def _format_seconds(value: float) -> str:
    # Retry-After is specified in whole seconds, but fractions keep tests fast; clients parse floats.
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


def _error_type(status: int) -> str:
    return {400: "invalid_request_error", 401: "authentication_error", 429: "rate_limit_error"}.get(status, "server_error")


def _error_response(status: int, message: str, kind: str, headers: dict[str, str] | None = None) -> web.Response:
    body = {"error": {"message": message, "type": kind, "param": None, "code": None}}
    return web.json_response(body, status=status, headers=headers)

