"""Nothing answered is lost: a real `model-eval serve` process under load, killed with SIGKILL; every call
it answered is in its call log, and the `production_calls` asset (a real Dagster materialization) loads them."""

from __future__ import annotations

import signal
import threading

import dagster as dg

from model_eval_tests.fake_openai_server import FakeOpenAIServer, ok
from model_eval_tests.gateway_harness import http, make_project, publish, serve_process, wait_for

MESSAGES = [{"role": "user", "content": "hello"}]


def test_sigkill_loses_no_answered_call(tmp_path, monkeypatch):
    with FakeOpenAIServer(script=lambda info: ok("PASS", 5, 1)) as fake:
        paths = make_project(tmp_path / "p", fake.api_base)
        publish(paths, {"grading": {"model": "steady", "candidate": "challenger", "stage": "shadow"}})
        service, base = serve_process(paths, tmp_path, "--rate-limit", "0")
        try:
            answered: list[str] = []
            stop = threading.Event()

            def client(worker: int) -> None:
                i = 0
                while not stop.is_set():
                    i += 1
                    try:
                        reply = http("POST", base + "/v1/chat/completions",
                                     {"model": "task/grading", "messages": MESSAGES, "user": f"{worker}-{i}",
                                      "stream": i % 3 == 0}, timeout=5)
                    except OSError:
                        return   # the service is gone
                    # Answered: a complete response (for a stream, through its [DONE] event).
                    if reply.status == 200 and (i % 3 or reply.body.endswith(b"data: [DONE]\n\n")):
                        answered.append(reply.headers["x-model-eval-call-id"])

            workers = [threading.Thread(target=client, args=(w,)) for w in range(6)]
            for worker in workers:
                worker.start()
            wait_for(lambda: len(answered) >= 150, timeout_s=60)
            service.send_signal(signal.SIGKILL)   # mid-flight: requests are in progress right now
            service.wait(10)
            stop.set()
            for worker in workers:
                worker.join(10)
        finally:
            if service.poll() is None:
                service.kill()
                service.wait(10)

    monkeypatch.setenv("MODEL_EVAL_WAREHOUSE", str(paths.warehouse_file))
    monkeypatch.setenv("MODEL_EVAL_REGISTRY", str(paths.registry_file))
    from model_eval.definitions import defs

    instance = dg.DagsterInstance.ephemeral()
    definitions = defs()
    result = dg.materialize([definitions.get_assets_def("production_calls")], instance=instance,
                            resources=definitions.resources)
    assert result.success
    from model_eval import warehouse

    with warehouse.read_connection(paths.warehouse_file) as conn:
        loaded = {r[0] for r in conn.execute("SELECT call_id FROM production_calls WHERE role = 'primary'").fetchall()}
    missing = set(answered) - loaded
    assert len(answered) >= 150 and not missing, f"{len(missing)} answered calls not in the log"
    # Loading again adds nothing (idempotent), even with the killed process's files as they are.
    again = dg.materialize([definitions.get_assets_def("production_calls")], instance=instance, resources=definitions.resources)
    assert again.success and again.asset_materializations_for_node("production_calls")[0].metadata["new_rows"].value == 0

