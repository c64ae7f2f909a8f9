"""The one resource: where the golden sets, registry, warehouse and cache live."""

from __future__ import annotations

from pathlib import Path

import dagster as dg

from model_eval.project import Project
from model_eval.settings import ProjectPaths
from model_eval.file_lock import set_holder_label

EVAL_RUN_TAG = "model_eval/eval_run_id"
TRIGGER_TAG = "model_eval/trigger"


class ModelEvalResource(dg.ConfigurableResource):
    """Paths default to the checkout (or MODEL_EVAL_* environment variables); tests point them elsewhere."""

    golden_dir: str = ""
    registry_file: str = ""
    warehouse_file: str = ""
    cache_file: str = ""

    def setup_for_execution(self, context: dg.InitResourceContext) -> None:
        if context.run is not None:
            # Whoever waits for the warehouse writer lock while this run holds it is told which run it is.
            set_holder_label(f"Dagster run {context.run.run_id}")

    def paths(self) -> ProjectPaths:
        defaults = ProjectPaths.from_env()
        return ProjectPaths(
            golden_dir=Path(self.golden_dir) if self.golden_dir else defaults.golden_dir,
            registry_file=Path(self.registry_file) if self.registry_file else defaults.registry_file,
            warehouse_file=Path(self.warehouse_file) if self.warehouse_file else defaults.warehouse_file,
            cache_file=Path(self.cache_file) if self.cache_file else defaults.cache_file,
            deployment_file=defaults.deployment_file,
        )

    def project(self) -> Project:
        """Load the project's files once for the step that asks; a bad file fails that step, naming it."""
        return Project.load(self.paths())


@dg.definitions
def resources() -> dg.Definitions:
    return dg.Definitions(resources={"model_eval": ModelEvalResource()})


def eval_run_id(context: dg.AssetExecutionContext) -> str:
    """Runs started together (e.g. by `model-eval run`) share an eval run id; a lone UI run uses its own run id."""
    return context.run.tags.get(EVAL_RUN_TAG) or context.run.run_id


def is_orchestrated(context: dg.AssetExecutionContext) -> bool:
    """True for a run that belongs to a larger evaluation (`model-eval run`, the schedule, a sensor batch)."""
    return EVAL_RUN_TAG in context.run.tags


def trigger(context: dg.AssetExecutionContext) -> str:
    return context.run.tags.get(TRIGGER_TAG, "dagster")
