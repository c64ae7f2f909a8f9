"""The reaper tells dead runs from live ones in a real Dagster instance: by the owner tag of runs made
by `model-eval run`, and by the worker-start event of runs launched through a code server (a pid
now held by a newer process counts as dead). Dead runs are failed with the reason and their pool
slots are freed; live ones and ones it cannot judge are left alone."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import uuid

import dagster as dg
from dagster._core.events import DagsterEvent, EngineEventData
from dagster._core.events.log import EventLogEntry
from dagster._core.storage.tags import GRPC_INFO_TAG

from model_eval.process_identity import ProcessIdentity
from model_eval.run_reaper import OWNER_TAG, find_dead_runs, reap_dead_runs


def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def _started_run(instance, tags) -> str:
    run_id = str(uuid.uuid4())
    instance.add_run(dg.DagsterRun(job_name="prepare", run_id=run_id, status=dg.DagsterRunStatus.STARTED, tags=tags))
    return run_id


def _worker_started(instance, run_id: str, pid: int, at: float) -> None:
    event = DagsterEvent(event_type_value=dg.DagsterEventType.ENGINE_EVENT.value, job_name="prepare",
                         message=f"Started process for run (pid: {pid}).", event_specific_data=EngineEventData.in_process(pid))
    instance.store_event(EventLogEntry(error_info=None, level="DEBUG", user_message="", run_id=run_id, timestamp=at,
                                       job_name="prepare", dagster_event=event))


def test_dead_runs_are_told_from_live_ones_and_failed_with_their_slots_freed(tmp_path):
    instance = dg.DagsterInstance.local_temp(tempdir=str(tmp_path))
    local_code_server = {GRPC_INFO_TAG: json.dumps({"host": "localhost", "port": 4000})}
    me = ProcessIdentity.current()
    dead_owner = ProcessIdentity(me.host, _dead_pid(), me.started_at + 1)
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        runs = {
            "cli, owner gone": _started_run(instance, {OWNER_TAG: dead_owner.as_text()}),
            "cli, owner alive": _started_run(instance, {OWNER_TAG: me.as_text()}),
            # Same pid, other start time: the pid was reused by another process.
            "cli, pid reused": _started_run(instance, {OWNER_TAG: ProcessIdentity(me.host, me.pid, me.started_at - 50).as_text()}),
            "cli, other host": _started_run(instance, {OWNER_TAG: ProcessIdentity("elsewhere", dead_owner.pid, 1.0).as_text()}),
            "ui, worker gone": _started_run(instance, local_code_server),
            "ui, worker alive": _started_run(instance, local_code_server),
            "ui, pid now newer": _started_run(instance, local_code_server),
            "ui, remote code server": _started_run(instance, {GRPC_INFO_TAG: json.dumps({"host": "10.1.2.3", "port": 4000})}),
        }
        now = time.time()
        _worker_started(instance, runs["ui, worker gone"], _dead_pid(), now)
        _worker_started(instance, runs["ui, worker alive"], me.pid, now)
        _worker_started(instance, runs["ui, pid now newer"], sleeper.pid, now - 3600)  # the sleeper started after this event
        _worker_started(instance, runs["ui, remote code server"], _dead_pid(), now)

        assert {r.run_id for r in find_dead_runs(instance)} == {runs[k] for k in ("cli, owner gone", "cli, pid reused",
                                                                                  "ui, worker gone", "ui, pid now newer")}
        storage = instance.event_log_storage
        storage.set_concurrency_slots("model_eval_warehouse", 1)
        assert storage.claim_concurrency_slot("model_eval_warehouse", runs["cli, owner gone"], "golden_cases").is_claimed
        blocked = storage.claim_concurrency_slot("model_eval_warehouse", runs["cli, owner alive"], "golden_cases")
        assert not blocked.is_claimed   # the wedge of the issue: the only slot held by a dead run

        said = []
        reaped = reap_dead_runs(instance, None, say=said.append)
        assert len(reaped) == 4 and len([line for line in said if line.startswith("reaped dead run")]) == 4
        for key, run_id in runs.items():
            status = instance.get_run_by_id(run_id).status
            assert (status == dg.DagsterRunStatus.FAILURE) == (key in ("cli, owner gone", "cli, pid reused", "ui, worker gone",
                                                                      "ui, pid now newer")), key
        failure = instance.get_records_for_run(runs["cli, owner gone"], of_type=dg.DagsterEventType.RUN_FAILURE).records[0]
        assert f"pid {dead_owner.pid} on {socket.gethostname()}" in failure.event_log_entry.dagster_event.message
        assert runs["cli, owner gone"] not in storage.get_concurrency_run_ids()
        # The slot went to the step that was waiting for it.
        assert storage.claim_concurrency_slot("model_eval_warehouse", runs["cli, owner alive"], "golden_cases").is_claimed
        assert reap_dead_runs(instance, None, say=said.append) == []   # nothing twice
    finally:
        sleeper.kill()
        sleeper.wait()
