"""`model-eval plan` and `run --max-cost`: calls, tokens, cost and time before a run, from the golden
files, the response cache and the warehouse's history. Calls go to the scripted OpenAI-compatible server
(a test double for hosted providers); figures are checked against sums worked out here, and prices
against litellm itself."""

from __future__ import annotations

import contextlib
import io
import json
import math
import sqlite3

import pytest
import yaml

from model_eval import warehouse
from model_eval.cli import main
from model_eval.golden import read_cases
from model_eval.inference import RetryPolicy
from model_eval.planning import budget_refusal, format_plan, plan_run
from model_eval.project import Project
from model_eval.settings import ProjectPaths
from model_eval.steps.evaluation import run_inference
from model_eval.steps.golden import ingest_golden
from model_eval.steps.models import sync_registry
from model_eval_tests.conftest import copy_golden
from model_eval_tests.fake_openai_server import FakeOpenAIServer, always, ok

FAST_RETRY = RetryPolicy(backoff_base_s=0.01, backoff_cap_s=0.05, retry_after_cap_s=0.1)
PRICE = {"input": 1.0, "output": 2.0}


@pytest.fixture
def planned(tmp_path, monkeypatch):
    """Grading and classification (10 cases each); a priced, a map-priced and an unpriced model on the fake server."""
    golden = copy_golden(tmp_path / "golden", cases_per_task=10, tasks=["grading", "classification"])
    with FakeOpenAIServer(always(ok("PASS", prompt_tokens=40, completion_tokens=3))) as server:
        common = {"api_base": server.api_base, "timeout_s": 30, "max_concurrency": 2}
        registry = tmp_path / "models.yaml"
        registry.write_text(yaml.safe_dump({"models": [
            {"name": "priced", "model": "openai/priced", "price_per_million": PRICE, **common},
            {"name": "mapped", "model": "openai/gpt-4o-mini", **common},          # litellm's price map prices it
            {"name": "unpriced", "model": "openai/acme-unpriced", **common},      # no price anywhere
        ]}))
        warehouse_file = tmp_path / "warehouse" / "model_eval.duckdb"
        deployment = tmp_path / "deployment.yaml"
        deployment.write_text(yaml.safe_dump({"initial_assignments": {"grading": "priced", "classification": "priced"},
                                              "alerts": {"log_file": str(tmp_path / "alerts.log")}}))
        for key, value in {"MODEL_EVAL_GOLDEN_DIR": golden, "MODEL_EVAL_REGISTRY": registry, "MODEL_EVAL_DEPLOYMENT": deployment,
                           "MODEL_EVAL_WAREHOUSE": warehouse_file, "DAGSTER_HOME": tmp_path / "dagster_home"}.items():
            monkeypatch.setenv(key, str(value))
        yield ProjectPaths.from_env(), server


def _plan(paths, models=None, tasks=None, **kwargs):
    project = Project.load(paths)
    return plan_run(project, project.registry.select(models), project.select_tasks(tasks), **kwargs)


def _row(plan, model, task):
    return next(r for r in plan.rows if r.model == model and r.task == task)


def test_without_history_tokens_follow_the_prompt_length_rule_and_prices_their_source(planned):
    paths, server = planned
    plan = _plan(paths)
    project = Project.load(paths)
    for task in project.tasks:
        cases = read_cases(task)
        messages = [task.render_messages(json.loads(inputs)) for inputs in cases["inputs_json"]]
        chars = sum(len(m["content"]) for ms in messages for m in ms)
        # The documented rule: 4 characters a token, 4 tokens of framing per message.
        expected_in = math.ceil((chars / 4 + 4 * sum(map(len, messages))) / len(messages))
        expected_out = task.call_params["max_tokens"]
        calls = len(messages) * task.repeats
        priced, mapped, unpriced = (_row(plan, m, task.name) for m in ("priced", "mapped", "unpriced"))
        for row in (priced, mapped, unpriced):
            assert (row.calls, row.cached, row.input_tokens_per_call, row.output_tokens_per_call) == (calls, 0, expected_in, expected_out)
            assert row.tokens_basis.startswith("estimate") and row.seconds is None   # no latency history: unknown
        assert priced.cost_usd == pytest.approx(calls * (expected_in * PRICE["input"] + expected_out * PRICE["output"]) / 1e6)
        import litellm

        prompt, completion = litellm.cost_per_token(model="openai/gpt-4o-mini", prompt_tokens=calls * expected_in,
                                                    completion_tokens=calls * expected_out)
        assert mapped.cost_usd == pytest.approx(prompt + completion) and mapped.price_basis == "litellm price map"
        assert unpriced.cost_usd is None
    text = format_plan(plan)
    unpriced_lines = [line for line in text.splitlines() if line.startswith("unpriced")]
    assert len(unpriced_lines) == 2 and all(" unknown " in line and "0.000000" not in line for line in unpriced_lines)
    assert "+ unknown for 2 model x task" in text and server.total == 0          # planning sends nothing


def test_after_a_run_history_counts_cached_calls_apart_and_times_from_latency(planned, log):
    paths, _server = planned
    ingest_golden(Project.load(paths), "run-1", log)
    sync_registry(Project.load(paths), "run-1", log)
    run_inference(Project.load(paths), "priced", "run-1", log, task_names=["grading"], retry=FAST_RETRY)
    with warehouse.read_connection(paths.warehouse_file) as conn:
        mean_latency_ms, calls = conn.sql("""SELECT avg(latency_ms), count(*) FROM inference_results
                                             WHERE model = 'priced' AND task = 'grading'""").fetchall()[0]
        median_rate = conn.sql("""SELECT median(output_tokens * 1000.0 / latency_ms) FROM inference_results
                                  WHERE model = 'priced' AND task = 'grading'""").fetchall()[0][0]

    again = _plan(paths, ["priced"])
    grading, classification = _row(again, "priced", "grading"), _row(again, "priced", "classification")
    # Every grading answer is in the cache: nothing to send, nothing to pay, no time.
    assert (grading.calls, grading.cached, grading.to_send, grading.cost_usd, grading.seconds) == (calls, calls, 0, 0.0, 0.0)
    assert (grading.input_tokens_per_call, grading.output_tokens_per_call) == (40, 3)   # what the server reported
    assert grading.tokens_basis == f"history ({calls} calls)"
    # Classification has no history: tokens by the rule, time from the model's output rate on grading.
    assert classification.cached == 0 and classification.tokens_basis.startswith("estimate")
    assert classification.seconds == pytest.approx(classification.calls * classification.output_tokens_per_call / median_rate / 2)

    fresh = _row(_plan(paths, ["priced"], cache_max_age_s=0.0), "priced", "grading")   # as `run --fresh` would
    assert fresh.cached == 0 and fresh.cost_usd == pytest.approx(calls * (40 * PRICE["input"] + 3 * PRICE["output"]) / 1e6)
    assert fresh.seconds == pytest.approx(calls * mean_latency_ms / 1000 / 2)          # max_concurrency 2

    with sqlite3.connect(paths.cache_file) as cache:                                    # lose 5 answers
        cache.execute("DELETE FROM responses WHERE key IN (SELECT key FROM responses LIMIT 5)")
    partly = _row(_plan(paths, ["priced"]), "priced", "grading")
    assert (partly.cached, partly.to_send) == (calls - 5, 5)
    assert partly.cost_usd == pytest.approx(5 * (40 * PRICE["input"] + 3 * PRICE["output"]) / 1e6)


def test_budget_refusals_say_by_how_much_and_unknown_costs_need_consent(planned):
    paths, _server = planned
    plan = _plan(paths, ["priced", "mapped"])
    total = sum(r.cost_usd for r in plan.rows)
    assert budget_refusal(plan, total * 1.01) is None
    refusal = budget_refusal(plan, total / 2)
    assert refusal == f"expected cost {total:.6f} USD exceeds --max-cost {total / 2:g} USD by {total / 2:.6f} USD"
    with_unknown = _plan(paths)
    assert "unknown" in budget_refusal(with_unknown, 100.0) and "--allow-unknown-cost" in budget_refusal(with_unknown, 100.0)
    assert budget_refusal(with_unknown, 100.0, allow_unknown_cost=True) is None
    assert "exceeds" in budget_refusal(with_unknown, total / 2, allow_unknown_cost=True)


def test_the_cli_prints_the_plan_and_run_refuses_above_the_budget(planned, capsys):
    paths, server = planned
    assert main(["plan", "--models", "priced,unpriced", "--tasks", "grading"]) == 0
    out = capsys.readouterr().out
    assert "priced" in out and "unpriced" in out and "unknown" in out and "characters / 4" in out

    assert main(["run", "--models", "priced", "--max-cost", "0.000001"]) == 2
    err = capsys.readouterr().err
    assert "not started: expected cost" in err and "exceeds --max-cost 1e-06 USD by" in err
    assert main(["run", "--models", "priced,unpriced", "--max-cost", "100"]) == 2
    err = capsys.readouterr().err
    assert "unpriced/grading" in err and "unpriced/classification" in err and "--allow-unknown-cost" in err
    assert server.total == 0 and not paths.warehouse_file.exists()          # nothing was started

    with contextlib.redirect_stdout(io.StringIO()) as out:
        code = main(["run", "--models", "priced,unpriced", "--tasks", "grading", "--max-cost", "100", "--allow-unknown-cost", "-q"])
    assert code == 0, out.getvalue()
    assert "within --max-cost 100 USD" in out.getvalue() and "(+ 1 unknown, allowed)" in out.getvalue()
    assert server.total == 2 * _row(_plan(paths, ["priced"], ["grading"]), "priced", "grading").calls
