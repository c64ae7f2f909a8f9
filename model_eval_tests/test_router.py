"""The application-side router and the production call log, end to end into a real DuckDB file."""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import threading
from datetime import UTC, datetime
from pathlib import Path

import duckdb
import polars as pl
import pytest

from model_eval.production_log import ingest_call_logs
from model_eval.router import (
    CallLog,
    MissingApiKeyError,
    Router,
    SnapshotError,
    hash_request_key,
    read_snapshot,
    write_snapshot,
)

KEYS = [f"user-{i}" for i in range(10_000)]


def choice(name: str, **overrides) -> dict:
    entry = {"model": name, "litellm_model": f"openai/{name}", "api_base": "http://127.0.0.1:8765/v1",
             "api_key_env": None, "params": {"temperature": 0.3}}
    entry.update(overrides)
    return entry


def assignment(stage: str = "full", share: float = 0.0, model: str = "smollm2-135m",
               candidate: str | None = "gemma3-270m", **overrides) -> dict:
    entry = {**choice(model), "stage": stage, "traffic_share": share, "pinned": False,
             "candidate": choice(candidate) if candidate and stage != "full" else None}
    entry.update(overrides)
    return entry


@pytest.fixture
def snapshot(tmp_path: Path) -> Path:
    return tmp_path / "routing" / "snapshot.json"


# ----------------------------------------------------------------------------------------------
# Routing


def test_partial_split_matches_the_share_and_is_deterministic(snapshot):
    write_snapshot(snapshot, {"grading": assignment("partial", 0.2)})
    router = Router(snapshot)
    decisions = [router.route("grading", key) for key in KEYS]
    share = sum(d.primary.model == "gemma3-270m" for d in decisions) / len(KEYS)
    assert 0.18 <= share <= 0.22
    assert all(d.shadow is None and d.stage == "partial" for d in decisions)
    # Who gets the candidate is exactly the documented bucket rule.
    for d in decisions[:200]:
        digest = hashlib.sha256(f"grading\0{d.request_key}".encode()).digest()
        assert d.bucket == int.from_bytes(digest[:8], "big") / 2**64
        assert (d.primary.model == "gemma3-270m") == (d.bucket < 0.2)
    # Same key, same answer: from this router and from a fresh one (another process of the app).
    again = Router(snapshot)
    assert [router.route("grading", k) for k in KEYS[:500]] == decisions[:500]
    assert [again.route("grading", k) for k in KEYS[:500]] == decisions[:500]


@pytest.mark.parametrize("share", [0.0, 0.05, 0.5, 1.0])
def test_partial_share_edges(snapshot, share):
    write_snapshot(snapshot, {"grading": assignment("partial", share)})
    router = Router(snapshot)
    got = sum(router.route("grading", k).primary.model == "gemma3-270m" for k in KEYS) / len(KEYS)
    assert abs(got - share) <= 0.02
    if share in (0.0, 1.0):
        assert got == share


def test_tasks_split_independently(snapshot):
    write_snapshot(snapshot, {"grading": assignment("partial", 0.5), "summary": assignment("partial", 0.5)})
    router = Router(snapshot)
    in_a = {k for k in KEYS if router.route("grading", k).primary.model == "gemma3-270m"}
    in_b = {k for k in KEYS if router.route("summary", k).primary.model == "gemma3-270m"}
    # Independent halves overlap on about a quarter of the keys; the same hash would give a half.
    assert abs(len(in_a & in_b) / len(KEYS) - 0.25) <= 0.02


def test_shadow_stage_returns_both_and_full_returns_assigned_only(snapshot):
    write_snapshot(snapshot, {"grading": assignment("shadow", 0.2), "summary": assignment("full", model="gemma3-270m")})
    router = Router(snapshot)
    for key in KEYS[:1000]:
        shadow = router.route("grading", key)
        assert shadow.stage == "shadow"
        assert shadow.primary.model == "smollm2-135m" and shadow.shadow.model == "gemma3-270m"
        full = router.route("summary", key)
        assert full.stage == "full" and full.primary.model == "gemma3-270m" and full.shadow is None
    assert router.tasks == ["grading", "summary"]


def test_unknown_task_names_the_known_ones(snapshot):
    write_snapshot(snapshot, {"grading": assignment(), "summary": assignment()})
    with pytest.raises(KeyError, match="unknown task 'sql'.*grading, summary"):
        Router(snapshot).route("sql", "u1")


def test_snapshot_changes_on_disk_are_followed(snapshot):
    write_snapshot(snapshot, {"grading": assignment("shadow")})
    router = Router(snapshot, reload_every_s=0)
    lazy = Router(snapshot, reload_every_s=3600)
    assert router.route("grading", "u1").shadow is not None

    # Promotion: the candidate becomes the model.
    write_snapshot(snapshot, {"grading": assignment("full", model="gemma3-270m")})
    decision = router.route("grading", "u1")
    assert decision.stage == "full" and decision.primary.model == "gemma3-270m" and decision.shadow is None
    # The interval is honoured: a router that checked a moment ago keeps its snapshot until it is due.
    assert lazy.route("grading", "u1").stage == "shadow"
    assert lazy.reload() is True and lazy.route("grading", "u1").stage == "full"

    # Rollback, written twice within one clock tick: still picked up (the inode changes on replace).
    write_snapshot(snapshot, {"grading": assignment("partial", 1.0)})
    write_snapshot(snapshot, {"grading": assignment("full")})
    assert router.route("grading", "u1").primary.model == "smollm2-135m"


def test_a_snapshot_that_turns_bad_keeps_the_last_good_one(snapshot, caplog):
    write_snapshot(snapshot, {"grading": assignment("full")})
    router = Router(snapshot, reload_every_s=0)
    snapshot.write_text("{\"tasks\": {\"grading\": ")  # a non-atomic writer, caught mid-write
    assert router.route("grading", "u1").primary.model == "smollm2-135m"
    assert isinstance(router.last_error, SnapshotError) and str(snapshot) in str(router.last_error)
    assert "keeping the last good routing snapshot" in caplog.text
    snapshot.unlink()
    assert router.route("grading", "u1").primary.model == "smollm2-135m"
    assert "not found" in str(router.last_error)
    write_snapshot(snapshot, {"grading": assignment("full", model="gemma3-270m")})
    assert router.route("grading", "u1").primary.model == "gemma3-270m" and router.last_error is None


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "routing snapshot not found"),
        ("{not json", "not valid JSON"),
        ("[]", "must be a JSON object with a 'tasks' object"),
        (json.dumps({"tasks": {"grading": {**assignment(), "stage": "canary"}}}), "tasks.grading.stage"),
        (json.dumps({"tasks": {"grading": assignment("partial", 1.5)}}), "tasks.grading.traffic_share"),
        (json.dumps({"tasks": {"grading": assignment("shadow", candidate=None)}}), "stage 'shadow' needs a candidate"),
        (json.dumps({"tasks": {"grading": {**assignment(), "candidate": choice("x")}}}), "must be null in stage 'full'"),
        (json.dumps({"tasks": {"grading": {**assignment(), "litellm_model": ""}}}), "field 'tasks.grading.litellm_model'"),
        (json.dumps({"tasks": {"grading": {**assignment(), "api_key_env": "sk-live-123"}}}), "NAME of an environment variable"),
        (json.dumps({"tasks": {"grading": {**assignment(), "params": {"api_key": "x"}}}}), "may not set api_key"),
        (json.dumps({"tasks": {"grading": {**assignment(), "mode": "instruct"}}}), "field 'tasks.grading.mode'"),
        (json.dumps({"tasks": {"grading": {**assignment(), "mode": "completion"}}}), "field 'tasks.grading.completion_template'"),
        (json.dumps({"tasks": {"grading": {**assignment(), "mode": "completion",
                                           "completion_template": {"system": "{text}", "user": "{text}", "assistant": "{text}",
                                                                   "stop": []}}}}),
         r"field 'tasks.grading.completion_template.stop'"),
    ],
)
def test_bad_snapshots_error_clearly_naming_the_file(snapshot, content, message):
    if content is not None:
        snapshot.parent.mkdir(parents=True, exist_ok=True)
        snapshot.write_text(content)
    with pytest.raises(SnapshotError, match=message) as info:
        Router(snapshot)
    assert str(snapshot) in str(info.value)


def test_write_snapshot_validates_and_replaces_atomically(snapshot):
    write_snapshot(snapshot, {"grading": assignment("partial", 0.2, extra_note="kept")})
    with pytest.raises(SnapshotError, match="traffic_share"):
        write_snapshot(snapshot, {"grading": assignment("partial", -0.1)})
    # The refused write left the published file untouched and no temporary files behind.
    generated_at, tasks = read_snapshot(snapshot)
    assert generated_at and tasks["grading"]["traffic_share"] == 0.2 and tasks["grading"]["extra_note"] == "kept"
    assert [p.name for p in snapshot.parent.iterdir()] == ["snapshot.json"]
    # Optional fields are filled in, so the published file always has the full shape.
    write_snapshot(snapshot, {"grading": {"model": "m", "litellm_model": "openai/m"}})
    entry = json.loads(snapshot.read_text())["tasks"]["grading"]
    assert entry == {"model": "m", "litellm_model": "openai/m", "api_base": None, "api_key_env": None,
                     "params": {}, "mode": "chat", "completion_template": None, "candidate": None, "stage": "full",
                     "traffic_share": 0.0, "pinned": False}


BASE_MODEL_TEMPLATE = {"system": "{text}\n\n", "user": "{text}", "assistant": " {text}\n\n", "stop": ["\n\n"]}


def test_a_base_model_candidate_is_asked_with_the_prompt_it_was_evaluated_with(snapshot):
    candidate = choice("gemma3-270m", mode="completion", completion_template=BASE_MODEL_TEMPLATE)
    write_snapshot(snapshot, {"employer": {**assignment("shadow"), "candidate": candidate}})
    decision = Router(snapshot).route("employer", "u1")
    messages = [{"role": "system", "content": "Name the employer."}, {"role": "user", "content": "Posting: x\n\nEmployer:"}]
    assert not decision.primary.uses_text_completion
    assert decision.primary.call_arguments(messages) == {"messages": messages}
    assert decision.shadow.uses_text_completion
    assert decision.shadow.call_arguments(messages) == {"prompt": "Name the employer.\n\nPosting: x\n\nEmployer:",
                                                        "stop": ["\n\n"]}


def test_the_published_snapshot_carries_the_registry_mode(snapshot):
    from model_eval.promotion import AssignmentState, snapshot_tasks
    from model_eval.registry import load_registry
    from model_eval.settings import PROJECT_ROOT

    state = AssignmentState(task="employer", model="gemma3-270m", stage="shadow", traffic_share=0.0,
                            previous_model="smollm2-135m", pinned=False, assigned_at=datetime.now(UTC),
                            baseline_accuracy=None, baseline_success_rate=None, baseline_p95_latency_ms=None)
    write_snapshot(snapshot, snapshot_tasks({"employer": state}, load_registry(PROJECT_ROOT / "models.yaml")))
    decision = Router(snapshot).route("employer", "u1")
    assert decision.primary.model == "smollm2-135m" and decision.primary.mode == "chat"
    assert decision.shadow.model == "gemma3-270m" and decision.shadow.uses_text_completion
    assert decision.shadow.completion_template["stop"] == ["\n\n"]


# ----------------------------------------------------------------------------------------------
# Keys and the call log


def test_completion_kwargs_read_the_key_at_call_time_and_never_log_it(snapshot, tmp_path, monkeypatch):
    write_snapshot(snapshot, {"grading": assignment("shadow", api_key_env="ROUTER_TEST_KEY")})
    router = Router(snapshot)
    decision = router.route("grading", "alice@example.com")
    assert decision.primary.api_key_env == "ROUTER_TEST_KEY"

    monkeypatch.delenv("ROUTER_TEST_KEY", raising=False)
    with pytest.raises(MissingApiKeyError, match="ROUTER_TEST_KEY"):
        decision.primary.completion_kwargs()
    monkeypatch.setenv("ROUTER_TEST_KEY", "sk-canary-first")
    kwargs = decision.primary.completion_kwargs()
    assert kwargs == {"model": "openai/smollm2-135m", "api_base": "http://127.0.0.1:8765/v1",
                      "api_key": "sk-canary-first", "temperature": 0.3}
    monkeypatch.setenv("ROUTER_TEST_KEY", "sk-canary-rotated")  # rotation needs no reload
    assert decision.primary.completion_kwargs()["api_key"] == "sk-canary-rotated"
    # A keyless local server still gets a placeholder (the openai client insists on one).
    assert decision.shadow.completion_kwargs()["api_key"] == "sk-no-key"
    assert "sk-canary" not in repr(decision)

    log = CallLog(tmp_path / "calls")
    log.record(decision, "smollm2-135m", latency_ms=12.5, input_tokens=10, output_tokens=3, success=False,
               error="401 Unauthorized: Bearer sk-canary-rotated rejected", role="primary",
               extra={"echo": "sk-canary-rotated"})
    text = "".join(p.read_text() for p in (tmp_path / "calls").iterdir())
    assert "sk-canary" not in text and "[REDACTED]" in text
    assert "alice@example.com" not in text and hash_request_key("alice@example.com") in text


def test_call_log_round_trip_into_duckdb(snapshot, tmp_path):
    write_snapshot(snapshot, {"grading": assignment("shadow")})
    decision = Router(snapshot).route("grading", "u1")
    folder = tmp_path / "calls"
    log = CallLog(folder)
    primary_id = log.record(decision, decision.primary.model, latency_ms=120.0, input_tokens=50, output_tokens=5,
                            success=True, role="primary", extra={"app": "demo"})
    shadow_id = log.record(decision, decision.shadow.model, latency_ms=300.0, input_tokens=50, output_tokens=None,
                           success=False, error="timeout", role="shadow")
    files = list(folder.iterdir())
    assert [f.name for f in files] == [log.path_for().name]
    assert log.path_for().name.endswith(f"-{os.getpid()}.jsonl") and log.path_for().name.startswith("calls-")

    db = tmp_path / "warehouse.duckdb"
    with duckdb.connect(str(db)) as conn:
        assert ingest_call_logs(folder, conn) == 2
        assert ingest_call_logs(folder, conn) == 0
        rows = conn.sql("SELECT call_id, task, model, role, stage, bucket, latency_ms, input_tokens, output_tokens, "
                        "success, error, rating, source_file, request_key_hash, extra_json FROM production_calls "
                        "ORDER BY role").fetchall()
    assert [r[0] for r in rows] == [primary_id, shadow_id]
    primary, shadow = rows
    assert primary[1:12] == ("grading", "smollm2-135m", "primary", "shadow", decision.bucket, 120.0, 50, 5, True, None, None)
    assert shadow[1:12] == ("grading", "gemma3-270m", "shadow", "shadow", decision.bucket, 300.0, 50, None, False, "timeout", None)
    assert primary[12] == str(files[0].resolve()) and primary[13] == hash_request_key("u1")
    assert json.loads(primary[14]) == {"app": "demo"}

    # A rating arrives later; rating it again replaces it; a rating for a call not yet ingested waits.
    log.rate(primary_id, 0.5)
    log.rate(primary_id, 1.0)
    log.rate("from-another-worker", 0.25)
    with duckdb.connect(str(db)) as conn:
        assert ingest_call_logs(folder, conn) == 0
        assert conn.sql("SELECT rating FROM production_calls WHERE call_id = $id", params={"id": primary_id}).fetchall() == [(1.0,)]
        late = CallLog(folder)
        late.record(decision, "smollm2-135m", latency_ms=80.0, input_tokens=1, output_tokens=1, success=True,
                    role="primary", call_id="from-another-worker")
        assert ingest_call_logs(folder, conn) == 1
        assert conn.sql("SELECT rating FROM production_calls WHERE call_id = 'from-another-worker'").fetchall() == [(0.25,)]
        assert conn.sql("SELECT count(*) FROM production_pending_ratings").fetchall() == [(0,)]


def test_half_written_line_waits_for_the_next_ingest(snapshot, tmp_path):
    write_snapshot(snapshot, {"grading": assignment("full")})
    decision = Router(snapshot).route("grading", "u1")
    folder = tmp_path / "calls"
    log = CallLog(folder)
    log.record(decision, "smollm2-135m", latency_ms=1.0, input_tokens=1, output_tokens=1, success=True, role="primary")
    # A second line, caught halfway through being written (say the writer was killed mid-write).
    path = log.path_for()
    line = json.dumps({"event": "call", "call_id": "late", "ts": datetime.now(UTC).isoformat(),
                       "task": "grading", "request_key_hash": "ab", "model": "smollm2-135m", "role": "primary",
                       "stage": "full", "bucket": 0.5, "latency_ms": 2.0, "input_tokens": 1, "output_tokens": 1,
                       "success": True, "error": None, "rating": None}) + "\n"
    with open(path, "a") as handle:
        handle.write(line[:40])

    db = tmp_path / "warehouse.duckdb"
    with duckdb.connect(str(db)) as conn:
        assert ingest_call_logs(folder, conn) == 1
        assert ingest_call_logs(folder, conn) == 0
    with open(path, "a") as handle:
        handle.write(line[40:])
        handle.write("this line is garbage\n")  # skipped with a warning, does not block what follows
    log.record(decision, "smollm2-135m", latency_ms=3.0, input_tokens=1, output_tokens=1, success=True, role="primary")
    with duckdb.connect(str(db)) as conn:
        assert ingest_call_logs(folder, conn) == 2
        assert ingest_call_logs(folder, conn) == 0
        assert conn.sql("SELECT count(*) FROM production_calls WHERE call_id = 'late'").fetchall() == [(1,)]
        assert conn.sql('SELECT "offset" FROM production_log_offsets').fetchall() == [(path.stat().st_size,)]


def test_a_failed_ingest_changes_nothing(snapshot, tmp_path, monkeypatch):
    from model_eval import production_log

    write_snapshot(snapshot, {"grading": assignment("full")})
    decision = Router(snapshot).route("grading", "u1")
    folder = tmp_path / "calls"
    log = CallLog(folder)
    log.record(decision, "m", latency_ms=1.0, input_tokens=1, output_tokens=1, success=True, role="primary")
    with duckdb.connect(str(tmp_path / "w.duckdb")) as conn:
        assert ingest_call_logs(folder, conn) == 1
        offsets = conn.sql("SELECT * FROM production_log_offsets").fetchall()

        log.record(decision, "m", latency_ms=2.0, input_tokens=1, output_tokens=1, success=True, role="primary")
        log.rate("x", 1.0)
        # Break the write half-way: the new call is inserted, then the ratings insert names a
        # column the table does not have.
        monkeypatch.setattr(production_log, "RATING_SCHEMA", {"call_id": pl.String, "no_such_column": pl.String})
        with pytest.raises(duckdb.Error, match="no_such_column"):
            ingest_call_logs(folder, conn)
        monkeypatch.undo()
        assert conn.sql("SELECT count(*) FROM production_calls").fetchall() == [(1,)]
        assert conn.sql("SELECT * FROM production_log_offsets").fetchall() == offsets
        assert ingest_call_logs(folder, conn) == 1
        assert conn.sql("SELECT call_id FROM production_pending_ratings").fetchall() == [("x",)]


def test_record_refuses_a_shadow_row_without_a_shadow_model(snapshot, tmp_path):
    write_snapshot(snapshot, {"grading": assignment("full")})
    decision = Router(snapshot).route("grading", "u1")
    with pytest.raises(ValueError, match="no shadow model"):
        CallLog(tmp_path).record(decision, "m", latency_ms=1.0, input_tokens=None, output_tokens=None,
                                 success=True, role="shadow")


# ----------------------------------------------------------------------------------------------
# Concurrency: several processes, each with several threads, logging at once

PROCESSES, THREADS, CALLS_PER_THREAD = 2, 4, 150


def _log_from_a_worker(folder: str, snapshot: str, start: multiprocessing.Event) -> None:
    decision = Router(Path(snapshot)).route("grading", f"pid-{os.getpid()}")
    log = CallLog(Path(folder))
    big = "x" * 8000  # lines larger than a pipe buffer make interleaving visible if writes were split
    start.wait(10)

    def work(thread: int) -> None:
        for i in range(CALLS_PER_THREAD):
            log.record(decision, decision.primary.model, latency_ms=float(i), input_tokens=i, output_tokens=i,
                       success=True, role="primary", extra={"thread": thread, "i": i, "pad": big})

    threads = [threading.Thread(target=work, args=(t,)) for t in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def test_concurrent_processes_write_intact_lines(snapshot, tmp_path):
    write_snapshot(snapshot, {"grading": assignment("full")})
    folder = tmp_path / "calls"
    context = multiprocessing.get_context("spawn")  # no fork of pytest's threads
    start = context.Event()
    workers = [context.Process(target=_log_from_a_worker, args=(str(folder), str(snapshot), start))
               for _ in range(PROCESSES)]
    for w in workers:
        w.start()
    start.set()
    for w in workers:
        w.join(60)
        assert w.exitcode == 0

    files = sorted(folder.iterdir())
    assert len(files) == PROCESSES  # one file per process
    expected = THREADS * CALLS_PER_THREAD
    for path in files:
        lines = path.read_bytes().split(b"\n")
        assert lines[-1] == b""
        parsed = [json.loads(line) for line in lines[:-1]]  # every line is whole, valid JSON
        assert len(parsed) == expected
        assert len({(p["extra"]["thread"], p["extra"]["i"]) for p in parsed}) == expected

    with duckdb.connect(str(tmp_path / "warehouse.duckdb")) as conn:
        assert ingest_call_logs(folder, conn) == PROCESSES * expected
        assert ingest_call_logs(folder, conn) == 0
