"""The `model-eval` command line: clear errors for bad arguments, manual assignment control, read-only SQL."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from model_eval import warehouse
from model_eval.project import Project
from model_eval.steps.golden import ingest_golden
from model_eval.steps.models import ensure_assignments, sync_registry
from model_eval.cli import main
from model_eval.router import Router


@pytest.fixture
def cli_env(paths, monkeypatch, log):
    for key, value in {"MODEL_EVAL_GOLDEN_DIR": paths.golden_dir, "MODEL_EVAL_REGISTRY": paths.registry_file,
                       "MODEL_EVAL_WAREHOUSE": paths.warehouse_file}.items():
        monkeypatch.setenv(key, str(value))
    ingest_golden(Project.load(paths), "setup", log)
    sync_registry(Project.load(paths), "setup", log)
    ensure_assignments(Project.load(paths), log)
    return paths


@pytest.mark.parametrize("argv,words", [
    (["run", "--models", "gpt-9"], ["unknown model 'gpt-9'", "registered:"]),
    (["run", "--tasks", "poetry"], ["unknown task(s) poetry", "available:"]),
    (["run", "--models", "gpt-4o-mini"], ["gpt-4o-mini cannot run", "OPENAI_API_KEY is not set"]),
])
def test_run_rejects_bad_arguments_before_doing_anything(cli_env, capsys, monkeypatch, argv, words):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    before = cli_env.warehouse_file.read_bytes()
    assert main(argv) == 2
    err = capsys.readouterr().err
    for word in words:
        assert word in err, err
    assert cli_env.warehouse_file.read_bytes() == before


def test_pin_unpin_promote_rollback_are_recorded_with_who_and_why(cli_env, capsys):
    assert main(["assign", "pin", "grading", "gemma3-270m", "--by", "ana", "--reason", "legal review"]) == 0
    assert main(["assign", "unpin", "grading", "--by", "ana", "--reason", "review done"]) == 0
    assert main(["assign", "promote", "classification", "gemma3-270m", "--by", "bo", "--reason", "manual test"]) == 0
    assert main(["assign", "rollback", "classification", "--by", "bo", "--reason", "went badly"]) == 0
    with warehouse.read_connection(cli_env.warehouse_file) as conn:
        rows = conn.sql("""SELECT task, action, model, previous_model, pinned, assigned_by, reason FROM model_assignments
                           WHERE action LIKE 'manual%' ORDER BY seq""").fetchall()
    assert rows == [
        ("grading", "manual_pin", "gemma3-270m", "smollm2-135m", True, "ana", "legal review"),
        ("grading", "manual_unpin", "gemma3-270m", "smollm2-135m", False, "ana", "review done"),
        ("classification", "manual_promote", "gemma3-270m", "smollm2-135m", False, "bo", "manual test"),
        ("classification", "manual_rollback", "smollm2-135m", "gemma3-270m", False, "bo", "went badly"),
    ]
    router = Router(cli_env.snapshot_file)
    assert router.route("grading", "k").primary.model == "gemma3-270m"
    assert router.route("classification", "k").primary.model == "smollm2-135m"
    assert main(["assign", "show", "grading"]) == 0
    assert "legal review" in capsys.readouterr().out


def test_a_pinned_task_is_only_reported_by_the_pipeline(cli_env, log):
    from model_eval.promotion import plan_promotions

    assert main(["assign", "pin", "grading", "gemma3-270m", "--reason", "keep it"]) == 0
    project = Project.load(cli_env)
    with warehouse.read_connection(cli_env.warehouse_file) as conn:
        decisions = plan_promotions(conn, project.select_tasks(["grading"]), {"grading": "smollm2-135m"}, project.deployment)
    assert decisions[0].action == "pinned" and "reported only" in decisions[0].reason


@pytest.mark.parametrize("argv,message", [
    (["assign", "pin", "grading", "gpt-9", "--reason", "x"], "unknown model 'gpt-9'"),
    (["assign", "pin", "grading", "gemma3-270m"], "say why"),
    (["assign", "rollback", "grading", "--reason", "x"], "no previous model"),
    (["assign", "pin", "poetry", "gemma3-270m", "--reason", "x"], "unknown task"),
])
def test_manual_control_errors_are_clear_and_change_nothing(cli_env, capsys, argv, message):
    with warehouse.read_connection(cli_env.warehouse_file) as conn:
        before = conn.sql("SELECT count(*) FROM model_assignments").fetchall()
    assert main(argv) == 2
    assert message in capsys.readouterr().err
    with warehouse.read_connection(cli_env.warehouse_file) as conn:
        assert conn.sql("SELECT count(*) FROM model_assignments").fetchall() == before


def test_sql_is_read_only_unless_asked(cli_env, capsys):
    assert main(["sql", "SELECT count(*) AS n FROM golden_cases"]) == 0
    assert "64" in capsys.readouterr().out
    assert main(["sql", "DELETE FROM golden_cases"]) == 2
    assert "read-only" in capsys.readouterr().err.lower()


def test_the_installed_command_runs(cli_env):
    result = subprocess.run([os.path.join(os.path.dirname(sys.executable), "model-eval"), "sql",
                             "SELECT task FROM golden_versions ORDER BY task"], capture_output=True, text=True, env=os.environ)
    assert result.returncode == 0, result.stderr
    assert "classification" in result.stdout and "grading" in result.stdout
