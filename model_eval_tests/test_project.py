"""The project's files are read once per step, and a bad one fails the step that reads it (naming the
file, line and field), never the loading of the Dagster code location."""

from __future__ import annotations

import collections
import shutil

import dagster as dg
import pytest
import yaml

from model_eval import deployment as deployment_module
from model_eval import golden as golden_module
from model_eval import registry as registry_module
from model_eval.definitions import defs as build_definitions
from model_eval.errors import InputError
from model_eval.project import Project
from model_eval.settings import PROJECT_ROOT
from model_eval_tests.conftest import copy_golden, use_project_files
from model_eval_tests.fake_openai_server import FakeOpenAIServer, always, ok


@pytest.fixture
def project_files(tmp_path, monkeypatch):
    golden = copy_golden(tmp_path / "golden", cases_per_task=10, tasks=["grading", "classification"])
    deployment = tmp_path / "deployment.yaml"
    shutil.copyfile(PROJECT_ROOT / "deployment.yaml", deployment)
    with FakeOpenAIServer(always(ok("PASS"))) as server:
        registry = tmp_path / "models.yaml"
        registry.write_text(yaml.safe_dump({"models": [{
            "name": "fake", "model": "openai/fake", "api_base": server.api_base, "timeout_s": 30,
            "price_per_million": {"input": 1.0, "output": 1.0}}]}))
        data = yaml.safe_load(deployment.read_text())
        data["initial_assignments"] = {"grading": "fake", "classification": "fake"}
        data["alerts"] = {"log_file": str(tmp_path / "alerts.log")}
        deployment.write_text(yaml.safe_dump(data, sort_keys=False))
        instance = use_project_files(monkeypatch, tmp_path, golden, registry, deployment)
        yield {"instance": instance, "deployment": deployment}


def count_file_reads(monkeypatch) -> collections.Counter:
    """Count every parse of a task folder, the registry and the deployment file, whoever asks for it."""
    reads: collections.Counter = collections.Counter()

    def counted(name, module, attribute):
        original = getattr(module, attribute)

        def wrapper(*args, **kwargs):
            reads[name] += 1
            return original(*args, **kwargs)

        monkeypatch.setattr(module, attribute, wrapper)

    counted("task folder", golden_module, "load_task")
    counted("registry file", registry_module, "_read_yaml")
    counted("deployment file", deployment_module, "_parse")
    return reads


def test_every_step_reads_the_project_files_exactly_once(project_files, monkeypatch):
    definitions = build_definitions()
    instance = project_files["instance"]
    reads = count_file_reads(monkeypatch)
    prepare = definitions.resolve_job_def("prepare").execute_in_process(instance=instance, raise_on_error=False)
    assert prepare.success
    steps = len(prepare.get_step_success_events())
    assert steps == 2
    # Two tasks: each step parses each task folder once, the registry once, the deployment once.
    assert reads == {"task folder": 2 * steps, "registry file": steps, "deployment file": steps}

    reads.clear()
    evaluate = definitions.resolve_job_def("evaluate_model").execute_in_process(
        instance=instance, partition_key="fake", raise_on_error=False)
    assert evaluate.success
    steps = len(evaluate.get_step_success_events())
    assert steps == 2
    assert reads == {"task folder": 2 * steps, "registry file": steps, "deployment file": steps}


def test_a_bad_deployment_file_names_line_and_field(tmp_path):
    path = tmp_path / "deployment.yaml"
    path.write_text("gates:\n  min_cases: 10\nschedule:\n  timezone: UTC\n  cron: every sunday\n")
    with pytest.raises(InputError) as caught:
        deployment_module.load_deployment(path, tmp_path)
    assert caught.value.line == 5 and caught.value.field == "schedule.cron"
    assert str(caught.value).startswith(f"{path}, line 5, field 'schedule.cron': ")


def test_a_bad_deployment_file_keeps_the_code_location_loading_and_fails_the_schedule_tick(project_files):
    deployment = project_files["deployment"]
    data = yaml.safe_load(deployment.read_text())
    data["schedule"] = {"cron": "0 1 * * 0", "timezone": "UTC"}
    data["gates"]["min_cases"] = "ten"
    deployment.write_text(yaml.safe_dump(data, sort_keys=False))
    bad_line = next(i for i, line in enumerate(deployment.read_text().splitlines(), start=1) if "min_cases" in line)

    definitions = build_definitions()  # loads: the file is only read when the definitions are built, and tolerated there
    schedule = definitions.resolve_schedule_def("weekly_evaluation")
    assert schedule.cron_schedule == deployment_module.DEFAULT_SCHEDULE_CRON
    assert definitions.resolve_job_def("refresh_model") is not None

    with dg.build_schedule_context(instance=project_files["instance"],
                                   resources={"model_eval": definitions.resources["model_eval"]}) as context:
        with pytest.raises(Exception) as caught:
            list(schedule(context))
    message = str(caught.value)
    assert str(deployment) in message and f"line {bad_line}" in message and "gates.min_cases" in message


def test_the_schedule_uses_the_cron_of_the_deployment_file(project_files):
    deployment = project_files["deployment"]
    data = yaml.safe_load(deployment.read_text())
    data["schedule"] = {"cron": "30 2 * * 1", "timezone": "Europe/Paris"}
    deployment.write_text(yaml.safe_dump(data, sort_keys=False))
    schedule = build_definitions().resolve_schedule_def("weekly_evaluation")
    assert (schedule.cron_schedule, schedule.execution_timezone) == ("30 2 * * 1", "Europe/Paris")


def test_project_selects_tasks_by_name_and_names_the_unknown(paths):
    project = Project.load(paths)
    assert [t.name for t in project.select_tasks(["grading", "classification"])] == ["classification", "grading"]
    assert project.select_tasks(None) == list(project.tasks)
    with pytest.raises(InputError, match="unknown task.*summarise.*available: "):
        project.select_tasks(["grading", "summarise"])
