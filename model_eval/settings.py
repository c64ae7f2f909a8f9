"""Where the project's files live. Every path can be moved with an environment variable,
which is how tests point the whole pipeline at a temporary golden set and warehouse."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def _path_from_env(name: str, default: Path) -> Path:
    value = os.environ.get(name)
    return Path(value).expanduser().resolve() if value else default


@dataclass(frozen=True)
class ProjectPaths:
    golden_dir: Path
    registry_file: Path
    warehouse_file: Path
    cache_file: Path
    deployment_file: Path = PROJECT_ROOT / "deployment.yaml"

    @property
    def base_dir(self) -> Path:
        """Relative paths in the deployment file resolve against the checkout."""
        return PROJECT_ROOT

    @property
    def snapshot_file(self) -> Path:
        """The assignments applications read (they never open the DuckDB file)."""
        return self.warehouse_file.parent / "assignments.json"

    @property
    def call_log_dir(self) -> Path:
        """Append-only logs of production calls made through the router."""
        return self.warehouse_file.parent / "production_log"

    @property
    def reports_dir(self) -> Path:
        """The HTML report of every evaluation run, and latest.html."""
        return self.warehouse_file.parent / "reports"

    @property
    def discovered_registry_file(self) -> Path:
        """Registry entries the new-model sensor found on discovery endpoints."""
        return self.warehouse_file.parent / "discovered_models.yaml"

    @classmethod
    def from_env(cls) -> "ProjectPaths":
        warehouse = _path_from_env("MODEL_EVAL_WAREHOUSE", PROJECT_ROOT / "warehouse" / "model_eval.duckdb")
        return cls(
            golden_dir=_path_from_env("MODEL_EVAL_GOLDEN_DIR", PROJECT_ROOT / "golden"),
            registry_file=_path_from_env("MODEL_EVAL_REGISTRY", PROJECT_ROOT / "models.yaml"),
            warehouse_file=warehouse,
            # The response cache is a separate SQLite file: inference writes to it after every
            # call (so a killed run resumes) without ever holding the DuckDB write lock.
            cache_file=_path_from_env("MODEL_EVAL_CACHE", warehouse.parent / "cache" / "responses.sqlite"),
            deployment_file=_path_from_env("MODEL_EVAL_DEPLOYMENT", PROJECT_ROOT / "deployment.yaml"),
        )
