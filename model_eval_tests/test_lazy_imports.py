"""`model-eval run` as a process. It imports heavy modules only where they are used: an unchanged re-run does not need
Great Expectations (validation is reused), and an `openai/` model goes through the lean HTTP client, so
litellm is never imported for it (prices come from litellm's JSON map, read as a file). And a model
called through litellm leaves no HTTP session open for the interpreter to complain about at exit."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from model_eval.inference import CostCalculator
from model_eval.model_map import model_map
from model_eval.registry import ModelSpec
from model_eval.settings import PROJECT_ROOT
from model_eval_tests.conftest import stub_project_env
from model_eval_tests.fake_openai_server import FakeOpenAIServer, always, ok


def _imported(importtime_log: str) -> set[str]:
    """Top-level package names from `python -X importtime` output."""
    names = set()
    for line in importtime_log.splitlines():
        if line.startswith("import time:") and "|" in line:
            names.add(line.rsplit("|", 1)[1].strip().split(".")[0])
    return names


@pytest.fixture
def stub_project(tmp_path):
    with FakeOpenAIServer(always(ok("PASS"))) as server:
        env = stub_project_env(tmp_path, server.api_base, "grading", 10)
        yield env, server


def _run(env, *args: str) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-X", "importtime", "-m", "model_eval.cli", "run", "-q", *args], env=env,
                          cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def test_an_unchanged_rerun_skips_great_expectations_and_the_http_path_never_imports_litellm(stub_project):
    env, server = stub_project
    first = _imported(_run(env).stderr)
    assert "great_expectations" in first and "aiohttp" in first   # the first run validates, and calls over HTTP
    assert "litellm" not in first
    calls = server.total
    assert calls == 30
    second = _imported(_run(env).stderr)
    assert server.total == calls                                 # every answer from the cache
    assert "great_expectations" not in second and "litellm" not in second
    assert "dagster" in second                                   # the runs still go through the instance


@pytest.mark.parametrize("mode", ["chat", "completion"])
def test_the_litellm_path_leaves_no_http_session_open(stub_project, mode):
    # litellm sends text completions over aiohttp sessions it caches and never closes; at exit each one
    # printed "Unclosed client session" (dozens in the default run before the lean path took over).
    env, server = stub_project
    completion = (", mode: completion, completion_template: {system: '{text}\\n\\n', user: '{text}',"
                  " assistant: ' {text}\\n\\n', stop: ['\\n\\n']}") if mode == "completion" else ""
    registry = env["MODEL_EVAL_REGISTRY"]
    with open(registry) as handle:
        text = handle.read()
    with open(registry, "w") as handle:
        handle.write(text.replace("max_concurrency: 8,", f"max_concurrency: 8, client: litellm{completion},"))
    done = _run(env)
    assert server.total == 30 and "litellm" in _imported(done.stderr)    # the calls did go through litellm
    endpoints = {record.endpoint for record in server.records}
    assert endpoints == {"text" if mode == "completion" else "chat"}
    assert "Unclosed client session" not in done.stderr and "Unclosed connector" not in done.stderr


def test_costs_from_the_map_match_litellm_for_openai_and_anthropic_chat_models():
    litellm = pytest.importorskip("litellm")
    checked = 0
    for key, entry in model_map().items():
        provider = entry.get("litellm_provider")
        if entry.get("mode") != "chat" or provider not in ("openai", "anthropic") or "input_cost_per_token" not in entry:
            continue
        model = key if key.startswith(f"{provider}/") else f"{provider}/{key}"
        prompt, completion = litellm.cost_per_token(model=model, prompt_tokens=1234, completion_tokens=56)
        cost = CostCalculator(ModelSpec(name="m", litellm_model=model, provider=provider, family="f"))(1234, 56)
        assert cost == pytest.approx(prompt + completion, rel=1e-9, abs=1e-15), model
        checked += 1
    assert checked > 50
    assert CostCalculator(ModelSpec(name="m", litellm_model="openai/no-such-model", provider="openai", family="f"))(10, 10) is None
