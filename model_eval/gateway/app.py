"""The gateway's HTTP service: FastAPI routes over the shared routing core, served by uvicorn.

FastAPI (on Starlette) for the OpenAPI document and /docs it derives from the routes. The hot route,
/v1/chat/completions, is declared there for the document but served by `LeanChatRoute` ahead of
FastAPI: same token check and handler, without FastAPI's per-request machinery (0.70 -> 0.41 ms
of the gateway's CPU a call; benchmarks/README.md, section 8). uvicorn with uvloop and httptools: the
fastest pure-Python HTTP stack measured for this (benchmarks/README.md, section 7).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from fastapi import Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.security import HTTPBearer
from starlette.exceptions import HTTPException as StarletteHTTPException
from swagger_ui_bundle import swagger_ui_path

from model_eval.gateway import openai_api
from model_eval.gateway.reads import Reads, ReadError, parse_window
from model_eval.gateway.security import Access, LimitsMiddleware, error_body
from model_eval.registry import Registry
from model_eval.routed_calls import CallResult, RoutedCaller, UnknownModelError
from model_eval.router import CallLog, Router, SnapshotError
from model_eval.settings import ProjectPaths

log = logging.getLogger(__name__)

CALL_ID_HEADER = "x-model-eval-call-id"
MODEL_HEADER = "x-model-eval-model"
REQUEST_KEY_HEADER = "x-model-eval-request-key"
REQUEST_KEY_HEADER_BYTES = REQUEST_KEY_HEADER.encode()
MAX_COMMENT_CHARS = 2000
# Swagger UI's files that /docs loads, served from the swagger-ui-bundle-v2 package (pyproject.toml says why).
SWAGGER_UI_ASSETS = {"swagger-ui-bundle.js": "text/javascript", "swagger-ui.css": "text/css", "favicon-32x32.png": "image/png"}


@dataclass(frozen=True)
class GatewaySettings:
    max_body_bytes: int = 1_000_000      # a long prompt is ~100 kB; a megabyte leaves room and stops abuse
    # Per client address; 0 turns the limit off. One application server is one address, so the default
    # must carry a busy one (the 500 calls/s target) while still stopping a runaway loop.
    rate_per_s: float = 1000.0
    burst: int = 2000
    max_shadow_in_flight: int = 64       # shadow calls past this are dropped (counted in /v1/health), never queued
    snapshot_reload_s: float = 2.0       # how often the routing snapshot's file is checked for a new assignment
    lean_chat_route: bool = True         # serve chat completions ahead of FastAPI (LeanChatRoute); off: through it


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.headers = status, message, param, headers


def error_response(status: int, message: str, param: str | None = None, headers: dict[str, str] | None = None,
                   kind: str | None = None) -> Response:
    return Response(error_body(status, message, param, kind), status_code=status, media_type="application/json",
                    headers=headers)


def upstream_failure(result: CallResult, headers: dict[str, str]) -> Response:
    """The model failed: its error class and status only. The provider's message stays in the call log
    (redacted): providers echo parts of keys and internal details in theirs."""
    status = 429 if result.error_class == "RateLimitError" else 504 if result.error_class in ("Timeout", "TimeoutError") else 502
    upstream = f" (upstream HTTP {result.status})" if result.status else ""
    if status == 429:
        headers = {**headers, "retry-after": "1"}
    return error_response(status, f"model {result.model} failed: {result.error_class}{upstream}; call {result.call_id}",
                          headers=headers, kind="upstream_error")


class Gateway:
    """The service's state: the router (reloaded as the pipeline publishes), the caller, the reads."""

    def __init__(self, paths: ProjectPaths, registry: Registry, settings: GatewaySettings, *, completion=None,
                 text_completion=None):
        self.paths = paths
        self.settings = settings
        self.reads = Reads(paths.warehouse_file, paths.call_log_dir)
        self.started = time.time()
        self._router: Router | None = None
        self._router_error: str | None = None
        self._router_tried = 0.0
        self.caller = RoutedCaller(None, CallLog(paths.call_log_dir), registry, completion=completion,
                                   text_completion=text_completion)
        self.router()   # load now if the pipeline has published a snapshot; retried later otherwise
        self.shadow_tasks: set[asyncio.Task] = set()
        self.shadow_dropped = 0

    def router(self) -> Router | None:
        """The Router, created once the snapshot exists (a fresh install may start the gateway first)."""
        if self._router is None and time.monotonic() - self._router_tried >= self.settings.snapshot_reload_s:
            self._router_tried = time.monotonic()
            try:
                self._router = Router(self.paths.snapshot_file, reload_every_s=self.settings.snapshot_reload_s)
                self._router_error = None
                self.caller.router = self._router
            except SnapshotError as exc:
                self._router_error = str(exc)
        return self._router

    def start_shadow(self, decision, messages, params) -> None:
        """The candidate's call, off the request path: a task the response never waits for."""
        if len(self.shadow_tasks) >= self.settings.max_shadow_in_flight:
            self.shadow_dropped += 1   # shadow answers are evidence, not service: shed them under load
            return
        task = asyncio.get_running_loop().create_task(self.caller.shadow(decision, messages, params))
        self.shadow_tasks.add(task)
        task.add_done_callback(self.shadow_tasks.discard)

    async def drain(self, timeout_s: float = 10.0) -> None:
        if self.shadow_tasks:
            await asyncio.wait(list(self.shadow_tasks), timeout=timeout_s)
        await self.caller.aclose()

    def health(self) -> dict[str, Any]:
        router = self.router()
        problem = self._router_error if router is None else (str(router.last_error) if router.last_error else None)
        return {"status": "ok" if problem is None else "degraded", "uptime_s": round(time.time() - self.started, 1),
                "snapshot": {"generated_at": router.generated_at if router else None, "problem": problem,
                             "tasks": router.tasks if router else []},
                "shadow": {"in_flight": len(self.shadow_tasks), "dropped": self.shadow_dropped}}


def _public_choice(entry: dict[str, Any] | None) -> dict[str, Any] | None:
    """A model as the read API shows it: no endpoint address and no key variable."""
    if entry is None:
        return None
    return {"model": entry["model"], "litellm_model": entry["litellm_model"], "mode": entry.get("mode", "chat"),
            "params": entry.get("params") or {}}


def create_app(paths: ProjectPaths, registry: Registry, access: Access, settings: GatewaySettings = GatewaySettings(),
               *, completion=None, text_completion=None):
    """The ASGI application: the limits middleware around the FastAPI app."""
    gateway = Gateway(paths, registry, settings, completion=completion, text_completion=text_completion)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        await gateway.drain()

    app = FastAPI(title="model_eval gateway", version="1", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None,
                  description="OpenAI-compatible chat completions routed by each task's assignment, call logging, "
                              "feedback and statistics. Every endpoint but /v1/health needs a bearer token.")
    app.state.gateway = gateway
    # Only declares the scheme in the OpenAPI document (the Authorize button of /docs); `allowed` checks.
    bearer = HTTPBearer(auto_error=False, description="MODEL_EVAL_API_TOKEN (read and write) or MODEL_EVAL_API_READ_TOKEN (read)")

    def allowed(level: str):
        # async: a plain function here would be run in FastAPI's thread pool, a thread hand-off per request.
        async def check(request: Request, _=Depends(bearer)) -> None:
            refused = refusal(access, request.headers.get("authorization"), level)
            if refused is not None:
                raise refused
        return check

    read, write = Depends(allowed("read")), Depends(allowed("write"))

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> Response:
        return error_response(exc.status, exc.message, exc.param, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> Response:
        first = exc.errors()[0] if exc.errors() else {}
        param = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
        return error_response(422, f"{param or 'request'}: {first.get('msg', 'invalid')}", param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> Response:
        return error_response(exc.status_code, str(exc.detail), None, getattr(exc, "headers", None))

    # ------------------------------------------------------------ calls
    chat_schema = {"requestBody": {"required": True, "content": {"application/json": {"schema": {
        "type": "object", "required": ["model", "messages"],
        "properties": {"model": {"type": "string", "description": "task/<task> (routed by its assignment) or a registry model name"},
                       "messages": {"type": "array", "items": {"type": "object", "properties": {
                           "role": {"type": "string", "enum": ["system", "user", "assistant"]}, "content": {"type": "string"}}}},
                       "stream": {"type": "boolean"}, "user": {"type": "string", "description": "request key for the traffic split"},
                       "temperature": {"type": "number"}, "max_tokens": {"type": "integer"}, "stop": {"type": "array"}}}}}}}

    async def answer_chat(body: bytes, request_key: str | None) -> Response:
        """One chat completion, whichever route received it (the caller has checked the token)."""
        try:
            req = openai_api.parse_chat_request(body)
        except openai_api.RequestError as exc:
            return error_response(exc.status, f"{exc.field}: {exc}" if exc.field else str(exc), exc.field)
        if req.model.startswith("task/"):
            gateway.router()
        try:
            decision = gateway.caller.decide(req.model, req.user or request_key)
        except UnknownModelError as exc:
            return error_response(404, f"model: {exc}", "model")
        for choice in (decision.primary, decision.shadow):
            if choice is not None and choice.uses_text_completion and req.messages[-1]["role"] != "user":
                return error_response(400, f"messages: {choice.model} is asked in completion mode; the last message "
                                           "must be the user's", "messages")
        if decision.shadow is not None:
            gateway.start_shadow(decision, req.messages, req.params)
        call_id = str(uuid.uuid4())
        if req.stream:
            return await _stream(decision, req, call_id)
        result = await gateway.caller.complete(decision, req.messages, req.params, call_id)
        headers = {CALL_ID_HEADER: call_id, MODEL_HEADER: result.model}
        if result.answer is None:
            return upstream_failure(result, headers)
        return Response(openai_api.completion_body(call_id, result.model, result.answer), media_type="application/json",
                        headers=headers)

    async def _stream(decision, req: openai_api.ChatRequest, call_id: str) -> Response:
        pieces = gateway.caller.stream(decision, req.messages, req.params, call_id)
        first = await pieces.__anext__()
        model = decision.primary.model
        headers = {CALL_ID_HEADER: call_id, MODEL_HEADER: model, "cache-control": "no-cache"}
        if isinstance(first, CallResult) and first.answer is None:
            await pieces.aclose()
            return upstream_failure(first, headers)   # nothing sent yet: an ordinary error response

        async def events():
            created = int(time.time())
            item = first
            try:
                yield openai_api.chunk_event(call_id, model, created, {"role": "assistant", "content": ""}, None)
                while True:
                    if isinstance(item, CallResult):
                        # The call is logged by now; only then does the client see the end of the answer.
                        if item.answer is None:
                            yield openai_api.error_event(f"model {model} failed: {item.error_class}", item.error_class)
                        elif req.include_usage:
                            yield openai_api.usage_event(call_id, model, created, item.answer)
                        yield openai_api.DONE_EVENT
                        return
                    yield openai_api.chunk_event(call_id, model, created, {"content": item.text} if item.text else {},
                                                 item.finish_reason)
                    item = await pieces.__anext__()
            finally:
                await pieces.aclose()

        return StreamingResponse(events(), media_type="text/event-stream", headers=headers)

    @app.post("/v1/chat/completions", dependencies=[write], openapi_extra=chat_schema, tags=["calls"],
              summary="OpenAI-compatible chat completion, answered by the model the task's assignment names")
    async def chat_completions(request: Request) -> Response:
        # Declares the endpoint for /docs and the OpenAPI document; LeanChatRoute serves it ahead of
        # FastAPI unless `settings.lean_chat_route` is off, with the same token check and handler.
        return await answer_chat(await request.body(), request.headers.get(REQUEST_KEY_HEADER))

    @app.post("/v1/feedback", dependencies=[write], tags=["calls"],
              summary="Rate an answer: {call_id, rating in [0, 1] | thumbs: true/false, comment?}")
    async def feedback(request: Request) -> Response:
        import json

        try:
            data = json.loads(await request.body())
        except (ValueError, UnicodeDecodeError) as exc:
            return error_response(400, f"body: not valid JSON: {exc}", "body")
        if not isinstance(data, dict):
            return error_response(400, "body: must be a JSON object", "body")
        unknown = sorted(set(data) - {"call_id", "rating", "thumbs", "comment"})
        if unknown:
            return error_response(400, f"{unknown[0]}: unknown field; allowed: call_id, rating, thumbs, comment", unknown[0])
        call_id = data.get("call_id")
        try:
            uuid.UUID(str(call_id))
        except ValueError:
            return error_response(400, f"call_id: must be the {CALL_ID_HEADER} header of an answer, got {call_id!r}", "call_id")
        rating, thumbs = data.get("rating"), data.get("thumbs")
        if (rating is None) == (thumbs is None):
            return error_response(400, "rating: give exactly one of rating (0 to 1) or thumbs (true/false)", "rating")
        if thumbs is not None:
            if not isinstance(thumbs, bool):
                return error_response(400, f"thumbs: must be true or false, got {thumbs!r}", "thumbs")
            rating = 1.0 if thumbs else 0.0
        elif isinstance(rating, bool) or not isinstance(rating, (int, float)) or not math.isfinite(rating) or not 0 <= rating <= 1:
            return error_response(400, f"rating: must be a number from 0 (bad) to 1 (good), got {rating!r}", "rating")
        comment = data.get("comment")
        if comment is not None and (not isinstance(comment, str) or len(comment) > MAX_COMMENT_CHARS):
            return error_response(400, f"comment: must be a string of at most {MAX_COMMENT_CHARS} characters", "comment")
        # Written like a call: to the OS before the answer, so a kill right after loses no acknowledged rating.
        gateway.caller.call_log.rate(str(call_id), float(rating), comment)
        return JSONResponse({"call_id": str(call_id), "rating": float(rating)}, headers={CALL_ID_HEADER: str(call_id)})

    # ------------------------------------------------------------ reads (plain functions: FastAPI runs them in
    # its thread pool, so DuckDB's blocking reads never hold up the event loop that serves calls)
    @app.get("/v1/health", tags=["reads"], summary="Liveness and the routing snapshot's state (no token needed)")
    async def health() -> dict[str, Any]:
        return gateway.health()

    def _router_or_503() -> Router:
        router = gateway.router()
        if router is None:
            raise ApiError(503, f"no routing snapshot yet ({gateway._router_error})")
        return router

    @app.get("/v1/tasks", dependencies=[read], tags=["reads"], summary="Every routed task with its assignment")
    def tasks() -> dict[str, Any]:
        router = _router_or_503()
        out = []
        for name in router.tasks:
            entry = router.assignment(name)
            out.append({"task": name, "model": f"task/{name}", "serving": entry["model"], "stage": entry["stage"],
                        "candidate": entry["candidate"]["model"] if entry["candidate"] else None,
                        "traffic_share": entry["traffic_share"], "pinned": entry["pinned"]})
        return {"tasks": out, "snapshot_generated_at": router.generated_at}

    def _known_task(task: str) -> dict[str, Any]:
        router = _router_or_503()
        if task not in router.tasks:
            raise ApiError(404, f"task: no routed task '{task}' (known: {', '.join(router.tasks) or 'none'})", "task")
        return router.assignment(task)

    @app.get("/v1/tasks/{task}", dependencies=[read], tags=["reads"],
             summary="A task's assignment, stage, champion, runner-up and the reasoning")
    def task_detail(task: str) -> dict[str, Any]:
        entry = _known_task(task)
        decision = gateway.reads.task_decision(task)
        return {"task": task, "assignment": {"serving": _public_choice(entry), "candidate": _public_choice(entry["candidate"]),
                                             "stage": entry["stage"], "traffic_share": entry["traffic_share"],
                                             "pinned": entry["pinned"]},
                "stage": entry["stage"], **decision}

    @app.get("/v1/tasks/{task}/leaderboard", dependencies=[read], tags=["reads"],
             summary="Newest evaluation metrics per model on the task's current golden version")
    def task_leaderboard(task: str) -> dict[str, Any]:
        _known_task(task)
        return gateway.reads.leaderboard(task)

    @app.get("/v1/models/{name}/stats", dependencies=[read], tags=["reads"],
             summary="Production statistics of a model over a window, including calls not yet in the warehouse")
    def model_stats(name: str, window: str = Query("24h", description="e.g. 90s, 30m, 24h, 7d"),
                    task: str | None = Query(None, description="only this task's calls")) -> dict[str, Any]:
        try:
            span = parse_window(window)
        except ReadError as exc:
            raise ApiError(400, f"{exc.field}: {exc}", exc.field) from None
        if name not in registry.names():
            raise ApiError(404, f"name: '{name}' is not a registry model", "name")
        return gateway.reads.model_stats(name, span, task)

    @app.get("/openapi.json", dependencies=[read], include_in_schema=False)
    def openapi_document() -> dict[str, Any]:
        return app.openapi()

    @app.get("/docs", dependencies=[read], include_in_schema=False)
    def docs(request: Request) -> Response:
        # Everything the page loads comes from this service (no CDN: /docs works on a machine without
        # internet). The document is inlined (Swagger UI's `spec`), so the page needs no second
        # authenticated fetch; validatorUrl null: no badge fetched from the validator's public site.
        assets = request.scope.get("root_path", "") + "/docs/"
        return get_swagger_ui_html(openapi_url="", title="model_eval gateway", swagger_js_url=assets + "swagger-ui-bundle.js",
                                   swagger_css_url=assets + "swagger-ui.css", swagger_favicon_url=assets + "favicon-32x32.png",
                                   swagger_ui_parameters={"spec": app.openapi(), "validatorUrl": None})

    @app.get("/docs/{asset}", dependencies=[read], include_in_schema=False)
    def docs_asset(asset: str) -> Response:
        media_type = SWAGGER_UI_ASSETS.get(asset)   # only these names: no path from the request reaches the disk
        if media_type is None:
            raise ApiError(404, f"asset: /docs serves only {', '.join(SWAGGER_UI_ASSETS)}", "asset")
        return FileResponse(swagger_ui_path / asset, media_type=media_type, headers={"cache-control": "private, max-age=86400"})

    served = LeanChatRoute(app, answer_chat, access) if settings.lean_chat_route else app
    return LimitsMiddleware(served, settings.max_body_bytes, settings.rate_per_s, settings.burst)


def refusal(access: Access, authorization: str | None, level: str) -> ApiError | None:
    """Why a request with this Authorization header may not do `level` ("read" or "write"), or None."""
    got = access.level(authorization)
    if got is None:
        return ApiError(401, "missing or invalid bearer token (Authorization: Bearer <token>)", None,
                        {"www-authenticate": "Bearer"})
    if level == "write" and got != "write":
        return ApiError(403, "this token may only read; calls and feedback need MODEL_EVAL_API_TOKEN")
    return None


class LeanChatRoute:
    """`POST /v1/chat/completions` straight to its handler; every other request on to FastAPI.

    Profiled under the benchmark's load (benchmarks/README.md, section 8), FastAPI's route cost more
    than the call itself: its middleware stack, routing and dependency solving (which ran the token
    check in the thread pool) were about a third of the gateway's time per call. Here the same token
    check and handler run inline; the limits middleware sits in front of both routes alike.
    """

    PATH = "/v1/chat/completions"

    def __init__(self, app, handler, access: Access):
        self.app = app
        self.handler = handler
        self.access = access

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] != self.PATH or scope["method"] != "POST":
            return await self.app(scope, receive, send)
        authorization = request_key = None
        for name, value in scope["headers"]:
            if name == b"authorization":
                authorization = value.decode("latin-1")
            elif name == REQUEST_KEY_HEADER_BYTES:
                request_key = value.decode("latin-1")
        refused = refusal(self.access, authorization, "write")
        if refused is not None:
            response = error_response(refused.status, refused.message, refused.param, refused.headers)
        else:
            body = await _read_body(receive)
            if body is None:
                return   # the client went away before sending its request: no call, nobody to answer
            try:
                response = await self.handler(body, request_key)
            except Exception:   # what FastAPI's error middleware would do: log it, answer 500 in our error shape
                log.exception("chat completion failed in the gateway")
                response = error_response(500, "internal error in the gateway (see its log)")
        await response(scope, receive, send)


async def _read_body(receive) -> bytes | None:
    chunks = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunks.append(message.get("body", b""))
        if not message.get("more_body"):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def serve(host: str, port: int, *, no_auth: bool = False, allow_remote: bool = False,
          settings: GatewaySettings = GatewaySettings()) -> int:
    """`model-eval serve`: check the bind rules, load the registry, run uvicorn until SIGINT/SIGTERM."""
    import uvicorn

    from model_eval.gateway.security import check_bind
    from model_eval.registry import load_registry

    paths = ProjectPaths.from_env()
    access = Access.from_env(no_auth)
    check_bind(host, access, allow_remote)
    registry = load_registry(paths.registry_file, paths.discovered_registry_file)
    app = create_app(paths, registry, access, settings)
    print(f"model_eval gateway on http://{host}:{port} (docs: /docs; snapshot {paths.snapshot_file}; "
          f"call log {paths.call_log_dir}; auth {'off' if no_auth else 'on'})", flush=True)
    config = uvicorn.Config(app, host=host, port=port, loop="uvloop", http="httptools", lifespan="on",
                            access_log=False, log_level="warning", timeout_graceful_shutdown=10, server_header=False,
                            # The rate limit keys on the peer address: uvicorn would otherwise take a client's
                            # X-Forwarded-For at its word from 127.0.0.1, letting a local client pick its own key.
                            proxy_headers=False)
    uvicorn.Server(config).run()
    return 0
