"""Run a whole evaluation through a Dagster instance: prepare, one run per model partition, recommend.

Used by `model-eval run` and the end-to-end tests; the schedule and sensors request the same jobs.
Before anything else it reaps runs and evaluations left behind by killed processes (run_reaper.py).
Every run it makes carries this process's identity, so a later one can tell if it was killed. The
evaluation is recorded as running first; the recommend run marks it complete when it admits its
scores into the metrics, and an evaluation that stops before that is marked incomplete.
"""

from __future__ import annotations

import signal
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterator

import dagster as dg

from model_eval import eval_runs, warehouse
from model_eval.defs.resources import EVAL_RUN_TAG, TRIGGER_TAG
from model_eval.process_identity import ProcessIdentity
from model_eval.project import Project
from model_eval.registry import ModelSpec
from model_eval.run_reaper import owner_tags, reap_dead_runs
from model_eval.serving import local_models_served
from model_eval.unchanged import Reuse, record_reuses, reusable_by_model, served_tasks


@dataclass
class EvaluationOutcome:
    eval_run_id: str
    succeeded: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)   # model -> error
    error: str | None = None                                  # prepare/recommend failure
    blocked: str | None = None                                # gates that failed for some task (its promotion waits)
    dagster_run_ids: list[str] = field(default_factory=list)
    recommended: bool = False      # the recommend run succeeded, so it marked the evaluation complete
    reused: dict[str, list[Reuse]] = field(default_factory=dict)   # model -> evaluations found unchanged, not run

    @property
    def ok(self) -> bool:
        return self.error is None and not self.failed


@contextmanager
def sigterm_kept() -> Iterator[None]:
    """Keep SIGTERM's handler across an in-process Dagster run. Dagster's interrupt capture leaves
    SIGTERM with SIGINT's handler when a run ends; in a process started in the background SIGINT is
    ignored, so SIGTERM would be ignored from then on, and so would it be in every process started
    afterwards (the local model servers, a warm runner): they could no longer be stopped by SIGTERM."""
    if threading.current_thread() is not threading.main_thread():
        yield   # only the main thread can set handlers; Dagster changes none from other threads either
        return
    handler = signal.getsignal(signal.SIGTERM)
    try:
        yield
    finally:
        if handler is not None:   # None: set outside Python, and nothing can put it back
            signal.signal(signal.SIGTERM, handler)


def new_eval_run_id() -> str:
    return f"eval-{datetime.now(timezone.utc):%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:6]}"


def _failure_text(event) -> str:
    error = event.step_failure_data.error if event.step_failure_data else None
    cause = error.cause if error is not None and error.cause is not None else error
    return f"{event.step_key}: {cause.message.strip() if cause else 'failed'}"


def _check_failures(events: list[dg.DagsterEvent]) -> list[str]:
    """The gate checks of a run that failed for some task, with the description each one recorded
    (from the run's own events, which an in-process run returns: no read of the event log)."""
    texts = []
    for event in events:
        if event.event_type_value != "ASSET_CHECK_EVALUATION":
            continue
        evaluation = event.event_specific_data
        if not evaluation.passed:
            texts.append(f"{evaluation.check_name} ({evaluation.description})")
    return texts


def run_evaluation(
    defs: dg.Definitions,
    instance: dg.DagsterInstance,
    project: Project,
    models: list[ModelSpec],
    task_names: list[str],
    *,
    trigger: str = "cli",
    log_level: str = "WARNING",
    say: Callable[[str], None] = lambda line: print(line, flush=True),
    max_cache_age_hours: float | None = None,
    adaptive: bool | None = None,
) -> EvaluationOutcome:
    """`adaptive`: True or False decides; None follows deployment.yaml (`adaptive.enabled`)."""
    warehouse_file = project.paths.warehouse_file
    reap_dead_runs(instance, warehouse_file, say)
    outcome = EvaluationOutcome(eval_run_id=new_eval_run_id())
    tags = {EVAL_RUN_TAG: outcome.eval_run_id, TRIGGER_TAG: trigger, **owner_tags()}
    with warehouse.write_connection(warehouse_file) as conn:
        eval_runs.start(conn, outcome.eval_run_id, trigger, ProcessIdentity.current())
    try:
        _run_jobs(defs, instance, project, models, task_names, outcome, tags, log_level, say,
                  {"max_cache_age_hours": max_cache_age_hours, "adaptive": adaptive})
    finally:
        _mark_incomplete_unless_complete(warehouse_file, outcome)
    return outcome


def _mark_incomplete_unless_complete(warehouse_file: Path, outcome: EvaluationOutcome) -> None:
    """An evaluation that ended without its results being admitted to metrics is incomplete, with the reason."""
    if outcome.recommended:
        return
    with warehouse.read_connection(warehouse_file) as conn:
        if eval_runs.status_of(conn, outcome.eval_run_id) != eval_runs.RUNNING:
            return
    reason = outcome.error or "it stopped before its results were complete"
    with warehouse.write_connection(warehouse_file) as conn:
        eval_runs.mark_incomplete(conn, outcome.eval_run_id, reason)


def _run_jobs(defs: dg.Definitions, instance: dg.DagsterInstance, project: Project, models: list[ModelSpec],
              task_names: list[str], outcome: EvaluationOutcome, tags: dict[str, str], log_level: str,
              say: Callable[[str], None], inference_settings: dict) -> None:
    logging_config = {"loggers": {"console": {"config": {"log_level": log_level}}}}

    def execute(job_name: str, **kwargs) -> str | None:
        """Run a job in this process, recorded in the instance; returns the error text, or None."""
        job = defs.resolve_job_def(job_name)
        with sigterm_kept():
            result = job.execute_in_process(instance=instance, tags=tags, raise_on_error=False, **kwargs)
        outcome.dagster_run_ids.append(result.run_id)
        # A gate that fails for one task is a WARN check result, not a failed run: promotion still
        # runs for the other tasks. Report which gates held which tasks back.
        blocked = _check_failures(result.all_events)
        if blocked:
            outcome.blocked = "; ".join(blocked)
        if result.success:
            return None
        failures = [e for e in result.all_events if e.is_step_failure]
        return "; ".join(_failure_text(e) for e in failures) or "run failed"

    if error := execute("prepare", run_config=logging_config):
        outcome.error = f"prepare: {error}"
        return
    # Evaluations this run would repeat exactly are reused, not run again (unchanged.py).
    reuses = reusable_by_model(project, models, task_names, inference_settings["max_cache_age_hours"])
    to_run = {spec.name: [t for t in served_tasks(project, spec, task_names) if t not in {r.task for r in reuses[spec.name]}]
              for spec in models}
    for spec in models:
        if reuses[spec.name]:
            outcome.reused[spec.name] = reuses[spec.name]
            runs = ", ".join(sorted({r.eval_run_id for r in reuses[spec.name]}))
            tasks = ", ".join(r.task for r in reuses[spec.name])
            say(f"{spec.name}: unchanged since eval run {runs} on {tasks} (every answer cached; same golden files, "
                f"task settings, model settings and scoring code): its results stand")
    if outcome.reused:
        record_reuses(project.paths.warehouse_file, outcome.eval_run_id, outcome.reused)
    running = [spec for spec in models if to_run[spec.name] or not outcome.reused.get(spec.name)]
    with local_models_served(project.registry, running, project.paths.warehouse_file.parent / "run"):
        for index, spec in enumerate(running, start=1):
            started = time.perf_counter()
            say(f"[{index}/{len(running)}] {spec.name}: evaluating ...")
            inference_config = {"tasks": to_run[spec.name] or task_names, **inference_settings}
            config = {**logging_config, "ops": {"inference_results": {"config": inference_config}}}
            error = execute("evaluate_model", partition_key=spec.name, run_config=config)
            if error:
                outcome.failed[spec.name] = error
                say(f"[{index}/{len(running)}] {spec.name}: FAILED: {error}")
            else:
                outcome.succeeded.append(spec.name)
                say(f"[{index}/{len(running)}] {spec.name}: done in {time.perf_counter() - started:.1f} s")
    if not outcome.succeeded and not outcome.reused:
        outcome.error = "no model was evaluated"
        return
    if error := execute("recommend", run_config=logging_config):
        outcome.error = f"recommend: {error}"
    else:
        outcome.recommended = True
