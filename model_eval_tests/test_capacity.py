"""Capacity: output tokens per second of every call, the resident memory of the process serving a local
model while it answers, model file sizes, and the registry's `resources` limit.

Calls go to the scripted OpenAI-compatible server (a test double for a provider). In the first test it
also stands in for the bundled llama.cpp server of a "local" entry: it listens in this test process, so
the memory sampled is this process's, which the test reads independently from /proc.
"""

from __future__ import annotations

import os
import random
import socket
import statistics
import subprocess
import sys
import time

import pytest
import yaml

from model_eval import capacity, warehouse
from model_eval.errors import RegistryError
from model_eval.inference import RetryPolicy
from model_eval.local_models import local_model_path
from model_eval.project import Project
from model_eval.registry import load_registry, split_by_availability
from model_eval.steps.evaluation import run_inference, score_model
from model_eval.steps.golden import ingest_golden
from model_eval.steps.models import sync_registry
from model_eval.steps.recommendation import refresh_metrics
from model_eval_tests.conftest import copy_golden
from model_eval_tests.fake_openai_server import FakeOpenAIServer, Reply, always, ok, random_mix, route, server_error

FAST_RETRY = RetryPolicy(backoff_base_s=0.01, backoff_cap_s=0.05, retry_after_cap_s=0.1)
SMOLLM2 = "smollm2-135m-instruct"
# An answer after 80 ms, as a small local model takes at least: memory is sampled every 50 ms inside the
# calls' time windows, and an instant stub (over the lean HTTP path, a call of about a millisecond) leaves
# no sample inside any window.
ANSWER = Reply(kind="hang", hang_s=0.08, text="PASS", completion_tokens=6)
GEMMA = "gemma3-270m"


def _file_mb(local_model: str) -> float:
    return os.path.getsize(local_model_path(local_model)) / 2**20


def _status_kb(pid: int, field: str) -> int:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} in /proc/{pid}/status")


@pytest.fixture
def scripted(tmp_path, paths):
    """Two tasks, a 'local' and a remote model behind the scripted server; about one grading call in six fails."""
    copy_golden(tmp_path / "golden-small", cases_per_task=10, tasks=["grading", "classification"])
    paths = paths.__class__(golden_dir=tmp_path / "golden-small", registry_file=paths.registry_file,
                            warehouse_file=paths.warehouse_file, cache_file=paths.cache_file)
    answer = ANSWER
    script = route([("One word, PASS or FAIL", random_mix(7, {server_error(500): 0.15}, otherwise=answer))], always(answer))
    with FakeOpenAIServer(script) as server:
        common = {"api_base": server.api_base, "price_per_million": {"input": 0.0, "output": 0.0}, "max_attempts": 1,
                  "timeout_s": 30}
        paths.registry_file.write_text(yaml.safe_dump({"models": [
            {"name": "local-small", "model": "openai/local-small", "local_model": SMOLLM2, **common},
            {"name": "remote", "model": "openai/remote", **common},
        ]}))
        yield paths, server


def _evaluate(paths, log, eval_run_id):
    ingest_golden(Project.load(paths), eval_run_id, log)
    sync_registry(Project.load(paths), eval_run_id, log)
    for model in ("local-small", "remote"):
        run_inference(Project.load(paths), model, eval_run_id, log, retry=FAST_RETRY)
        score_model(Project.load(paths), model, eval_run_id, log)
    refresh_metrics(Project.load(paths), log, completing=eval_run_id)  # every model of the eval run is scored


def test_tokens_per_second_per_call_and_per_model_and_task(scripted, log):
    paths, _server = scripted
    _evaluate(paths, log, "run-1")
    with warehouse.read_connection(paths.warehouse_file) as conn:
        calls = conn.sql("""SELECT model, task, output_tokens, latency_ms, error_class, output_tokens_per_s
                            FROM inference_results""").fetchall()
        metrics = {(m, t): rate for m, t, rate in conn.sql(
            "SELECT model, task, output_tokens_per_s FROM model_task_metrics WHERE eval_run_id = 'run-1'").fetchall()}
    failed = [c for c in calls if c[4] is not None]
    assert failed and len(failed) < len(calls)        # the script failed some calls: they have no rate
    assert all(c[5] is None for c in failed)
    by_group: dict[tuple[str, str], list[float]] = {}
    for model, task, tokens, latency_ms, error, rate in calls:
        if error is None:
            assert tokens == 6 and rate == pytest.approx(tokens / (latency_ms / 1000))
            by_group.setdefault((model, task), []).append(rate)
    assert set(metrics) == set(by_group) == {(m, t) for m in ("local-small", "remote") for t in ("grading", "classification")}
    for group, rates in by_group.items():
        assert metrics[group] == pytest.approx(statistics.median(rates))


def test_local_model_memory_is_sampled_per_task_and_remote_memory_is_unknown(scripted, log):
    paths, _server = scripted
    _evaluate(paths, log, "run-1")
    # The scripted server listens in this process: the memory sampled is this process's resident set.
    peak_mb_so_far = _status_kb(os.getpid(), "VmHWM") / 1024
    with warehouse.read_connection(paths.warehouse_file) as conn:
        resources = conn.sql("SELECT * FROM model_resources").pl()
        metrics = {(r["model"], r["task"]): r for r in conn.sql(
            "SELECT * FROM model_task_metrics WHERE eval_run_id = 'run-1'").pl().iter_rows(named=True)}
    assert sorted(resources["task"]) == ["classification", "grading"]       # one row per task, local model only
    assert set(resources["model"]) == {"local-small"} and set(resources["server_pid"]) == {os.getpid()}
    for row in resources.iter_rows(named=True):
        assert row["rss_samples"] > 0
        assert 10 < row["peak_rss_mb"] <= peak_mb_so_far
        assert row["model_file_mb"] == pytest.approx(_file_mb(SMOLLM2))
    for task in ("grading", "classification"):
        local, remote = metrics[("local-small", task)], metrics[("remote", task)]
        assert local["peak_memory_mb"] == resources.filter(resources["task"] == task)["peak_rss_mb"][0]
        assert local["memory_eval_run_id"] == "run-1" and local["model_file_mb"] == pytest.approx(_file_mb(SMOLLM2))
        assert remote["peak_memory_mb"] is None and remote["model_file_mb"] is None and remote["memory_eval_run_id"] is None


def test_a_run_answered_from_the_cache_keeps_the_earlier_measurement(scripted, log):
    paths, server = scripted
    _evaluate(paths, log, "run-1")
    with warehouse.read_connection(paths.warehouse_file) as conn:
        first = dict(conn.sql("SELECT task, peak_rss_mb FROM model_resources").fetchall())
    # Now every call succeeds: run-2 sends again only the grading calls that failed in run-1 (failures are
    # not cached); classification is answered entirely from the cache, so the model is not measured for it.
    # Those few calls take milliseconds, less than the sampling interval: they are still measured.
    server.script = always(ok("PASS", completion_tokens=6))
    _evaluate(paths, log, "run-2")
    with warehouse.read_connection(paths.warehouse_file) as conn:
        second = {task: (peak, samples) for task, peak, samples in conn.sql(
            "SELECT task, peak_rss_mb, rss_samples FROM model_resources WHERE eval_run_id = 'run-2'").fetchall()}
        metrics = {task: (peak, run) for task, peak, run in conn.sql("""
            SELECT task, peak_memory_mb, memory_eval_run_id FROM model_task_metrics
            WHERE eval_run_id = 'run-2' AND model = 'local-small'""").fetchall()}
    assert second["classification"] == (None, 0)
    assert metrics["classification"] == (first["classification"], "run-1")
    assert second["grading"][0] is not None and metrics["grading"] == (second["grading"][0], "run-2")


def test_the_process_listening_on_a_port_is_found():
    with FakeOpenAIServer() as server:
        assert capacity.listening_pid(server.api_base) == os.getpid()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    child = subprocess.Popen([sys.executable, "-m", "http.server", "--bind", "127.0.0.1", str(port)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while capacity.listening_pid(f"http://127.0.0.1:{port}/v1") is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert capacity.listening_pid(f"http://127.0.0.1:{port}/v1") == child.pid
    finally:
        child.terminate()
        child.wait()
    assert capacity.listening_pid(f"http://127.0.0.1:{port}/v1") is None


def test_the_sampler_sees_another_process_grow_and_shrink():
    grow = ("import sys, time; sys.stdin.readline(); block = bytearray(160 * 2**20); "
            "block[::4096] = b'x' * len(block[::4096]); print('held', flush=True); time.sleep(0.6); del block; "
            "print('freed', flush=True); sys.stdin.readline()")
    child = subprocess.Popen([sys.executable, "-c", grow], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        with capacity.MemorySampler(child.pid, interval_s=0.02) as sampler:
            time.sleep(0.2)
            go_at = time.time()
            child.stdin.write("go\n")
            child.stdin.flush()
            assert child.stdout.readline().strip() == "held"
            held_from = time.time()
            assert child.stdout.readline().strip() == "freed"
            held_until = time.time()
            time.sleep(0.2)
            high_water_kb = _status_kb(child.pid, "VmHWM")
        before = [kb for t, kb in sampler.samples if t < go_at]
        peak = capacity.peak_in_windows(sampler.samples, [(held_from, held_until)])
        assert before and peak is not None
        assert max(before) < 100 * 1024 < peak[0]                   # the 160 MB block is seen while held
        assert peak[0] >= 0.95 * high_water_kb                      # and the sampled peak is the real one
        assert sampler.samples[-1][1] < 100 * 1024                 # and gone once freed
        child.stdin.write("done\n")
        child.stdin.flush()
    finally:
        child.kill()
        child.wait()
    assert capacity.resident_kb(child.pid) is None


def test_peak_in_windows_matches_a_direct_scan():
    rng = random.Random(3)
    samples = sorted((rng.uniform(0, 100), rng.randint(1, 10**6)) for _ in range(400))
    for _ in range(50):
        windows = [tuple(sorted((rng.uniform(0, 100), rng.uniform(0, 100)))) for _ in range(rng.randint(0, 6))]
        inside = [kb for t, kb in samples for start, end in windows if start <= t <= end + capacity.WINDOW_GRACE_S]
        expected = (max(inside), len(inside)) if inside else None
        assert capacity.peak_in_windows(samples, windows) == expected


def _registry(tmp_path, body: dict):
    path = tmp_path / "models.yaml"
    path.write_text(yaml.safe_dump(body, sort_keys=False))
    return path


LOCAL_ENTRIES = [{"name": "small", "model": "openai/small", "local_model": SMOLLM2},
                 {"name": "larger", "model": "openai/larger", "local_model": GEMMA}]


def test_a_local_model_whose_file_exceeds_the_memory_limit_is_skipped_with_the_reason(tmp_path, paths, log):
    limit = (_file_mb(SMOLLM2) + _file_mb(GEMMA)) / 2                 # between the two files' sizes
    paths.registry_file.write_text(yaml.safe_dump({"resources": {"max_memory_mb": limit}, "models": LOCAL_ENTRIES}))
    synced = sync_registry(Project.load(paths), "sync-1", log)
    assert [m.name for m in synced.available] == ["small"]
    assert synced.skipped["larger"] == (f"does not fit: its model file is {_file_mb(GEMMA):.0f} MB, "
                                        f"above resources.max_memory_mb {limit:g} MB")
    assert f"model larger: skipped, {synced.skipped['larger']}" in log.text()
    with warehouse.read_connection(paths.warehouse_file) as conn:
        rows = dict(conn.sql("SELECT model, unavailable_reason FROM models WHERE NOT available").fetchall())
    assert rows == {"larger": synced.skipped["larger"]}

    # A model's own limit replaces the machine-wide one.
    entries = [LOCAL_ENTRIES[0], {**LOCAL_ENTRIES[1], "resources": {"max_memory_mb": 10 * limit}}]
    registry = load_registry(_registry(tmp_path, {"resources": {"max_memory_mb": limit}, "models": entries}))
    assert split_by_availability(list(registry.models))[1] == {}


def test_a_local_model_whose_measured_memory_exceeds_the_limit_is_skipped(tmp_path, paths, log):
    limit = 2 * _file_mb(GEMMA)                                        # both files fit
    paths.registry_file.write_text(yaml.safe_dump({"resources": {"max_memory_mb": limit}, "models": LOCAL_ENTRIES}))
    assert sync_registry(Project.load(paths), "sync-1", log).skipped == {}
    with warehouse.write_connection(paths.warehouse_file) as conn:
        conn.executemany("INSERT INTO model_resources VALUES (?, ?, ?, ?, ?, ?, ?, ?, now()::TIMESTAMP - ?::INTERVAL)", [
            # Older measurements, and one of another local model under the same name, do not count.
            ["old-run", "small", "grading", SMOLLM2, 94.0, limit + 500, 10, 1, "2 days"],
            ["new-run", "small", "grading", SMOLLM2, 94.0, limit - 50, 10, 1, "1 day"],
            ["new-run", "small", "classification", SMOLLM2, 94.0, limit + 10, 10, 1, "1 day"],
            ["other-run", "larger", "grading", SMOLLM2, 94.0, limit + 900, 10, 1, "1 hour"],
        ])
    project = Project.load(paths)
    measured = capacity.measured_memory_mb(paths.warehouse_file, list(project.registry.models))
    assert measured == {"small": (limit + 10, "new-run")}
    synced = sync_registry(project, "sync-2", log)
    assert [m.name for m in synced.available] == ["larger"]
    assert synced.skipped["small"] == (f"does not fit: its measured peak resident memory is {limit + 10:.0f} MB "
                                       f"(eval run new-run), above resources.max_memory_mb {limit:g} MB")


@pytest.mark.parametrize("body,field,line", [
    ({"resources": {"max_memory_mb": -1}, "models": LOCAL_ENTRIES}, "resources.max_memory_mb", 2),
    ({"resources": {"max_ram": 100}, "models": LOCAL_ENTRIES}, "resources.max_ram", 2),
    ({"resources": [100], "models": LOCAL_ENTRIES}, "resources", 2),
    ({"models": [LOCAL_ENTRIES[0], {**LOCAL_ENTRIES[1], "resources": {"max_memory_mb": "lots"}}]},
     "models[1].resources.max_memory_mb", 5),
])
def test_bad_resource_limits_name_the_file_line_and_field(tmp_path, body, field, line):
    path = _registry(tmp_path, body)
    with pytest.raises(RegistryError) as error:
        load_registry(path)
    assert error.value.field == field and error.value.line == line and str(path) in str(error.value)


@pytest.mark.llm
def test_each_bundled_model_is_measured_while_it_answers(tmp_path, paths, log):
    """The real llama.cpp server swaps the two bundled models in one process: each gets its own figure."""
    pytest.importorskip("llama_cpp.server", reason="needs the local extra: pip install -e '.[local]'")
    from model_eval.local_server import LocalModelServer

    copy_golden(tmp_path / "golden-one", cases_per_task=10, tasks=["classification"])
    paths = paths.__class__(golden_dir=tmp_path / "golden-one", registry_file=paths.registry_file,
                            warehouse_file=paths.warehouse_file, cache_file=paths.cache_file)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    paths.registry_file.write_text(yaml.safe_dump({"local_server": {"port": port}, "models": [
        {**entry, "price_per_million": {"input": 0.0, "output": 0.0}, "max_concurrency": 1, "timeout_s": 180}
        for entry in LOCAL_ENTRIES]}))
    project = Project.load(paths)
    with LocalModelServer(project.registry.local_models(), port=port, log_path=tmp_path / "llama.log") as server:
        _evaluate_models(paths, log, ["small", "larger", "small"], ["run-small", "run-larger", "run-small-again"])
        server_pid = server._process.pid
    with warehouse.read_connection(paths.warehouse_file) as conn:
        peaks = {run: (pid, peak, samples) for run, pid, peak, samples in conn.sql(
            "SELECT eval_run_id, server_pid, peak_rss_mb, rss_samples FROM model_resources").fetchall()}
        rates = dict(conn.sql("SELECT model, median(output_tokens_per_s) FROM inference_results GROUP BY model").fetchall())
    print(f"\npeak resident MB: {peaks}; median output tokens/s: {rates}; file MB: {_file_mb(SMOLLM2)}, {_file_mb(GEMMA)}")
    assert {pid for pid, _, _ in peaks.values()} == {server_pid}
    assert all(samples > 0 for _, _, samples in peaks.values())
    small, larger, small_again = (peaks[run][1] for run in ("run-small", "run-larger", "run-small-again"))
    # The weights are memory-mapped and read in full for every token, so each model's file is resident while it answers.
    assert small > _file_mb(SMOLLM2) and larger > _file_mb(GEMMA)
    assert larger - small > (_file_mb(GEMMA) - _file_mb(SMOLLM2)) / 2
    # Swapping back unmaps the larger model's weights: the small one is not measured with them. (The process
    # keeps some heap the larger model freed, so the small one measures a little higher than on a fresh server.)
    assert small <= small_again < larger - (_file_mb(GEMMA) - _file_mb(SMOLLM2)) / 2
    assert all(rate > 0 for rate in rates.values())


def _evaluate_models(paths, log, models: list[str], eval_run_ids: list[str]) -> None:
    ingest_golden(Project.load(paths), eval_run_ids[0], log)
    sync_registry(Project.load(paths), eval_run_ids[0], log)
    for model, eval_run_id in zip(models, eval_run_ids):
        run_inference(Project.load(paths), model, eval_run_id, log, retry=FAST_RETRY, cache_max_age_s=0.0)
