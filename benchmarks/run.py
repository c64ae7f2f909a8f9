"""Benchmarks of the inference engine, the response cache, scoring and metrics, in one run.

    python benchmarks/run.py            # ~2 minutes on 2 cores
    python benchmarks/run.py --help     # sizes, rounds, profiling

What it measures (see benchmarks/README.md for the why of each figure and target):

(a) calls/s of model_eval.inference.run_model against an instant fake OpenAI endpoint, versus a
    bare `litellm.acompletion` loop with the same concurrency, call count and call arguments. The
    ratio is the engine's own overhead; litellm itself is the ceiling for both.
(b) an unchanged re-run of the same requests on the same cache: calls sent (must be 0) and time.
(c) DuckDB `compute_metrics` over 1,000,000 synthetic score rows, and `score_results` (verdict
    scorer) over synthetic inference rows, extrapolated per row to 1,000,000.

The fake endpoint is the test double model_eval_tests/fake_openai_server.py, run in its own process
so that it does not compete with the measured client for the GIL.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import datetime as dt
import io
import json
import os
import platform
import pstats
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

# Before litellm is imported: use the bundled price map (no network) and no telemetry.
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DAGSTER_DISABLE_TELEMETRY", "1")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing; model_eval_tests is not packaged

import litellm  # noqa: E402
import polars as pl  # noqa: E402

from model_eval import warehouse  # noqa: E402
from model_eval.golden import load_task  # noqa: E402
from model_eval.inference import CallRequest, RetryPolicy, run_model  # noqa: E402
from model_eval.metrics import compute_metrics  # noqa: E402
from model_eval.registry import ModelSpec  # noqa: E402
from model_eval.response_cache import ResponseCache, cache_key  # noqa: E402
from model_eval.scoring import score_results  # noqa: E402

litellm.suppress_debug_info = True

TARGET_RATIO = 0.9               # the engine keeps >= 90% of bare litellm throughput
TARGET_RERUN_SENT = 0            # an unchanged re-run sends nothing
TARGET_RERUN_MS_PER_CALL = 1.0   # ...and answers from the cache in under 1 ms a call (2 s for 2,000)
TARGET_METRICS_1M_S = 10.0       # metrics over 1M score rows
TARGET_SCORE_AND_METRICS_1M_S = 60.0   # scoring + metrics of 1M rows, a full re-score of a big history
PARAMS = {"max_tokens": 8}


# ---------------------------------------------------------------- the fake endpoint, in another process
class EndpointProcess:
    """The fake server as a child process; it exits when we close its stdin (or after a hard limit)."""

    def __init__(self, limit_s: float):
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "model_eval_tests.fake_openai_server", "--seconds", str(limit_s)],
            cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        port = self.proc.stdout.readline().strip()
        if not port.isdigit():
            self.close()
            raise RuntimeError(f"fake server did not report a port (got {port!r})")
        self.api_base = f"http://127.0.0.1:{port}/v1"

    def sent(self) -> int:
        """Chat-completion requests the server has received so far."""
        with urllib.request.urlopen(self.api_base.removesuffix("/v1") + "/_fake/stats", timeout=10) as response:
            return json.load(response)["total"]

    def close(self) -> None:
        if self.proc.stdin:
            self.proc.stdin.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)


# ---------------------------------------------------------------- (a) and (b): inference throughput
def make_spec(api_base: str, concurrency: int) -> ModelSpec:
    return ModelSpec(name="bench", litellm_model="openai/fake", provider="openai", family="fake", api_base=api_base,
                     price_input_per_million=1.0, price_output_per_million=2.0, max_concurrency=concurrency,
                     timeout_s=30.0, max_attempts=3)


def make_requests(spec: ModelSpec, calls: int, repeats: int = 2, salt: str = "") -> list[CallRequest]:
    """`calls` requests as (calls / repeats) cases x repeats, like a golden set with repeats."""
    requests = []
    for i in range(calls // repeats):
        messages = [{"role": "system", "content": "Answer with one word only, PASS or FAIL."},
                    {"role": "user", "content": f"{salt}Summary {i}: is it faithful to the posting? PASS or FAIL:"}]
        for repeat in range(repeats):
            requests.append(CallRequest("grading", "v1", f"case-{i:05d}", repeat, messages, dict(PARAMS),
                                        cache_key(spec.config_hash, messages, PARAMS, repeat)))
    return requests


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
    with ResponseCache(cache_path) as cache:
        started = time.perf_counter()
        if profiler:
            profiler.enable()
        frame, stats = asyncio.run(run_model(spec, requests, cache, retry=RetryPolicy()))
        if profiler:
            profiler.disable()
        return time.perf_counter() - started, frame, stats


@dataclass
class InferenceFigures:
    calls: int
    bare_s: float
    engine_s: float
    rerun_sent: int
    rerun_s: float
    rerun_rows_from_cache: int
    profile: str | None


def measure_inference(calls: int, concurrency: int, rounds: int, workdir: Path, profile: bool) -> InferenceFigures:
    endpoint = EndpointProcess(limit_s=1800)
    try:
        spec = make_spec(endpoint.api_base, concurrency)
        # Warm-up outside the timings: imports, litellm's lazy setup, the connection pool.
        asyncio.run(bare_litellm(spec, make_requests(spec, 2 * concurrency, salt="warm "), concurrency))
        engine_run(spec, make_requests(spec, 2 * concurrency, salt="warm "), workdir / "warm.sqlite")

        # Rounds in the order bare, engine, engine, bare, ...: slow drift of the machine (other load,
        # thermal, the server's heap) then weighs on both sides equally.
        per_round = calls // rounds
        bare_s = engine_s = 0.0
        done: list[tuple[list[CallRequest], Path]] = []
        for r in range(rounds):
            requests = make_requests(spec, per_round, salt=f"round {r} ")
            cache_path = workdir / f"engine-{r}.sqlite"        # a fresh cache every round
            before = endpoint.sent()
            order = ("bare", "engine") if r % 2 == 0 else ("engine", "bare")
            for side in order:
                if side == "bare":
                    bare_s += asyncio.run(bare_litellm(spec, requests, concurrency))
                else:
                    seconds, frame, stats = engine_run(spec, requests, cache_path)
                    engine_s += seconds
                    if stats.errors or frame.height != len(requests):
                        raise RuntimeError(f"engine run had {stats.errors} errors / {frame.height} rows: not a clean benchmark")
            if endpoint.sent() - before != 2 * len(requests):
                raise RuntimeError("the server saw a different number of calls than were made; the comparison is off")
            done.append((requests, cache_path))

        # (b) the unchanged re-run: every round's requests again, each on the cache its run filled.
        before = endpoint.sent()
        rerun_s, from_cache = 0.0, 0
        for requests, cache_path in done:
            seconds, frame, _ = engine_run(spec, requests, cache_path)
            rerun_s += seconds
            from_cache += int(frame["from_cache"].sum())
        rerun_sent = endpoint.sent() - before

        profile_text = None
        if profile or bare_s / engine_s < TARGET_RATIO:
            profiler = cProfile.Profile()
            engine_run(spec, make_requests(spec, min(per_round, 1000), salt="profile "), workdir / "profile.sqlite", profiler)
            profile_text = top_functions(profiler)
        return InferenceFigures(calls=per_round * rounds, bare_s=bare_s, engine_s=engine_s, rerun_sent=rerun_sent,
                                rerun_s=rerun_s, rerun_rows_from_cache=from_cache, profile=profile_text)
    finally:
        endpoint.close()


def top_functions(profiler: cProfile.Profile, limit: int = 25) -> str:
    """Where the time goes, by own time, with the model_eval share called out."""
    out = io.StringIO()
    stats = pstats.Stats(profiler, stream=out)
    total = stats.total_tt
    own = sum(tt for (path, _, _), (_, _, tt, _, _) in stats.stats.items() if "/model_eval/" in path)
    out.write(f"profiled engine run: {total:.2f} s in Python; model_eval's own code: {own:.3f} s "
              f"({100 * own / total:.1f}%), not counting what it calls\n")
    # The engine's synchronous helpers, with what they call (e.g. SQLite under ResponseCache.put).
    # Coroutines are left out: their cumulative time includes every await, i.e. litellm.
    coroutines = {"run_model", "one", "_default_completion"}
    helpers = sorted(((ct, nc, func, Path(path).name) for (path, _, func), (_, nc, _, ct, _) in stats.stats.items()
                      if "/model_eval/" in path and func not in coroutines), reverse=True)
    out.write("model_eval functions by cumulative time:\n")
    for ct, nc, func, name in helpers[:8]:
        out.write(f"  {ct:8.3f} s  {nc:7d} calls  {1e3 * ct / nc:7.3f} ms/call  {name}:{func}\n")
    out.write("\n")
    stats.sort_stats("tottime").print_stats(limit)
    return out.getvalue()


# ---------------------------------------------------------------- (c) scoring and metrics
def measure_metrics(rows: int, workdir: Path) -> tuple[float, int]:
    """compute_metrics over `rows` synthetic score rows built by DuckDB itself. Returns (seconds, metric rows)."""
    db = workdir / "bench.duckdb"
    with warehouse.write_connection(db) as conn:     # the real schema
        # 5 models x 3 tasks; each (model, task) gets rows/15 calls = cases x 3 repeats.
        # hash(i) gives stable pseudo-random verdicts, failures and latencies without Python loops.
        conn.execute(f"""
            INSERT INTO scores
            SELECT 'bench-run', 'model-' || (i % 5), ['grading', 'extraction', 'classification'][(i // 5) % 3 + 1], 'v1',
                   'case-' || (i // 45), ((i // 15) % 3)::INTEGER, 'verdict',
                   CASE WHEN h % 10 < 8 THEN 1.0 ELSE 0.0 END, h % 10 < 8,
                   CASE WHEN h % 100 = 0 THEN NULL WHEN h % 10 < 8 THEN 'PASS' ELSE 'FAIL' END,
                   'synthetic', h % 100 = 0, 50 + (h % 2000)::DOUBLE, 200 + h % 300, 1 + h % 5,
                   CASE WHEN i % 5 = 4 THEN NULL ELSE (h % 1000) * 1e-7 END, now()::TIMESTAMP
            FROM (SELECT range AS i, hash(range) AS h FROM range({rows}))""")
        assert conn.execute("SELECT count(*) FROM scores").fetchone()[0] == rows
    with warehouse.read_connection(db) as conn:
        started = time.perf_counter()
        metrics = compute_metrics(conn)
        seconds = time.perf_counter() - started
    return seconds, metrics.height


def synthetic_inference(rows: int, cases: int, version: str) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Inference rows with the kinds of replies small models give, and their golden cases."""
    replies = ["PASS", "FAIL", "**PASS**", "Verdict: fail", "PASS. The summary is accurate.",
               "It does not pass. FAIL", "pass", "I think the summary is fine, so my answer is PASS",
               "<think>Is it PASS or FAIL? It invents pay.</think>FAIL", "maybe?", "", None]
    frame = pl.DataFrame({"i": pl.int_range(0, rows, eager=True),
                          "response_text": [replies[i % len(replies)] for i in range(rows)]}).with_columns(
        pl.lit("bench-run").alias("eval_run_id"), pl.lit("model-a").alias("model"), pl.lit("grading").alias("task"),
        pl.lit(version).alias("dataset_version"),
        pl.format("case-{}", (pl.col("i") // 3) % cases).alias("case_id"),
        (pl.col("i") % 3).cast(pl.Int32).alias("repeat"),
        (50 + pl.col("i") % 900).cast(pl.Float64).alias("latency_ms"),
        pl.lit(300, pl.Int64).alias("input_tokens"), pl.lit(2, pl.Int64).alias("output_tokens"),
        pl.lit(3e-4).alias("cost_usd"),
    ).with_columns(
        # The None reply is a failed call, the way the engine records one.
        pl.when(pl.col("response_text").is_null()).then(pl.lit("Timeout")).otherwise(None).alias("error_class"),
    ).drop("i")
    golden = pl.DataFrame({"task": "grading", "dataset_version": version,
                           "case_id": [f"case-{c}" for c in range(cases)],
                           "expected_json": [json.dumps("PASS" if c % 2 else "FAIL") for c in range(cases)]})
    return frame, golden


def measure_scoring(rows: int) -> tuple[float, int]:
    task = load_task(REPO / "golden" / "grading")          # the real task: verdict scorer and its settings
    results, cases = synthetic_inference(rows, cases=max(1, rows // 30), version=task.dataset_version)
    started = time.perf_counter()
    scores = score_results(results, cases, {task.name: task})
    seconds = time.perf_counter() - started
    if scores.height != rows:
        raise RuntimeError(f"score_results returned {scores.height} rows for {rows}")
    return seconds, int(scores["correct"].sum())


# ---------------------------------------------------------------- report
def versions() -> str:
    names = ["litellm", "openai", "httpx", "aiohttp", "duckdb", "polars"]
    found = []
    for name in names:
        try:
            found.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            found.append(f"{name} -")
    return ", ".join(found)


def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--calls", type=int, default=2000, help="calls per side in (a)")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=4, help="interleaved rounds the calls are split into")
    parser.add_argument("--metric-rows", type=int, default=1_000_000)
    parser.add_argument("--score-rows", type=int, default=100_000)
    parser.add_argument("--profile", action="store_true", help="print a cProfile of the engine even on PASS")
    args = parser.parse_args(argv)

    started = time.perf_counter()
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="model_eval_bench_") as tmp:
        workdir = Path(tmp)
        print(f"(a)+(b) inference: {args.calls} calls per side at concurrency {args.concurrency}...", flush=True)
        inf = measure_inference(args.calls, args.concurrency, args.rounds, workdir, args.profile)
        print(f"(c) metrics over {args.metric_rows:,} rows, scoring {args.score_rows:,} rows...", flush=True)
        metrics_s, metric_rows = measure_metrics(args.metric_rows, workdir)
        score_s, _ = measure_scoring(args.score_rows)

    bare_rate, engine_rate = inf.calls / inf.bare_s, inf.calls / inf.engine_s
    ratio = engine_rate / bare_rate
    per_row_us = score_s / args.score_rows * 1e6
    score_1m_s = per_row_us          # microseconds per row x 1e6 rows = seconds
    metrics_1m_s = metrics_s * 1_000_000 / args.metric_rows
    rows = [
        ("(a) bare litellm.acompletion loop", f"{bare_rate:,.0f} calls/s", "baseline", ""),
        ("(a) model_eval run_model, fresh cache", f"{engine_rate:,.0f} calls/s", "", ""),
        ("(a) engine / bare", f"{ratio:.3f}", f">= {TARGET_RATIO}", verdict(ratio >= TARGET_RATIO)),
        ("(b) re-run: calls sent to server", f"{inf.rerun_sent}", f"= {TARGET_RERUN_SENT}",
         verdict(inf.rerun_sent == TARGET_RERUN_SENT and inf.rerun_rows_from_cache == inf.calls)),
        (f"(b) re-run: wall time, {inf.calls:,} calls", f"{inf.rerun_s:.3f} s",
         f"<= {TARGET_RERUN_MS_PER_CALL * inf.calls / 1000:g} s", verdict(inf.rerun_s <= TARGET_RERUN_MS_PER_CALL * inf.calls / 1000)),
        (f"(c) compute_metrics, {args.metric_rows:,} score rows", f"{metrics_s:.2f} s ({metric_rows} metric rows)",
         f"<= {TARGET_METRICS_1M_S} s per 1M", verdict(metrics_1m_s <= TARGET_METRICS_1M_S)),
        (f"(c) score_results (verdict), {args.score_rows:,} rows", f"{score_s:.2f} s = {per_row_us:.1f} us/row", "", ""),
        ("(c) score 1M rows (extrapolated, linear)", f"{score_1m_s:.1f} s", "", ""),
        ("(c) score + aggregate 1M rows", f"{score_1m_s + metrics_1m_s:.1f} s", f"<= {TARGET_SCORE_AND_METRICS_1M_S:.0f} s",
         verdict(score_1m_s + metrics_1m_s <= TARGET_SCORE_AND_METRICS_1M_S)),
    ]

    print()
    print(f"model_eval benchmark  {dt.datetime.now().astimezone().isoformat(timespec='seconds')}")
    print(f"machine: {os.cpu_count()} cores, {platform.machine()}, {platform.system()} {platform.release()}, "
          f"python {platform.python_version()}; load average {load_before:.2f} before, "
          f"{os.getloadavg()[0]:.2f} after (other processes share these cores)")
    print(f"versions: {versions()}")
    print(f"endpoint: fake OpenAI server (test double) in a separate process, instant replies; "
          f"{args.rounds} interleaved rounds")
    widths = [max(len(r[i]) for r in rows + [("figure", "value", "target", "result")]) for i in range(4)]
    line = "  ".join("{:<%d}" % w for w in widths)
    print(line.format("figure", "value", "target", "result"))
    print(line.format(*("-" * w for w in widths)))
    for row in rows:
        print(line.format(*row))
    print(f"total benchmark time: {time.perf_counter() - started:.0f} s")
    if inf.profile:
        print()
        print(inf.profile)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
