"""The model registry: clear errors naming the entry and field; hosted models skipped with a reason; no keys stored."""

from __future__ import annotations

import json
import textwrap

import pytest

from model_eval import warehouse
from model_eval.errors import RegistryError
from model_eval.project import Project
from model_eval.steps.models import sync_registry
from model_eval.registry import availability, load_registry


def _write(tmp_path, body: str):
    path = tmp_path / "models.yaml"
    path.write_text(textwrap.dedent(body))
    return path


def test_shipped_registry_has_two_different_local_models_and_hosted_examples(paths):
    registry = load_registry(paths.registry_file)
    local = [m for m in registry.models if m.local_model and m.enabled]
    assert len({m.local_model for m in local}) >= 2
    assert len({m.family for m in local}) >= 2
    providers = {m.provider for m in registry.models}
    assert {"openai", "anthropic", "google", "ollama"} <= providers
    assert all(m.api_base == "http://127.0.0.1:8765/v1" for m in local)


def test_hosted_models_without_keys_are_skipped_with_a_reason(paths, log, monkeypatch):
    for var in ("OPENAI_API_KEY", "ANTHROPIC_API_KEY", "GEMINI_API_KEY"):
        monkeypatch.delenv(var, raising=False)
    synced = sync_registry(Project.load(paths), "run-1", log)
    assert synced.skipped["gpt-4o-mini"] == "environment variable OPENAI_API_KEY is not set"
    assert "not reachable" in synced.skipped["ollama-llama3.2"]
    assert "model gpt-4o-mini: skipped, environment variable OPENAI_API_KEY is not set" in log.text()
    with warehouse.read_connection(paths.warehouse_file) as conn:
        rows = dict(conn.sql("SELECT model, available FROM models").fetchall())
    assert rows["gpt-4o-mini"] is False


def test_a_key_in_the_environment_is_used_but_never_stored(paths, log, monkeypatch):
    canary = "sk-canary-4f1c9e0b7d"
    monkeypatch.setenv("OPENAI_API_KEY", canary)
    registry = load_registry(paths.registry_file)
    assert registry.get("gpt-4o-mini").api_key() == canary
    assert availability(registry.get("gpt-4o-mini")) is None
    sync_registry(Project.load(paths), "run-1", log)
    assert canary.encode() not in paths.warehouse_file.read_bytes()
    with warehouse.read_connection(paths.warehouse_file) as conn:
        dump = repr(conn.sql("SELECT * FROM models").fetchall())
    assert canary not in dump and "OPENAI_API_KEY" in dump


@pytest.mark.parametrize("entry,words", [
    ("- name: a b\n    model: openai/x", ["line 2", "models[0].name", "partition key"]),
    ("- name: ok\n    model: openai/x\n    colour: red", ["line 2", "models[0].colour", "unknown field"]),
    ("- name: ok\n    model: openai/x\n    api_key_env: sk-123secret", ["models[0].api_key_env", "NAME of an environment variable"]),
    ("- name: ok\n    model: openai/x\n    params: {api_key: sk-1}", ["models[0].params", "api_key"]),
    ("- name: ok\n    model: openai/x\n    price_per_million: {input: -1, output: 2}", ["models[0].price_per_million.input"]),
    ("- name: ok\n    model: openai/x\n    api_base: localhost:1234", ["models[0].api_base", "http"]),
    ("- name: ok\n    model: openai/x\n  - name: ok\n    model: openai/y", ["line 4", "models[1].name", "duplicate"]),
    ("- name: ok\n    model: openai/x\n    max_attempts: 0", ["models[0].max_attempts"]),
    ("- name: ok\n    model: openai/x\n    enabled: yes please", ["models[0].enabled"]),
    ("- model: openai/x", ["models[0].name", "required"]),
    ("- name: ok\n    model: openai/x\n    mode: instruct", ["models[0].mode", "chat, completion"]),
    ("- name: ok\n    model: openai/x\n    mode: completion", ["models[0].completion_template", "required with mode: completion"]),
    ("- name: ok\n    model: openai/x\n    completion_template: {system: '{text}', user: '{text}', assistant: '{text}', stop: [x]}",
     ["models[0].completion_template", "only used with mode: completion"]),
    ("- name: ok\n    model: openai/x\n    mode: completion\n    completion_template: {system: '{text}', user: 'Q', assistant: '{text}', stop: [x]}",
     ["line 2", "models[0].completion_template.user", "exactly one {text}"]),
    ("- name: ok\n    model: openai/x\n    client: aiohttp", ["models[0].client", "http, litellm"]),
    ("- name: ok\n    model: ollama/llama3.2\n    client: http", ["models[0].client", "needs an api_base"]),
])
def test_malformed_entries_name_line_and_field(tmp_path, entry, words):
    path = _write(tmp_path, "models:\n  " + entry + "\n")
    with pytest.raises(RegistryError) as caught:
        load_registry(path)
    message = str(caught.value)
    assert str(path) in message
    for word in words:
        assert word in message, message


def test_yaml_syntax_error_names_the_line(tmp_path):
    path = _write(tmp_path, "models:\n  - name: a\n    model: [unclosed\n")
    with pytest.raises(RegistryError, match="line"):
        load_registry(path)


def test_unknown_or_disabled_model_selection_is_an_error(paths):
    registry = load_registry(paths.registry_file)
    with pytest.raises(RegistryError, match="unknown model 'gpt-9'.*registered: smollm2-135m"):
        registry.select(["gpt-9"])
    assert [m.name for m in registry.select(["gemma3-270m"])] == ["gemma3-270m"]


def test_config_hash_ignores_the_key_but_follows_parameters(tmp_path, monkeypatch):
    base = "models:\n  - name: m\n    model: openai/x\n    api_key_env: K\n    params: {temperature: %s}\n"
    monkeypatch.setenv("K", "one")
    first = load_registry(_write(tmp_path, base % "0.1")).get("m").config_hash
    monkeypatch.setenv("K", "two")
    assert load_registry(_write(tmp_path, base % "0.1")).get("m").config_hash == first
    assert load_registry(_write(tmp_path, base % "0.2")).get("m").config_hash != first


def test_completion_mode_and_its_template_are_read_and_change_the_config_hash(tmp_path):
    base = "models:\n  - name: m\n    model: openai/x\n"
    template = "    mode: completion\n    completion_template:\n      system: \"{text}\\n\\n\"\n      user: \"{text}\"\n" \
               "      assistant: \" {text}\\n\\n\"\n      stop: [%s]\n"
    chat = load_registry(_write(tmp_path, base)).get("m")
    completion = load_registry(_write(tmp_path, base + template % '"\\n\\n"')).get("m")
    other_stop = load_registry(_write(tmp_path, base + template % '"\\n"')).get("m")
    assert chat.mode == "chat" and chat.completion_template is None
    assert completion.mode == "completion" and completion.completion_template.stop == ("\n\n",)
    assert completion.completion_template.assistant == " {text}\n\n"
    assert len({chat.config_hash, completion.config_hash, other_stop.config_hash}) == 3
    record = completion.public_record()
    assert record["mode"] == "completion" and json.loads(record["completion_template_json"])["stop"] == ["\n\n"]


def test_the_shipped_base_model_is_evaluated_in_completion_mode(paths):
    registry = load_registry(paths.registry_file)
    assert registry.get("gemma3-270m").mode == "completion"
    assert registry.get("smollm2-135m").mode == "chat"


def test_the_call_path_follows_the_documented_rule(tmp_path, monkeypatch):
    text = """models:
  - {name: vllm, model: openai/meta-llama/Llama-3.1-8B, api_base: "http://127.0.0.1:8000/v1"}
  - {name: hosted-openai, model: openai/gpt-4o-mini}
  - {name: forced-litellm, model: openai/gpt-4o-mini, client: litellm}
  - {name: claude, model: anthropic/claude-3-5-haiku-20241022, api_key_env: ANTHROPIC_API_KEY}
  - {name: ollama-native, model: ollama/llama3.2, api_base: "http://127.0.0.1:11434"}
  - {name: ollama-v1, model: ollama/llama3.2, api_base: "http://127.0.0.1:11434/v1", client: http}
"""
    registry = load_registry(_write(tmp_path, text))
    paths = {spec.name: spec.transport for spec in registry.models}
    assert paths == {"vllm": "http", "hosted-openai": "http", "forced-litellm": "litellm", "claude": "litellm",
                     "ollama-native": "litellm", "ollama-v1": "http"}
    from model_eval.http_client import endpoint_of

    assert endpoint_of(registry.get("vllm")) == ("http://127.0.0.1:8000/v1", "meta-llama/Llama-3.1-8B")
    assert endpoint_of(registry.get("hosted-openai")) == ("https://api.openai.com/v1", "gpt-4o-mini")
    assert endpoint_of(registry.get("ollama-v1")) == ("http://127.0.0.1:11434/v1", "llama3.2")
    # The client is how calls travel, not what answers: cached answers stay valid when it changes.
    assert registry.get("hosted-openai").config_hash == registry.get("forced-litellm").config_hash
    # OpenAI's own API without a variable named: OPENAI_API_KEY, as litellm reads it (and so it is redacted).
    monkeypatch.setenv("OPENAI_API_KEY", "sk-env-0123")
    assert registry.get("hosted-openai").api_key() == "sk-env-0123"
    assert registry.get("vllm").api_key() is None
