"""The official openai client against the gateway, in front of the bundled llama.cpp models: a chat
model (SmolLM2-135M) and a base model asked in completion mode (Gemma-3-270M), streamed and not."""

from __future__ import annotations

import os

import openai
import pytest

os.environ["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"

pytest.importorskip("llama_cpp.server", reason="needs the local extra: pip install -e '.[local]'")

from model_eval.local_server import LocalModelServer  # noqa: E402
from model_eval_tests.gateway_harness import ThreadedGateway, free_port, log_lines, make_project, publish  # noqa: E402

pytestmark = pytest.mark.llm


def test_the_openai_client_works_unchanged_against_the_bundled_models(tmp_path):
    with LocalModelServer({"smollm2-135m": "smollm2-135m-instruct", "gemma3-270m": "gemma3-270m"}, port=free_port(),
                          log_path=tmp_path / "llama.log") as server:
        base = {"api_base": server.api_base, "price_per_million": {"input": 0.0, "output": 0.0}, "provider": "llama.cpp",
                "params": {"temperature": 0.0}, "timeout_s": 180}
        paths = make_project(tmp_path / "p", server.api_base, [
            {"name": "smollm2-135m", "model": "openai/smollm2-135m", **base},
            {"name": "gemma3-270m", "model": "openai/gemma3-270m", "mode": "completion", **base,
             "completion_template": {"system": "{text}\n\n", "user": "{text}", "assistant": " {text}\n\n", "stop": ["\n\n"]}}])
        publish(paths, {"chat": {"model": "smollm2-135m"}, "employer": {"model": "gemma3-270m"}})
        with ThreadedGateway(paths) as gw:
            client = openai.OpenAI(base_url=gw.base_url + "/v1", api_key="unused-without-auth", max_retries=0, timeout=300)
            chat = client.chat.completions.create(model="task/chat", max_tokens=8,
                                                  messages=[{"role": "user", "content": "Say hello."}])
            assert chat.model == "smollm2-135m" and chat.choices[0].message.content.strip()
            assert chat.usage.completion_tokens >= 1
            pieces = [c.choices[0].delta.content or "" for c in client.chat.completions.create(
                model="task/chat", max_tokens=8, stream=True, messages=[{"role": "user", "content": "Say hello."}]) if c.choices]
            assert "".join(pieces).strip()
            base_answer = client.chat.completions.create(model="task/employer", max_tokens=8, messages=[
                {"role": "system", "content": "Name the employer of the job posting."},
                {"role": "user", "content": "Posting: Head Chef - The Copper Pot, Bath. Run our kitchen."}])
            assert base_answer.model == "gemma3-270m" and "\n\n" not in base_answer.choices[0].message.content
    lines = log_lines(paths)
    assert [l["model"] for l in lines] == ["smollm2-135m", "smollm2-135m", "gemma3-270m"] and all(l["success"] for l in lines)
    assert lines[0]["cost_usd"] == 0.0 and lines[1]["output_tokens"] >= 1   # streamed: counted from the pieces
