"""Resilience against the scripted fault server (a test double): a fault mix over 2,000+ calls,
adaptive concurrency, SIGKILL in the middle of a partition, and readers during writes.

The engine's fault tests run on both call paths (litellm and the lean HTTP client: `CLIENTS`)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time

import polars as pl
import pytest
import yaml

from model_eval import warehouse
from model_eval.project import Project
from model_eval.steps.evaluation import run_inference
from model_eval.steps.golden import ingest_golden
from model_eval.steps.models import sync_registry
from model_eval.golden import load_tasks, read_cases
from model_eval.inference import CallRequest, RetryPolicy, run_model
from model_eval.registry import ModelSpec
from model_eval.response_cache import ResponseCache, cache_key
from model_eval.scoring import score_results
from model_eval.settings import PROJECT_ROOT
from model_eval_tests.fake_openai_server import (
    FakeOpenAIServer,
    garbage,
    hang,
    ok,
    random_mix,
    rate_limited,
    server_error,
    slow_body,
)

FAST_RETRY = RetryPolicy(backoff_base_s=0.01, backoff_cap_s=0.05, retry_after_cap_s=0.05)
CLIENTS = pytest.mark.parametrize("client", ["litellm", "http"])


def _spec(server, **overrides) -> ModelSpec:
    fields = dict(name="fake", litellm_model="openai/fake", provider="fake", family="fake", api_base=server.api_base,
                  price_input_per_million=1.0, price_output_per_million=1.0, max_concurrency=32, timeout_s=0.5, max_attempts=4)
    fields.update(overrides)
    return ModelSpec(**fields)


def _requests(spec: ModelSpec, cases: int, repeats: int) -> list[CallRequest]:
    out = []
    for i in range(cases):
        messages = [{"role": "user", "content": f"case {i}: PASS or FAIL?"}]
        for r in range(repeats):
            out.append(CallRequest("grading", "v1", f"case-{i:04d}", r, messages, {}, cache_key(spec.config_hash, messages, {}, r)))
    return out


@CLIENTS
def test_fault_mix_over_2000_calls_loses_and_duplicates_nothing(tmp_path, client):
    mix = random_mix(7, {rate_limited(0.01): 0.15, server_error(500): 0.15, hang(3.0): 0.05, garbage(): 0.05},
                     otherwise=ok("PASS"))
    import asyncio

    with FakeOpenAIServer(mix) as server, ResponseCache(tmp_path / "cache.sqlite") as cache:
        spec = _spec(server, client=client)
        requests = _requests(spec, 700, 3)
        frame, stats = asyncio.run(run_model(spec, requests, cache, retry=FAST_RETRY))
        received = server.total
    assert len(requests) == 2100 == frame.height == stats.total
    assert frame.select("case_id", "repeat").n_unique() == frame.height          # no duplicate, none lost
    assert int(frame["attempts"].sum()) == stats.sent
    assert received <= stats.sent  # an attempt can time out client-side before it reaches the server
    failed = frame.filter(pl.col("error_class").is_not_null())
    assert failed.height == stats.errors and (failed["attempts"] == spec.max_attempts).all()  # only after capped retries
    assert stats.retries > 1000 and stats.rate_limited > 0
    assert 0.9 < (frame.height - failed.height) / frame.height < 1.0              # ~(0.4)^4 of calls fail 4 times
    cases = pl.DataFrame({"task": ["grading"] * 700, "dataset_version": ["v1"] * 700,
                          "case_id": [f"case-{i:04d}" for i in range(700)], "expected_json": ['"PASS"'] * 700})
    grading = load_tasks(PROJECT_ROOT / "golden", only=["grading"])[0]
    scores = score_results(frame.with_columns(pl.lit("run").alias("eval_run_id")), cases, {"grading": grading})
    assert scores.height == frame.height
    assert scores.filter(pl.col("call_failed")).height == failed.height
    assert scores.filter(~pl.col("call_failed"))["correct"].all()


@CLIENTS
def test_concurrency_backs_off_on_a_burst_of_429s_and_recovers(tmp_path, client):
    import asyncio

    burst_until = {"t": 0.0}

    def script(info):
        if burst_until["t"] == 0.0:
            burst_until["t"] = time.monotonic() + 1.5
        return rate_limited(0.1) if time.monotonic() < burst_until["t"] else ok("PASS")

    # Retry-After honoured up to 0.2 s: 20 attempts outlast the 1.5 s burst however fast the client is.
    patient = RetryPolicy(backoff_base_s=0.01, backoff_cap_s=0.05, retry_after_cap_s=0.2)
    with FakeOpenAIServer(script) as server, ResponseCache(tmp_path / "cache.sqlite") as cache:
        spec = _spec(server, max_concurrency=16, max_attempts=20, client=client)
        frame, stats = asyncio.run(run_model(spec, _requests(spec, 400, 1), cache, retry=patient))
    limits = [limit for _, limit in stats.concurrency_trace]
    assert frame["error_class"].null_count() == frame.height
    assert min(limits) <= 4, limits          # the burst halved the limit several times
    assert limits[-1] == 16, limits          # sustained success climbed back to the configured maximum
    low = limits.index(min(limits))
    assert limits[low:] == sorted(limits[low:])  # after the burst, only increases


WORKER = """
import os, sys
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
from model_eval.project import Project
from model_eval.settings import ProjectPaths
from model_eval.steps.evaluation import run_inference
from model_eval.inference import RetryPolicy
import logging
paths = ProjectPaths.from_env()
run_inference(Project.load(paths), "fake", "crash-run", logging.getLogger("worker"), retry=RetryPolicy(0.01, 0.05, 0.05))
"""


def _answer(info):
    # Deterministic per prompt and repeat, slow enough that a kill lands mid-partition: two halves
    # 0.04 s apart (one chunk would be sent at once, with no pause at all).
    text = hashlib.sha256(json.dumps(info.payload.get("messages")).encode()).hexdigest()[:12]
    return slow_body(seconds=0.08, chunks=2, text=f"PASS {text}")


def _committed_answers(cache_file) -> int:
    """Answers the worker has committed to its response cache, read without writing to the file."""
    if not cache_file.exists():
        return 0
    try:
        with contextlib.closing(sqlite3.connect(f"file:{cache_file}?mode=ro", uri=True, timeout=5)) as conn:
            return conn.execute("SELECT count(*) FROM responses").fetchone()[0]
    except sqlite3.OperationalError:   # the worker has not created the table yet
        return 0


def _setup_warehouse(paths, server, log, client: str | None = None):
    entry = {"name": "fake", "model": "openai/fake", "api_base": server.api_base, "price_per_million": {"input": 1, "output": 1},
             "max_concurrency": 4, "timeout_s": 30}
    if client is not None:
        entry["client"] = client          # through the registry field, as a user would choose it
    paths.registry_file.write_text(yaml.safe_dump({"models": [entry]}))
    ingest_golden(Project.load(paths), "setup", log)
    sync_registry(Project.load(paths), "setup", log)


def _env(paths):
    return {**os.environ, "MODEL_EVAL_GOLDEN_DIR": str(paths.golden_dir), "MODEL_EVAL_REGISTRY": str(paths.registry_file),
            "MODEL_EVAL_WAREHOUSE": str(paths.warehouse_file), "MODEL_EVAL_CACHE": str(paths.cache_file)}


def _result_rows(paths):
    with warehouse.read_connection(paths.warehouse_file) as conn:
        return conn.sql("""SELECT task, case_id, repeat, response_text, error_class FROM inference_results
                           WHERE eval_run_id = 'crash-run' ORDER BY ALL""").fetchall()


@CLIENTS
def test_sigkill_mid_partition_then_restart_repeats_no_finished_call(paths, log, tmp_path, client):
    import dataclasses

    with FakeOpenAIServer(_answer) as server:
        _setup_warehouse(paths, server, log, client)
        worker = subprocess.Popen([sys.executable, "-c", WORKER], env=_env(paths), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 120
        # Kill once some answers are committed (the engine writes them in batches) and the run is
        # well under way; waiting on the server's count alone raced the first batch on a fast machine.
        while (server.total < 50 or _committed_answers(paths.cache_file) == 0) \
                and time.monotonic() < deadline and worker.poll() is None:
            time.sleep(0.02)
        worker.send_signal(signal.SIGKILL)
        worker.wait(timeout=30)
        assert worker.returncode == -signal.SIGKILL, "the worker finished before it could be killed"
        with ResponseCache(paths.cache_file) as cache:
            finished = cache.count()
        sent_before = server.total
        total_calls = sum(read_cases(task).height * task.repeats for task in Project.load(paths).tasks)  # every shipped task
        assert 0 < finished <= sent_before < total_calls
        assert not paths.warehouse_file.exists() or _result_rows(paths) == []  # nothing half-written

        subprocess.run([sys.executable, "-c", WORKER], env=_env(paths), check=True, timeout=300, capture_output=True)
        assert server.total - sent_before == total_calls - finished            # only unfinished calls were sent again
        interrupted = _result_rows(paths)

        clean = dataclasses.replace(paths, warehouse_file=tmp_path / "clean" / "w.duckdb", cache_file=tmp_path / "clean" / "c.sqlite")
        _setup_warehouse(clean, server, log, client)
        subprocess.run([sys.executable, "-c", WORKER], env=_env(clean), check=True, timeout=300, capture_output=True)
    assert interrupted == _result_rows(clean) and len(interrupted) == total_calls


READER = """
import json, sys, time, duckdb
path, seconds = sys.argv[1], float(sys.argv[2])
end = time.monotonic() + seconds
errors, seen = [], set()
while time.monotonic() < end:
    try:
        conn = duckdb.connect(path, read_only=True)
        for row in conn.sql("SELECT eval_run_id, count(*) FROM inference_results GROUP BY 1").fetchall():
            seen.add(tuple(row))
        conn.close()
    except Exception as exc:
        errors.append(repr(exc))
    time.sleep(0.005)
print(json.dumps({"errors": errors, "seen": sorted(seen)}))
"""


def test_a_reader_querying_in_a_loop_during_writes_sees_no_error_and_no_half_partition(paths, log):
    with FakeOpenAIServer(_answer) as server:
        _setup_warehouse(paths, server, log)
        paths.registry_file.write_text(paths.registry_file.read_text().replace("max_concurrency: 4", "max_concurrency: 16"))
        run_inference(Project.load(paths), "fake", "write-0", log, retry=FAST_RETRY)
        reader = subprocess.Popen([sys.executable, "-c", READER, str(paths.warehouse_file), "8"], stdout=subprocess.PIPE, text=True)
        for i in range(1, 4):
            run_inference(Project.load(paths), "fake", f"write-{i}", log, retry=FAST_RETRY)   # cached: fast, many writes
            run_inference(Project.load(paths), "fake", "write-0", log, retry=FAST_RETRY)      # replace a slice readers watch
        out, _ = reader.communicate(timeout=60)
    report = json.loads(out)
    assert report["errors"] == []
    full = sum(read_cases(task).height * task.repeats for task in Project.load(paths).tasks)  # the fake model serves every task
    assert report["seen"] and all(count == full for _, count in report["seen"])   # a slice is all there or absent
