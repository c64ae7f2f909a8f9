"""The Dagster code location (see workspace.yaml and [tool.dg] in pyproject.toml): every definition
under model_eval/defs/, found by Dagster's defs-folder loader."""

from pathlib import Path

import dagster as dg


@dg.definitions
def defs() -> dg.Definitions:
    return dg.load_from_defs_folder(path_within_project=Path(__file__).parent)


def refresh_model_job_for_reconstruction() -> dg.JobDefinition:
    """The `refresh_model` job resolved against every definition, for `dg.reconstructable`
    (multiprocess execution outside the UI needs a module-level function that rebuilds it)."""
    return defs().resolve_job_def("refresh_model")
