"""The warm runner: one long-lived process per Dagster instance that runs `model-eval run` requests
with Dagster, the definitions and the instance already loaded (runner_client.py is the other side).

Each request brings the caller's argv, environment, working directory and its stdin/stdout/stderr;
the run executes in this process's main thread exactly as `model-eval run --in-process` would, with
those in place, and its exit code goes back to the caller. One run at a time: a request that arrives
during a run is told "busy" and runs in its caller's process instead.

It exits when idle for --idle-seconds, when asked to stop, when a caller runs newer code (its
fingerprint differs), and after a run that was interrupted (what an interrupted run leaves in memory
is not worth trusting). Runs it executes carry its pid as their owner, so if it is killed, the next
run reaps them like those of any killed `model-eval run`. Its own messages (never the caller's
environment) go to runner.log in the instance folder.
"""

from __future__ import annotations

import argparse
import os
import queue
import signal
import socket
import struct
import sys
import threading
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path

from model_eval.file_lock import exclusive_lock
from model_eval.runner_client import receive_message, send_message

_STOP = object()
LOCK_WAIT_S = 120.0
_PEER_CREDENTIALS = struct.Struct("3i")   # pid, uid, gid (SO_PEERCRED)


def log(message: str) -> None:
    print(f"{datetime.now(timezone.utc):%Y-%m-%dT%H:%M:%SZ} runner {os.getpid()}: {message}", flush=True)


class LoadedDagster:
    """The instance and the definitions, kept between runs. The definitions read deployment.yaml
    (the schedule's cron), so they are built again when that file changes."""

    def __init__(self):
        from model_eval.dagster_sqlite import open_instance

        self.instance = open_instance()
        self._definitions = None
        self._deployment_stamp = None

    def definitions(self):
        from model_eval.definitions import defs
        from model_eval.settings import ProjectPaths

        deployment = ProjectPaths.from_env().deployment_file
        try:
            info = deployment.stat()
            stamp = (str(deployment), info.st_size, info.st_mtime_ns)
        except OSError:
            stamp = (str(deployment), None, None)
        if self._definitions is None or stamp != self._deployment_stamp:
            self._definitions, self._deployment_stamp = defs(), stamp
        return self._definitions


def preload() -> LoadedDagster:
    """Import and load what every run needs, then run one throwaway asset on an in-memory instance:
    Dagster imports much of its execution machinery on a process's first run."""
    import dagster as dg
    import duckdb  # noqa: F401
    import polars  # noqa: F401
    import pyarrow  # noqa: F401

    import model_eval.cli  # noqa: F401
    import model_eval.orchestration  # noqa: F401
    import model_eval.report.render  # noqa: F401
    import model_eval.inference  # noqa: F401
    import model_eval.plain_http  # noqa: F401

    @dg.asset
    def warm_up() -> int:
        return 1

    with dg.DagsterInstance.ephemeral() as scratch:
        dg.materialize([warm_up], instance=scratch,
                       run_config={"loggers": {"console": {"config": {"log_level": "ERROR"}}}})
    loaded = LoadedDagster()
    loaded.definitions()
    return loaded


class Runner:
    def __init__(self, listener: socket.socket, fingerprint: str, idle_seconds: float, loaded: LoadedDagster):
        self.listener = listener
        self.fingerprint = fingerprint
        self.idle_seconds = idle_seconds
        self.loaded = loaded
        self.requests: queue.Queue = queue.Queue()
        self.busy = threading.Event()

    def serve(self) -> None:
        threading.Thread(target=self._accept_forever, daemon=True, name="runner-accept").start()
        while True:
            try:
                item = self.requests.get(timeout=self.idle_seconds or None)
            except queue.Empty:
                log(f"idle for {self.idle_seconds:.0f} s: exiting")
                return
            if item is _STOP:
                return
            conn, request, fds = item
            try:
                must_exit = self._run(conn, request, fds)
            finally:
                conn.close()
                self.busy.clear()
            if must_exit:
                log("that run was interrupted or broke the runner: exiting")
                return

    def _accept_forever(self) -> None:
        while True:
            conn, _ = self.listener.accept()
            try:
                self._admit(conn)
            except Exception as exc:   # one bad caller must not stop the runner
                log(f"refused a request: {exc!r}")
                conn.close()

    def _admit(self, conn: socket.socket) -> None:
        conn.settimeout(10)
        _, uid, _ = _PEER_CREDENTIALS.unpack(conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEER_CREDENTIALS.size))
        if uid != os.getuid():
            raise PermissionError(f"caller uid {uid} is not this runner's")
        request, fds = receive_message(conn, with_fds=3)
        conn.settimeout(None)
        if request is None:      # a caller that only looked whether a runner is there
            for fd in fds:
                os.close(fd)
            conn.close()
            return
        if request.get("stop") or request.get("fingerprint") != self.fingerprint:
            for fd in fds:
                os.close(fd)
            stop = bool(request.get("stop"))
            send_message(conn, {"stopping": True} if stop else {"stale": True})
            conn.close()
            log(f"{'asked to stop' if stop else 'a caller runs other code'}: exiting after any run in progress")
            self.requests.put(_STOP)
            return
        if len(fds) != 3 or self.busy.is_set():
            for fd in fds:
                os.close(fd)
            send_message(conn, {"busy": True})
            conn.close()
            return
        self.busy.set()
        self.requests.put((conn, request, fds))

    def _run(self, conn: socket.socket, request: dict, fds: list[int]) -> bool:
        """Run one request with the caller's streams, environment and folder; True if the runner should
        exit after it (the run was interrupted, or failed in a way a run does not)."""
        from model_eval import cli

        send_message(conn, {"pid": os.getpid()})
        finished = threading.Event()
        interrupted = threading.Event()

        def watch_caller():
            # An interrupt message, or the caller going away, interrupts the run in the main thread.
            try:
                receive_message(conn)   # whatever it says: only an interrupt, or the end of the stream, comes
            except OSError:
                pass
            if not finished.is_set():
                interrupted.set()
                os.kill(os.getpid(), signal.SIGINT)

        own_streams = [os.dup(n) for n in (0, 1, 2)]
        own_env, own_cwd = dict(os.environ), os.getcwd()
        started = time.perf_counter()
        code, broken = 1, False
        try:
            for n, fd in enumerate(fds):
                os.dup2(fd, n)
                os.close(fd)
            os.environ.clear()
            os.environ.update(request["env"])
            os.chdir(request["cwd"])
            threading.Thread(target=watch_caller, daemon=True, name="runner-caller").start()
            code = cli.run_with_loaded_dagster(request["argv"], self.loaded)
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            code = 130
            interrupted.set()
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        except BaseException:
            traceback.print_exc()
            code = 1
            broken = True    # not a failed run but a failure of the runner: start afresh
        finally:
            finished.set()
            sys.stdout.flush()
            sys.stderr.flush()
            for n, fd in enumerate(own_streams):
                os.dup2(fd, n)
                os.close(fd)
            os.environ.clear()
            os.environ.update(own_env)
            os.chdir(own_cwd)
        try:
            send_message(conn, {"exit": code})
        except OSError:
            pass
        log(f"ran {' '.join(request['argv'])!r}: exit {code} in {time.perf_counter() - started:.2f} s")
        return interrupted.is_set() or broken


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="model-eval's warm runner (started by `model-eval run`)")
    parser.add_argument("--socket", required=True)
    parser.add_argument("--fingerprint", required=True)
    parser.add_argument("--idle-seconds", type=float, default=900.0)
    args = parser.parse_args(argv)
    # A run is interrupted by the runner sending itself SIGINT; a caller started in the background
    # hands its runner an ignored SIGINT (and SIGTERM), which would leave runs uninterruptible.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    path = Path(args.socket)
    # Two callers may start a runner at once: the one holding the lock serves, the other leaves.
    # A runner replaced for running older code may still be finishing a run: wait a while for it.
    try:
        with exclusive_lock(path.with_suffix(".lock"), LOCK_WAIT_S, AnotherRunnerServes):
            serve(path, args.fingerprint, args.idle_seconds)
    except AnotherRunnerServes:
        pass
    return 0


class AnotherRunnerServes(TimeoutError):
    """The lock stayed taken for LOCK_WAIT_S: a runner for this instance is serving; this one leaves."""


def serve(path: Path, fingerprint: str, idle_seconds: float) -> None:
    started = time.perf_counter()
    loaded = preload()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    path.unlink(missing_ok=True)
    listener.bind(str(path))
    os.chmod(path, 0o600)
    listener.listen(8)
    log(f"serving {os.environ.get('DAGSTER_HOME')} at {path} (loaded in {time.perf_counter() - started:.1f} s)")
    try:
        Runner(listener, fingerprint, idle_seconds, loaded).serve()
    finally:
        path.unlink(missing_ok=True)
        listener.close()

if __name__ == "__main__":
    sys.exit(main())
