"""Schedule and sensors, ticked with Dagster's own testing helpers; the runs they request are executed for real.

Models are served by the scripted local OpenAI-compatible server (a test double for hosted providers).
"""

from __future__ import annotations

import json
from datetime import datetime

import dagster as dg
import pytest
import yaml

from model_eval import warehouse
from model_eval.defs.automation.requests import BATCH_TAG
from model_eval.defs.automation.sensors import (
    alert_on_run_failure,
    evaluation_complete,
    golden_version_sensor,
    new_model_sensor,
)
from model_eval.defs.resources import EVAL_RUN_TAG, ModelEvalResource
from model_eval.definitions import defs as build_definitions
from model_eval.settings import ProjectPaths
from model_eval_tests.conftest import copy_golden, use_project_files
from model_eval_tests.fake_openai_server import FakeOpenAIServer, always, ok
from model_eval_tests.local_receivers import WebhookReceiver

RESOURCES = {"model_eval": ModelEvalResource()}
DEFINITIONS = build_definitions()


@pytest.fixture
def env(tmp_path, monkeypatch):
    golden = copy_golden(tmp_path / "golden", cases_per_task=10, tasks=["grading", "classification"])
    webhook = WebhookReceiver()
    with FakeOpenAIServer(always(ok("PASS")), model_id="listed-model") as server, webhook:
        def entry(name, **extra):
            return {"name": name, "model": f"openai/{name}", "api_base": server.api_base, "provider": "fake",
                    "price_per_million": {"input": 1.0, "output": 1.0}, "timeout_s": 30, **extra}

        registry = tmp_path / "models.yaml"
        registry.write_text(yaml.safe_dump({"models": [entry("first")]}))
        deployment = tmp_path / "deployment.yaml"
        deployment.write_text(yaml.safe_dump({
            "initial_assignments": {"grading": "first", "classification": "first"},
            "alerts": {"log_file": str(tmp_path / "alerts.log"), "webhook_url_env": "TEST_ALERT_WEBHOOK"},
            "schedule": {"cron": "0 1 * * 0"},
        }))
        monkeypatch.setenv("TEST_ALERT_WEBHOOK", webhook.url("/hook"))
        instance = use_project_files(monkeypatch, tmp_path, golden, registry, deployment)
        yield {"instance": instance, "registry": registry, "deployment": deployment, "entry": entry, "server": server,
               "golden": golden, "webhook": webhook, "paths": ProjectPaths.from_env(), "tmp": tmp_path}


def tick(sensor, env, cursor=None):
    # Entered as a context manager, as Dagster asks: a context left open keeps the instance it opened as
    # the thread's current "defs state storage", which breaks definitions loaded later in this process.
    with dg.build_sensor_context(instance=env["instance"], cursor=cursor, resources=RESOURCES,
                                 definitions=DEFINITIONS) as context:
        result = sensor(context)
    if isinstance(result, dg.SensorResult):
        for request in result.dynamic_partitions_requests or []:
            env["instance"].add_dynamic_partitions(request.partitions_def_name, list(request.partition_keys))
        return list(result.run_requests or []), result.cursor
    return ([] if isinstance(result, dg.SkipReason) else list(result)), cursor


def execute(env, request: dg.RunRequest, job_name: str = "refresh_model"):
    job = DEFINITIONS.resolve_job_def(job_name)
    result = job.execute_in_process(instance=env["instance"], partition_key=request.partition_key, tags=request.tags,
                                    run_config=request.run_config or {}, raise_on_error=False)
    return result


def add_model(env, name, **extra):
    data = yaml.safe_load(env["registry"].read_text())
    data["models"].append(env["entry"](name, **extra))
    env["registry"].write_text(yaml.safe_dump(data))


def test_a_new_registry_model_is_evaluated_exactly_once(env, monkeypatch):
    requests, cursor = tick(new_model_sensor, env)
    assert [r.partition_key for r in requests] == ["first"]
    assert all(execute(env, r).success for r in requests)
    again, cursor = tick(new_model_sensor, env, cursor)
    assert again == []

    add_model(env, "second")
    add_model(env, "keyed", api_key_env="KEYED_MODEL_KEY")       # no key yet: skipped, not forgotten
    monkeypatch.delenv("KEYED_MODEL_KEY", raising=False)
    requests, cursor = tick(new_model_sensor, env, cursor)
    assert [r.partition_key for r in requests] == ["second"]
    assert requests[0].run_key.startswith("new-model:second:") and requests[0].tags[BATCH_TAG] == "1"
    assert execute(env, requests[0]).success
    assert tick(new_model_sensor, env, cursor)[0] == []

    monkeypatch.setenv("KEYED_MODEL_KEY", "sk-test-key")
    requests, cursor = tick(new_model_sensor, env, cursor)
    assert [r.partition_key for r in requests] == ["keyed"]
    assert tick(new_model_sensor, env, cursor)[0] == []
    assert set(env["instance"].get_dynamic_partitions("models")) == {"first", "second", "keyed"}


def test_models_listed_by_a_discovery_endpoint_are_registered_and_evaluated_once(env):
    deployment = yaml.safe_load(env["deployment"].read_text())
    deployment["discovery"] = {"openai_compatible": [{
        "api_base": env["server"].api_base, "prefix": "disc-",
        "template": {"price_per_million": {"input": 0.5, "output": 0.5}, "timeout_s": 30}}],
        "ollama": [{"api_base": "http://127.0.0.1:9", "prefix": "down-"}]}  # an endpoint that is down is only logged
    env["deployment"].write_text(yaml.safe_dump(deployment))
    requests, cursor = tick(new_model_sensor, env)
    assert sorted(r.partition_key for r in requests) == ["disc-listed-model", "first"]
    discovered = yaml.safe_load(env["paths"].discovered_registry_file.read_text())["models"]
    assert discovered[0]["model"] == "openai/listed-model" and discovered[0]["api_base"] == env["server"].api_base
    run = next(r for r in requests if r.partition_key == "disc-listed-model")
    assert execute(env, run).success
    assert tick(new_model_sensor, env, cursor)[0] == []


def test_finished_batch_triggers_recommendation_and_promotion_once(env):
    add_model(env, "second")
    with dg.build_schedule_context(instance=env["instance"], resources=RESOURCES,
                                   scheduled_execution_time=datetime(2026, 11, 29, 1, 0)) as schedule_context:
        requests = list(DEFINITIONS.resolve_schedule_def("weekly_evaluation")(schedule_context))
    assert sorted(r.partition_key for r in requests) == ["first", "second"]
    assert {r.tags[EVAL_RUN_TAG] for r in requests} == {"weekly-20261129T0100"}
    assert all(r.run_config["ops"]["inference_results"]["config"]["max_cache_age_hours"] == 24.0 for r in requests)

    execute(env, requests[0])
    assert tick(evaluation_complete, env)[0] == []            # one of two runs finished: wait
    execute(env, requests[1])
    follow_up, _ = tick(evaluation_complete, env)
    assert [r.run_key for r in follow_up] == ["recommend:weekly-20261129T0100"]
    assert execute(env, follow_up[0], "recommend").success
    with warehouse.read_connection(env["paths"].warehouse_file) as conn:
        recs = conn.sql("SELECT DISTINCT eval_run_id FROM recommendations").fetchall()
        assignments = conn.sql("SELECT task, model FROM model_assignments ORDER BY task").fetchall()
    assert recs == [("weekly-20261129T0100",)]
    assert assignments == [("classification", "first"), ("grading", "first")]


def test_a_new_golden_version_re_evaluates_only_that_task_reusing_the_cache(env):
    requests, cursor = tick(new_model_sensor, env)
    assert execute(env, requests[0]).success
    requests, golden_cursor = tick(golden_version_sensor, env)
    assert requests == []  # the first tick only records the golden sets
    cases = env["golden"] / "grading" / "cases"
    lines = (cases / "v1.jsonl").read_text().splitlines()
    extra = json.loads(lines[0])
    extra["id"] = "grading-new"
    extra["inputs"]["summary"] += " Remote work is possible."
    (cases / "v2.jsonl").write_text("\n".join(lines + [json.dumps(extra)]) + "\n")

    requests, golden_cursor = tick(golden_version_sensor, env, golden_cursor)
    assert [r.partition_key for r in requests] == ["first"]
    assert requests[0].run_config["ops"]["inference_results"]["config"]["tasks"] == ["grading"]
    sent_before = env["server"].total
    result = execute(env, requests[0])
    assert result.success
    metadata = result.asset_materializations_for_node("inference_results")[0].metadata
    assert metadata["calls"].value == 11 * 3 and metadata["from_cache"].value == 10 * 3
    assert env["server"].total - sent_before == 3          # only the new case was sent
    assert tick(golden_version_sensor, env, golden_cursor)[0] == []
    with warehouse.read_connection(env["paths"].warehouse_file) as conn:
        tasks = conn.sql(f"SELECT DISTINCT task, dataset_version FROM inference_results WHERE eval_run_id = '{requests[0].tags[EVAL_RUN_TAG]}'").fetchall()
        sent_rates = [tokens * 1000 / latency for tokens, latency in conn.sql(
            f"""SELECT output_tokens, latency_ms FROM inference_results
                WHERE eval_run_id = '{requests[0].tags[EVAL_RUN_TAG]}' AND NOT from_cache""").fetchall()]
    assert tasks == [("grading", "v2")]
    # The UI shows the calls' speed; a remote server's memory is unknown.
    capacity_by_task = metadata["capacity_by_task"].value
    assert list(capacity_by_task) == ["grading"] and capacity_by_task["grading"]["peak_memory_mb"] is None
    assert capacity_by_task["grading"]["output_tokens_per_s"] == pytest.approx(sorted(sent_rates)[1], abs=0.01)


def test_a_failed_run_sends_an_alert(env):
    (env["golden"] / "grading" / "cases" / "v1.jsonl").write_text("{not json\n")
    requests, _ = tick(new_model_sensor, env)
    result = execute(env, requests[0])
    assert not result.success
    failure = env["instance"].all_logs(result.run_id, of_type=dg.DagsterEventType.RUN_FAILURE)[0].dagster_event
    with dg.build_run_status_sensor_context(sensor_name="alert_on_run_failure", dagster_event=failure,
                                            dagster_instance=env["instance"], dagster_run=result.dagster_run,
                                            resources=RESOURCES) as status_context:
        alert_on_run_failure(status_context.for_run_failure())
    body = env["webhook"].requests[-1].json()
    assert "run of refresh_model failed" in body["text"] and "[CRITICAL]" in body["text"]
    logged = [json.loads(line) for line in (env["tmp"] / "alerts.log").read_text().splitlines()]
    assert logged[-1]["kind"] == "run_failed" and logged[-1]["model"] == "first"


class OllamaStub:
    """A minimal local stand-in for Ollama (a test double: no Ollama on this machine): GET /api/tags lists
    `models`; POST /api/show answers `capabilities` for the models it has them for (older Ollama versions
    report none) and counts the requests."""

    def __init__(self, models: list[str], capabilities: dict[str, list[str]]):
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        stub = self
        self.shown: list[str] = []

        class Handler(BaseHTTPRequestHandler):
            def _answer(self, status, body):
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):  # noqa: N802 - the stdlib's name
                if self.path == "/api/tags":
                    self._answer(200, {"models": [{"name": name} for name in models]})
                else:
                    self._answer(404, {"error": "not found"})

            def do_POST(self):  # noqa: N802
                name = json.loads(self.rfile.read(int(self.headers["Content-Length"])))["model"]
                stub.shown.append(name)
                if self.path != "/api/show" or name not in models:
                    self._answer(404, {"error": f"model '{name}' not found"})
                else:
                    self._answer(200, {"details": {"format": "gguf"},
                                       **({"capabilities": capabilities[name]} if name in capabilities else {})})

            def log_message(self, *args):
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self.api_base = f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._server.shutdown()
        self._server.server_close()


def test_models_listed_by_an_ollama_endpoint_are_discovered_if_they_can_chat(env):
    listed = ["llama3.2:1b", "qwen2.5:0.5b", "nomic-embed-text:latest", "all-minilm:latest", "phi3:mini-128k"]
    capabilities = {"llama3.2:1b": ["completion", "tools"], "nomic-embed-text:latest": ["embedding"],
                    "phi3:mini-128k": ["completion"]}
    with OllamaStub(listed, capabilities) as ollama:
        deployment = yaml.safe_load(env["deployment"].read_text())
        deployment["discovery"] = {"ollama": [{"api_base": ollama.api_base, "prefix": "ollama-", "exclude": ["128k$"],
                                               "template": {"price_per_million": {"input": 0, "output": 0}}}]}
        env["deployment"].write_text(yaml.safe_dump(deployment))
        requests, cursor = tick(new_model_sensor, env)
        # Capabilities are asked only for models the patterns let through; the next tick asks nothing again.
        assert sorted(ollama.shown) == sorted(set(listed) - {"phi3:mini-128k"})
        again, later_cursor = tick(new_model_sensor, env, cursor)
        assert again == [] and len(ollama.shown) == 4
        # Changed rules judge the models they turned away again.
        deployment["discovery"]["ollama"][0]["exclude"] = ["-128k-nothing$"]
        env["deployment"].write_text(yaml.safe_dump(deployment))
        rejudged, _ = tick(new_model_sensor, env, later_cursor)
        assert [r.partition_key for r in rejudged] == ["ollama-phi3-mini-128k"] and ollama.shown[-1] == "phi3:mini-128k"
    # llama3.2 says it completes; qwen2.5's Ollama reports no capabilities, and neither litellm's map nor
    # its name says it is not a chat model; nomic-embed says embedding; all-minilm's name is an embedding model's.
    assert sorted(r.partition_key for r in requests) == ["first", "ollama-llama3.2-1b", "ollama-qwen2.5-0.5b"]
    discovered = {m["name"]: m for m in yaml.safe_load(env["paths"].discovered_registry_file.read_text())["models"]}
    assert sorted(discovered) == ["ollama-llama3.2-1b", "ollama-phi3-mini-128k", "ollama-qwen2.5-0.5b"]
    assert discovered["ollama-llama3.2-1b"]["model"] == "ollama/llama3.2:1b"
    assert discovered["ollama-llama3.2-1b"]["api_base"] == ollama.api_base
    assert "Ollama /api/show capabilities [completion, tools] include 'completion'" in discovered["ollama-llama3.2-1b"]["notes"]
    assert "unknown to litellm's model map" in discovered["ollama-qwen2.5-0.5b"]["notes"]


def test_discovery_evaluates_only_the_chat_models_of_a_mixed_listing(env):
    listed = ["gpt-4o-mini", "text-embedding-3-small", "whisper-1", "tts-1", "dall-e-3", "omni-moderation-latest",
              "BAAI/bge-m3", "acme-support-chat-v2", "acme-support-chat-v2-preview", "babbage-002"]
    with FakeOpenAIServer(listed_models=listed) as server:
        deployment = yaml.safe_load(env["deployment"].read_text())
        deployment["discovery"] = {"openai_compatible": [{
            "api_base": server.api_base, "prefix": "mix-", "exclude": ["-preview$"],
            "template": {"price_per_million": {"input": 0.5, "output": 0.5}, "timeout_s": 30}}]}
        env["deployment"].write_text(yaml.safe_dump(deployment))
        requests, _ = tick(new_model_sensor, env)
        assert sorted(r.partition_key for r in requests) == ["first", "mix-acme-support-chat-v2", "mix-gpt-4o-mini"]
        run = next(r for r in requests if r.partition_key == "mix-acme-support-chat-v2")
        assert execute(env, run).success
    discovered = {m["name"]: m["notes"] for m in yaml.safe_load(env["paths"].discovered_registry_file.read_text())["models"]}
    assert discovered["mix-gpt-4o-mini"].endswith("litellm's model map gives mode 'chat'")