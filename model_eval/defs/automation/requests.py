"""What the schedule and sensors share: which models can be called, and the runs that evaluate them.

Scheduled and sensor-launched evaluations run `refresh_model` once per model partition, all tagged
with one eval run id and the batch size; `evaluation_complete` requests `recommend` (metrics,
recommendations, gates, promotion) once every run of the batch has finished.
"""

from __future__ import annotations

from pathlib import Path

import dagster as dg

from model_eval.capacity import measured_memory_mb
from model_eval.defs.partitions import MODELS
from model_eval.defs.resources import EVAL_RUN_TAG, TRIGGER_TAG
from model_eval.registry import ModelSpec, split_by_availability

BATCH_TAG = "model_eval/batch_size"


def callable_models(models: list[ModelSpec], log, warehouse_file: Path | None = None) -> list[ModelSpec]:
    """The models that can be called now; each one skipped gets a log line saying why. With the warehouse,
    memory measured in earlier runs counts against the registry's `resources` limit too."""
    ready, skipped = split_by_availability(models, measured_memory_mb(warehouse_file, models) if warehouse_file else None)
    for name, reason in skipped.items():
        log.info(f"model {name}: skipped, {reason}")
    return ready


def evaluation_requests(models: list[ModelSpec], eval_run_id: str, trigger: str, run_key_prefix: str, *,
                        tasks: list[str] | None = None, max_cache_age_hours: float | None = None,
                        adaptive: bool | None = None) -> list[dg.RunRequest]:
    """One `refresh_model` run per model, tagged so `evaluation_complete` knows when the batch is done.
    `adaptive` None: the inference step follows deployment.yaml's `adaptive.enabled`."""
    tags = {EVAL_RUN_TAG: eval_run_id, TRIGGER_TAG: trigger, BATCH_TAG: str(len(models))}
    config = {"ops": {"inference_results": {"config": {"tasks": tasks or [], "max_cache_age_hours": max_cache_age_hours,
                                                       "adaptive": adaptive}}}}
    return [dg.RunRequest(run_key=f"{run_key_prefix}:{m.name}", partition_key=m.name, tags=tags, run_config=config)
            for m in models]


def missing_partitions(instance: dg.DagsterInstance, names: list[str]) -> list[dg.AddDynamicPartitionsRequest]:
    """A request adding the model partitions the instance does not have yet (none if it has them all)."""
    missing = sorted(set(names) - set(instance.get_dynamic_partitions(MODELS.name)))
    return [dg.AddDynamicPartitionsRequest(MODELS.name, missing)] if missing else []
