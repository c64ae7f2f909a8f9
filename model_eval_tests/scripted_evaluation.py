"""Two real evaluation runs through a Dagster instance, against the scripted OpenAI-compatible server
(a TEST DOUBLE for hosted providers), with models whose behaviour the test decides:

* `oracle-large` - answers every case right, slowly (its body trickles out), priced high;
* `steady-small` - answers right except on every third case, fast, priced low; the assigned model;
* `turncoat`     - right on every case in the first run but slower than `oracle-large` (so it never
  wins), wrong on every case in the second: drift. It has no price, so its cost is unknown.

The second run asks every model anew (no cached answers), so drift can be measured.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import dagster as dg
import pytest
import yaml

from model_eval.definitions import defs
from model_eval.orchestration import EvaluationOutcome, run_evaluation
from model_eval.project import Project
from model_eval.settings import ProjectPaths
from model_eval_tests.conftest import copy_golden, use_project_files
from model_eval_tests.fake_openai_server import FakeOpenAIServer, ok, slow_body

TASKS = ["grading", "classification", "extraction"]
WRONG = {"grading": {"PASS": "FAIL", "FAIL": "PASS"}, "classification": "retail", "extraction": "{}"}


def _answer_key(golden: Path) -> list[tuple[list[str], str, str]]:
    """Per case: the starts of its inputs (all found in its prompt), its task, the expected answer as a model writes it."""
    key = []
    for task in TASKS:
        for line in (golden / task / "cases" / "v1.jsonl").read_text().splitlines():
            case = json.loads(line)
            starts = [v[:80] for v in case["inputs"].values() if isinstance(v, str)]
            expected = case["expected"] if isinstance(case["expected"], str) else json.dumps(case["expected"])
            key.append((starts, task, expected))
    return key


def _wrong(task: str, expected: str) -> str:
    wrong = WRONG[task]
    if isinstance(wrong, dict):
        return wrong[expected]
    return "education" if expected == wrong else wrong


@dataclass
class ScriptedProject:
    root: Path
    paths: ProjectPaths
    instance: dg.DagsterInstance
    env: dict[str, str]
    outcomes: list[EvaluationOutcome]
    server: FakeOpenAIServer


def scripted_models(golden: Path, state: dict):
    key = _answer_key(golden)

    def script(info):
        found = next(((task, expected) for starts, task, expected in key if all(s in info.last_message for s in starts)), None)
        if found is None:
            return ok("I cannot tell")
        task, expected = found
        model = info.payload.get("model")
        if model == "oracle-large":
            return slow_body(0.04, chunks=4, text=expected)
        if model == "steady-small":
            third = int(hashlib.sha256(info.last_message.encode()).hexdigest(), 16) % 3 == 0
            return ok(_wrong(task, expected) if third else expected)
        if model == "turncoat":
            return ok(_wrong(task, expected)) if state["turned"] else slow_body(0.12, chunks=4, text=expected)
        return ok("I cannot tell")

    return script


def evaluate_twice(root: Path, mp: pytest.MonkeyPatch, alerts: dict | None = None) -> ScriptedProject:
    """Set up the project under `root`, run two evaluations (the second asking anew) and return it all.

    The scripted server is stopped before returning; `server` keeps its counters.
    """
    golden = copy_golden(root / "golden", tasks=TASKS)
    state = {"turned": False}
    server = FakeOpenAIServer(scripted_models(golden, state)).start()
    try:
        def entry(name, price):
            model = {"name": name, "model": f"openai/{name}", "api_base": server.api_base, "params": {"temperature": 0.0},
                     "provider": "scripted", "max_attempts": 2, "timeout_s": 30, "max_concurrency": 8}
            if price is not None:
                model["price_per_million"] = {"input": price, "output": price * 2}
            return model

        registry = root / "models.yaml"
        registry.write_text(yaml.safe_dump({"models": [entry("oracle-large", 2.5), entry("steady-small", 0.15),
                                                       entry("turncoat", None)]}))
        deployment = root / "deployment.yaml"
        deployment.write_text(yaml.safe_dump({
            "initial_assignments": {task: "steady-small" for task in TASKS},
            # A promoted model stays in shadow here, so a later run with nothing new changes nothing.
            "rollout": {"min_hours_in_stage": 1000},
            "alerts": {"log_file": str(root / "alerts.log"), **(alerts or {})},
        }))
        instance = use_project_files(mp, root, golden, registry, deployment)
        paths = ProjectPaths.from_env()
        project = Project.load(paths)
        definitions = defs()
        models = list(project.registry.models)
        outcomes = [run_evaluation(definitions, instance, project, models, TASKS, say=lambda _: None)]
        state["turned"] = True
        outcomes.append(run_evaluation(definitions, instance, project, models, TASKS, say=lambda _: None,
                                       max_cache_age_hours=0.0))
    finally:
        server.stop()
    env = {"MODEL_EVAL_GOLDEN_DIR": str(golden), "MODEL_EVAL_REGISTRY": str(registry),
           "MODEL_EVAL_DEPLOYMENT": str(deployment), "MODEL_EVAL_WAREHOUSE": str(paths.warehouse_file)}
    return ScriptedProject(root, paths, instance, env, outcomes, server)
