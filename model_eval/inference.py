"""The inference engine: every (case x repeat) for one model, asynchronously.

Calls go over the lean HTTP client (`http_client`, OpenAI-compatible endpoints) or through litellm
(every other provider), as `ModelSpec.transport` says; everything below the call is shared.

Bounded concurrency per model, a per-call timeout, retries with exponential backoff and jitter on
rate limits, server errors and timeouts (honouring Retry-After, with a hard cap on attempts), and a
response cache so unchanged work is never sent twice. Plain asyncio; no Dagster here.
"""

from __future__ import annotations

import asyncio
import collections
import inspect
import itertools
import json
import logging
import random
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Awaitable, Callable, Iterable, Iterator

import polars as pl

from model_eval.crash_points import crash_point
from model_eval.golden import TaskSpec
from model_eval.http_client import Answer, OpenAICompatibleClient
from model_eval.model_map import price_per_million
from model_eval.prompts import ModelInput, build_input
from model_eval.registry import ModelSpec
from model_eval.response_cache import ResponseCache, cache_key

log = logging.getLogger(__name__)

# HTTP statuses worth another attempt: timeouts, conflicts, rate limits and server errors.
RETRYABLE_STATUS = {408, 409, 425, 429, 500, 502, 503, 504, 520, 522, 524, 529}
RETRYABLE_ERROR_NAMES = {"Timeout", "APIConnectionError", "RateLimitError", "InternalServerError",
                         "ServiceUnavailableError", "BadGatewayError", "APITimeoutError", "TimeoutError"}

RESULT_SCHEMA = {
    "model": pl.String, "task": pl.String, "dataset_version": pl.String, "case_id": pl.String, "repeat": pl.Int32,
    "cache_key": pl.String, "response_text": pl.String, "latency_ms": pl.Float64, "input_tokens": pl.Int64,
    "output_tokens": pl.Int64, "cost_usd": pl.Float64, "finish_reason": pl.String, "error_class": pl.String,
    "error_message": pl.String, "attempts": pl.Int32, "from_cache": pl.Boolean, "completed_at": pl.Float64,
}


@dataclass(frozen=True)
class CallRequest:
    task: str
    dataset_version: str
    case_id: str
    repeat: int
    messages: list[dict[str, str]]
    params: dict[str, Any]
    key: str
    prompt: str | None = None          # set in completion mode: the messages laid out by the model's template
    stop: tuple[str, ...] = ()

    @property
    def model_input(self) -> ModelInput:
        if self.prompt is None:
            return ModelInput("chat", self.messages)
        return ModelInput("completion", self.messages, self.prompt, self.stop)


@dataclass(frozen=True)
class RetryPolicy:
    backoff_base_s: float = 0.5
    backoff_cap_s: float = 20.0
    retry_after_cap_s: float = 60.0

    def delay(self, attempt: int, retry_after_s: float | None) -> float:
        if retry_after_s is not None:
            return min(max(retry_after_s, 0.0), self.retry_after_cap_s)
        ceiling = min(self.backoff_cap_s, self.backoff_base_s * 2 ** (attempt - 1))
        # "Equal jitter": keep half the exponential step, randomise the rest, so callers that
        # failed together do not retry together.
        return ceiling / 2 + random.uniform(0, ceiling / 2)


class AdaptiveLimit:
    """Calls in flight for one model: halved on a rate limit, raised by one after a window of successes.

    Additive increase, multiplicative decrease (as TCP does): a burst of 429s backs off at once,
    sustained success climbs back to the configured maximum. One burst halves the limit once: a
    429 only counts if its call started after the last decrease (the `epoch` it carries).
    """

    def __init__(self, maximum: int, minimum: int | None = None):
        self.maximum = maximum
        # A floor at a quarter of the maximum: a provider that rate-limits a steady share of calls
        # whatever the load would otherwise pin the limit near 1 (measured: 4.8x the fault-free wall
        # time in the fault benchmark, against about 2.7x with this floor); Retry-After still paces it.
        self.minimum = minimum if minimum is not None else max(1, maximum // 4)
        self.limit = maximum
        self.in_flight = 0
        self.epoch = 0
        self._successes = 0
        # Callers waiting for a slot, first come first served: a freed slot is handed to the oldest
        # waiter, never taken by a newcomer (with a plain condition a newcomer could barge in and an
        # early request starve, which stalls anything that consumes results in request order).
        self._waiters: collections.deque[asyncio.Future] = collections.deque()
        self.trace: list[tuple[float, int]] = [(time.monotonic(), maximum)]

    async def acquire(self) -> int:
        if self.in_flight < self.limit and not self._waiters:
            self.in_flight += 1
            return self.epoch
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self.in_flight -= 1          # the slot arrived with the cancellation: pass it on
                self._hand_over()
            else:
                self._waiters.remove(waiter)
            raise
        return self.epoch

    async def release(self) -> None:
        self.in_flight -= 1
        self._hand_over()

    def _hand_over(self) -> None:
        while self._waiters and self.in_flight < self.limit:
            waiter = self._waiters.popleft()
            if not waiter.done():
                self.in_flight += 1
                waiter.set_result(None)

    def rate_limited(self, started_epoch: int) -> None:
        if started_epoch != self.epoch:
            return
        self.epoch += 1
        self._successes = 0
        self._set(max(self.minimum, self.limit // 2))

    def succeeded(self) -> None:
        self._successes += 1
        if self._successes >= self.limit and self.limit < self.maximum:
            self._successes = 0
            self._set(self.limit + 1)

    def _set(self, limit: int) -> None:
        if limit != self.limit:
            self.limit = limit
            self.trace.append((time.monotonic(), limit))
            self._hand_over()


@dataclass
class RunStats:
    total: int = 0
    done: int = 0
    cached: int = 0
    sent: int = 0
    retries: int = 0
    errors: int = 0
    unknown_cost: int = 0
    rate_limited: int = 0
    skipped: int = 0          # requests `admit` turned down (adaptive mode): no call, no row
    wall_s: float = 0.0
    error_classes: dict[str, int] = field(default_factory=dict)
    concurrency_trace: list[tuple[float, int]] = field(default_factory=list)  # (monotonic time, calls allowed in flight)


ProgressFn = Callable[[RunStats], None]
CompletionFn = Callable[..., Awaitable[Any]]


def iter_requests(spec: ModelSpec, tasks: list[TaskSpec], cases: Iterable[dict[str, Any]]) -> Iterator[CallRequest]:
    """Every (case x repeat) this model must answer, for the tasks it serves, one at a time.

    `cases` are golden_cases rows (dicts with task, dataset_version, case_id, inputs_json), in any
    order; a generator keeps a suite of any size out of memory.
    """
    by_name = {t.name: t for t in tasks if spec.serves(t.name, t.tier)}
    for row in cases:
        task = by_name.get(row["task"])
        if task is None or row["dataset_version"] != task.dataset_version:
            continue
        params = {**spec.params, **task.call_params}
        asked = build_input(task.render_messages(json.loads(row["inputs_json"])), spec.mode, spec.completion_template)
        completion = None if asked.mode == "chat" else asked.identity()
        for repeat in range(task.repeats):
            yield CallRequest(task.name, task.dataset_version, row["case_id"], repeat, asked.messages, params,
                              cache_key(spec.config_hash, asked.messages, params, repeat, completion),
                              asked.prompt, asked.stop)


def _status_of(exc: BaseException) -> int | None:
    for attr in ("status_code", "status"):
        value = getattr(exc, attr, None)
        if isinstance(value, int):
            return value
    response = getattr(exc, "response", None)
    return getattr(response, "status_code", None)


def is_retryable(exc: BaseException) -> bool:
    if isinstance(exc, (asyncio.TimeoutError, TimeoutError, ConnectionError)):
        return True
    status = _status_of(exc)
    if status is not None:
        return status in RETRYABLE_STATUS
    return type(exc).__name__ in RETRYABLE_ERROR_NAMES


def retry_after_seconds(exc: BaseException) -> float | None:
    """The server's Retry-After (seconds form), wherever litellm or httpx kept the headers."""
    candidates = [getattr(exc, "litellm_response_headers", None), getattr(getattr(exc, "response", None), "headers", None),
                  getattr(exc, "headers", None)]
    for headers in candidates:
        if not headers:
            continue
        try:
            value = headers.get("retry-after") or headers.get("Retry-After")
        except AttributeError:
            continue
        if value is None:
            continue
        try:
            return float(value)
        except (TypeError, ValueError):
            return None  # an HTTP date: fall back to our own backoff
    return None


def redact(text: str, secrets: list[str]) -> str:
    for secret in secrets:
        if secret and len(secret) >= 4:
            text = text.replace(secret, "***")
    return text


def prices_per_million(spec: ModelSpec) -> tuple[float, float] | None:
    """USD per million input and output tokens: the registry's, else litellm's price map (read as a
    file: the HTTP path never imports litellm); None when neither has one."""
    if spec.price_input_per_million is not None and spec.price_output_per_million is not None:
        return spec.price_input_per_million, spec.price_output_per_million
    return price_per_million(spec.litellm_model)


class CostCalculator:
    """Cost from the registry's prices, else litellm's price map; unknown is None, never 0."""

    def __init__(self, spec: ModelSpec):
        self.spec = spec
        self.prices = prices_per_million(spec)
        self.warned = False

    def __call__(self, input_tokens: int | None, output_tokens: int | None) -> float | None:
        if input_tokens is None or output_tokens is None:
            return None
        prices = self.prices
        cost = None if prices is None else (input_tokens * prices[0] + output_tokens * prices[1]) / 1e6
        if cost is None and not self.warned:
            log.warning("model %s: no price in the registry and litellm has none for %s; cost recorded as NULL",
                        self.spec.name, self.spec.litellm_model)
            self.warned = True
        return cost


def _litellm():
    """litellm, imported when first used (it takes seconds) and set up for this engine."""
    import litellm

    # Otherwise litellm prints a "Give Feedback / Get Help" banner for every failed call.
    litellm.suppress_debug_info = True
    # litellm's aiohttp transport opens a session per text-completion call and never closes it: each
    # printed "Unclosed client session" at exit. httpx's transport leaves nothing behind.
    litellm.disable_aiohttp_transport = True
    return litellm


async def _default_completion(**kwargs):
    return await _litellm().acompletion(**kwargs)


async def _default_text_completion(**kwargs):
    """Completion mode: litellm sends `openai/<model>` with a custom api_base to the endpoint's /completions."""
    return await _litellm().atext_completion(**kwargs)


async def close_litellm_clients() -> None:
    """Close the HTTP clients litellm cached on this event loop, before the loop ends.

    litellm keeps one client per provider configuration and never closes them; left open, they hold
    connections of a loop that is ending (and an aiohttp one prints "Unclosed client session" at
    exit). litellm's own cleanup misses its cached OpenAI SDK clients (their async teardown is
    `close()`), so those are closed here first. The cache is emptied: the next run has a new loop.
    """
    import sys

    if "litellm" not in sys.modules:
        return   # nothing was called through litellm in this process
    import litellm
    from litellm.llms.custom_httpx.async_client_cleanup import close_litellm_async_clients

    cache = litellm.in_memory_llm_clients_cache
    for client in list(getattr(cache, "cache_dict", {}).values()):
        close = getattr(client, "close", None)
        if close is not None and inspect.iscoroutinefunction(close) and not hasattr(client, "aclose"):
            try:
                await close()
            except Exception:  # noqa: BLE001 - a client that cannot close is left to the garbage collector
                pass
    await close_litellm_async_clients()
    cache.flush_cache()


def _usage(response: Any) -> tuple[int | None, int | None]:
    usage = getattr(response, "usage", None)
    if usage is None and isinstance(response, dict):
        usage = response.get("usage")
    if usage is None:
        return None, None
    get = usage.get if isinstance(usage, dict) else lambda k: getattr(usage, k, None)
    return get("prompt_tokens"), get("completion_tokens")


def _text_and_finish(response: Any) -> tuple[str | None, str | None]:
    choices = getattr(response, "choices", None) or []
    if not choices:
        return None, None
    choice = choices[0]
    message = getattr(choice, "message", None)
    # A chat answer is in choices[0].message.content, a text completion's in choices[0].text.
    text = getattr(message, "content", None) if message is not None else getattr(choice, "text", None)
    return text, getattr(choice, "finish_reason", None)


class LitellmClient:
    """The litellm path, shaped like `OpenAICompatibleClient`: (model input, params) -> Answer."""

    def __init__(self, spec: ModelSpec, completion: CompletionFn, text_completion: CompletionFn):
        self.spec = spec
        self.completion = completion
        self.text_completion = text_completion
        self.key = spec.api_key()

    async def __aenter__(self) -> "LitellmClient":
        return self

    async def __aexit__(self, *exc) -> None:
        if self.completion is _default_completion or self.text_completion is _default_text_completion:
            await close_litellm_clients()

    async def __call__(self, model_input: ModelInput, params: dict[str, Any]) -> Answer:
        send = self.completion if model_input.mode == "chat" else self.text_completion
        response = await send(model=self.spec.litellm_model, **model_input.litellm_arguments(), api_base=self.spec.api_base,
                              api_key=self.key or ("sk-no-key" if self.spec.api_base else None),
                              timeout=self.spec.timeout_s, num_retries=0, max_retries=0, **params)
        text, finish_reason = _text_and_finish(response)
        input_tokens, output_tokens = _usage(response)
        return Answer(text, finish_reason, input_tokens, output_tokens)

    async def stream(self, model_input: ModelInput, params: dict[str, Any]) -> AsyncIterator[Answer]:
        """Pieces of a chat answer as litellm streams them (with usage at the end when the provider sends it).

        Completion mode is answered whole, as one piece: litellm's text-completion streaming differs by
        provider, and the base models this mode exists for answer in a few tokens anyway.
        """
        if model_input.mode != "chat":
            yield await self(model_input, params)
            return
        response = await self.completion(model=self.spec.litellm_model, **model_input.litellm_arguments(),
                                         api_base=self.spec.api_base, api_key=self.key or ("sk-no-key" if self.spec.api_base else None),
                                         timeout=self.spec.timeout_s, num_retries=0, max_retries=0, stream=True,
                                         stream_options={"include_usage": True}, **params)
        async for chunk in response:
            choices = getattr(chunk, "choices", None) or []
            delta = getattr(choices[0], "delta", None) if choices else None
            text = getattr(delta, "content", None) if delta is not None else None
            finish = getattr(choices[0], "finish_reason", None) if choices else None
            input_tokens, output_tokens = _usage(chunk)
            if text or finish or output_tokens is not None:
                yield Answer(text or None, finish, input_tokens, output_tokens)


def client_for(spec: ModelSpec, completion: CompletionFn | None = None,
               text_completion: CompletionFn | None = None) -> OpenAICompatibleClient | LitellmClient:
    """The path `spec.transport` names; given litellm-shaped functions (tests, benchmarks), those."""
    if completion is None and text_completion is None and spec.transport == "http":
        return OpenAICompatibleClient(spec)
    return LitellmClient(spec, completion or _default_completion, text_completion or _default_text_completion)


async def run_model(
    spec: ModelSpec,
    requests: Iterable[CallRequest],
    cache: ResponseCache,
    *,
    retry: RetryPolicy = RetryPolicy(),
    completion: CompletionFn | None = None,
    text_completion: CompletionFn | None = None,
    on_progress: ProgressFn | None = None,
    progress_every: int = 10,
    progress_interval_s: float = 2.0,
    cache_max_age_s: float | None = None,
    sink: Callable[[pl.DataFrame], None] | None = None,
    batch_rows: int = 5000,
    total: int | None = None,
    admit: Callable[[CallRequest], bool] | None = None,
    observe: Callable[[dict[str, Any]], None] | None = None,
) -> tuple[pl.DataFrame | None, RunStats]:
    """Answer every request for one model; returns the rows and the run's totals.

    Memory stays bounded whatever the suite's size: requests are pulled from the iterable as
    workers free up, the cache is consulted a chunk at a time, and with a `sink` the result rows
    are handed over in batches of `batch_rows` (then None is returned instead of a frame).
    Cached answers are reused; `cache_max_age_s` makes older ones be asked again (a scheduled
    re-evaluation must see today's model, or a provider's silent change would never show).
    Calls go over the path `spec.transport` names (one HTTP session for the whole run), unless
    litellm-shaped `completion` / `text_completion` functions are given: then chat requests go
    through `completion`, completion-mode requests (those with a prompt) through `text_completion`.
    Adaptive mode (`model_eval.adaptive`): `admit(request)` is asked just before a request is
    answered (from the cache or by a call) and may turn it down; `observe(row)` sees every row.
    Progress is reported every `progress_every` rows but at most once per `progress_interval_s`, and
    at the end: a Dagster log line costs a committed event, and a fast endpoint would otherwise get
    hundreds of them, each holding up the event loop.
    """
    if total is None and isinstance(requests, list):
        total = len(requests)
    stats = RunStats(total=total or 0)
    started = time.perf_counter()
    cost_of = CostCalculator(spec)
    client = client_for(spec, completion, text_completion)
    secrets = [k for k in [client.key] if k]
    rows: list[dict[str, Any]] = []
    limit = AdaptiveLimit(spec.max_concurrency)
    last_progress = started

    def finish(row: dict[str, Any]) -> None:
        rows.append(row)
        if observe is not None:
            observe(row)
        if sink is not None and len(rows) >= batch_rows:
            sink(pl.DataFrame(rows, schema=RESULT_SCHEMA))
            rows.clear()
        stats.done += 1
        if row["error_class"]:
            stats.errors += 1
            stats.error_classes[row["error_class"]] = stats.error_classes.get(row["error_class"], 0) + 1
        if row["cost_usd"] is None and not row["error_class"]:
            stats.unknown_cost += 1
        nonlocal last_progress
        due = stats.done % progress_every == 0 and time.perf_counter() - last_progress >= progress_interval_s
        if on_progress and (due or stats.done == stats.total):
            last_progress = time.perf_counter()
            try:
                on_progress(stats)
            except Exception as exc:  # noqa: BLE001 - progress reporting must never change the results
                log.warning("progress callback failed: %s", exc)

    def base_row(req: CallRequest) -> dict[str, Any]:
        return {"model": spec.name, "task": req.task, "dataset_version": req.dataset_version, "case_id": req.case_id,
                "repeat": req.repeat, "cache_key": req.key}

    pending_cache: list[tuple[str, str, dict[str, Any]]] = []
    last_flush = time.monotonic()

    def remember(key: str, payload: dict[str, Any]) -> None:
        """Buffer successful answers and write them at most every 0.1 s or 50 calls.

        A write per call costs a synchronous SQLite commit on the event loop (it was the engine's
        largest cost in benchmarks); a run killed now loses at most that window of answers.
        """
        pending_cache.append((key, spec.name, payload))
        if len(pending_cache) >= 50 or time.monotonic() - last_flush >= 0.1:
            flush_cache()

    def flush_cache() -> None:
        nonlocal last_flush
        batch = pending_cache[:]
        pending_cache.clear()
        last_flush = time.monotonic()
        try:
            cache.put_many(batch)
        except Exception as exc:  # noqa: BLE001 - the answers are still recorded in the results; only resumability suffers
            log.warning("model %s: could not write %d answers to the response cache: %s", spec.name, len(batch), exc)
        crash_point("inference.cached")

    async def one(req: CallRequest, hit: dict[str, Any] | None) -> None:
        if admit is not None and not admit(req):
            stats.skipped += 1
            return
        if hit is not None:
            stats.cached += 1
            finish({**base_row(req), **hit, "cost_usd": cost_of(hit["input_tokens"], hit["output_tokens"]),
                    "error_class": None, "error_message": None, "attempts": 0, "from_cache": True,
                    "completed_at": time.time()})
            return
        attempt = 0
        while True:
            attempt += 1
            # The slot is held for the call only, not while backing off: a model that asks us to
            # wait should not have its waiting calls count as load.
            epoch = await limit.acquire()
            stats.sent += 1
            t0 = time.perf_counter()
            try:
                # Both clients apply the provider timeout per read; this makes it a deadline for the
                # whole call, so a server trickling its answer cannot hold a slot indefinitely.
                # The small grace lets the provider's own timeout (a clearer error) fire first.
                async with asyncio.timeout(spec.timeout_s * 1.1 + 0.5):
                    answer = await client(req.model_input, req.params)
            except Exception as exc:  # noqa: BLE001 - every failure is recorded, none crashes the run
                latency_ms = (time.perf_counter() - t0) * 1000
                await limit.release()
                if _status_of(exc) == 429 or type(exc).__name__ == "RateLimitError":
                    stats.rate_limited += 1
                    limit.rate_limited(epoch)
                if is_retryable(exc) and attempt < spec.max_attempts:
                    stats.retries += 1
                    await asyncio.sleep(retry.delay(attempt, retry_after_seconds(exc)))
                    continue
                finish({**base_row(req), "response_text": None, "latency_ms": latency_ms, "input_tokens": None,
                        "output_tokens": None, "finish_reason": None, "cost_usd": None,
                        "error_class": type(exc).__name__, "error_message": redact(str(exc), secrets)[:2000],
                        "attempts": attempt, "from_cache": False, "completed_at": time.time()})
                return
            # Success: outside the try, so a problem recording it can never add a second, failed row.
            latency_ms = (time.perf_counter() - t0) * 1000
            await limit.release()
            limit.succeeded()
            payload = {"response_text": answer.text, "latency_ms": latency_ms, "input_tokens": answer.input_tokens,
                       "output_tokens": answer.output_tokens, "finish_reason": answer.finish_reason}
            remember(req.key, payload)
            finish({**base_row(req), **payload, "cost_usd": cost_of(answer.input_tokens, answer.output_tokens),
                    "error_class": None, "error_message": None, "attempts": attempt, "from_cache": False,
                    "completed_at": time.time()})
            return

    # A bounded queue between a feeder (which looks up the cache a chunk at a time) and a fixed pool
    # of workers. Twice the concurrency limit in workers, so calls sleeping in a backoff do not
    # leave the allowed slots idle.
    queue: asyncio.Queue = asyncio.Queue(maxsize=1000)
    workers_n = 2 * spec.max_concurrency + 2

    async def feed() -> None:
        iterator = iter(requests)
        while chunk := list(itertools.islice(iterator, 500)):
            hits = cache.get_many([r.key for r in chunk], max_age_s=cache_max_age_s)
            for req in chunk:
                await queue.put((req, hits.get(req.key)))
        for _ in range(workers_n):
            await queue.put(None)

    async def work() -> None:
        while (item := await queue.get()) is not None:
            await one(*item)

    try:
        async with client:
            await asyncio.gather(feed(), *(work() for _ in range(workers_n)))
    finally:
        flush_cache()
    stats.total = max(stats.total, stats.done)
    stats.wall_s = time.perf_counter() - started
    stats.concurrency_trace = limit.trace
    if sink is not None:
        if rows:
            sink(pl.DataFrame(rows, schema=RESULT_SCHEMA))
        return None, stats
    return pl.DataFrame(rows, schema=RESULT_SCHEMA).sort("task", "case_id", "repeat"), stats
