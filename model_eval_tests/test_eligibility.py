"""Which discovered models are evaluated as chat models, the rule that decides, and deployment.yaml's
errors for bad patterns. litellm's model map is read from its package file, checked against litellm itself."""

from __future__ import annotations

import pytest
import yaml

from model_eval import model_map
from model_eval.deployment import load_deployment
from model_eval.eligibility import EligibilityRules, Pattern, judge
from model_eval.errors import InputError
from model_eval.settings import PROJECT_ROOT

DEFAULT = EligibilityRules()


@pytest.mark.parametrize("model_id,litellm_model,eligible,rule,words", [
    ("gpt-4o-mini", "openai/gpt-4o-mini", True, "litellm model map", "mode 'chat'"),
    ("text-embedding-3-small", "openai/text-embedding-3-small", False, "litellm model map", "mode 'embedding'"),
    ("whisper-1", "openai/whisper-1", False, "litellm model map", "mode 'audio_transcription'"),
    ("tts-1", "openai/tts-1", False, "litellm model map", "mode 'audio_speech'"),
    ("omni-moderation-latest", "openai/omni-moderation-latest", False, "litellm model map", "mode 'moderation'"),
    # The map calls this one chat; its name says speech synthesis, and the name rule still applies.
    ("gemini-2.5-pro-preview-tts", "gemini/gemini-2.5-pro-preview-tts", False, "name pattern", "speech synthesis"),
    ("nomic-embed-text:latest", "ollama/nomic-embed-text:latest", False, "name pattern", "(embedding)"),
    ("BAAI/bge-m3", "openai/BAAI/bge-m3", False, "name pattern", "(embedding)"),
    ("dall-e-3", "openai/dall-e-3", False, "name pattern", "(image generation)"),
    ("black-forest-labs/FLUX.1-schnell", "openai/black-forest-labs/FLUX.1-schnell", False, "name pattern", "image generation"),
    ("distil-whisper-large-v3", "openai/distil-whisper-large-v3", False, "name pattern", "speech recognition"),
    ("acme-support-chat-v2", "openai/acme-support-chat-v2", True, "name pattern", "unknown to litellm's model map"),
    # Whole-word patterns: letters around 'tts' or 'flux' make another word.
    ("mattstral-7b", "openai/mattstral-7b", True, "name pattern", "matches no non-chat pattern"),
    ("fluxion-chat", "openai/fluxion-chat", True, "name pattern", "matches no non-chat pattern"),
])
def test_each_rule_names_itself(model_id, litellm_model, eligible, rule, words):
    verdict = judge(model_id, litellm_model, DEFAULT)
    assert (verdict.eligible, verdict.rule) == (eligible, rule) and words in verdict.reason, verdict


def test_include_and_exclude_come_first_and_ollama_capabilities_decide_alone():
    rules = EligibilityRules(include=(Pattern.compile("^llama"), Pattern.compile("qwen")), exclude=(Pattern.compile(r":70b$"),))
    assert judge("mistral:7b", "ollama/mistral:7b", rules).rule == "include"
    verdict = judge("llama3:70b", "ollama/llama3:70b", rules)
    assert (verdict.eligible, verdict.rule, verdict.reason) == (False, "exclude", "matches exclude pattern ':70b$'")
    # A name the patterns would turn away is a chat model when Ollama says it completes, and the reverse.
    assert judge("qwen-embed-chat", "ollama/qwen-embed-chat", rules, ["completion", "tools"]).eligible
    said_no = judge("llama3.2", "ollama/llama3.2", rules, ["embedding"])
    assert (said_no.eligible, said_no.rule) == (False, "ollama capabilities") and "[embedding]" in said_no.reason
    unchecked = judge("text-embedding-3-small", "openai/text-embedding-3-small", EligibilityRules(require_chat=False))
    assert (unchecked.eligible, unchecked.rule) == (True, "no check")
    own = EligibilityRules(non_chat_patterns=(Pattern.compile("vision"),))
    assert not judge("acme-vision-1", "openai/acme-vision-1", own).eligible
    assert judge("nomic-embed-text", "ollama/nomic-embed-text", own).eligible   # the built-in list was replaced


def _deployment(tmp_path, endpoint: dict):
    path = tmp_path / "deployment.yaml"
    path.write_text(yaml.safe_dump({"initial_assignments": {},
                                    "discovery": {"ollama": [{"api_base": "http://127.0.0.1:11434", **endpoint}]}},
                                   sort_keys=False))
    return path


@pytest.mark.parametrize("endpoint,field,words", [
    ({"exclude": ["ok", "(unclosed"]}, "discovery.ollama[0].exclude[1]", "'(unclosed' is not a valid regular expression"),
    ({"include": "llama"}, "discovery.ollama[0].include", "must be a list of regular expressions"),
    ({"non_chat_patterns": [""]}, "discovery.ollama[0].non_chat_patterns", "must be a list of regular expressions"),
    ({"require_chat": "yes"}, "discovery.ollama[0].require_chat", "true or false"),
    ({"exlude": ["x"]}, "discovery.ollama[0].exlude", "unknown field"),
])
def test_bad_discovery_rules_name_the_file_line_and_field(tmp_path, endpoint, field, words):
    path = _deployment(tmp_path, endpoint)
    with pytest.raises(InputError) as error:
        load_deployment(path, tmp_path)
    text = path.read_text().splitlines()
    assert error.value.field == field and words in error.value.message and str(path) in str(error.value)
    key = field.rsplit(".", 1)[-1].split("[")[0]
    assert key in text[error.value.line - 1] or text[error.value.line - 1].lstrip().startswith("-"), (error.value.line, text)


def test_the_shipped_deployment_file_parses_with_default_rules():
    deployment = load_deployment(PROJECT_ROOT / "deployment.yaml", PROJECT_ROOT)
    assert all(e.rules.require_chat for e in deployment.discovery)


@pytest.mark.parametrize("model", ["openai/gpt-4o-mini", "openai/gpt-4o", "anthropic/claude-haiku-4-5",
                                   "gemini/gemini-2.5-flash", "mistral/mistral-small-latest", "ollama/llama3",
                                   "ollama/llama3.2", "anthropic/claude-3-5-haiku-20241022", "openai/smollm2-135m"])
def test_prices_read_from_the_map_file_agree_with_litellm(model):
    import litellm

    try:
        prompt, completion = litellm.cost_per_token(model=model, prompt_tokens=1_000_000, completion_tokens=1_000_000)
        expected = (pytest.approx(prompt), pytest.approx(completion))
    except Exception:  # noqa: BLE001 - litellm raises for a model it does not price
        expected = None
    assert model_map.price_per_million(model) == expected


def test_judging_and_planning_do_not_import_litellm():
    """Importing litellm takes seconds; a sensor tick and `model-eval plan` read its map file instead."""
    import subprocess
    import sys

    code = ("import sys; from model_eval.eligibility import EligibilityRules, judge; from model_eval import planning; "
            "assert not judge('text-embedding-3-small', 'openai/text-embedding-3-small', EligibilityRules()).eligible; "
            "assert planning.model_map.price_per_million('openai/gpt-4o-mini') is not None; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'litellm'))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=PROJECT_ROOT, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
