"""Route, call and log one request: the core the gateway and in-process applications share.

`Router` (model_eval/router.py) decides who answers from the published snapshot; this module makes
the call over the same clients the evaluation uses (`inference.client_for`: the lean HTTP client for
OpenAI-compatible endpoints, litellm for every other provider, as the registry's `client:` rule says),
asks a completion-mode model the way it was evaluated (`prompts.build_input` with its template), and
writes every call to the `CallLog` with latency, tokens, cost, success, stage and role. An
application that prefers not to run the gateway uses it directly:

    async with RoutedCaller(Router(paths.snapshot_file), CallLog(paths.call_log_dir), registry) as caller:
        decision = caller.decide("task/grading", request_key=user_id)
        result = await caller.complete(decision, messages)        # logged before it returns
        if decision.shadow is not None:
            asyncio.create_task(caller.shadow(decision, messages))  # off the request path, only logged

The log line is written (one O_APPEND write) before `complete` returns and before a stream's last
piece is handed over, so a process killed after answering has logged what it answered.
"""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from dataclasses import dataclass, replace
from typing import Any, AsyncIterator

from model_eval.http_client import Answer
from model_eval.inference import CostCalculator, client_for, redact
from model_eval.prompts import CompletionTemplate, build_input
from model_eval.registry import ModelSpec, Registry
from model_eval.router import CallLog, ModelChoice, RouteDecision, Router, bucket_for

TASK_PREFIX = "task/"
DIRECT_STAGE = "direct"   # the stage logged for a registry model called by name: no rollout applies


class UnknownModelError(LookupError):
    """The request's `model` is neither `task/<a routed task>` nor a registry model name."""


@dataclass(frozen=True)
class CallResult:
    call_id: str
    model: str                   # the registry model that answered (or failed)
    answer: Answer | None        # None when the call failed
    error_class: str | None
    error: str | None            # redacted: no provider key ever appears here
    latency_ms: float
    cost_usd: float | None
    status: int | None = None    # the upstream's HTTP status on failure, when it had one


@dataclass(frozen=True)
class PreparedModel:
    """What calling a choice needs, worked out once per choice rather than per call (its config hash
    alone is a JSON dump and a sha256)."""

    spec: ModelSpec
    client_key: tuple[str, str, str]
    cost: CostCalculator


def spec_for(choice: ModelChoice, registry: Registry | None) -> ModelSpec:
    """How to call a snapshot choice: the registry entry's prices, timeout and client rule, with the
    snapshot's endpoint, parameters and mode (the snapshot is what the pipeline last published)."""
    fields = dict(litellm_model=choice.litellm_model, api_base=choice.api_base, api_key_env=choice.api_key_env,
                  params=dict(choice.params), mode=choice.mode,
                  completion_template=CompletionTemplate.from_mapping(choice.completion_template)
                  if choice.completion_template else None)
    if registry is not None and choice.model in registry.names():
        return replace(registry.get(choice.model), **fields)
    return ModelSpec(name=choice.model, provider=choice.litellm_model.split("/", 1)[0], family=choice.model, **fields)


def choice_for(spec: ModelSpec) -> ModelChoice:
    return ModelChoice.from_dict(spec.routing_record())


def _status_of(exc: BaseException) -> int | None:
    status = getattr(exc, "status_code", None)
    return status if isinstance(status, int) else None


class RoutedCaller:
    """Decides, calls and logs. One client (connection pool) per model configuration, opened on first use.

    Use inside `async with` (or call `aclose()`), in the event loop that makes the calls.
    `completion` / `text_completion` replace litellm's functions on the litellm path (tests).
    """

    def __init__(self, router: Router | None, call_log: CallLog, registry: Registry | None = None, *,
                 completion=None, text_completion=None):
        self.router = router
        self.call_log = call_log
        self.registry = registry
        self._completion = completion
        self._text_completion = text_completion
        self._clients: dict[tuple[str, str, str], Any] = {}
        self._prepared: dict[ModelChoice, PreparedModel] = {}
        self._direct: dict[str, ModelChoice] = {}

    async def __aenter__(self) -> "RoutedCaller":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        clients, self._clients = list(self._clients.values()), {}
        for client in clients:
            await client.__aexit__(None, None, None)

    # ------------------------------------------------------------ who answers
    def decide(self, model: str, request_key: str | None = None) -> RouteDecision:
        """`task/<name>`: the task's assignment; a registry name: that model, unrouted. Else UnknownModelError.

        Without a request key the split is random (a fresh key per request): the same user keeps
        their model only when the application says who the user is.
        """
        # A random key needs no cryptographic source: it only places the request in the split.
        key = request_key if request_key else f"{random.getrandbits(128):032x}"
        if model.startswith(TASK_PREFIX):
            task = model[len(TASK_PREFIX):]
            try:
                if self.router is not None:
                    return self.router.route(task, key)
            except KeyError:   # the router's error for a task without an assignment; reworded below
                pass
            known = ", ".join(TASK_PREFIX + t for t in (self.router.tasks if self.router else [])) or "none"
            raise UnknownModelError(f"no routed task '{task}' (tasks with an assignment: {known})")
        if self.registry is not None and model in self.registry.names():
            choice = self._direct.get(model)
            if choice is None:
                choice = self._direct[model] = choice_for(self.registry.get(model))
            return RouteDecision(task=None, request_key=key, primary=choice, shadow=None, stage=DIRECT_STAGE,
                                 bucket=bucket_for("", key))
        raise UnknownModelError(f"'{model}' is neither task/<task> nor a registry model")

    # ------------------------------------------------------------ calls
    def _prepare(self, choice: ModelChoice) -> PreparedModel:
        prepared = self._prepared.get(choice)   # equal choices (params included) share one
        if prepared is None:
            spec = spec_for(choice, self.registry)
            prepared = self._prepared[choice] = PreparedModel(spec, (spec.name, spec.config_hash, spec.transport),
                                                              CostCalculator(spec))
        return prepared

    async def _client(self, prepared: PreparedModel):
        client = self._clients.get(prepared.client_key)   # one pool per model configuration, whichever choice names it
        if client is None:
            client = client_for(prepared.spec, self._completion, self._text_completion)
            await client.__aenter__()
            self._clients[prepared.client_key] = client
        return client

    def _log(self, decision: RouteDecision, prepared: PreparedModel, role: str, call_id: str, latency_ms: float,
             answer: Answer | None, exc: BaseException | None, secrets: list[str]) -> CallResult:
        spec = prepared.spec
        cost = prepared.cost(answer.input_tokens, answer.output_tokens) if answer is not None else None
        error = None if exc is None else redact(f"{type(exc).__name__}: {exc}", secrets)
        extra = None if exc is None else {"error_class": type(exc).__name__}
        self.call_log.record(decision, spec.name, latency_ms=latency_ms,
                             input_tokens=answer.input_tokens if answer else None,
                             output_tokens=answer.output_tokens if answer else None, success=exc is None,
                             error=error, role=role, extra=extra, call_id=call_id, cost_usd=cost)
        return CallResult(call_id, spec.name, answer, None if exc is None else type(exc).__name__, error, latency_ms, cost,
                          None if exc is None else _status_of(exc))

    async def call(self, decision: RouteDecision, role: str, messages: list[dict[str, str]],
                   params: dict[str, Any] | None = None, call_id: str | None = None) -> CallResult:
        """One call to the decision's primary or shadow model; logged before it returns, never raises for the call."""
        choice = decision.primary if role == "primary" else decision.shadow
        if choice is None:
            raise ValueError(f"the decision has no {role} model")
        prepared = self._prepare(choice)
        spec = prepared.spec
        call_id = call_id or str(uuid.uuid4())
        # The evaluated parameters win over the request's: the evidence is about that configuration.
        merged = {**(params or {}), **spec.params}
        started = time.perf_counter()
        answer, failure, secrets = None, None, []
        try:
            client = await self._client(prepared)
            secrets = [client.key] if client.key else []
            model_input = build_input(messages, spec.mode, spec.completion_template)
            async with asyncio.timeout(spec.timeout_s * 1.1 + 0.5):
                answer = await client(model_input, merged)
        except Exception as exc:  # noqa: BLE001 - every failure is logged and reported, none crashes the service
            failure = exc
        return self._log(decision, prepared, role, call_id, (time.perf_counter() - started) * 1000, answer, failure, secrets)

    async def complete(self, decision: RouteDecision, messages: list[dict[str, str]], params: dict[str, Any] | None = None,
                       call_id: str | None = None) -> CallResult:
        return await self.call(decision, "primary", messages, params, call_id)

    async def shadow(self, decision: RouteDecision, messages: list[dict[str, str]],
                     params: dict[str, Any] | None = None) -> CallResult | None:
        """The candidate's answer in the shadow stage: logged with role `shadow`, never shown to anyone."""
        if decision.shadow is None:
            return None
        return await self.call(decision, "shadow", messages, params)

    async def stream(self, decision: RouteDecision, messages: list[dict[str, str]], params: dict[str, Any] | None = None,
                     call_id: str | None = None) -> AsyncIterator[Answer | CallResult]:
        """The primary's answer piece by piece, then one `CallResult` once the call is logged.

        Failures before the first piece are reported by the CallResult alone (no piece was sent);
        tokens are the provider's usage when it sends one, else the count of pieces (one token each
        on llama.cpp and vLLM) for output and unknown for input.
        """
        prepared = self._prepare(decision.primary)
        spec = prepared.spec
        call_id = call_id or str(uuid.uuid4())
        merged = {**(params or {}), **spec.params}
        started = time.perf_counter()
        pieces = 0
        input_tokens = output_tokens = finish = None
        failure: BaseException | None = None
        secrets: list[str] = []
        logged = False
        try:
            try:
                client = await self._client(prepared)
                secrets = [client.key] if client.key else []
                model_input = build_input(messages, spec.mode, spec.completion_template)
                async with asyncio.timeout(spec.timeout_s * 1.1 + 0.5):
                    async for piece in client.stream(model_input, merged):
                        input_tokens = piece.input_tokens if piece.input_tokens is not None else input_tokens
                        output_tokens = piece.output_tokens if piece.output_tokens is not None else output_tokens
                        finish = piece.finish_reason or finish
                        if piece.text:
                            pieces += 1
                        if piece.text or piece.finish_reason:
                            yield piece
            except Exception as exc:  # noqa: BLE001 - logged and reported to the client as an error event
                failure = exc
            summary = Answer(None, finish, input_tokens, output_tokens if output_tokens is not None else pieces)
            result = self._log(decision, prepared, "primary", call_id, (time.perf_counter() - started) * 1000,
                               None if failure else summary, failure, secrets)
            logged = True
            yield result
        finally:
            if not logged:   # the consumer went away mid-answer (client disconnected): still one line for the call
                self._log(decision, prepared, "primary", call_id, (time.perf_counter() - started) * 1000, None,
                          ConnectionAbortedError("the client stopped reading the stream"), secrets)
