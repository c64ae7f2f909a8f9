"""Errors that name the file, line and field a person has to fix."""

from __future__ import annotations

from pathlib import Path


class ModelEvalError(Exception):
    """Base class for every error the pipeline reports to a person."""


class InputError(ModelEvalError):
    """Bad input (golden file, registry, task settings): says where and what."""

    def __init__(self, path: Path | str, message: str, line: int | None = None, field: str | None = None):
        self.path = str(path)
        self.line = line
        self.field = field
        self.message = message
        where = self.path
        if line is not None:
            where += f", line {line}"
        if field is not None:
            where += f", field '{field}'"
        super().__init__(f"{where}: {message}")


class GoldenSetError(InputError):
    """A golden task file or cases file is malformed."""


class RegistryError(InputError):
    """The model registry file is malformed or names something unknown."""
