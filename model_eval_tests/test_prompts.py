"""Request building: few-shot turns, completion prompts from a template, request bodies and cache keys."""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace

import polars as pl
import pytest

from model_eval.golden import FewShotExample, load_tasks
from model_eval.inference import iter_requests
from model_eval.prompts import CompletionTemplate, TemplateError, build_input
from model_eval.registry import ModelSpec
from model_eval.response_cache import cache_key
from model_eval.settings import PROJECT_ROOT

BASE_TEMPLATE = CompletionTemplate(system="{text}\n\n", user="{text}", assistant=" {text}\n\n", stop=("\n\n",))
TURNS = [
    {"role": "system", "content": "Name the employer."},
    {"role": "user", "content": "Posting:\nCook - Blue Fig\n\nEmployer:"},
    {"role": "assistant", "content": "Blue Fig"},
    {"role": "user", "content": "Posting:\nScam ad\n\nEmployer:"},
]


def test_completion_prompt_lays_out_every_turn_and_ends_with_the_cue():
    prompt = BASE_TEMPLATE.render(TURNS)
    assert prompt == ("Name the employer.\n\n"
                      "Posting:\nCook - Blue Fig\n\nEmployer: Blue Fig\n\n"
                      "Posting:\nScam ad\n\nEmployer:")   # no trailing space: the model writes " none" itself


def test_a_cue_with_markup_is_written_and_braces_in_turns_stay_text():
    template = CompletionTemplate(system="### System\n{text}\n", user="### Q\n{text}\n",
                                  assistant="### A {{json}}\n{text}\n", stop=("###",))
    turns = [{"role": "user", "content": "x"}, {"role": "assistant", "content": '{"a": {"b": 1}}'},
             {"role": "user", "content": "y {z}"}]
    assert template.render(turns) == '### Q\nx\n### A {json}\n{"a": {"b": 1}}\n### Q\ny {z}\n### A {json}\n'
    with pytest.raises(ValueError, match="end with a user turn"):
        template.render(turns[:2])


@pytest.mark.parametrize("raw,field,words", [
    ({"system": "{text}", "user": "{text}", "assistant": "{text}", "stop": []}, "stop", "non-empty list"),
    ({"system": "{text}", "user": "{text}", "assistant": "{text}", "stop": ["a", "b", "c", "d", "e"]}, "stop", "at most 4"),
    ({"system": "{text}", "user": "Q: {question}", "assistant": "{text}", "stop": ["\n"]}, "user", "exactly one {text}"),
    ({"system": "{text}", "user": "{text} {text}", "assistant": "{text}", "stop": ["\n"]}, "user", "exactly one {text}"),
    ({"system": "{text}", "user": "{text}", "assistant": "A: {text", "stop": ["\n"]}, "assistant", "does not parse"),
    ({"user": "{text}", "assistant": "{text}", "stop": ["\n"]}, "system", "required"),
    ({"system": "{text}", "user": "{text}", "assistant": "{text}", "stop": ["\n"], "bos": "<s>"}, "bos", "unknown field"),
])
def test_bad_templates_name_their_field(raw, field, words):
    with pytest.raises(TemplateError) as caught:
        CompletionTemplate.from_mapping(raw)
    assert caught.value.field == field and words in str(caught.value)


def test_request_bodies_for_both_endpoints():
    chat = build_input(TURNS)
    assert chat.endpoint_path == "/chat/completions"
    assert chat.openai_body("gemma3-270m", {"temperature": 0.0}) == {"model": "gemma3-270m", "temperature": 0.0, "messages": TURNS}
    text = build_input(TURNS, "completion", BASE_TEMPLATE)
    assert text.endpoint_path == "/completions"
    body = text.openai_body("gemma3-270m", {"max_tokens": 16})
    assert body == {"model": "gemma3-270m", "max_tokens": 16, "prompt": BASE_TEMPLATE.render(TURNS), "stop": ["\n\n"]}
    with pytest.raises(ValueError, match="template"):
        build_input(TURNS, "completion", None)


def _spec(**changes) -> ModelSpec:
    spec = ModelSpec(name="m", litellm_model="openai/m", provider="openai", family="", api_base="http://127.0.0.1:9/v1",
                     params={"temperature": 0.0})
    return replace(spec, **changes)


def _keys(spec: ModelSpec, task) -> list[str]:
    row = {"task": task.name, "dataset_version": task.dataset_version, "case_id": "c1",
           "inputs_json": json.dumps({"posting": "Cook - Blue Fig, Leeds\n\nCook wanted."})}
    return [r.key for r in iter_requests(spec, [task], [row])]


def test_cache_key_follows_mode_template_and_examples():
    task = {t.name: t for t in load_tasks(PROJECT_ROOT / "golden", only=["employer"])}["employer"]
    chat = _spec()
    completion = _spec(mode="completion", completion_template=BASE_TEMPLATE)
    other_template = _spec(mode="completion", completion_template=replace(BASE_TEMPLATE, user="Q: {text}"))
    other_stop = _spec(mode="completion", completion_template=replace(BASE_TEMPLATE, stop=("\n",)))
    fewer_examples = replace(task, examples=task.examples[:-1])
    other_answer = replace(task, examples=task.examples[:-1] + (FewShotExample(task.examples[-1].inputs, "Brindle"),))
    keys = [_keys(chat, task), _keys(completion, task), _keys(other_template, task), _keys(other_stop, task),
            _keys(chat, fewer_examples), _keys(chat, other_answer), _keys(completion, other_answer)]
    flat = [k for group in keys for k in group]
    assert len(flat) == len(set(flat)) == 7 * task.repeats   # every change asks anew; repeats stay distinct
    assert _keys(completion, task) == keys[1]                  # and the same request keeps its key


def test_chat_cache_keys_are_the_ones_made_before_modes_existed():
    messages = [{"role": "user", "content": "hi"}]
    material = json.dumps({"config": "abc", "messages": messages, "params": {"max_tokens": 4}, "repeat": 1},
                          sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    assert cache_key("abc", messages, {"max_tokens": 4}, 1) == hashlib.sha256(material.encode()).hexdigest()
    assert _spec().config_hash == _spec(mode="chat").config_hash != _spec(mode="completion", completion_template=BASE_TEMPLATE).config_hash


def test_completion_requests_carry_the_prompt_and_stop():
    task = load_tasks(PROJECT_ROOT / "golden", only=["employer"])[0]
    spec = _spec(mode="completion", completion_template=BASE_TEMPLATE)
    cases = pl.DataFrame({"task": ["employer"], "dataset_version": [task.dataset_version], "case_id": ["c1"],
                          "inputs_json": [json.dumps({"posting": "Cook - Blue Fig, Leeds"})]})
    request = next(iter_requests(spec, [task], cases.iter_rows(named=True)))
    assert request.stop == ("\n\n",) and request.model_input.mode == "completion"
    assert request.prompt.startswith(task.system_prompt) and request.prompt.endswith("Cook - Blue Fig, Leeds\n\nEmployer:")
    assert request.prompt.count("Employer:") == len(task.examples) + 1
    assert request.model_input.litellm_arguments() == {"prompt": request.prompt, "stop": ["\n\n"]}
