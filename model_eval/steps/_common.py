"""What every step module shares: the log it writes to and the timestamp it stamps rows with."""

from __future__ import annotations

import logging
from datetime import datetime, timezone
from typing import Protocol


class Log(Protocol):
    def info(self, msg: str) -> None: ...
    def warning(self, msg: str) -> None: ...


def utc_now() -> datetime:
    """Naive UTC, the way the warehouse's TIMESTAMP columns hold it."""
    return datetime.now(timezone.utc).replace(tzinfo=None)


def logger(name: str = "model_eval") -> Log:
    return logging.getLogger(name)
