"""Completion mode against the real llama.cpp server: Gemma-3-270M (a base model) asked as base models are.

The registry's own gemma3-270m entry (mode, template, stop) and the shipped employer task (with its
few-shot examples) go through the inference engine to the server's /v1/completions, on both call
paths: the lean HTTP client (the registry's rule for openai/ models) and real litellm.
The postings here are written for this test, not taken from any golden set.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
from dataclasses import replace

import polars as pl
import pytest

os.environ["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"

pytest.importorskip("llama_cpp.server", reason="needs the local extra: pip install -e '.[local]'")

from model_eval.golden import load_tasks  # noqa: E402
from model_eval.inference import iter_requests, run_model  # noqa: E402
from model_eval.local_server import LocalModelServer  # noqa: E402
from model_eval.registry import load_registry  # noqa: E402
from model_eval.response_cache import ResponseCache  # noqa: E402
from model_eval.scorers import get_scorer  # noqa: E402
from model_eval.settings import PROJECT_ROOT  # noqa: E402

pytestmark = pytest.mark.llm

POSTINGS = {
    "named": ("Head Chef - The Copper Pot, Bath\n\nRun a kitchen of six for our 60-cover restaurant, write seasonal "
              "menus and manage food costs. GBP 38,000 plus tips.", "The Copper Pot"),
    "in-body": ("Forklift Driver - Reno, NV\n\nDunmore Logistics is hiring a forklift driver to load and unload trailers "
                "in our distribution centre on night shift. Pay discussed at interview.", "Dunmore Logistics"),
}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def gemma(tmp_path_factory):
    log_path = tmp_path_factory.mktemp("llama") / "server.log"
    with LocalModelServer({"gemma3-270m": "gemma3-270m"}, port=_free_port(), log_path=log_path) as server:
        spec = load_registry(PROJECT_ROOT / "models.yaml").get("gemma3-270m")
        yield replace(spec, api_base=server.api_base)


@pytest.mark.parametrize("client", ["http", "litellm"])
def test_gemma_answers_the_employer_task_through_the_text_endpoint(gemma, tmp_path, client):
    assert gemma.mode == "completion" and gemma.transport == "http"
    gemma = replace(gemma, client=client)
    task = load_tasks(PROJECT_ROOT / "golden", only=["employer"])[0]
    task = replace(task, repeats=1)
    cases = pl.DataFrame({"task": ["employer"] * 2, "dataset_version": [task.dataset_version] * 2,
                          "case_id": list(POSTINGS), "inputs_json": [json.dumps({"posting": p}) for p, _ in POSTINGS.values()]})
    requests = list(iter_requests(gemma, [task], cases.iter_rows(named=True)))
    assert all(r.prompt is not None and "messages" not in r.model_input.litellm_arguments() for r in requests)
    with ResponseCache(tmp_path / "responses.sqlite") as cache:
        frame, stats = asyncio.run(run_model(gemma, requests, cache))

    assert stats.errors == 0 and stats.sent == 2, frame["error_message"].to_list()
    scorer = get_scorer(task.scorer)
    for row in frame.iter_rows(named=True):
        # The prompt held the system text and six solved examples: far more than the posting alone.
        assert row["input_tokens"] > 300 and 0 < row["output_tokens"] <= task.call_params["max_tokens"]
        # The answer ended where the template's stop sequence says: no next "Posting:" paragraph.
        assert row["finish_reason"] == "stop" and "\n\n" not in row["response_text"]
        expected = POSTINGS[row["case_id"]][1]
        score = scorer.score(row["response_text"], expected, task.scorer_settings)
        assert score.correct, (row["response_text"], expected, score.reason)
