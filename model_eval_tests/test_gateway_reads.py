"""The gateway's read API over a real DuckDB warehouse, the calls not loaded yet, the pipeline and the
service never blocking each other, and ratings as rollback evidence (checked against scipy)."""

from __future__ import annotations

import random
import threading
from datetime import datetime, timedelta, timezone

import numpy as np
import pytest
from scipy import stats as scipy_stats

from model_eval import warehouse
from model_eval.production_log import ingest_call_logs
from model_eval.promotion import current_assignments, degradation_reason, candidate_degradation, record
from model_eval.router import CallLog, RouteDecision, ModelChoice
from model_eval.stats import mann_whitney_u
from model_eval_tests.decision_warehouse import deployment, make_task
from model_eval_tests.fake_openai_server import FakeOpenAIServer, ok
from model_eval_tests.gateway_harness import ThreadedGateway, http, log_lines, make_project, publish

MESSAGES = [{"role": "user", "content": "hello"}]


@pytest.fixture
def served(tmp_path):
    with FakeOpenAIServer(script=lambda info: ok("PASS", 10, 1 + info.index % 7)) as fake:
        paths = make_project(tmp_path / "p", fake.api_base)
        publish(paths, {"grading": {"model": "steady", "candidate": "challenger", "stage": "partial", "share": 0.3}})
        with ThreadedGateway(paths) as gw:
            yield paths, gw


def _call(gw, n: int, key_prefix: str = "u") -> list[str]:
    return [http("POST", gw.base_url + "/v1/chat/completions", {"model": "task/grading", "messages": MESSAGES,
                                                              "user": f"{key_prefix}{i}"}).headers["x-model-eval-call-id"]
            for i in range(n)]


def _seed_decisions(paths) -> None:
    now = datetime.now(timezone.utc).replace(tzinfo=None)
    with warehouse.write_connection(paths.warehouse_file) as conn:
        conn.execute("""INSERT INTO recommendations (eval_run_id, task, dataset_version, policy, is_task_policy, champion,
                        runner_up, reasoning, confidence, created_at) VALUES
                        ('run-1', 'grading', 'v1', 'strict', true, 'challenger', 'steady', 'challenger is more accurate', 0.9, ?)""",
                     [now])
        # "lucky" answered 3 cases right before adaptive mode stopped it: the best accuracy, never ranked.
        for model, accuracy, status in (("steady", 0.7, "complete"), ("challenger", 0.9, "complete"),
                                        ("lucky", 1.0, "stopped: cannot qualify")):
            conn.execute("""INSERT INTO model_task_metrics (eval_run_id, model, task, dataset_version, cases, calls, accuracy,
                            p50_latency_ms, evaluated_at, status) VALUES ('run-1', ?, 'grading', 'v1', 20, 60, ?, 100, ?, ?)""",
                         [model, accuracy, now, status])
        with warehouse.transaction(conn):
            record(conn, task="grading", model="challenger", stage="partial", traffic_share=0.3, previous_model="steady",
                   pinned=False, action="advance", reason="gates passed", assigned_by="pipeline")


def test_tasks_decisions_and_leaderboard(served):
    paths, gw = served
    tasks = http("GET", gw.base_url + "/v1/tasks").json()["tasks"]
    assert tasks == [{"task": "grading", "model": "task/grading", "serving": "steady", "stage": "partial",
                      "candidate": "challenger", "traffic_share": 0.3, "pinned": False}]
    before = http("GET", gw.base_url + "/v1/tasks/grading").json()
    assert before["champion"] is None and "no warehouse" in before["note"]
    _seed_decisions(paths)
    detail = http("GET", gw.base_url + "/v1/tasks/grading").json()
    assert detail["stage"] == "partial" and detail["assignment"]["candidate"]["model"] == "challenger"
    assert (detail["champion"], detail["runner_up"], detail["reasoning"]) == ("challenger", "steady", "challenger is more accurate")
    assert detail["last_change"]["action"] == "advance"
    assert "api_base" not in str(detail) and "api_key_env" not in str(detail)
    board = http("GET", gw.base_url + "/v1/tasks/grading/leaderboard").json()
    assert [(m["model"], m["ranked"]) for m in board["models"]] == [("challenger", True), ("steady", True), ("lucky", False)]
    assert board["models"][2]["status"] == "stopped: cannot qualify" and board["dataset_version"] == "v1"
    missing = http("GET", gw.base_url + "/v1/tasks/nope")
    assert missing.status == 404 and missing.json()["error"]["param"] == "task"


def test_model_stats_count_calls_not_loaded_yet_and_match_an_independent_computation(served):
    paths, gw = served
    _call(gw, 30)
    with warehouse.write_connection(paths.warehouse_file) as conn:
        ingest_call_logs(paths.call_log_dir, conn)
    _call(gw, 20, "v")
    lines = [l for l in log_lines(paths) if l["event"] == "call" and l["model"] == "steady"]
    stats = http("GET", gw.base_url + "/v1/models/steady/stats?window=1h").json()
    assert stats["calls"] == len(lines) and stats["successes"] == len(lines) and stats["success_rate"] == 1.0
    fresh = stats["freshness"]
    assert fresh["warehouse_calls"] + fresh["unloaded_calls"] >= len(lines) and fresh["unloaded_calls"] > 0
    assert fresh["unread_log_bytes"] == 0
    latencies = np.array([l["latency_ms"] for l in lines])
    for q in (50, 95, 99):
        assert stats["latency_ms"][f"p{q}"] == pytest.approx(np.percentile(latencies, q), rel=1e-9)
    rates = [l["output_tokens"] / (l["latency_ms"] / 1000) for l in lines]
    assert stats["output_tokens_per_s"]["median"] == pytest.approx(float(np.median(rates)))
    assert stats["cost_usd"]["total_known"] == pytest.approx(sum(l["cost_usd"] for l in lines))
    assert stats["by_role"] == {"primary": len(lines)}
    bad = http("GET", gw.base_url + "/v1/models/steady/stats?window=forever")
    assert bad.status == 400 and bad.json()["error"]["param"] == "window"
    assert http("GET", gw.base_url + "/v1/models/nobody/stats").status == 404


def test_the_pipeline_and_the_service_never_block_each_other(served):
    paths, gw = served
    _seed_decisions(paths)
    ids = _call(gw, 5)
    holding, release = threading.Event(), threading.Event()

    def pipeline_write():
        # A pipeline step holding the writer lock, mid-transaction on its private copy.
        with warehouse.write_connection(paths.warehouse_file) as conn:
            ingest_call_logs(paths.call_log_dir, conn)
            holding.set()
            release.wait(30)

    writer = threading.Thread(target=pipeline_write)
    writer.start()
    try:
        assert holding.wait(30)
        # Every read answers while the writer holds its lock (a 5 s timeout would fail the test, not hang it).
        for path in ("/v1/tasks/grading", "/v1/tasks/grading/leaderboard", "/v1/models/steady/stats"):
            assert http("GET", gw.base_url + path, timeout=5).status == 200, path
        stats = http("GET", gw.base_url + "/v1/models/steady/stats", timeout=5).json()
        assert stats["freshness"]["warehouse_calls"] == 0   # the unpublished ingest is not visible...
        assert stats["calls"] == sum(1 for l in log_lines(paths) if l["model"] == "steady")   # ...the logs are
        assert http("POST", gw.base_url + "/v1/chat/completions", {"model": "task/grading", "messages": MESSAGES},
                    timeout=5).status == 200
    finally:
        release.set()
        writer.join(30)
    # And a reader holding the published file open (as the service does mid-read) never stops a write.
    with warehouse.read_connection(paths.warehouse_file):
        with warehouse.write_connection(paths.warehouse_file, lock_timeout_s=5) as conn:
            ingest_call_logs(paths.call_log_dir, conn)
    stats = http("GET", gw.base_url + "/v1/models/steady/stats").json()
    with warehouse.read_connection(paths.warehouse_file) as conn:
        loaded = {r[0] for r in conn.execute("SELECT call_id FROM production_calls").fetchall()}
    assert set(ids) <= loaded and stats["freshness"]["unloaded_calls"] == 0


@pytest.mark.parametrize("seed", range(6))
def test_mann_whitney_u_matches_scipy(seed):
    rng = random.Random(seed)
    if seed % 2:   # thumbs: two values, nearly everything tied
        x = [float(rng.random() < 0.6) for _ in range(rng.randint(5, 80))]
        y = [float(rng.random() < 0.8) for _ in range(rng.randint(5, 80))]
    else:          # star ratings scaled to [0, 1]
        x = [rng.randint(0, 4) / 4 for _ in range(rng.randint(5, 80))]
        y = [rng.randint(1, 4) / 4 for _ in range(rng.randint(5, 80))]
    for alternative in ("less", "greater"):
        ours = mann_whitney_u(x, y, alternative)
        theirs = scipy_stats.mannwhitneyu(x, y, alternative=alternative, method="asymptotic", use_continuity=True)
        assert ours.u == pytest.approx(theirs.statistic) and ours.p_value == pytest.approx(theirs.pvalue, rel=1e-9, abs=1e-12)


def _rated_calls(folder, model: str, task: str, thumbs: list[bool], stage: str, when: datetime) -> None:
    """Calls logged as the gateway logs them, then rated as POST /v1/feedback does, with timestamps set."""
    log = CallLog(folder)
    choice = ModelChoice(model, "openai/fake")
    decision = RouteDecision(task=task, request_key="k", primary=choice, shadow=None, stage=stage, bucket=0.5)
    for i, up in enumerate(thumbs):
        call_id = log.record(decision, model, latency_ms=10, input_tokens=1, output_tokens=1, success=True, role="primary")
        log.rate(call_id, 1.0 if up else 0.0)
    # Move the lines to the window under test (CallLog stamps "now").
    for file in folder.glob("*.jsonl"):
        text = file.read_text()
        stamp = when.replace(tzinfo=timezone.utc).isoformat()
        file.write_text("\n".join(l if f'"model":"{model}"' not in l or '"ts":"' not in l else
                                  l[:l.index('"ts":"') + 6] + stamp + l[l.index('"', l.index('"ts":"') + 6):]
                                  for l in text.splitlines()) + "\n")


def _challenger_assigned(conn, stage: str, share: float, at: datetime) -> None:
    """`challenger` takes over `grading` from `steady` in `stage`, as of `at`."""
    with warehouse.transaction(conn):
        record(conn, task="grading", model="challenger", stage=stage, traffic_share=share, previous_model="steady",
               pinned=False, action="advance", reason="test", assigned_by="test")
        conn.execute("UPDATE model_assignments SET assigned_at = ?", [at])


@pytest.mark.parametrize("candidate_up, expect_abort", [(0.45, True), (0.85, False)])
def test_a_drop_in_ratings_during_partial_aborts_the_rollout(tmp_path, candidate_up, expect_abort):
    task = make_task("grading")
    now = datetime.now(timezone.utc).replace(tzinfo=None)
    db = tmp_path / "w.duckdb"
    rng = random.Random(3)
    logs = tmp_path / "logs"
    _rated_calls(logs, "steady", "grading", [rng.random() < 0.85 for _ in range(60)], "partial", now - timedelta(hours=1))
    _rated_calls(logs, "challenger", "grading", [rng.random() < candidate_up for _ in range(40)], "partial",
                 now - timedelta(hours=1))
    with warehouse.write_connection(db) as conn:
        _challenger_assigned(conn, "partial", 0.3, now - timedelta(hours=2))
        ingest_call_logs(logs, conn)
        state = current_assignments(conn)["grading"]
        reason = candidate_degradation(conn, task, state, deployment(), now)
        too_few = candidate_degradation(conn, task, state, deployment(degradation={"min_rated_calls": 50}), now)
    assert (reason is not None and "Mann-Whitney" in reason) == expect_abort, reason
    assert too_few is None   # 40 rated candidate calls are under the minimum of 50: no verdict either way


def test_a_drop_in_ratings_after_a_full_rollout_rolls_back(tmp_path):
    task = make_task("grading")
    now = datetime.now(timezone.utc).replace(tzinfo=None)
    db, logs = tmp_path / "w.duckdb", tmp_path / "logs"
    # The previous model's ratings in the 3 hours before the switch; the new model's in the 3 hours since.
    _rated_calls(logs, "steady", "grading", [True] * 45 + [False] * 5, "full", now - timedelta(hours=4))
    _rated_calls(logs, "challenger", "grading", [True] * 20 + [False] * 20, "full", now - timedelta(hours=1))
    with warehouse.write_connection(db) as conn:
        _challenger_assigned(conn, "full", 1.0, now - timedelta(hours=3))
        ingest_call_logs(logs, conn)
        reason = degradation_reason(conn, task, current_assignments(conn)["grading"], deployment(), now)
    assert reason is not None and "user ratings fell" in reason and "0.50 over 40" in reason and "0.90 over 50" in reason
