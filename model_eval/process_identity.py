"""Who a process is, recorded so that someone else can later tell whether it is still alive.

A pid alone is not enough: after a crash the number can be reused by an unrelated process. A pid
together with the process's start time and its host names one process for good. Start times come
from /proc on Linux; elsewhere only "a process with this pid exists" can be checked.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

# Two readings of one process's start time differ by rounding only; a different process differs more.
_SAME_START_TOLERANCE_S = 0.05


def _boot_time() -> float | None:
    try:
        for line in Path("/proc/stat").read_text().splitlines():
            if line.startswith("btime "):
                return float(line.split()[1])
    except OSError:
        pass
    return None


_BOOT_TIME = _boot_time()


def process_started_at(pid: int) -> float | None:
    """When process `pid` started (seconds since the epoch); None if there is no such live process.

    Without /proc, a live pid gives 0.0: it exists, its start time is unknown.
    """
    stat = Path(f"/proc/{pid}/stat")
    if _BOOT_TIME is None or not Path("/proc/self/stat").exists():
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            pass
        return 0.0
    try:
        text = stat.read_text()
    except OSError:
        return None
    # The command name (field 2) is in parentheses and may itself contain spaces or parentheses.
    fields = text[text.rindex(")") + 2:].split()
    if fields[0] in ("Z", "X"):  # a zombie has finished; only its exit status is left to collect
        return None
    return round(_BOOT_TIME + int(fields[19]) / os.sysconf("SC_CLK_TCK"), 2)


@dataclass(frozen=True)
class ProcessIdentity:
    host: str
    pid: int
    started_at: float  # seconds since the epoch; 0.0 when the platform cannot tell

    @classmethod
    def current(cls) -> "ProcessIdentity":
        return cls(host=socket.gethostname(), pid=os.getpid(), started_at=process_started_at(os.getpid()) or 0.0)

    @property
    def is_local(self) -> bool:
        return self.host == socket.gethostname()

    def is_alive(self) -> bool | None:
        """True or False for a process on this host; None for another host (it cannot be checked from here)."""
        if not self.is_local:
            return None
        started = process_started_at(self.pid)
        if started is None:
            return False
        if started == 0.0 or self.started_at == 0.0:
            return True
        return abs(started - self.started_at) <= _SAME_START_TOLERANCE_S

    def describe(self) -> str:
        when = datetime.fromtimestamp(self.started_at, timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC") if self.started_at else "?"
        return f"pid {self.pid} on {self.host} (started {when})"

    def as_text(self) -> str:
        return f"{self.host} {self.pid} {self.started_at:.2f}"

    @classmethod
    def from_text(cls, text: str) -> "ProcessIdentity":
        host, pid, started = text.rsplit(" ", 2)
        return cls(host=host, pid=int(pid), started_at=float(started))
