"""Fault suite: the engine against a provider that fails 40% of attempts, and the same calls fault-free.

The faulty endpoint (benchmarks/fake_endpoint.py --faults) answers each attempt, drawn by a seeded
hash of (call, attempt): 15% 429 with Retry-After 0.01 s, 15% 500, 5% hang for 3 s (the client's
timeout is 0.5 s), 5% a 200 whose body is HTML; the rest succeed. Because the draw is a pure
function, the endpoint can tell afterwards exactly which calls were *doomed* (every one of their
4 allowed attempts drawn a fault): the engine must complete every other call, and fail those.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from benchmarks.common import Endpoint, Figure, make_requests, make_spec

from model_eval.inference import RetryPolicy, RunStats, run_model  # noqa: E402
from model_eval.response_cache import ResponseCache  # noqa: E402

TIMEOUT_S = 0.5
MAX_ATTEMPTS = 4
CONCURRENCY = 32
# Fast retries, as in the resilience tests: the figure is about the engine's behaviour, not waiting.
FAST_RETRY = RetryPolicy(backoff_base_s=0.01, backoff_cap_s=0.05, retry_after_cap_s=0.05)
# Wall time with faults, relative to the same calls without: ~1.65x as many attempts are sent
# (1 / 0.6 per call, capped at 4), hangs hold a slot for the 0.5 s timeout, and the adaptive limit
# halves on 429s. Up to 3x is "the faults cost time, they do not stall the run".
TARGET_SLOWDOWN = 3.0


@dataclass
class FaultSuite:
    calls: int
    clean_s: float
    fault_s: float
    frame: pl.DataFrame
    stats: RunStats
    doomed: int                 # calls the script failed on every allowed attempt
    first_attempt_faulty: int   # calls whose first attempt the script failed
    lost_ok: int                # OK replies the client timed out on (it tried that call again)
    server_total: int           # attempts the faulty server received

    def figures(self) -> list[Figure]:
        failed = self.frame.filter(pl.col("error_class").is_not_null())
        completed = self.frame.height - failed.height
        retried = self.frame.filter(pl.col("attempts") > 1).height
        unique = self.frame.select("case_id", "repeat").n_unique()
        limits = [limit for _, limit in self.stats.concurrency_trace]
        allowed = self.calls - self.doomed
        slowdown = self.fault_s / self.clean_s
        return [
            # A measurement check first: on a loaded machine a 0.5 s timeout can fire on an OK reply,
            # which then reads as a fault the script did not send and shifts the exact figures below.
            Figure("2 faults: OK replies lost to client timeouts", f"{self.lost_ok}", "= 0 (else: load)", self.lost_ok == 0),
            Figure(f"2 faults, {self.calls:,} calls: one result per call", f"{unique:,} of {self.frame.height:,} rows",
                   f"= {self.calls:,}", unique == self.frame.height == self.calls),
            Figure("2 faults: completion share", f"{completed / self.calls:.2%} ({completed:,})",
                   f">= {allowed / self.calls:.2%} (not doomed)", completed >= allowed),
            Figure("2 faults: calls retried", f"{retried:,} ({self.stats.retries:,} retries, {self.stats.sent:,} sent)",
                   f"= {self.first_attempt_faulty:,} (1st attempt faulty)", retried == self.first_attempt_faulty),
            Figure("2 faults: failed calls", f"{failed.height:,} ({failed.height / self.calls:.2%})",
                   f"= {self.doomed:,} (doomed by the script)",
                   failed.height == self.doomed and bool((failed["attempts"] == MAX_ATTEMPTS).all())),
            Figure("2 faults: min concurrency reached", f"{min(limits)} (of {CONCURRENCY}; {self.stats.rate_limited:,} 429s; "
                   f"ended at {limits[-1]})", f"< {CONCURRENCY} (backs off)", min(limits) < CONCURRENCY),
            Figure("2 faults: wall time vs fault-free", f"{slowdown:.2f}x ({self.fault_s:.1f} s vs {self.clean_s:.1f} s)",
                   f"<= {TARGET_SLOWDOWN:g}x", slowdown <= TARGET_SLOWDOWN),
        ]


def _run(api_base: str, calls: int, cache_path: Path, salt: str = "fault suite ") -> tuple[float, pl.DataFrame, RunStats]:
    spec = make_spec(api_base, CONCURRENCY, timeout_s=TIMEOUT_S, max_attempts=MAX_ATTEMPTS)
    # One repeat: the fake server counts attempts per request body, and the script draws per attempt.
    requests = make_requests(spec, calls, repeats=1, salt=salt)
    with ResponseCache(cache_path) as cache:
        started = time.perf_counter()
        frame, stats = asyncio.run(run_model(spec, requests, cache, retry=FAST_RETRY))
        return time.perf_counter() - started, frame, stats


def measure(calls: int, seed: int, workdir: Path) -> FaultSuite:
    with Endpoint() as clean:
        _run(clean.api_base, 2 * CONCURRENCY, workdir / "fault-warm.sqlite", salt="warm-up ")    # untimed
        clean_s, clean_frame, _ = _run(clean.api_base, calls, workdir / "fault-free.sqlite")
    if clean_frame["error_class"].null_count() != clean_frame.height:
        raise RuntimeError("the fault-free run had errors: its time is no baseline")

    faulty = Endpoint(faults=True, seed=seed, max_attempts=MAX_ATTEMPTS)
    try:
        fault_s, frame, stats = _run(faulty.api_base, calls, workdir / "faults.sqlite")
    finally:
        summary = faulty.close()
    if not summary or summary["calls"] != calls:
        raise RuntimeError(f"the faulty endpoint saw {summary and summary['calls']} distinct calls, not {calls}")
    return FaultSuite(calls=calls, clean_s=clean_s, fault_s=fault_s, frame=frame, stats=stats, doomed=summary["doomed"],
                      first_attempt_faulty=summary["first_attempt_faulty"], lost_ok=summary["lost_ok"],
                      server_total=summary["total"])
