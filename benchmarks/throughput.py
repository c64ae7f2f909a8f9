"""Throughput: the engine (`run_model`) versus a bare `litellm.acompletion` loop, and an unchanged re-run.

Both sides make the same calls with the same arguments and the same concurrency against the instant
fake endpoint (another process). litellm's own per-call CPU is the ceiling for both, so the ratio
is the engine's overhead: cache writes, cost, rows, the adaptive concurrency limit.
"""

from __future__ import annotations

import asyncio
import cProfile
import io
import pstats
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
TARGET_RERUN_SENT = 0            # an unchanged re-run sends nothing
TARGET_RERUN_MS_PER_CALL = 1.0   # ...and answers from the cache in under 1 ms a call


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

    @property
    def rate(self) -> float:
        return self.calls / self.seconds if self.seconds else 0.0


@dataclass
class Throughput:
    bare: dict[int, Side] = field(default_factory=dict)      # concurrency -> totals
    engine: dict[int, Side] = field(default_factory=dict)
    rerun_calls: int = 0
    rerun_sent: int = 0
    rerun_s: float = 0.0
    rerun_from_cache: int = 0
    profile: str | None = None

    def ratio(self, concurrency: int) -> float:
        return self.engine[concurrency].rate / self.bare[concurrency].rate

    def figures(self) -> list[Figure]:
        out = []
        for c in self.bare:
            bare, engine = self.bare[c], self.engine[c]
            out += [
                Figure(f"1 throughput c={c}: bare litellm loop, {bare.calls:,} calls", f"{bare.rate:,.0f} calls/s", "baseline"),
                Figure(f"1 throughput c={c}: engine run_model, {engine.calls:,} calls", f"{engine.rate:,.0f} calls/s"),
                Figure(f"1 throughput c={c}: engine / bare", f"{self.ratio(c):.3f}", f">= {TARGET_RATIO}",
                       self.ratio(c) >= TARGET_RATIO),
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
            spec = make_spec(endpoint.api_base, concurrency)
            # Warm-up outside the timings: imports, litellm's lazy setup, a connection pool this wide.
            warm = make_requests(spec, 2 * concurrency, salt=f"warm {concurrency} ")
            asyncio.run(bare_litellm(spec, warm, concurrency))
            engine_run(spec, warm, workdir / f"warm-{concurrency}.sqlite")

            # Rounds in the order bare, engine | engine, bare | ...: slow drift of a shared machine
            # (other load, the server's heap) then weighs on both sides equally.
            per_round = calls // rounds
            bare, engine = Side(), Side()
            for r in range(rounds):
                requests = make_requests(spec, per_round, salt=f"c{concurrency} round {r} ")
                cache_path = workdir / f"engine-{concurrency}-{r}.sqlite"   # a fresh cache every round
                before = endpoint.sent()
                for side in (("bare", "engine") if r % 2 == 0 else ("engine", "bare")):
                    if side == "bare":
                        bare.seconds += asyncio.run(bare_litellm(spec, requests, concurrency))
                        bare.calls += len(requests)
                    else:
                        seconds, frame, stats = engine_run(spec, requests, cache_path)
                        if stats.errors or stats.retries or frame.height != len(requests):
                            raise RuntimeError(f"engine run had {stats.errors} errors, {stats.retries} retries, "
                                               f"{frame.height} rows for {len(requests)} calls: not a clean benchmark")
                        engine.seconds += seconds
                        engine.calls += len(requests)
                # Neither side may have hidden retries (or lost calls) from the comparison.
                if endpoint.sent() - before != 2 * len(requests):
                    raise RuntimeError("the server saw a different number of calls than were made; the comparison is off")
                done.append((spec, requests, cache_path))
            result.bare[concurrency], result.engine[concurrency] = bare, engine

        # The unchanged re-run: every round's requests again, each on the cache its run filled.
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
            engine_run(spec, make_requests(spec, min(calls // rounds, 1000), salt="profile "),
                       workdir / "profile.sqlite", profiler)
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
    coroutines = {"run_model", "one", "work", "feed", "_default_completion", "acquire", "release"}
    helpers = sorted(((ct, nc, func, Path(path).name) for (path, _, func), (_, nc, _, ct, _) in stats.stats.items()
                      if "/model_eval/" in path and func not in coroutines), reverse=True)
    out.write("model_eval functions by cumulative time:\n")
    for ct, nc, func, name in helpers[:8]:
        out.write(f"  {ct:8.3f} s  {nc:7d} calls  {1e3 * ct / nc:7.3f} ms/call  {name}:{func}\n")
    out.write("\n")
    stats.sort_stats("tottime").print_stats(limit)
    return out.getvalue()
