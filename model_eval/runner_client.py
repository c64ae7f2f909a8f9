"""Hand `model-eval run` to a warm runner: a process that keeps Dagster and the definitions loaded.

A run started from a new process pays about 2.5 s before its first step: importing Dagster, polars,
DuckDB and pyarrow, loading the definitions, opening the instance, and the first execution's lazy
imports. The warm runner (runner_server.py) pays that once and then serves runs for one Dagster
instance until it has been idle for a while. This module is the client side; it imports only the
standard library, so asking the runner costs a few milliseconds.

The client passes its own stdin, stdout and stderr to the runner (SCM_RIGHTS), with its environment
and working directory; the run prints straight to the caller's terminal or pipe, and the client
exits with the run's exit code. Ctrl-C (or SIGTERM) interrupts the run; so does the client going away.

When there is no runner yet, or it runs older code, or it is busy with another run, the run happens
in this process as before, and (unless it is busy) a new runner is started in the background for
the next run. MODEL_EVAL_RUNNER=off (or `model-eval run --in-process`) never uses or starts one.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import stat
import struct
import subprocess
import sys
import time
from pathlib import Path

RUNNER_ENV = "MODEL_EVAL_RUNNER"                    # "warm" (the default) or "off"
IDLE_MINUTES_ENV = "MODEL_EVAL_RUNNER_IDLE_MINUTES"
DEFAULT_IDLE_MINUTES = 15.0
PACKAGE_DIR = Path(__file__).resolve().parent
_HEADER = struct.Struct("!I")


def runner_enabled() -> bool:
    return os.environ.get(RUNNER_ENV, "warm").strip().lower() not in {"off", "0", "no", "false"}


def idle_seconds() -> float:
    value = os.environ.get(IDLE_MINUTES_ENV)
    try:
        return max(0.0, float(value)) * 60 if value else DEFAULT_IDLE_MINUTES * 60
    except ValueError:
        return DEFAULT_IDLE_MINUTES * 60


def code_fingerprint(dagster_home: Path) -> str:
    """What the runner's loaded code and open instance depend on: the interpreter, every file of this
    package (path, size, modification time), the instance configuration file and the instance folder
    itself (one deleted and made again is another instance). A runner whose fingerprint differs from
    the caller's is stale and is replaced."""
    folder = os.stat(dagster_home)
    digest = hashlib.sha256(f"{sys.executable}|{sys.version}|{folder.st_dev}|{folder.st_ino}".encode())
    for root, dirs, files in os.walk(PACKAGE_DIR):
        dirs[:] = sorted(d for d in dirs if d != "__pycache__")
        for name in sorted(files):
            if name.endswith((".py", ".js", ".css", ".html")):
                info = os.stat(os.path.join(root, name))
                digest.update(f"{root}/{name}|{info.st_size}|{info.st_mtime_ns}".encode())
    try:
        digest.update((dagster_home / "dagster.yaml").read_bytes())
    except OSError:
        pass
    return digest.hexdigest()[:16]


def socket_dir() -> Path:
    """A folder only this user may enter: the socket carries the caller's environment (API keys)."""
    return Path(os.environ.get("XDG_RUNTIME_DIR") or "/tmp") / f"model-eval-runner-{os.getuid()}"


def socket_path(dagster_home: Path) -> Path:
    """One runner per Dagster instance. Hashed: a Unix socket path must stay under ~100 bytes."""
    key = hashlib.sha256(str(dagster_home.resolve()).encode()).hexdigest()[:16]
    return socket_dir() / f"{key}.sock"


def private_socket_dir() -> Path | None:
    """The socket folder, created 0700; None (no runner) if it exists but someone else could enter it."""
    folder = socket_dir()
    try:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        info = folder.lstat()
    except OSError:
        return None
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid() or info.st_mode & 0o077:
        return None
    return folder


def send_message(conn: socket.socket, message: dict, fds: list[int] | None = None) -> None:
    data = json.dumps(message).encode()
    if fds:
        socket.send_fds(conn, [_HEADER.pack(len(data)) + data], fds)
    else:
        conn.sendall(_HEADER.pack(len(data)) + data)


def receive_message(conn: socket.socket, with_fds: int = 0) -> tuple[dict | None, list[int]]:
    """One length-prefixed JSON message (and up to `with_fds` file descriptors); None at end of stream."""
    fds: list[int] = []
    buffer = b""
    while len(buffer) < _HEADER.size:
        if with_fds and not fds:
            chunk, fds, _, _ = socket.recv_fds(conn, 65536, with_fds)
        else:
            chunk = conn.recv(65536)
        if not chunk:
            return None, fds
        buffer += chunk
    (size,) = _HEADER.unpack(buffer[:_HEADER.size])
    buffer = buffer[_HEADER.size:]
    while len(buffer) < size:
        chunk = conn.recv(size - len(buffer))
        if not chunk:
            return None, fds
        buffer += chunk
    return json.loads(buffer[:size]), fds


def start_runner(dagster_home: Path, path: Path, fingerprint: str) -> None:
    """Start a runner in the background, in its own session: it outlives this process, and a Ctrl-C
    meant for this run does not reach it. Its own messages go to runner.log in the instance folder."""
    log = open(dagster_home / "runner.log", "ab")
    try:
        subprocess.Popen(
            [sys.executable, "-m", "model_eval.runner_server", "--socket", str(path), "--fingerprint", fingerprint,
             "--idle-seconds", str(idle_seconds())],
            stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True, close_fds=True, cwd="/",
            # The runner must load the code the fingerprint was taken of: this package's folder first.
            env={**os.environ, "DAGSTER_HOME": str(dagster_home),
                 "PYTHONPATH": os.pathsep.join(filter(None, [str(PACKAGE_DIR.parent), os.environ.get("PYTHONPATH")]))})
    finally:
        log.close()


def run_warm(argv: list[str], dagster_home: Path, say=lambda line: print(line, file=sys.stderr, flush=True)) -> int | None:
    """The run's exit code if the warm runner ran it; None if it must run in this process.

    A missing or stale runner is (re)started in the background for the next run.
    """
    if not runner_enabled() or private_socket_dir() is None:
        return None
    path = socket_path(dagster_home)
    fingerprint = code_fingerprint(dagster_home)
    conn = connect(dagster_home)
    if conn is None:
        start_runner(dagster_home, path, fingerprint)
        say("(starting a warm runner in the background: the next run starts faster; MODEL_EVAL_RUNNER=off to turn it off)")
        return None
    with conn:
        request = {"argv": argv, "env": dict(os.environ), "cwd": os.getcwd(), "fingerprint": fingerprint}
        try:
            send_message(conn, request, [0, 1, 2])
            reply, _ = receive_message(conn)
        except OSError:     # e.g. a closed stdin cannot be passed: run here, the runner is fine
            return None
        if reply is None or "stale" in reply:
            start_runner(dagster_home, path, fingerprint)
            return None
        if "busy" in reply:
            return None
        return _follow_run(conn, reply["pid"], say)


def _follow_run(conn: socket.socket, runner_pid: int, say) -> int:
    """Wait for the run's exit code, passing an interrupt on to the runner."""
    def interrupt(signum, frame):
        try:
            send_message(conn, {"interrupt": signum})
        except OSError:
            pass

    previous = {s: signal.signal(s, interrupt) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        reply, _ = receive_message(conn)   # a signal's handler runs, then the read goes on (PEP 475)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if reply is None:
        say(f"error: the warm runner (pid {runner_pid}) ended during the run; the next run reaps what it left")
        return 1
    return int(reply["exit"])


def connect(dagster_home: Path) -> socket.socket | None:
    """A connection to this instance's runner; None if no runner listens."""
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.connect(str(socket_path(dagster_home)))
    except OSError:
        conn.close()
        return None
    return conn


def runner_is_up(dagster_home: Path) -> bool:
    conn = connect(dagster_home)
    if conn is None:
        return False
    conn.close()   # closing at once asks nothing of it
    return True


def stop_runner(dagster_home: Path, timeout_s: float = 10.0) -> bool:
    """Ask this instance's runner to exit after any run in progress; True if one was running."""
    conn = connect(dagster_home)
    if conn is None:
        return False
    with conn:
        try:
            send_message(conn, {"stop": True})
            receive_message(conn)
        except OSError:
            return False
    path = socket_path(dagster_home)
    deadline = time.monotonic() + timeout_s
    while path.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    return True
