"""Throughput and CPU per call: the engine (`run_model`) on both of its paths versus a bare
`litellm.acompletion` loop, and an unchanged re-run.

Every side makes the same calls with the same arguments and the same concurrency against the instant
fake endpoint (another process, so its CPU is not counted). On the litellm path, litellm's own per-call
CPU is the ceiling, so engine / bare litellm is the engine's overhead: cache writes, cost, rows, the
adaptive concurrency limit. The lean path (`client: http`, the OpenAI-compatible aiohttp client) does
the same bookkeeping without litellm; its CPU per call is the figure issue 11 sets at <= 1 ms.
"""

from __future__ import annotations

import asyncio
import cProfile
import dataclasses
import io
import pstats
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.common import Endpoint, Figure, make_requests, make_spec

import litellm  # noqa: E402  (after benchmarks.common has set litellm's environment)

from model_eval.inference import CallRequest, RetryPolicy, run_model  # noqa: E402
from model_eval.registry import ModelSpec  # noqa: E402
from model_eval.response_cache import ResponseCache  # noqa: E402

litellm.suppress_debug_info = True

TARGET_RATIO = 0.9               # the engine keeps >= 90% of bare litellm throughput
TARGET_LEAN_CPU_MS = 1.0         # the lean path: at most 1 ms of CPU per call, everything included
TARGET_RERUN_SENT = 0            # an unchanged re-run sends nothing
TARGET_RERUN_MS_PER_CALL = 1.0   # ...and answers from the cache in under 1 ms a call
SIDES = ("bare", "engine", "lean")


def cpu_seconds() -> float:
    """User + system CPU of this process so far (the endpoint runs in another one)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def bare_litellm(spec: ModelSpec, requests: list[CallRequest], concurrency: int) -> float:
    """The baseline: the same calls, same arguments, same concurrency, no engine. Returns seconds."""
    semaphore = asyncio.Semaphore(concurrency)

    async def one(req: CallRequest) -> None:
        async with semaphore:
            await litellm.acompletion(model=spec.litellm_model, messages=req.messages, api_base=spec.api_base,
                                      api_key="sk-no-key", timeout=spec.timeout_s, num_retries=0, max_retries=0,
                                      **req.params)

    started = time.perf_counter()
    await asyncio.gather(*(one(r) for r in requests))
    return time.perf_counter() - started


def engine_run(spec: ModelSpec, requests: list[CallRequest], cache_path: Path, profiler: cProfile.Profile | None = None):
    """One run_model on the cache at `cache_path`; returns (seconds, frame, stats)."""
    with ResponseCache(cache_path) as cache:
        started = time.perf_counter()
        if profiler:
            profiler.enable()
        frame, stats = asyncio.run(run_model(spec, requests, cache, retry=RetryPolicy()))
        if profiler:
            profiler.disable()
        return time.perf_counter() - started, frame, stats


@dataclass
class Side:
    calls: int = 0
    seconds: float = 0.0
    cpu_s: float = 0.0

    @property
    def rate(self) -> float:
        return self.calls / self.seconds if self.seconds else 0.0

    @property
    def cpu_ms_per_call(self) -> float:
        return 1000 * self.cpu_s / self.calls if self.calls else 0.0


@dataclass
class Throughput:
    bare: dict[int, Side] = field(default_factory=dict)      # concurrency -> totals
    engine: dict[int, Side] = field(default_factory=dict)    # run_model through litellm
    lean: dict[int, Side] = field(default_factory=dict)      # run_model over the HTTP client
    rerun_calls: int = 0
    rerun_sent: int = 0
    rerun_s: float = 0.0
    rerun_from_cache: int = 0
    profile: str | None = None

    def ratio(self, concurrency: int) -> float:
        return self.engine[concurrency].rate / self.bare[concurrency].rate

    def lean_ratio(self, concurrency: int) -> float:
        return self.lean[concurrency].rate / self.bare[concurrency].rate

    def figures(self) -> list[Figure]:
        out = []
        for c in self.bare:
            bare, engine, lean = self.bare[c], self.engine[c], self.lean[c]
            out += [
                Figure(f"1 throughput c={c}: bare litellm loop, {bare.calls:,} calls",
                       f"{bare.rate:,.0f} calls/s, {bare.cpu_ms_per_call:.2f} ms CPU/call", "baseline"),
                Figure(f"1 throughput c={c}: engine via litellm, {engine.calls:,} calls",
                       f"{engine.rate:,.0f} calls/s, {engine.cpu_ms_per_call:.2f} ms CPU/call"),
                Figure(f"1 throughput c={c}: engine via litellm / bare", f"{self.ratio(c):.3f}", f">= {TARGET_RATIO}",
                       self.ratio(c) >= TARGET_RATIO),
                Figure(f"1 throughput c={c}: engine via HTTP client, {lean.calls:,} calls",
                       f"{lean.rate:,.0f} calls/s = {self.lean_ratio(c):.1f}x bare litellm"),
                Figure(f"1 throughput c={c}: engine via HTTP client, CPU per call", f"{lean.cpu_ms_per_call:.2f} ms "
                       f"({engine.cpu_ms_per_call / lean.cpu_ms_per_call:.1f}x less than via litellm)",
                       f"<= {TARGET_LEAN_CPU_MS:g} ms", lean.cpu_ms_per_call <= TARGET_LEAN_CPU_MS),
            ]
        limit_s = TARGET_RERUN_MS_PER_CALL * self.rerun_calls / 1000
        out += [
            Figure(f"1 re-run unchanged, {self.rerun_calls:,} calls: sent to server", f"{self.rerun_sent}",
                   f"= {TARGET_RERUN_SENT}", self.rerun_sent == TARGET_RERUN_SENT and self.rerun_from_cache == self.rerun_calls),
            Figure(f"1 re-run unchanged, {self.rerun_calls:,} calls: wall time", f"{self.rerun_s:.2f} s",
                   f"<= {limit_s:g} s", self.rerun_s <= limit_s),
        ]
        return out


def measure(calls: int, concurrencies: list[int], rounds: int, workdir: Path, profile: bool) -> Throughput:
    """`calls` per side and concurrency, split into `rounds` interleaved rounds."""
    result = Throughput()
    done: list[tuple[ModelSpec, list[CallRequest], Path]] = []
    with Endpoint() as endpoint:
        for concurrency in concurrencies:
            # The same model on each path; the client is not part of config_hash, so the requests
            # (and their cache keys) are identical.
            specs = {"engine": dataclasses.replace(make_spec(endpoint.api_base, concurrency), client="litellm"),
                     "lean": dataclasses.replace(make_spec(endpoint.api_base, concurrency), client="http")}
            spec = specs["engine"]
            # Warm-up outside the timings: imports, litellm's lazy setup, a connection pool this wide.
            warm = make_requests(spec, 2 * concurrency, salt=f"warm {concurrency} ")
            asyncio.run(bare_litellm(spec, warm, concurrency))
            for side in ("engine", "lean"):
                engine_run(specs[side], warm, workdir / f"warm-{concurrency}-{side}.sqlite")

            # The sides take turns in an order rotated every round (bare, engine, lean | engine, lean,
            # bare | ...): slow drift of a shared machine (other load, the server's heap) weighs on all alike.
            per_round = calls // rounds
            sides = {name: Side() for name in SIDES}
            for r in range(rounds):
                requests = make_requests(spec, per_round, salt=f"c{concurrency} round {r} ")
                before = endpoint.sent()
                for name in SIDES[r % 3:] + SIDES[:r % 3]:
                    cpu_before = cpu_seconds()
                    if name == "bare":
                        seconds = asyncio.run(bare_litellm(spec, requests, concurrency))
                    else:
                        cache_path = workdir / f"{name}-{concurrency}-{r}.sqlite"   # a fresh cache every round
                        seconds, frame, stats = engine_run(specs[name], requests, cache_path)
                        if stats.errors or stats.retries or frame.height != len(requests):
                            raise RuntimeError(f"{name} run had {stats.errors} errors, {stats.retries} retries, "
                                               f"{frame.height} rows for {len(requests)} calls: not a clean benchmark")
                        done.append((specs[name], requests, cache_path))
                    sides[name].cpu_s += cpu_seconds() - cpu_before
                    sides[name].seconds += seconds
                    sides[name].calls += len(requests)
                # No side may have hidden retries (or lost calls) from the comparison.
                if endpoint.sent() - before != len(SIDES) * len(requests):
                    raise RuntimeError("the server saw a different number of calls than were made; the comparison is off")
            result.bare[concurrency], result.engine[concurrency], result.lean[concurrency] = (
                sides["bare"], sides["engine"], sides["lean"])

        # The unchanged re-run: every engine run's requests again, each on the cache its run filled.
        before = endpoint.sent()
        for spec, requests, cache_path in done:
            seconds, frame, _ = engine_run(spec, requests, cache_path)
            result.rerun_s += seconds
            result.rerun_calls += len(requests)
            result.rerun_from_cache += int(frame["from_cache"].sum())
        result.rerun_sent = endpoint.sent() - before

        missed = [c for c in concurrencies if result.ratio(c) < TARGET_RATIO]
        if profile or missed:
            concurrency = (missed or concurrencies)[0]
            spec = make_spec(endpoint.api_base, concurrency)
            profiler = cProfile.Profile()
            engine_run(dataclasses.replace(spec, client="litellm"),
                       make_requests(spec, min(calls // rounds, 1000), salt="profile "), workdir / "profile.sqlite", profiler)
            result.profile = f"engine profile at concurrency {concurrency}\n" + top_functions(profiler)
    return result


def top_functions(profiler: cProfile.Profile, limit: int = 25) -> str:
    """Where the time goes, by own time, with the model_eval share called out."""
    out = io.StringIO()
    stats = pstats.Stats(profiler, stream=out)
    total = stats.total_tt
    own = sum(tt for (path, _, _), (_, _, tt, _, _) in stats.stats.items() if "/model_eval/" in path)
    out.write(f"profiled engine run: {total:.2f} s in Python; model_eval's own code: {own:.3f} s "
              f"({100 * own / total:.1f}%), not counting what it calls\n")
    # The engine's synchronous helpers, with what they call (e.g. SQLite under ResponseCache.put_many).
    # Coroutines are left out: their cumulative time includes every await, i.e. litellm.
    coroutines = {"run_model", "one", "work", "feed", "_default_completion", "acquire", "release", "__call__"}
    helpers = sorted(((ct, nc, func, Path(path).name) for (path, _, func), (_, nc, _, ct, _) in stats.stats.items()
                      if "/model_eval/" in path and func not in coroutines), reverse=True)
    out.write("model_eval functions by cumulative time:\n")
    for ct, nc, func, name in helpers[:8]:
        out.write(f"  {ct:8.3f} s  {nc:7d} calls  {1e3 * ct / nc:7.3f} ms/call  {name}:{func}\n")
    out.write("\n")
    stats.sort_stats("tottime").print_stats(limit)
    return out.getvalue()
