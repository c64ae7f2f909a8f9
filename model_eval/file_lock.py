"""An exclusive lock between processes on a lock file, given up after a deadline.

Used where only one process may act at a time: the warehouse writer, and starting the local model
server on a port. The lock dies with its process (flock), so a killed holder never leaves it taken.
The holder records who it is beside the lock (`<lock>.holder`: host, pid, start time, what it is
doing), so a waiter can say whom it waits for; a waiter sleeps between attempts, never spins.
"""

from __future__ import annotations

import fcntl
import json
import os
import random
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from model_eval.process_identity import ProcessIdentity

_holder_label = ""
FIRST_REPORT_AFTER_S = 2.0   # waiters queue behind each other's short holds all the time; say so once it is not short
REPORT_EVERY_S = 30.0
MAX_POLL_S = 0.5


def set_holder_label(label: str) -> None:
    """What this process is doing (e.g. "Dagster run <id>"), shown to anyone waiting for a lock it holds."""
    global _holder_label
    _holder_label = label


def holder_file(lock_path: Path) -> Path:
    return lock_path.with_name(lock_path.name + ".holder")


def _record_holder(lock_path: Path) -> None:
    record = {"process": ProcessIdentity.current().as_text(), "label": _holder_label,
              "command": " ".join(sys.argv)[:300], "since": time.time()}
    temporary = lock_path.with_name(f"{lock_path.name}.holder.{os.getpid()}.tmp")
    temporary.write_text(json.dumps(record))
    os.replace(temporary, holder_file(lock_path))


def describe_holder(lock_path: Path) -> str:
    """Who holds the lock, from the record its holder left beside it."""
    try:
        record = json.loads(holder_file(lock_path).read_text())
        holder = ProcessIdentity.from_text(record["process"])
    except (OSError, ValueError, KeyError):
        return "a process that has not recorded itself (it has just taken the lock)"
    if holder.is_alive() is False:  # the record of an earlier holder: the new one has not written its own yet
        return "a process that has just taken the lock and not recorded itself yet"
    doing = f", {record['label']}" if record.get("label") else ""
    return f"{holder.describe()}{doing}, command `{record['command']}`, holding it for {time.time() - record['since']:.0f} s"


@contextmanager
def exclusive_lock(lock_path: Path, timeout_s: float, on_timeout: Callable[[], Exception], poll_s: float = 0.05,
                   on_wait: Callable[[float, str], None] | None = None) -> Iterator[None]:
    """Hold `lock_path` while the block runs; raise `on_timeout()` if it stays taken for `timeout_s`.

    While waiting, `on_wait(seconds_waited, holder_description)` is called after 2 s, then every 30 s.
    """
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a+") as handle:
        started = time.monotonic()
        next_report = started + min(FIRST_REPORT_AFTER_S, timeout_s / 2)
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                waited = time.monotonic() - started
                if waited > timeout_s:
                    raise on_timeout() from None
                if on_wait is not None and time.monotonic() >= next_report:
                    on_wait(waited, describe_holder(lock_path))
                    next_report += REPORT_EVERY_S
                # Jitter: waiters do not wake in step. Longer waits poll less often.
                time.sleep(min(poll_s * 2 ** min(waited, 4), max(poll_s, MAX_POLL_S)) * random.uniform(0.5, 1.5))
        try:
            _record_holder(lock_path)
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
