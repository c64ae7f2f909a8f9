"""Shared fixtures: a temporary copy of the golden sets and a temporary warehouse per test."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
from pathlib import Path

import pytest

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DAGSTER_DISABLE_TELEMETRY", "1")
# `model-eval run` in these tests runs in its own process; a warm runner left behind per test
# instance would hold memory for minutes. test_warm_runner.py turns it on where it is the subject.
os.environ["MODEL_EVAL_RUNNER"] = "off"
# A suite started in the background (`pytest &`) inherits an ignored SIGINT. Dagster runs made here
# directly (dg.materialize) hand SIGINT's handler to SIGTERM when they end, and every process a test
# starts afterwards would then ignore SIGTERM and never stop on terminate(): Python's own handler.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

from model_eval.settings import PROJECT_ROOT, ProjectPaths  # noqa: E402


class ListLog:
    """Collects log lines so tests can assert on what a person would be told."""

    def __init__(self):
        self.lines: list[tuple[str, str]] = []

    def info(self, msg: str) -> None:
        self.lines.append(("info", msg))

    def warning(self, msg: str) -> None:
        self.lines.append(("warning", msg))

    def text(self) -> str:
        return "\n".join(m for _, m in self.lines)


@pytest.fixture(autouse=True)
def no_dagster_context_left_open(request):
    """Fail the test that leaves a Dagster evaluation context open.

    A sensor, schedule or run-status context built without `with` opens an instance of its own and
    leaves its storage as the thread's current "defs state storage"; once that instance is garbage
    collected, every later `load_from_defs_folder` in the process fails with "Attempted to resolve
    undefined DagsterInstance weakref" (seen in a full run, far from the test that caused it). The
    check reads Dagster's own context variable, a private name: there is no public one.
    """
    yield
    if "dagster" not in sys.modules:
        return
    from dagster._core.storage.defs_state.base import DefsStateStorage

    if DefsStateStorage.get() is not None:
        from dagster._core.storage.defs_state.base import _current_storage

        _current_storage.set(None)   # so the tests after this one are not failed for it
        pytest.fail(f"{request.node.nodeid} left a Dagster context open (build_*_context without `with`)")


@pytest.fixture
def log() -> ListLog:
    return ListLog()


def copy_golden(target: Path, cases_per_task: int | None = None, tasks: list[str] | None = None) -> Path:
    """Copy the shipped golden sets; optionally keep only the first N cases of each (balanced for verdicts).

    Without `tasks`, the judge-scored task is left out: it needs its judge model in the test's registry,
    so tests that exercise it ask for it by name."""
    shutil.copytree(PROJECT_ROOT / "golden", target, ignore=shutil.ignore_patterns("README.md"))
    for folder in list(target.iterdir()):
        judged = "name: judge" in (folder / "task.yaml").read_text()
        if (tasks is not None and folder.name not in tasks) or (tasks is None and judged):
            shutil.rmtree(folder)
            continue
        if cases_per_task is None:
            continue
        for cases_file in (folder / "cases").glob("*.jsonl"):
            rows = [json.loads(line) for line in cases_file.read_text().splitlines() if line.strip()]
            if rows and rows[0]["expected"] in ("PASS", "FAIL"):
                passes = [r for r in rows if r["expected"] == "PASS"][: (cases_per_task + 1) // 2]
                fails = [r for r in rows if r["expected"] == "FAIL"][: cases_per_task // 2]
                rows = passes + fails
            else:
                rows = rows[:cases_per_task]
            cases_file.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return target


@pytest.fixture
def paths(tmp_path: Path) -> ProjectPaths:
    golden = copy_golden(tmp_path / "golden")
    registry = tmp_path / "models.yaml"
    shutil.copyfile(PROJECT_ROOT / "models.yaml", registry)
    return ProjectPaths(golden_dir=golden, registry_file=registry, warehouse_file=tmp_path / "warehouse" / "model_eval.duckdb",
                        cache_file=tmp_path / "warehouse" / "cache" / "responses.sqlite")


def use_project_files(monkeypatch, root: Path, golden: Path, registry: Path, deployment: Path):
    """Point every entry point (resources, CLI, sensors) at these files, with a warehouse under `root`,
    and return a real Dagster instance stored in `root/dagster_home`."""
    import dagster as dg

    for key, value in {"MODEL_EVAL_GOLDEN_DIR": golden, "MODEL_EVAL_REGISTRY": registry, "MODEL_EVAL_DEPLOYMENT": deployment,
                       "MODEL_EVAL_WAREHOUSE": root / "warehouse" / "model_eval.duckdb"}.items():
        monkeypatch.setenv(key, str(value))
    monkeypatch.setenv("no_proxy", "127.0.0.1")  # local receivers must not be reached through a proxy
    (root / "dagster_home").mkdir(exist_ok=True)
    return dg.DagsterInstance.local_temp(tempdir=str(root / "dagster_home"))


def stub_project_env(root: Path, api_base: str, task: str, cases: int, model_fields: str = "") -> dict[str, str]:
    """A project of one task and one model, `stub`, at a fake OpenAI endpoint (`api_base`), assigned to
    that task; returns the environment a `model-eval` process needs to work on it. `model_fields` adds
    fields to the model's registry entry (flow style, each starting with ", ")."""
    golden = copy_golden(root / "golden", cases_per_task=cases, tasks=[task])
    (root / "models.yaml").write_text(
        f"models:\n  - {{name: stub, model: openai/fake, api_base: '{api_base}', max_concurrency: 8,"
        f" price_per_million: {{input: 1.0, output: 2.0}}{model_fields}}}\n")
    deployment = (PROJECT_ROOT / "deployment.yaml").read_text()
    start, end = deployment.index("initial_assignments:"), deployment.index("\n# Gates")
    deployment = deployment[:start] + f"initial_assignments:\n  {task}: stub\n" + deployment[end:]
    deployment = deployment.replace("log_file: warehouse/alerts.log", f"log_file: {root / 'alerts.log'}")
    (root / "deployment.yaml").write_text(deployment)
    return {**os.environ, "MODEL_EVAL_GOLDEN_DIR": str(golden), "MODEL_EVAL_REGISTRY": str(root / "models.yaml"),
            "MODEL_EVAL_DEPLOYMENT": str(root / "deployment.yaml"),
            "MODEL_EVAL_WAREHOUSE": str(root / "warehouse" / "model_eval.duckdb"),
            "DAGSTER_HOME": str(root / "dagster_home"), "no_proxy": "127.0.0.1", "PYTHONPATH": str(PROJECT_ROOT)}
