"""Run a long-lived service (`model-eval ui`, later `model-eval serve`) as a child process tree, and
stop every process of it on SIGTERM, SIGINT (Ctrl-C) or SIGHUP within a deadline.

`dagster dev` starts a webserver, a daemon and a code server, and the code server starts run
workers; left to themselves they take about 25 s to exit on SIGTERM, and if only the parent dies
they live on. So the service runs in a session of its own (a terminal's Ctrl-C reaches only this
process, which then decides how the tree stops), this process adopts orphans of the tree (Linux
"child subreaper", so no member escapes to init), and stopping sends SIGTERM to every member and,
after `grace_s`, SIGKILL to whatever is left. The direct child also gets SIGTERM if this process is
killed outright (Linux parent-death signal).
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Mapping, Sequence

_PR_SET_PDEATHSIG = 1
_PR_SET_CHILD_SUBREAPER = 36
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def _prctl(option: int, value: int) -> None:
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(option, value, 0, 0, 0)


def _parents() -> dict[int, int]:
    """pid -> parent pid of every live process, from /proc (empty where there is no /proc)."""
    parents = {}
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            text = (entry / "stat").read_text()
        except OSError:
            continue
        fields = text[text.rindex(")") + 2:].split()
        if fields[0] not in ("Z", "X"):
            parents[int(entry.name)] = int(fields[1])
    return parents


def descendants(pid: int) -> set[int]:
    """Every live process below `pid` in the process tree."""
    children: dict[int, list[int]] = {}
    for child, parent in _parents().items():
        children.setdefault(parent, []).append(child)
    found, stack = set(), [pid]
    while stack:
        for child in children.get(stack.pop(), []):
            if child not in found:
                found.add(child)
                stack.append(child)
    return found


def _alive(pid: int) -> bool:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return text[text.rindex(")") + 2:].split()[0] not in ("Z", "X")


def _signal_all(pids: set[int], signum: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, signum)
        except (ProcessLookupError, PermissionError):
            pass


def _reap_adopted(main_pid: int) -> None:
    """Collect the exit status of adopted orphans (never the main child's: Popen collects that)."""
    while True:
        try:
            info = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            return
        if info is None or info.si_pid == main_pid:
            return
        try:
            os.waitpid(info.si_pid, 0)
        except ChildProcessError:
            return


def stop_tree(child: subprocess.Popen, grace_s: float) -> float:
    """SIGTERM every process of the child's tree, SIGKILL what is left after `grace_s`. Returns seconds taken."""
    started = time.monotonic()
    members = descendants(os.getpid()) | {child.pid}
    _signal_all(members, signal.SIGTERM)
    deadline = started + grace_s
    while time.monotonic() < deadline:
        # Members may start children while they stop; every process below this one is part of the service.
        members |= descendants(os.getpid())
        _reap_adopted(child.pid)
        child.poll()
        if not any(_alive(pid) for pid in members):
            break
        time.sleep(0.1)
    else:
        members |= descendants(os.getpid())
        _signal_all({pid for pid in members if _alive(pid)}, signal.SIGKILL)
    child.wait()
    while any(_alive(pid) for pid in members):
        _reap_adopted(child.pid)
        time.sleep(0.05)
    _reap_adopted(child.pid)
    return time.monotonic() - started


class _Stop(Exception):
    def __init__(self, signum: int):
        self.signum = signum


def run_service(command: Sequence[str], *, cwd: Path | None = None, env: Mapping[str, str] | None = None,
                grace_s: float = 6.0) -> int:
    """Run `command` until it exits or this process is told to stop; then nothing of it is left.

    Returns the service's exit code, or 128 + the signal number when stopped by a signal.
    """
    def raise_stop(signum, _frame):
        raise _Stop(signum)

    previous = {signum: signal.signal(signum, raise_stop) for signum in STOP_SIGNALS}
    _prctl(_PR_SET_CHILD_SUBREAPER, 1)
    child = None
    try:
        child = subprocess.Popen(list(command), cwd=cwd, env=dict(env) if env is not None else None, start_new_session=True,
                                 preexec_fn=lambda: _prctl(_PR_SET_PDEATHSIG, signal.SIGTERM))
        while child.poll() is None:
            _reap_adopted(child.pid)
            time.sleep(0.5)
        # The service ended by itself; members it left behind are still ours to stop.
        stop_tree(child, grace_s)
        return child.returncode
    except _Stop as stop:
        for signum in STOP_SIGNALS:
            signal.signal(signum, signal.SIG_IGN)  # a second Ctrl-C must not interrupt the stopping
        if child is not None:
            took = stop_tree(child, grace_s)
            print(f"stopped every process of the service in {took:.1f} s", file=sys.stderr, flush=True)
        return 128 + stop.signum
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
