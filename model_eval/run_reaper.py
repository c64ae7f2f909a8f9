"""Dead runs are reaped: Dagster runs whose process is gone are marked failed, with the reason, their
pool slots are freed, and the evaluations they drove are marked incomplete.

A run killed with SIGKILL (or lost with its machine) cannot report its own end, so Dagster keeps it
STARTED for ever, and the default run launcher has no health check that Dagster's run monitoring
could use. Every run records the process executing it, so this module can check it:

* runs made by `model-eval run` carry OWNER_TAG (host, pid, process start time) from creation;
* runs launched through a code server (the UI, the daemon's schedule and sensors) are found by the
  "Started process for run (pid: N)" event their worker writes first. A pid now held by a process
  that started after that event is a reused pid: the worker is gone.

A run on another host cannot be judged from here and is left alone. `model-eval run` reaps before
it starts; under `model-eval ui` the `reap_dead_runs` sensor does it every 30 s.
"""

from __future__ import annotations

import json
import shutil
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import dagster as dg
from dagster._core.storage.tags import GRPC_INFO_TAG

from model_eval.process_identity import ProcessIdentity, process_started_at

OWNER_TAG = "model_eval/owner_process"
IN_PROGRESS = [dg.DagsterRunStatus.NOT_STARTED, dg.DagsterRunStatus.STARTING, dg.DagsterRunStatus.STARTED,
               dg.DagsterRunStatus.CANCELING]
_LOCAL_HOSTS = {"localhost", "127.0.0.1", "::1", socket.gethostname()}
_WORKER_STARTED = "Started process for run"
# A start time read from /proc is rounded to a clock tick; the event is written just after the start.
_CLOCK_SLACK_S = 1.0


def owner_tags() -> dict[str, str]:
    """Tags naming this process as the one executing a run (for runs executed in this process)."""
    return {OWNER_TAG: ProcessIdentity.current().as_text()}


@dataclass(frozen=True)
class DeadRun:
    run_id: str
    job_name: str
    reason: str


def _worker_gone(instance: dg.DagsterInstance, run: dg.DagsterRun) -> str | None:
    """Why the run's process is known to be gone, or None if it is alive or cannot be checked from here."""
    if OWNER_TAG in run.tags:
        owner = ProcessIdentity.from_text(run.tags[OWNER_TAG])
        return f"its process ({owner.describe()}) is gone" if owner.is_alive() is False else None
    if run.status not in (dg.DagsterRunStatus.STARTED, dg.DagsterRunStatus.CANCELING):
        return None  # not launched yet, or launching: Dagster's own start timeout covers it
    grpc_host = json.loads(run.tags.get(GRPC_INFO_TAG, "{}")).get("host")
    if grpc_host not in _LOCAL_HOSTS:
        return None  # its worker runs where its code server runs, not necessarily here
    records = instance.get_records_for_run(run.run_id, of_type=dg.DagsterEventType.ENGINE_EVENT).records
    for record in reversed(records):
        entry = record.event_log_entry
        event = entry.dagster_event
        if event is None or not (event.message or "").startswith(_WORKER_STARTED):
            continue
        pid = int(event.engine_event_data.metadata["pid"].value)
        started = process_started_at(pid)
        if started is None:
            return f"its run worker (pid {pid} on {socket.gethostname()}) is gone"
        if started > entry.timestamp + _CLOCK_SLACK_S:
            return f"its run worker (pid {pid} on {socket.gethostname()}) is gone; that pid now belongs to a newer process"
        return None
    return None


def find_dead_runs(instance: dg.DagsterInstance) -> list[DeadRun]:
    dead = []
    for run in instance.get_runs(filters=dg.RunsFilter(statuses=IN_PROGRESS)):
        reason = _worker_gone(instance, run)
        if reason is not None:
            dead.append(DeadRun(run.run_id, run.job_name, reason))
    return dead


def _free_slots(instance: dg.DagsterInstance, run_id: str) -> None:
    storage = instance.event_log_storage
    if storage.supports_global_concurrency_limits:
        storage.free_concurrency_slots_for_run(run_id)


def reap_dead_runs(instance: dg.DagsterInstance, warehouse_file: Path | None,
                   say: Callable[[str], None] = lambda line: print(line, flush=True), reaper: str = "model-eval") -> list[DeadRun]:
    """Mark dead runs failed, free every pool slot a dead or finished run still holds, and mark the
    evaluations left without a process incomplete. Says what it did, one line each."""
    dead = find_dead_runs(instance)
    for run in dead:
        instance.report_run_failed(instance.get_run_by_id(run.run_id),
                                   f"Marked failed by {reaper}: {run.reason} (killed or crashed without reporting its end).")
        _free_slots(instance, run.run_id)
        say(f"reaped dead run {run.run_id} ({run.job_name}): {run.reason}; marked failed, pool slots freed")
    storage = instance.event_log_storage
    if storage.supports_global_concurrency_limits:
        for run_id in storage.get_concurrency_run_ids():
            run = instance.get_run_by_id(run_id)
            if run is None or run.is_finished:
                storage.free_concurrency_slots_for_run(run_id)
                say(f"freed the pool slots still held by finished run {run_id}")
    if warehouse_file is not None and warehouse_file.exists():
        _reap_evaluations(warehouse_file, {r.run_id for r in dead}, say)
    return dead


def _reap_evaluations(warehouse_file: Path, dead_run_ids: set[str], say: Callable[[str], None]) -> None:
    from model_eval import eval_runs, warehouse

    with warehouse.read_connection(warehouse_file) as conn:
        if not eval_runs.has_statuses(conn) or not eval_runs.abandoned(conn, dead_run_ids):
            return  # nothing to write: do not take the writer lock for nothing
    with warehouse.write_connection(warehouse_file) as conn:
        conn.execute("BEGIN TRANSACTION")
        marked = [(eval_run_id, reason) for eval_run_id, reason in eval_runs.abandoned(conn, dead_run_ids)
                  if eval_runs.mark_incomplete(conn, eval_run_id, reason)]
        conn.execute("COMMIT")
    for eval_run_id, reason in marked:
        say(f"eval run {eval_run_id} marked incomplete: {reason}; its results will not feed metrics")
        # Parquet parts staged by its killed inference steps: their answers are in the response cache.
        for staging in (warehouse_file.parent / "staging").glob(f"{eval_run_id}--*"):
            shutil.rmtree(staging, ignore_errors=True)
