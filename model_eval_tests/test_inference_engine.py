"""The inference engine against a scripted local OpenAI-compatible server, on both of its paths.

Every engine test runs twice (the `client` fixture): through real litellm and the OpenAI SDK, and
through the lean HTTP client (`model_eval.http_client`). Nothing is mocked between `run_model` and
the HTTP socket; the fake server (a test double) decides each answer and counts every request, so
the tests can assert exact call counts, and the two paths must pass the same assertions.

Timeouts, backoff and Retry-After caps are shrunk so the whole module runs in a few seconds.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
import urllib.request
from pathlib import Path

# Must be set before litellm is imported anywhere: use the bundled price map, no network fetch.
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

import litellm  # noqa: E402
import polars as pl  # noqa: E402
import pytest  # noqa: E402

from model_eval.inference import CallRequest, RetryPolicy, iter_requests, run_model  # noqa: E402
from model_eval.prompts import build_input  # noqa: E402
from model_eval.registry import ModelSpec  # noqa: E402
from model_eval.response_cache import ResponseCache, cache_key  # noqa: E402
from model_eval_tests.fake_openai_server import (  # noqa: E402
    FakeOpenAIServer, always, fail_first, garbage, hang, nonsense, ok, random_mix, rate_limited, route, server_error, slow_body)

# litellm prints a "Give Feedback" banner on every exception; the tests provoke hundreds.
litellm.suppress_debug_info = True

KEY_ENV = "MODEL_EVAL_TEST_FAKE_KEY"
SECRET = "sk-fake-SECRET-0123456789abcdef"
FAST_RETRY = RetryPolicy(backoff_base_s=0.01, backoff_cap_s=0.05, retry_after_cap_s=0.2)
PRICE_IN, PRICE_OUT = 1.0, 2.0        # USD per million tokens
PARAMS = {"max_tokens": 8}
GOLDEN_DIR = Path(__file__).resolve().parents[1] / "golden"


# ---------------------------------------------------------------- helpers
@pytest.fixture
def server():
    with FakeOpenAIServer() as srv:
        yield srv


@pytest.fixture
def cache(tmp_path):
    with ResponseCache(tmp_path / "cache" / "responses.sqlite") as c:
        yield c


@pytest.fixture(autouse=True)
def api_key(monkeypatch):
    monkeypatch.setenv(KEY_ENV, SECRET)
    return SECRET


def spec_for(server: FakeOpenAIServer, client: str, **overrides) -> ModelSpec:
    fields = dict(name="fake-model", litellm_model="openai/fake", provider="openai", family="fake",
                  api_base=server.api_base, api_key_env=KEY_ENV, price_input_per_million=PRICE_IN,
                  price_output_per_million=PRICE_OUT, max_concurrency=8, timeout_s=1.0, max_attempts=3, client=client)
    fields.update(overrides)
    return ModelSpec(**fields)


@pytest.fixture(params=["litellm", "http"])
def client(request) -> str:
    """Every engine test runs on both paths: litellm, and the lean OpenAI-compatible HTTP client."""
    if request.param == "litellm":
        request.getfixturevalue("litellm_warmed_up")
    return request.param


@pytest.fixture(scope="module")
def litellm_warmed_up():
    """litellm's first async calls in a process spend a second or more setting it up; on a loaded machine
    that exceeds the tests' 1 s timeouts and turns into a retry no test asked for."""
    with FakeOpenAIServer() as srv:
        async def warm():
            for call in (litellm.acompletion(messages=[{"role": "user", "content": "warm"}], **kwargs),
                         litellm.atext_completion(prompt="warm", **kwargs)):
                await call
        kwargs = dict(model="openai/fake", api_base=srv.api_base, api_key="sk-no-key", num_retries=0, max_retries=0)
        asyncio.run(warm())


@pytest.fixture
def make_spec(client):
    return lambda server, **overrides: spec_for(server, client, **overrides)


def wait_for_stragglers(server: FakeOpenAIServer, quiet_s: float = 0.3, limit_s: float = 10.0) -> None:
    """Let the server finish requests a cancelled run had already sent (it counts a request once answered)."""
    deadline = time.monotonic() + limit_s
    seen = server.total
    while time.monotonic() < deadline:
        time.sleep(quiet_s)
        if server.total == seen:
            return
        seen = server.total


def prompt(i: int, prefix: str = "case") -> str:
    return f"{prefix} {i}: is this summary faithful? Answer PASS or FAIL."


def make_requests(spec: ModelSpec, n: int, repeats: int = 1, prefix: str = "case", task: str = "grading") -> list[CallRequest]:
    """n distinct prompts x repeats. Distinct prompts keep 'one request body' == 'one case' on the server."""
    requests = []
    for i in range(n):
        messages = [{"role": "user", "content": prompt(i, prefix)}]
        for repeat in range(repeats):
            requests.append(CallRequest(task, "v1", f"{prefix}-{i:04d}", repeat, messages, dict(PARAMS),
                                        cache_key(spec.config_hash, messages, PARAMS, repeat)))
    return requests


def run(spec: ModelSpec, requests: list[CallRequest], cache: ResponseCache, **kwargs):
    return asyncio.run(run_model(spec, requests, cache, retry=FAST_RETRY, **kwargs))


def assert_one_row_per_request(frame: pl.DataFrame, requests: list[CallRequest]) -> None:
    keys = frame.select("task", "case_id", "repeat")
    assert frame.height == len(requests), "a request was lost or answered twice"
    assert keys.n_unique() == frame.height, "duplicate (task, case_id, repeat) rows"
    assert set(keys.iter_rows()) == {(r.task, r.case_id, r.repeat) for r in requests}
    assert frame["cache_key"].n_unique() == len({r.key for r in requests})


def arrivals_by_prompt(server: FakeOpenAIServer) -> dict[str, list[float]]:
    seen: dict[str, list[float]] = {}
    for record in server.records:
        seen.setdefault(record.last_message, []).append(record.arrived)
    return seen


# ---------------------------------------------------------------- the fake server itself
def test_fake_server_lists_models_and_counts_exactly(server):
    with urllib.request.urlopen(server.api_base + "/models", timeout=5) as response:
        listing = json.load(response)
    assert [m["id"] for m in listing["data"]] == ["fake"]
    assert server.api_base.startswith("http://127.0.0.1:")
    server.script = route([("boom", always(server_error()))], default=always(ok("PASS")))
    for text in ("fine", "boom", "fine again"):
        litellm_call = dict(model="openai/fake", api_base=server.api_base, api_key="k", num_retries=0, max_retries=0,
                            messages=[{"role": "user", "content": text}], timeout=5)
        try:
            litellm.completion(**litellm_call)
        except litellm.InternalServerError:
            pass
    assert (server.total, server.count(200), server.count(500), server.count("ok")) == (3, 2, 1, 2)


# ---------------------------------------------------------------- success and accounting
def test_instant_success_fills_every_field(server, cache, make_spec):
    server.script = always(ok("PASS", prompt_tokens=40, completion_tokens=2))
    spec = make_spec(server)
    requests = make_requests(spec, 12, repeats=2)
    frame, stats = run(spec, requests, cache)

    assert_one_row_per_request(frame, requests)
    assert frame["response_text"].to_list() == ["PASS"] * 24
    assert frame["error_class"].null_count() == 24
    assert frame["attempts"].to_list() == [1] * 24
    assert not frame["from_cache"].any()
    assert frame["finish_reason"].unique().to_list() == ["stop"]
    assert frame["cost_usd"].to_list() == pytest.approx([(40 * PRICE_IN + 2 * PRICE_OUT) / 1e6] * 24)
    assert (frame["latency_ms"] > 0).all()
    # Exact accounting: one HTTP request per call, each one cached.
    assert server.total == stats.sent == 24
    assert cache.count("fake-model") == 24
    assert (stats.done, stats.errors, stats.retries, stats.unknown_cost) == (24, 0, 0, 0)


def test_nonsense_text_is_a_successful_call(server, cache, make_spec):
    server.script = always(nonsense("purple monkey dishwasher }{"))
    spec = make_spec(server)
    requests = make_requests(spec, 5)
    frame, stats = run(spec, requests, cache)
    # The call worked; judging the answer is the scorer's job, not the engine's.
    assert frame["response_text"].to_list() == ["purple monkey dishwasher }{"] * 5
    assert frame["error_class"].null_count() == 5
    assert frame["attempts"].to_list() == [1] * 5
    assert stats.errors == 0 and server.total == 5


# ---------------------------------------------------------------- retries
def test_rate_limit_is_retried_after_the_retry_after_header(server, cache, make_spec):
    server.script = fail_first(1, rate_limited(retry_after=0.15))
    spec = make_spec(server)
    requests = make_requests(spec, 4)
    frame, stats = run(spec, requests, cache)

    assert frame["error_class"].null_count() == 4
    assert frame["attempts"].to_list() == [2] * 4
    assert (server.count(429), server.count(200), server.total) == (4, 4, 8)
    assert stats.retries == 4
    for text, times in arrivals_by_prompt(server).items():
        assert len(times) == 2, text
        # The backoff alone would be ~10 ms; waiting at least the header's 0.15 s proves it was honoured.
        assert times[1] - times[0] >= 0.15, f"{text}: retried after {times[1] - times[0]:.3f}s"


def test_retry_after_longer_than_the_cap_is_capped(server, cache, make_spec):
    server.script = fail_first(1, rate_limited(retry_after=30))
    spec = make_spec(server)
    requests = make_requests(spec, 3)
    started = time.monotonic()
    frame, _ = run(spec, requests, cache)

    assert frame["attempts"].to_list() == [2] * 3
    assert frame["error_class"].null_count() == 3
    for times in arrivals_by_prompt(server).values():
        assert 0.2 <= times[1] - times[0] < 2.0       # retry_after_cap_s = 0.2, not the server's 30 s
    assert time.monotonic() - started < 10


def test_server_error_is_retried_then_succeeds(server, cache, make_spec):
    server.script = fail_first(2, server_error(500))
    spec = make_spec(server, max_attempts=3)
    requests = make_requests(spec, 6)
    frame, stats = run(spec, requests, cache)

    assert frame["error_class"].null_count() == 6
    assert frame["response_text"].to_list() == ["PASS"] * 6
    assert frame["attempts"].to_list() == [3] * 6
    assert (server.count(500), server.count(200)) == (12, 6)
    assert stats.retries == 12 and stats.sent == server.total == 18


def test_server_error_every_time_stops_at_max_attempts(server, cache, make_spec):
    server.script = always(server_error(503, "overloaded"))
    spec = make_spec(server, max_attempts=4)
    requests = make_requests(spec, 3)
    frame, stats = run(spec, requests, cache)

    assert frame["attempts"].to_list() == [4] * 3
    assert frame["error_class"].to_list() == ["ServiceUnavailableError"] * 3
    assert frame["response_text"].null_count() == 3 and frame["cost_usd"].null_count() == 3
    assert server.total == 12
    assert stats.errors == 3 and stats.error_classes == {"ServiceUnavailableError": 3}
    assert cache.count() == 0           # failures are never cached: the next run tries again


def test_hang_past_timeout_is_retried_then_recorded_as_error(server, cache, make_spec):
    # A 1 s client timeout: long enough for every attempt to reach the server on a loaded machine
    # (a 0.3 s one sometimes expired before the request arrived), far shorter than the 20 s hang.
    server.script = always(hang(seconds=20))
    spec = make_spec(server, timeout_s=1.0, max_attempts=3)
    requests = make_requests(spec, 2)
    frame, stats = run(spec, requests, cache)

    assert frame.height == 2
    assert frame["error_class"].null_count() == 0
    assert set(frame["error_class"]) <= {"Timeout", "APITimeoutError", "TimeoutError"}, frame["error_class"].to_list()
    assert frame["attempts"].to_list() == [3, 3]
    assert server.count("hang") == 6
    # Each attempt is abandoned at the client timeout: all three together end long before one hang would.
    assert frame["latency_ms"].max() < 20_000


def test_one_hang_then_success(server, cache, make_spec):
    server.script = fail_first(1, hang(seconds=5))
    spec = make_spec(server, timeout_s=0.3)
    frame, _ = run(spec, make_requests(spec, 3), cache)
    assert frame["attempts"].to_list() == [2] * 3
    assert frame["error_class"].null_count() == 3
    assert (server.count("hang"), server.count("ok")) == (3, 3)


@pytest.mark.parametrize("reply", [garbage("<html>502 upstream confused</html>", "text/html"),
                                   garbage('{"choices": [ truncated', "application/json")],
                         ids=["html-body", "broken-json"])
def test_garbage_body_is_an_error_not_a_crash(server, cache, reply, make_spec):
    server.script = always(reply)
    spec = make_spec(server, max_attempts=3, timeout_s=10.0)   # no hang here: see the mixed-failures test
    requests = make_requests(spec, 4)
    frame, stats = run(spec, requests, cache)

    assert_one_row_per_request(frame, requests)
    assert frame["error_class"].null_count() == 0
    assert frame["response_text"].null_count() == 4
    assert frame["error_message"].str.len_chars().min() > 0
    assert frame["attempts"].is_between(1, 3).all()
    # Whatever litellm decides about retrying it, every HTTP request is accounted for.
    assert server.total == frame["attempts"].sum() == stats.sent
    assert cache.count() == 0


def test_mixed_failures_give_exactly_one_row_per_request(server, cache, make_spec):
    server.script = random_mix(seed=7, fractions={rate_limited(0.01): 0.15, server_error(500): 0.10,
                                                  server_error(502): 0.05, garbage(): 0.05, nonsense(): 0.10})
    # No hang in this mix, so a long client timeout costs nothing; with the default 1 s, a loaded machine
    # (the full suite at half speed) timed out 15 attempts before the server had answered them.
    spec = make_spec(server, max_concurrency=16, max_attempts=4, timeout_s=10.0)
    requests = make_requests(spec, 40, repeats=2)
    frame, stats = run(spec, requests, cache)

    assert_one_row_per_request(frame, requests)
    assert stats.done == stats.total == 80
    assert server.total == frame["attempts"].sum() == stats.sent
    assert stats.errors == frame["error_class"].drop_nulls().len()
    assert cache.count() == frame["error_class"].null_count()
    assert server.count(429) > 0 and server.count(500) > 0 and server.count("garbage") > 0


# ---------------------------------------------------------------- cache, resume
def test_unchanged_rerun_sends_nothing(server, cache, tmp_path, make_spec):
    server.script = always(ok("FAIL", prompt_tokens=30, completion_tokens=1))
    spec = make_spec(server)
    requests = make_requests(spec, 20, repeats=3)
    first, _ = run(spec, requests, cache)
    sent_first = server.total
    assert sent_first == 60

    # A fresh cache object on the same file: what the next process would see.
    with ResponseCache(cache.path) as reopened:
        second, stats = run(spec, requests, reopened)
    assert server.total == sent_first, "an unchanged rerun must not send any request"
    assert_one_row_per_request(second, requests)
    assert second["from_cache"].all() and second["attempts"].to_list() == [0] * 60
    assert (stats.cached, stats.sent) == (60, 0)
    columns = ["task", "case_id", "repeat", "response_text", "input_tokens", "output_tokens", "cost_usd", "latency_ms"]
    assert second.select(columns).equals(first.select(columns))


def test_rerun_resends_only_the_failed_calls(server, cache, make_spec):
    # Prompts of case 3 and 7 fail every time on the first run; everything else succeeds.
    server.script = route([("case 3:", always(server_error(500))), ("case 7:", always(server_error(500)))])
    spec = make_spec(server, max_attempts=2)
    requests = make_requests(spec, 10)
    first, _ = run(spec, requests, cache)
    assert first["error_class"].drop_nulls().len() == 2 and server.total == 8 + 2 * 2

    server.script = always(ok())
    server.reset()
    second, stats = run(spec, requests, cache)
    assert server.total == 2
    assert {r.last_message for r in server.records} == {prompt(3), prompt(7)}
    assert second["error_class"].null_count() == 10
    assert stats.cached == 8


# litellm builds a coroutine it has not awaited yet when the cancel lands; that is litellm's, not a leak of ours.
@pytest.mark.filterwarnings("ignore:coroutine .* was never awaited:RuntimeWarning")
def test_interrupted_run_resumes_without_resending_finished_calls(server, cache, make_spec):
    server.script = always(ok())
    spec = make_spec(server, max_concurrency=4)
    requests = make_requests(spec, 40)

    async def interrupted_run():
        # Cancel the whole run (as Ctrl-C or a killed Dagster step would) once 10 calls are finished.
        def progress(stats):
            if stats.done >= 10:
                run_task.cancel()

        run_task = asyncio.create_task(run_model(spec, requests, cache, retry=FAST_RETRY,
                                                 on_progress=progress, progress_every=1, progress_interval_s=0))
        done, _ = await asyncio.wait([run_task], timeout=30)
        assert run_task in done and run_task.cancelled()

    asyncio.run(interrupted_run())
    wait_for_stragglers(server)
    finished = cache.count()
    assert 10 <= finished < 40
    finished_prompts = {r.last_message for r in server.records if r.label == "ok"}
    server.reset()

    with ResponseCache(cache.path) as reopened:
        # Only prompts that never finished may go out again; the cached ones are read back.
        cached_keys = set(reopened.get_many([r.key for r in requests]))
        frame, stats = run(spec, requests, reopened)
    resent = [r.last_message for r in server.records]
    assert server.total == 40 - finished == len(set(resent))
    assert not set(resent) & {prompt(int(r.case_id[-4:])) for r in requests if r.key in cached_keys}
    assert_one_row_per_request(frame, requests)
    assert frame["from_cache"].sum() == finished == stats.cached
    assert frame["error_class"].null_count() == 40
    # Requests cut off mid-flight by the cancel reached the server but were never cached: resent, as they must be.
    assert finished_prompts >= {prompt(int(r.case_id[-4:])) for r in requests if r.key in cached_keys}


def test_partial_cache_from_an_earlier_run_is_reused(server, cache, make_spec):
    server.script = always(ok())
    spec = make_spec(server)
    requests = make_requests(spec, 30)
    run(spec, requests[:12], cache)
    server.reset()
    frame, stats = run(spec, requests, cache)
    assert server.total == 18
    assert {r.last_message for r in server.records} == {prompt(i) for i in range(12, 30)}
    assert frame["from_cache"].sum() == 12 and stats.sent == 18


def test_golden_sets_through_the_request_generator(server, cache, make_spec):
    from model_eval.golden import load_tasks, read_cases

    tasks = load_tasks(GOLDEN_DIR)
    cases = pl.concat([read_cases(t) for t in tasks])
    server.script = random_mix(seed=11, fractions={rate_limited(0.01): 0.1, server_error(500): 0.1})
    # A generous deadline: on a loaded machine a 1 s one can expire before a request reaches the
    # server, and this test counts requests, not deadlines (those have tests of their own).
    spec = make_spec(server, max_concurrency=16, max_attempts=5, timeout_s=15.0)
    requests = list(iter_requests(spec, tasks, cases.sort("task", "case_id").iter_rows(named=True)))
    assert len(requests) == sum(t.repeats * cases.filter(pl.col("task") == t.name).height for t in tasks)

    frame, _ = run(spec, requests, cache)
    assert_one_row_per_request(frame, requests)
    sent = server.total
    assert sent == frame["attempts"].sum()
    again, stats = run(spec, requests, cache)
    assert server.total == sent + (again.height - again["from_cache"].sum())
    assert stats.cached == cache.count()


# ---------------------------------------------------------------- cost and secrets
def test_unknown_price_is_null_never_zero(server, cache, make_spec):
    server.script = always(ok(prompt_tokens=50, completion_tokens=3))
    spec = make_spec(server, price_input_per_million=None, price_output_per_million=None,
                     litellm_model="openai/fake-model-litellm-cannot-price")
    frame, stats = run(spec, make_requests(spec, 5), cache)
    assert frame["error_class"].null_count() == 5
    assert frame["cost_usd"].null_count() == 5, frame["cost_usd"].to_list()
    assert stats.unknown_cost == 5
    # And from the cache the price is still unknown, not 0.
    again, _ = run(spec, make_requests(spec, 5), cache)
    assert again["from_cache"].all() and again["cost_usd"].null_count() == 5


def test_price_from_litellm_map_when_the_registry_has_none(server, cache, make_spec):
    server.script = always(ok(prompt_tokens=1000, completion_tokens=100))
    spec = make_spec(server, price_input_per_million=None, price_output_per_million=None,
                     litellm_model="openai/gpt-4o-mini")
    frame, stats = run(spec, make_requests(spec, 2), cache)
    assert stats.unknown_cost == 0
    assert (frame["cost_usd"] > 0).all()


@pytest.mark.parametrize("status,attempts", [(401, 1), (500, 3)])
def test_api_key_echoed_in_a_server_error_is_redacted(server, cache, status, attempts, make_spec):
    server.script = always(server_error(status, "Incorrect API key provided", echo_key=True))
    spec = make_spec(server, max_attempts=3)
    frame, _ = run(spec, make_requests(spec, 2), cache)

    assert frame["attempts"].to_list() == [attempts] * 2
    messages = frame["error_message"].to_list()
    assert all("Incorrect API key provided" in m for m in messages)
    assert all(SECRET not in m and "***" in m for m in messages), messages
    assert SECRET not in frame.write_csv()


# ---------------------------------------------------------------- regressions: bugs found in the engine and fixed
def test_timeout_is_a_deadline_for_the_whole_call(server, cache, make_spec):
    server.script = always(slow_body(seconds=2.0, chunks=10))     # each read 0.2 s: under the 0.3 s timeout
    spec = make_spec(server, timeout_s=0.3, max_attempts=1)
    started = time.monotonic()
    frame, _ = run(spec, make_requests(spec, 1), cache)
    assert time.monotonic() - started < 1.5, "one attempt with timeout_s=0.3 took the server's full 2 s"
    assert frame["error_class"][0] is not None


def test_a_failing_progress_callback_does_not_duplicate_rows(server, cache, make_spec):
    server.script = always(ok())
    spec = make_spec(server)
    requests = make_requests(spec, 5)
    raised = []

    def flaky_progress(stats):
        if not raised:
            raised.append(stats.done)
            raise RuntimeError("progress sink unavailable")

    frame, _ = run(spec, requests, cache, on_progress=flaky_progress, progress_every=1, progress_interval_s=0)
    assert raised
    assert_one_row_per_request(frame, requests)
    assert frame["error_class"].null_count() == 5


def test_progress_is_reported_at_most_once_per_interval_and_always_at_the_end(server, cache, make_spec):
    server.script = always(ok())
    spec = make_spec(server, max_concurrency=4)
    seen: dict[float, list[int]] = {0: [], 3600: []}
    for interval, reports in seen.items():
        run(spec, make_requests(spec, 30, prefix=f"i{interval}"), cache, progress_every=1, progress_interval_s=interval,
            on_progress=lambda stats, reports=reports: reports.append(stats.done))
    assert seen[0] == list(range(1, 31))       # no interval: every row
    assert seen[3600] == [30]                   # an interval longer than the run: only the last


# ---------------------------------------------------------------- completion mode (base models)
def test_completion_mode_goes_to_the_text_endpoint_with_prompt_stop_and_retries(server, cache, make_spec):
    from model_eval.golden import load_tasks
    from model_eval.prompts import CompletionTemplate

    template = CompletionTemplate(system="{text}\n\n", user="{text}", assistant=" {text}\n\n", stop=("\n\n",))
    seen: list = []

    def script(info):
        seen.append(info)
        return rate_limited(retry_after=0.05) if info.attempt == 1 else ok(" Kestrel Supply", prompt_tokens=300, completion_tokens=3)

    server.script = script
    spec = make_spec(server, mode="completion", completion_template=template)
    task = load_tasks(GOLDEN_DIR, only=["employer"])[0]
    cases = pl.DataFrame({"task": ["employer"] * 3, "dataset_version": [task.dataset_version] * 3,
                          "case_id": ["e1", "e2", "e3"], "inputs_json": [json.dumps({"posting": f"Posting {i}"}) for i in range(3)]})
    requests = list(iter_requests(spec, [task], cases.iter_rows(named=True)))
    frame, stats = run(spec, requests, cache)

    assert_one_row_per_request(frame, requests)
    assert {info.endpoint for info in seen} == {"text"}               # never the chat endpoint
    # Repeats of a case send the same body, so only each case's first arrival is rate-limited.
    assert server.count(429) == 3 and stats.retries == 3 and server.count(200) == len(requests)
    for info in seen:
        assert "messages" not in info.payload and info.payload["stop"] == ["\n\n"]
        assert info.payload["prompt"].startswith(task.system_prompt) and info.payload["prompt"].endswith("\n\nEmployer:")
        assert info.payload["max_tokens"] == task.call_params["max_tokens"]
    assert frame["response_text"].to_list() == [" Kestrel Supply"] * len(requests)
    assert frame["input_tokens"].to_list() == [300] * len(requests)
    assert frame["cost_usd"].to_list() == pytest.approx([(300 * PRICE_IN + 3 * PRICE_OUT) / 1e6] * len(requests))

    # Unchanged, the second run is answered from the cache; a chat-mode spec asks anew.
    again, again_stats = run(spec, list(iter_requests(spec, [task], cases.iter_rows(named=True))), cache)
    assert again_stats.sent == 0 and again["from_cache"].all()
    server.reset()
    server.script = always(ok("Kestrel Supply"))
    chat_spec = make_spec(server)
    _, chat_stats = run(chat_spec, list(iter_requests(chat_spec, [task], cases.iter_rows(named=True))), cache)
    assert chat_stats.sent == len(requests) and {r.endpoint for r in server.records} == {"chat"}


# ---------------------------------------------------------------- the two paths agree
FAULTS = {
    **{f"status-{status}": server_error(status, f"scripted {status}")
       for status in (400, 401, 403, 404, 408, 409, 422, 429, 500, 501, 502, 503, 504, 520, 529)},
    "context-window": server_error(400, "This model's maximum context length is 4097 tokens"),
    "rate-limit-wording": server_error(400, "Rate limit reached for requests"),
    "html-body": garbage("<html>502 upstream confused</html>", "text/html"),
    "broken-json": garbage('{"choices": [ truncated', "application/json"),
    "json-list": garbage("[1, 2]", "application/json"),
    "hang": hang(seconds=6),                     # past the 2 s read timeout
    "drip": slow_body(seconds=4.5, chunks=5),    # each read within it, the whole past the engine's 2.7 s deadline
}


@pytest.mark.parametrize("mode", ["chat", "completion"])
def test_both_paths_record_the_same_error_class_for_each_fault(server, tmp_path, mode, litellm_warmed_up):
    """litellm's own classification is the reference: the HTTP path must name each fault the same."""
    from model_eval.prompts import CompletionTemplate

    server.script = route([(f"fault {name}:", always(reply)) for name, reply in FAULTS.items()])
    template = CompletionTemplate(system="{text}\n\n", user="{text}", assistant=" {text}\n\n", stop=("\n\n",))
    extra = {"mode": "completion", "completion_template": template} if mode == "completion" else {}
    classes = {}
    for client in ("litellm", "http"):
        spec = spec_for(server, client, timeout_s=2.0, max_attempts=1, max_concurrency=len(FAULTS), **extra)
        requests = []
        for name in FAULTS:
            asked = build_input([{"role": "user", "content": f"fault {name}: PASS or FAIL?"}], spec.mode, spec.completion_template)
            requests.append(CallRequest("grading", "v1", name, 0, asked.messages, dict(PARAMS),
                                        cache_key(spec.config_hash, asked.messages, PARAMS, 0), asked.prompt, asked.stop))
        with ResponseCache(tmp_path / f"{client}.sqlite") as own_cache:
            frame, _ = run(spec, requests, own_cache)
        classes[client] = dict(zip(frame["case_id"], frame["error_class"]))
    assert None not in classes["litellm"].values(), classes["litellm"]
    differing = {name: (classes["litellm"][name], classes["http"][name]) for name in FAULTS
                 if classes["litellm"][name] != classes["http"][name]}
    assert not differing, f"(litellm, http) error_class per fault: {differing}"


def test_a_refused_connection_is_the_same_error_on_both_paths(tmp_path, litellm_warmed_up):
    import socket

    with socket.socket() as probe:          # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    seen = {}
    for client in ("litellm", "http"):
        spec = ModelSpec(name="nobody", litellm_model="openai/fake", provider="openai", family="fake",
                         api_base=f"http://127.0.0.1:{port}/v1", price_input_per_million=0.0, price_output_per_million=0.0,
                         timeout_s=1.0, max_attempts=2, client=client)
        with ResponseCache(tmp_path / f"{client}.sqlite") as own_cache:
            frame, _ = run(spec, make_requests(spec, 2), own_cache)
        assert frame["attempts"].to_list() == [2, 2]       # retried: a connection error is transient
        seen[client] = set(frame["error_class"])
    assert seen["http"] == seen["litellm"], seen


def test_http_path_keeps_connections_open_across_calls(cache):
    """One session per run: 200 calls at concurrency 4 reuse a handful of TCP connections."""
    from aiohttp import web

    peers: list[tuple] = []

    async def chat(request):
        peers.append(request.transport.get_extra_info("peername"))
        return web.json_response({"choices": [{"message": {"content": "PASS"}, "finish_reason": "stop"}],
                                  "usage": {"prompt_tokens": 3, "completion_tokens": 1}})

    async def scenario():
        app = web.Application()
        app.router.add_post("/v1/chat/completions", chat)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        try:
            spec = ModelSpec(name="pool", litellm_model="openai/fake", provider="openai", family="fake",
                             api_base=f"http://127.0.0.1:{port}/v1", price_input_per_million=0.0,
                             price_output_per_million=0.0, max_concurrency=4, timeout_s=5.0, client="http")
            return await run_model(spec, make_requests(spec, 200), cache, retry=FAST_RETRY)
        finally:
            await runner.cleanup()

    frame, stats = asyncio.run(scenario())
    assert stats.sent == len(peers) == 200 and frame["error_class"].null_count() == 200
    assert len(set(peers)) <= 8, f"{len(set(peers))} connections for 200 calls at concurrency 4"


def test_http_path_never_imports_litellm(tmp_path):
    """The point of the lean path: a run over it (prices from the map included) never loads litellm."""
    import subprocess
    import sys

    script = f"""
import asyncio, sys
from pathlib import Path
from model_eval_tests.fake_openai_server import FakeOpenAIServer, always, ok
from model_eval.inference import CallRequest, run_model
from model_eval.registry import ModelSpec
from model_eval.response_cache import ResponseCache, cache_key
with FakeOpenAIServer(always(ok(prompt_tokens=100, completion_tokens=10))) as server, \\
        ResponseCache(Path({str(tmp_path)!r}) / "c.sqlite") as cache:
    spec = ModelSpec(name="m", litellm_model="openai/gpt-4o-mini", provider="openai", family="gpt-4o",
                     api_base=server.api_base, timeout_s=5.0)
    messages = [[{{"role": "user", "content": f"case {{i}}"}}] for i in range(5)]
    requests = [CallRequest("grading", "v1", f"c{{i}}", 0, m, {{}}, cache_key(spec.config_hash, m, {{}}, 0))
                for i, m in enumerate(messages)]
    frame, stats = asyncio.run(run_model(spec, requests, cache))
assert spec.transport == "http" and stats.errors == 0 and frame["cost_usd"].null_count() == 0, frame
print("litellm" in sys.modules)
"""
    # A child process: this test module itself has imported litellm.
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize("model", ["openai/gpt-4o-mini", "anthropic/claude-3-5-haiku-20241022", "gemini/gemini-2.0-flash",
                                   "gpt-4o", "openai/no-such-model"])
def test_cost_from_the_price_map_agrees_with_litellm(model):
    """Both paths price tokens from the map read as a file (model_map); litellm's own arithmetic is the reference."""
    from model_eval.inference import CostCalculator

    try:
        expected = sum(litellm.cost_per_token(model=model, prompt_tokens=1234, completion_tokens=56))
    except Exception:  # noqa: BLE001 - litellm raises for models it does not price
        expected = None
    spec = ModelSpec(name="m", litellm_model=model, provider="x", family="x")
    got = CostCalculator(spec)(1234, 56)
    assert (got is None) == (expected is None), (got, expected)
    if expected is not None:
        assert got == pytest.approx(expected, rel=1e-9)


def test_http_path_honours_the_proxy_environment_like_litellm(monkeypatch):
    from model_eval.http_client import proxy_for

    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.internal:3128")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    assert proxy_for("https://api.openai.com/v1") == "http://proxy.internal:3128"
    assert proxy_for("http://127.0.0.1:8000/v1") is None          # no http proxy set, and bypassed anyway
    monkeypatch.setenv("HTTP_PROXY", "http://proxy.internal:3128")
    assert proxy_for("http://127.0.0.1:8000/v1") is None          # NO_PROXY
    assert proxy_for("http://gateway.internal/v1") == "http://proxy.internal:3128"
