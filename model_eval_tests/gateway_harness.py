"""What the gateway tests share: a project folder whose models point at the scripted test double
(FakeOpenAIServer, standing in for hosted providers), a published routing snapshot, and the real
gateway served by real uvicorn on a free loopback port, in a thread of the test process."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import uvicorn
import yaml

from model_eval.gateway.app import GatewaySettings, create_app
from model_eval.gateway.security import Access
from model_eval.registry import load_registry
from model_eval.router import write_snapshot
from model_eval.settings import PROJECT_ROOT, ProjectPaths

WRITE_TOKEN = "write-token-for-tests-0123456789"
READ_TOKEN = "read-token-for-tests-abcdefghij"
TEMPLATE = {"system": "{text}\n\n", "user": "Q: {text}", "assistant": "\nA: {text}\n\n", "stop": ["\n\n"]}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def registry_entries(api_base: str) -> list[dict[str, Any]]:
    """Models on the test double: two priced chat models, a base model in completion mode, one via litellm."""
    return [
        {"name": "steady", "model": "openai/fake", "api_base": api_base, "params": {"temperature": 0.0},
         "price_per_million": {"input": 1.0, "output": 2.0}, "provider": "test-double", "timeout_s": 5},
        {"name": "challenger", "model": "openai/fake", "api_base": api_base, "params": {"temperature": 0.1},
         "price_per_million": {"input": 3.0, "output": 4.0}, "provider": "test-double", "timeout_s": 5},
        {"name": "base", "model": "openai/fake", "api_base": api_base, "mode": "completion", "completion_template": TEMPLATE,
         "params": {"temperature": 0.0}, "price_per_million": {"input": 0.0, "output": 0.0}, "provider": "test-double",
         "timeout_s": 5},
        {"name": "via-litellm", "model": "openai/fake", "api_base": api_base, "client": "litellm",
         "params": {"temperature": 0.0}, "price_per_million": {"input": 1.0, "output": 1.0}, "provider": "test-double",
         "timeout_s": 5},
    ]


def make_project(root: Path, api_base: str, extra_models: list[dict] | None = None) -> ProjectPaths:
    root.mkdir(parents=True, exist_ok=True)
    registry = root / "models.yaml"
    registry.write_text(yaml.safe_dump({"models": registry_entries(api_base) + (extra_models or [])}))
    return ProjectPaths(golden_dir=root / "golden", registry_file=registry,
                        warehouse_file=root / "warehouse" / "model_eval.duckdb",
                        cache_file=root / "warehouse" / "cache" / "responses.sqlite")


def publish(paths: ProjectPaths, tasks: dict[str, dict[str, Any]]) -> None:
    """Write the routing snapshot as the pipeline would: `tasks` maps task -> (model, stage, candidate, share)."""
    registry = load_registry(paths.registry_file)

    def describe(name: str | None) -> dict | None:
        return None if name is None else registry.get(name).routing_record()

    write_snapshot(paths.snapshot_file, {
        task: {**describe(entry["model"]), "candidate": describe(entry.get("candidate")), "stage": entry.get("stage", "full"),
               "traffic_share": entry.get("share", 0.0), "pinned": False}
        for task, entry in tasks.items()})


class ThreadedGateway:
    """The real app under real uvicorn in a background thread (its own event loop)."""

    def __init__(self, paths: ProjectPaths, access: Access | None = None, settings: GatewaySettings | None = None):
        self.port = free_port()
        self.access = access or Access.from_env(no_auth=True)
        app = create_app(paths, load_registry(paths.registry_file), self.access,
                         settings or GatewaySettings(rate_per_s=0, snapshot_reload_s=0.05))
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, loop="asyncio", lifespan="on",
                                access_log=False, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="gateway", daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> "ThreadedGateway":
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the gateway did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(15)


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def http(method: str, url: str, body: Any = None, token: str | None = None, headers: dict[str, str] | None = None,
         raw: bytes | None = None, timeout: float = 20) -> Reply:
    """One request with urllib (no proxy), whatever the status."""
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    request = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json", **(headers or {})})
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(request, timeout=timeout) as response:
            return Reply(response.status, {k.lower(): v for k, v in response.headers.items()}, response.read())
    except urllib.error.HTTPError as error:
        return Reply(error.code, {k.lower(): v for k, v in error.headers.items()}, error.read())


def log_lines(paths: ProjectPaths) -> list[dict[str, Any]]:
    lines = []
    for file in sorted(paths.call_log_dir.glob("calls-*.jsonl")):
        lines += [json.loads(line) for line in file.read_text().splitlines() if line.strip()]
    return lines


def wait_for(predicate, timeout_s: float = 10.0, interval_s: float = 0.02):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval_s)
    raise AssertionError("condition not met in time")


def serve_process(paths: ProjectPaths, cwd: Path, *args: str) -> tuple[subprocess.Popen, str]:
    """A real `model-eval serve --no-auth` process on a free port for `paths`, once it answers; and its base URL.
    The caller stops it (kill and wait)."""
    port = free_port()
    env = {k: v for k, v in {**os.environ, "MODEL_EVAL_REGISTRY": str(paths.registry_file),
                             "MODEL_EVAL_WAREHOUSE": str(paths.warehouse_file), "PYTHONPATH": str(PROJECT_ROOT),
                             "no_proxy": "127.0.0.1"}.items() if not k.startswith("MODEL_EVAL_API")}
    service = subprocess.Popen([sys.executable, "-m", "model_eval.cli", "serve", "--no-auth", "--port", str(port), *args],
                               env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"

    def up() -> bool:
        try:
            return http("GET", base + "/v1/health", timeout=1).status == 200
        except OSError:
            time.sleep(0.05)
            return False

    try:
        wait_for(up, timeout_s=60, interval_s=0.1)
    except BaseException:
        service.kill()
        service.wait(10)
        raise
    return service, base
