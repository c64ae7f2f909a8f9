"""Consensus across models for tasks without expected answers: normalised matching for labels, verdicts and
JSON fields, token-F1 similarity for text, ties broken by the designated model, and each model's
agreement with the consensus recorded (also leave-one-out). The step runs on answers from the scripted
OpenAI-compatible server (a test double for hosted providers)."""

from __future__ import annotations

import json

import pytest
import yaml

from model_eval import warehouse
from model_eval.consensus import case_consensus, model_answer, normalise
from model_eval.golden import ConsensusSpec
from model_eval.project import Project
from model_eval.steps.consensus import compute_consensus
from model_eval.steps.evaluation import run_inference
from model_eval.steps.golden import ingest_golden
from model_eval.steps.models import sync_registry
from model_eval_tests.fake_openai_server import FakeOpenAIServer, ok

SPEC = ConsensusSpec(tie_breaker="b", similarity_threshold=0.6)


def answers(kind, spec=SPEC, **replies):
    return {model: normalise(text, kind, spec) for model, text in replies.items()}


def test_labels_match_after_normalisation_and_the_majority_wins():
    result = case_consensus(answers("label", a='"Finance."', b="finance", c="**Label: FINANCE**", d="retail"), "label", SPEC)
    assert (result.answer, result.supporters, result.agreement) == ("finance", ("a", "b", "c"), 0.75)
    assert result.tie_broken_by is None and result.reason == "3 of 4 model(s) agree"


def test_a_tie_is_broken_by_the_designated_model_only():
    tied = answers("label", a="retail", b="finance")
    result = case_consensus(tied, "label", SPEC)
    assert (result.answer, result.model, result.tie_broken_by, result.agreement) == ("finance", "b", "b", 0.5)
    unresolved = case_consensus(answers("label", a="retail", c="finance", b=None), "label", SPEC)
    assert unresolved.answer is None and "tie between a, c" in unresolved.reason and "b gave no usable answer" in unresolved.reason


def test_json_answers_agree_on_the_named_fields_with_strings_normalised():
    spec = ConsensusSpec(tie_breaker="a", fields=("industry", "salary.currency"))
    replies = answers("json", spec, a='```json\n{"industry": "Finance", "salary": {"currency": "usd"}, "skills": ["x"]}\n```',
                      b='{"industry": " finance ", "salary": {"currency": "USD"}, "skills": ["y"]}',
                      c='{"industry": "retail", "salary": {"currency": "USD"}}', d="no JSON here")
    assert replies["d"] is None
    result = case_consensus(replies, "json", spec)
    assert result.supporters == ("a", "b") and result.agreement == 0.5 and result.models_answering == 3
    assert json.loads(result.answer) == {"industry": "finance", "salary.currency": "usd"}


def test_text_answers_agree_at_the_similarity_threshold():
    spec = ConsensusSpec(tie_breaker="c", similarity_threshold=0.6)
    replies = answers("text", spec, a="Harwick Bank hires a credit analyst in Charlotte.",
                      b="Harwick Bank is hiring a credit analyst, Charlotte NC.",
                      c="A cafe in Galway wants a barista.")
    result = case_consensus(replies, "text", spec)
    assert set(result.supporters) == {"a", "b"} and result.agreement == pytest.approx(2 / 3)
    strict = case_consensus(replies, "text", ConsensusSpec(tie_breaker="c", similarity_threshold=0.95))
    assert strict.answer == replies["c"] and strict.tie_broken_by == "c"   # nobody agrees: a three-way tie


def test_a_models_answer_is_its_most_frequent_repeat():
    assert model_answer(["b", "a", "a", None]) == "a"
    assert model_answer(["b", "a"]) == "b"          # a tie goes to the earliest repeat
    assert model_answer([None, None]) is None


def test_the_step_records_consensus_and_each_models_agreement(paths, log, tmp_path):
    """Three models on a label task without expected answers, judged by nobody: only consensus measures them."""
    folder = paths.golden_dir / "sector"
    (folder / "cases").mkdir(parents=True)
    (folder / "task.yaml").write_text(yaml.safe_dump({
        "name": "sector", "tier": 1, "output_kind": "label", "prompt_template": "Sector of: {text}",
        "scorer": {"name": "judge", "settings": {"judge_model": "m-a", "rubric": "Right sector.", "calibration": "calibration.jsonl"}},
        "repeats": 2, "qualification_threshold": 0.8, "policy": "quality",
        "consensus": {"tie_breaker": "m-c"}}))
    (folder / "cases" / "v1.jsonl").write_text("".join(json.dumps({"id": f"s-{i:02d}", "inputs": {"text": f"case {i:02d}"}}) + "\n"
                                                        for i in range(10)))
    (folder / "calibration.jsonl").write_text("".join(json.dumps({"id": f"c-{i}", "inputs": {"text": "x"}, "answer": "y",
                                                                  "human_verdict": "PASS" if i % 2 else "FAIL"}) + "\n"
                                                      for i in range(10)))

    def script(info):
        case = int(info.last_message.split()[-1])
        model = info.payload["model"]
        if model == "m-a":
            return ok("Finance.")
        if model == "m-b":
            return ok("finance" if case < 6 else "retail")       # agrees with m-a on cases 0-5
        return ok("retail" if case < 8 else "Energy")             # m-c: sides with m-b on 6-7, alone on 8-9

    with FakeOpenAIServer(script) as server:
        paths.registry_file.write_text(yaml.safe_dump({"models": [
            {"name": n, "model": f"openai/{n}", "api_base": server.api_base, "price_per_million": {"input": 0, "output": 0},
             "tasks": ["sector"], "max_attempts": 2, "timeout_s": 30} for n in ("m-a", "m-b", "m-c")]}))
        ingest_golden(Project.load(paths), "run-1", log)
        sync_registry(Project.load(paths), "run-1", log)
        for model in ("m-a", "m-b", "m-c"):
            run_inference(Project.load(paths), model, "run-1", log)
    # Like metrics, consensus reads only finished evaluations: run-1 is still running until it is completed.
    assert compute_consensus(Project.load(paths), "rec-1", log).answers.height == 0
    result = compute_consensus(Project.load(paths), "rec-1", log, completing="run-1")

    with warehouse.read_connection(paths.warehouse_file) as conn:
        cases = conn.sql("SELECT case_id, consensus_answer, agreement, tie_broken_by, consensus_text FROM consensus_answers "
                         "ORDER BY case_id").fetchall()
        rates = {m: (n, agreed, rate, loo) for m, n, agreed, rate, loo in conn.sql(
            "SELECT model, cases, agreed, agreement_rate, loo_agreement_rate FROM consensus_agreement WHERE eval_run_id = 'rec-1'").fetchall()}
    # 0-5: m-a and m-b agree; 6-7: m-b and m-c; 8-9: three different labels, a tie the tie-breaker m-c wins.
    assert [c[1] for c in cases] == ["finance"] * 6 + ["retail"] * 2 + ["energy"] * 2
    assert [c[2] for c in cases] == [pytest.approx(2 / 3)] * 8 + [pytest.approx(1 / 3)] * 2
    assert [c[3] for c in cases] == [None] * 8 + ["m-c"] * 2
    assert cases[9][4] == "Energy"     # the reply as the model wrote it, beside its normalised form
    assert rates["m-a"][:3] == (10, 6, 0.6) and rates["m-b"][:3] == (10, 8, 0.8) and rates["m-c"][:3] == (10, 4, 0.4)
    # Leave-one-out: against the other two alone, whose ties m-c breaks when it is one of them.
    assert (rates["m-a"][3], rates["m-b"][3], rates["m-c"][3]) == (0.0, 0.2, 0.0)
    assert result.agreement.height == 3 and result.answers.height == 10
