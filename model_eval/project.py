"""The project a step works on: where its files are, and the tasks, registry and deployment read from them.

A step (a Dagster asset, check, sensor or schedule tick, or a CLI command) loads one `Project` when it
starts and passes it down; nothing below it reads those files again. A bad file raises a
`model_eval.errors.InputError` naming the file, line and field, which fails that step only: the
Dagster code location never reads them while it loads.
"""

from __future__ import annotations

from dataclasses import dataclass

from model_eval.deployment import Deployment, load_deployment
from model_eval.errors import GoldenSetError
from model_eval.golden import TaskSpec, load_tasks
from model_eval.registry import Registry, load_registry
from model_eval.settings import ProjectPaths


@dataclass(frozen=True)
class Project:
    paths: ProjectPaths
    tasks: tuple[TaskSpec, ...]       # every task in the golden folder, sorted by name
    registry: Registry                 # models.yaml plus the models discovery added
    deployment: Deployment

    @classmethod
    def load(cls, paths: ProjectPaths) -> "Project":
        return cls(
            paths=paths,
            tasks=tuple(load_tasks(paths.golden_dir)),
            registry=load_registry(paths.registry_file, paths.discovered_registry_file),
            deployment=load_deployment(paths.deployment_file, paths.base_dir),
        )

    def task_names(self) -> list[str]:
        return [t.name for t in self.tasks]

    def select_tasks(self, names: list[str] | None) -> list[TaskSpec]:
        """The named tasks in name order (every task for None or an empty list); unknown names are an error."""
        if not names:
            return list(self.tasks)
        unknown = sorted(set(names) - set(self.task_names()))
        if unknown:
            raise GoldenSetError(self.paths.golden_dir, f"unknown task(s) {', '.join(unknown)}; available: {', '.join(self.task_names())}")
        return [t for t in self.tasks if t.name in names]

    def task(self, name: str) -> TaskSpec:
        return self.select_tasks([name])[0]
