"""An exclusive lock between processes on a lock file, given up after a deadline.

Used where only one process may act at a time: the warehouse writer, and starting the local model
server on a port. The lock dies with its process (flock), so a killed holder never leaves it taken.
"""

from __future__ import annotations

import fcntl
import random
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator


@contextmanager
def exclusive_lock(lock_path: Path, timeout_s: float, on_timeout: Callable[[], Exception],
                   poll_s: float = 0.05) -> Iterator[None]:
    """Hold `lock_path` while the block runs; raise `on_timeout()` if it stays taken for `timeout_s`."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a+") as handle:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise on_timeout() from None
                time.sleep(poll_s * random.uniform(0.5, 1.5))  # jitter: waiters do not wake in step
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
