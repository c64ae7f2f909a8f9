"""Step `model_registry`: sync the registry file to the warehouse, and start every task from an assignment."""

from __future__ import annotations

from dataclasses import dataclass

import polars as pl

from model_eval import warehouse
from model_eval.capacity import measured_memory_mb
from model_eval.project import Project
from model_eval.promotion import current_assignments, ensure_initial_assignments, snapshot_tasks
from model_eval.registry import ModelSpec, split_by_availability
from model_eval.router import write_snapshot
from model_eval.steps._common import Log, utc_now

REGISTRY_COLUMN_TYPES = {"tasks": pl.List(pl.String), "tiers": pl.List(pl.Int64),
                         "price_input_per_million": pl.Float64, "price_output_per_million": pl.Float64,
                         "api_base": pl.String, "api_key_env": pl.String, "local_model": pl.String,
                         "unavailable_reason": pl.String, "completion_template_json": pl.String}


@dataclass(frozen=True)
class RegistrySync:
    available: list[ModelSpec]
    skipped: dict[str, str]       # model -> reason


def sync_registry(project: Project, eval_run_id: str, log: Log) -> RegistrySync:
    enabled = [m for m in project.registry.models if m.enabled]
    # A local model above the registry's memory limit (file size, or memory measured in an earlier run) is skipped.
    available, skipped = split_by_availability(enabled, measured_memory_mb(project.paths.warehouse_file, enabled))
    skipped |= {m.name: "disabled in the registry" for m in project.registry.models if not m.enabled}
    for name, reason in skipped.items():
        log.info(f"model {name}: skipped, {reason}")
    rows = [{**spec.public_record(), "available": spec.name not in skipped, "unavailable_reason": skipped.get(spec.name),
             "first_seen_run": eval_run_id, "last_seen_run": eval_run_id, "last_synced_at": utc_now()}
            for spec in project.registry.models]
    frame = pl.DataFrame(rows, schema_overrides=REGISTRY_COLUMN_TYPES)
    with warehouse.write_connection(project.paths.warehouse_file) as conn, warehouse.transaction(conn):
        conn.register("synced", frame.to_arrow())
        # Keep each (model, config) ever seen, so old results stay explained; refresh what is seen now.
        conn.execute("""
            INSERT INTO models BY NAME SELECT * FROM synced s
            WHERE NOT EXISTS (SELECT 1 FROM models m WHERE m.model = s.model AND m.config_hash = s.config_hash)""")
        conn.execute("""
            UPDATE models m SET enabled = s.enabled, available = s.available, unavailable_reason = s.unavailable_reason,
                   last_seen_run = s.last_seen_run, last_synced_at = s.last_synced_at,
                   mode = s.mode, completion_template_json = s.completion_template_json
            FROM synced s WHERE m.model = s.model AND m.config_hash = s.config_hash""")
    return RegistrySync(available=available, skipped=skipped)


def publish_assignments(project: Project, conn) -> None:
    """Write the routing snapshot applications read (atomically: they never see half a file)."""
    write_snapshot(project.paths.snapshot_file, snapshot_tasks(current_assignments(conn), project.registry))


def ensure_assignments(project: Project, log: Log) -> list[str]:
    """Record the assignments deployment.yaml declares for tasks with none yet, and publish the snapshot."""
    with warehouse.write_connection(project.paths.warehouse_file) as conn:
        added = ensure_initial_assignments(conn, project.deployment, project.registry, list(project.tasks))
        publish_assignments(project, conn)
    if added:
        log.info(f"initial assignments from {project.deployment.path.name}: {', '.join(added)}")
    return added
