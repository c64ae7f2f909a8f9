"""The sensors: new models, new golden versions, finished evaluation batches, failed runs, dead runs."""

from __future__ import annotations

import json
from collections import defaultdict

import dagster as dg

from model_eval import run_reaper
from model_eval.alerts import Alert, send_alert
from model_eval.defs.automation.requests import BATCH_TAG, callable_models, evaluation_requests, missing_partitions
from model_eval.defs import jobs
from model_eval.defs.partitions import MODELS
from model_eval.defs.resources import EVAL_RUN_TAG, TRIGGER_TAG, ModelEvalResource
from model_eval.deployment import load_deployment
from model_eval.discovery import (add_discovered, eligible_models, golden_fingerprints, list_endpoint_models, registry_entry,
                                  turned_away_key)
from model_eval.registry import load_registry

FINISHED = {dg.DagsterRunStatus.SUCCESS, dg.DagsterRunStatus.FAILURE, dg.DagsterRunStatus.CANCELED}


@dg.sensor(job=jobs.refresh_model_job, minimum_interval_seconds=60, default_status=dg.DefaultSensorStatus.RUNNING,
           description="Evaluates models added to the registry file or listed by configured discovery endpoints, once each.")
def new_model_sensor(context: dg.SensorEvaluationContext, model_eval: ModelEvalResource):
    project = model_eval.project()
    paths = project.paths
    # The cursor: registry models already evaluated ("name:config_hash"), and listed models turned away
    # (a list, in cursors written before discovery filtered models).
    cursor = json.loads(context.cursor) if context.cursor is not None else None
    turned_away = set(cursor.get("turned_away", [])) if isinstance(cursor, dict) else set()
    for endpoint in project.deployment.discovery:
        try:
            accepted, rejected = eligible_models(endpoint, list_endpoint_models(endpoint), set(project.registry.names()),
                                                 turned_away)
        except Exception as exc:  # noqa: BLE001 - an endpoint that is down must not stop the sensor
            context.log.warning(f"discovery {endpoint.api_base}: {type(exc).__name__}: {exc}")
            continue
        for model_id, verdict in rejected.items():
            context.log.info(f"discovery {endpoint.api_base}: {model_id} not evaluated ({verdict.rule}): {verdict.reason}")
            turned_away.add(turned_away_key(endpoint, model_id))
        entries = [registry_entry(endpoint, model_id, verdict) for model_id, verdict in accepted.items()]
        added = add_discovered(paths.discovered_registry_file, entries, set(project.registry.names()))
        if added:
            context.log.info(f"discovered at {endpoint.api_base}: {', '.join(added)}")
    # Discovery may have added entries: the registry is read again, the one reload this tick needs.
    registry = load_registry(paths.registry_file, paths.discovered_registry_file)
    if cursor is None:
        # First tick: models the instance already has partitions for were evaluated before.
        known = set(context.instance.get_dynamic_partitions(MODELS.name))
        seen = {f"{m.name}:{m.config_hash}" for m in registry.models if m.name in known}
    else:
        seen = set(cursor["seen"] if isinstance(cursor, dict) else cursor)
    new = [m for m in registry.models if m.enabled and f"{m.name}:{m.config_hash}" not in seen]
    # Not marked seen until callable: a key added later still triggers it.
    ready = callable_models(new, context.log, paths.warehouse_file)
    seen |= {f"{m.name}:{m.config_hash}" for m in ready}
    requests = [request for m in ready for request in evaluation_requests(
        [m], f"new-{m.name}-{m.config_hash[:8]}", "sensor", f"new-model:{m.name}:{m.config_hash}")]
    return dg.SensorResult(run_requests=requests, cursor=json.dumps({"seen": sorted(seen), "turned_away": sorted(turned_away)}),
                           dynamic_partitions_requests=missing_partitions(context.instance, [m.name for m in ready]))


@dg.sensor(job=jobs.refresh_model_job, minimum_interval_seconds=60, default_status=dg.DefaultSensorStatus.RUNNING,
           description="Re-evaluates only the affected task when its golden files change (cached answers are reused).")
def golden_version_sensor(context: dg.SensorEvaluationContext, model_eval: ModelEvalResource):
    prints = golden_fingerprints(model_eval.paths().golden_dir)
    if context.cursor is None:
        return dg.SensorResult(cursor=json.dumps(prints), skip_reason="recorded the golden sets as they are now")
    previous = json.loads(context.cursor)
    changed = sorted(task for task, digest in prints.items() if previous.get(task) != digest)
    if not changed:
        return dg.SensorResult(cursor=context.cursor, skip_reason="no golden set changed")
    project = model_eval.project()
    tasks = {t.name: t for t in project.select_tasks(changed)}
    requests, names = [], set()
    for name in changed:
        models = callable_models([m for m in project.registry.models if m.enabled and m.serves(name, tasks[name].tier)], context.log,
                                 project.paths.warehouse_file)
        eval_run_id = f"golden-{name}-{prints[name][:8]}"
        requests += evaluation_requests(models, eval_run_id, "golden_change", f"golden:{name}:{prints[name]}", tasks=[name])
        names |= {m.name for m in models}
    return dg.SensorResult(run_requests=requests, cursor=json.dumps(prints),
                           dynamic_partitions_requests=missing_partitions(context.instance, sorted(names)))


@dg.sensor(job=jobs.recommend_job, minimum_interval_seconds=30, default_status=dg.DefaultSensorStatus.RUNNING,
           description="Once every run of a scheduled or sensor-launched evaluation has finished, recommends and promotes.")
def evaluation_complete(context: dg.SensorEvaluationContext):
    runs = context.instance.get_runs(filters=dg.RunsFilter(job_name=jobs.refresh_model_job.name), limit=500)
    batches: dict[str, list] = defaultdict(list)
    for run in runs:
        if BATCH_TAG in run.tags and EVAL_RUN_TAG in run.tags:
            batches[run.tags[EVAL_RUN_TAG]].append(run)
    requests = []
    for eval_run_id, members in sorted(batches.items()):
        expected = int(members[0].tags[BATCH_TAG])
        finished = [r for r in members if r.status in FINISHED]
        if len(finished) >= expected and any(r.status == dg.DagsterRunStatus.SUCCESS for r in finished):
            requests.append(dg.RunRequest(run_key=f"recommend:{eval_run_id}",
                                          tags={EVAL_RUN_TAG: eval_run_id, TRIGGER_TAG: members[0].tags.get(TRIGGER_TAG, "sensor")}))
    return requests or dg.SkipReason("no evaluation batch has just finished")


@dg.sensor(minimum_interval_seconds=30, default_status=dg.DefaultSensorStatus.RUNNING,
           description="Marks runs whose process died (killed, crashed) failed, frees their pool slots, and marks "
                       "the evaluations they drove incomplete, so nothing waits for them.")
def reap_dead_runs(context: dg.SensorEvaluationContext, model_eval: ModelEvalResource):
    dead = run_reaper.reap_dead_runs(context.instance, model_eval.paths().warehouse_file, say=context.log.warning, reaper="the reap_dead_runs sensor")
    return dg.SkipReason(f"reaped {len(dead)} dead run(s)" if dead else "no dead run")


@dg.run_failure_sensor(default_status=dg.DefaultSensorStatus.RUNNING, description="Sends an alert for every failed run.")
def alert_on_run_failure(context: dg.RunFailureSensorContext, model_eval: ModelEvalResource):
    # Only the deployment file: a run that failed on a bad golden set must still raise its alert.
    paths = model_eval.paths()
    deployment = load_deployment(paths.deployment_file, paths.base_dir)
    run = context.dagster_run
    alert = Alert(kind="run_failed", title=f"run of {run.job_name} failed", severity="critical",
                  details=(context.failure_event.message or "")[:2000],
                  model=run.tags.get("dagster/partition"), facts={"run_id": run.run_id, "eval_run_id": run.tags.get(EVAL_RUN_TAG)})
    send_alert(alert, deployment.alerts, context.log)
