"""A throwaway local PostgreSQL server for tests (no pytest needed).

    with LocalPostgres() as pg:
        psycopg2.connect(pg.url)          # postgresql://model_eval:<password>@127.0.0.1:<port>/dagster_test

What it does, and why:

* Finds initdb / pg_ctl / postgres on PATH or in /usr/lib/postgresql/*/bin; if there are none it
  runs scripts/postgres_for_tests.sh, which installs them with apt-get. No system-wide server
  is used or touched: every test gets its own cluster in a temp dir.
* PostgreSQL refuses to run as root, so when the tests run as root the cluster is created and
  started as an unprivileged user (`postgres`, which the Debian package creates, else `nobody`)
  through runuser; the temp dir is handed to that user.
* The server listens on 127.0.0.1 on a free port only, plus a unix socket inside the temp dir.
  Local-socket connections are trusted; TCP connections need the password, so a client that
  reads it from configuration (Dagster's `password: {env: ...}`) is really checked.
* Durability is off (fsync, synchronous_commit, full_page_writes): the data is thrown away.
* On exit, or when starting fails half-way, the server is stopped and the temp dir removed.

`PostgresUnavailable` means "PostgreSQL cannot run on this machine at all" (no binaries and no
way to install them, or no way to run as an unprivileged user); callers may skip on it. Every
other failure (initdb or start errors) is a RuntimeError carrying the server log.
"""

from __future__ import annotations

import glob
import os
import pwd
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Self
from urllib.parse import quote

SETUP_SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "postgres_for_tests.sh"
PROGRAMS = ("initdb", "pg_ctl", "postgres")


class PostgresUnavailable(RuntimeError):
    """PostgreSQL cannot be installed or run here (not a bug in the code under test)."""


def _usable(directory: str) -> bool:
    return all(os.access(os.path.join(directory, name), os.X_OK) for name in PROGRAMS)


def find_bin_dir(install: bool = True, install_timeout_s: float = 1200.0) -> str:
    """The directory holding initdb, pg_ctl and postgres; installs PostgreSQL if allowed and needed.

    The same search as scripts/postgres_for_tests.sh, done here first so a machine that has the
    binaries never starts a shell; the script is the one place that knows how to install.
    """
    on_path = shutil.which("pg_ctl")
    candidates = [os.path.dirname(os.path.realpath(on_path))] if on_path else []
    # Newest major version first; sort by the number, not the text ("9" < "15").
    versioned = glob.glob("/usr/lib/postgresql/*/bin")
    versioned.sort(key=lambda d: [int(p) if p.isdigit() else 0 for p in Path(d).parent.name.split(".")], reverse=True)
    for directory in candidates + versioned:
        if _usable(directory):
            return directory
    if not install:
        raise PostgresUnavailable("no initdb/pg_ctl/postgres on PATH or in /usr/lib/postgresql/*/bin")
    try:
        result = subprocess.run(["bash", str(SETUP_SCRIPT)], check=False, capture_output=True, text=True, timeout=install_timeout_s)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise PostgresUnavailable(f"{SETUP_SCRIPT.name} could not install PostgreSQL: {exc}") from exc
    lines = result.stdout.strip().splitlines()
    if result.returncode != 0 or not lines or not _usable(lines[-1]):
        detail = (result.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise PostgresUnavailable(f"{SETUP_SCRIPT.name} could not install PostgreSQL: {detail}")
    return lines[-1]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _alive(pid: int) -> bool:
    """Whether a process runs (a zombie waiting for its parent to reap it does not count)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def _server_user() -> pwd.struct_passwd | None:
    """Who runs the server: None means "this process", which is fine unless we are root."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        try:
            return pwd.getpwnam(name)
        except KeyError:
            continue
    raise PostgresUnavailable("running as root and there is no 'postgres' or 'nobody' user to run PostgreSQL as")


class LocalPostgres:
    """A PostgreSQL cluster of its own: initdb'd in a temp dir, started on 127.0.0.1:<free port>.

    Attributes once started: host, port, user, password, db, url (a postgresql:// URL with the
    password), bin_dir, base_dir (the temp dir), log_file.
    """

    def __init__(self, db: str = "dagster_test", user: str = "model_eval", *, install: bool = True,
                 start_timeout_s: int = 60, step_timeout_s: float = 120.0):
        self.db = db
        self.user = user
        self.password = secrets.token_urlsafe(16)
        self.host = "127.0.0.1"
        self.port: int | None = None
        self.install = install
        self.start_timeout_s = start_timeout_s
        self.step_timeout_s = step_timeout_s
        self.bin_dir: str | None = None
        self.base_dir: Path | None = None
        self._started = False

    # ------------------------------------------------------------------ public
    @property
    def url(self) -> str:
        return f"postgresql://{quote(self.user)}:{quote(self.password)}@{self.host}:{self.port}/{self.db}"

    @property
    def data_dir(self) -> Path:
        return self.base_dir / "data"

    @property
    def socket_dir(self) -> Path:
        return self.base_dir / "socket"

    @property
    def log_file(self) -> Path:
        return self.base_dir / "postgres.log"

    def connect(self, db: str | None = None):
        """A psycopg2 connection over TCP (autocommit), the way Dagster connects."""
        import psycopg2  # comes with dagster-postgres (psycopg2-binary)

        conn = psycopg2.connect(host=self.host, port=self.port, user=self.user, password=self.password,
                                dbname=db or self.db, connect_timeout=10)
        conn.autocommit = True
        return conn

    def start(self) -> Self:
        self.bin_dir = find_bin_dir(install=self.install)
        account = _server_user()
        self.base_dir = self._make_base_dir(account)
        try:
            self._initdb(account)
            self._start_server()
            self._create_database()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop the server (if it runs) and delete the cluster; safe to call more than once."""
        if self.base_dir is None:
            return
        # The pid file also covers a start interrupted before we knew it had succeeded.
        if self._started or (self.data_dir / "postmaster.pid").exists():
            self._started = False
            # fast: disconnect clients (Dagster keeps some connections open), then shut down.
            self._stop_server("fast")
        shutil.rmtree(self.base_dir, ignore_errors=True)
        self.base_dir = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ------------------------------------------------------------------ steps
    def _make_base_dir(self, account: pwd.struct_passwd | None) -> Path:
        """A temp dir the server user owns. As root, TMPDIR may be somewhere (e.g. under /root)
        that user cannot even traverse, so fall back to /tmp when it cannot."""
        for parent in dict.fromkeys([tempfile.gettempdir(), "/tmp"]):
            base = Path(tempfile.mkdtemp(prefix="model_eval_pg_", dir=parent))
            if account is None:
                return base
            os.chown(base, account.pw_uid, account.pw_gid)
            probe = self._as_user(account, ["test", "-w", str(base), "-a", "-x", str(base)])
            try:
                if subprocess.run(probe, check=False, capture_output=True, timeout=30).returncode == 0:
                    return base
            except OSError as exc:  # no runuser/su at all
                shutil.rmtree(base, ignore_errors=True)
                raise PostgresUnavailable(f"cannot run a command as {account.pw_name}: {exc}") from exc
            shutil.rmtree(base, ignore_errors=True)
        raise PostgresUnavailable(f"user {account.pw_name} cannot use a temp dir under {tempfile.gettempdir()} or /tmp "
                                  "(or runuser is not permitted here)")

    def _initdb(self, account: pwd.struct_passwd | None) -> None:
        password_file = self.base_dir / "password"
        password_file.write_text(self.password + "\n")
        if account is not None:
            os.chown(password_file, account.pw_uid, account.pw_gid)
        self._run([self._bin("initdb"), "-D", str(self.data_dir), "-U", self.user, f"--pwfile={password_file}",
                   "--auth-local=trust", "--auth-host=scram-sha-256", "-E", "UTF8", "--locale=C", "--no-sync"],
                  timeout=self.step_timeout_s)
        password_file.unlink()
        self.socket_dir.mkdir()
        if account is not None:
            os.chown(self.socket_dir, account.pw_uid, account.pw_gid)

    def _start_server(self) -> None:
        """Start on a free port; another process may take the port between our probe and the
        server's bind, so a start that fails on the port is retried a few times with a new one."""
        conf = self.data_dir / "postgresql.conf"
        original = conf.read_text()
        last_error = ""
        for _ in range(3):
            self.port = _free_port()
            # Later settings win in postgresql.conf, so appending overrides initdb's defaults.
            conf.write_text(original + "\n# model_eval_tests.postgres_server\n" + "\n".join([
                "listen_addresses = '127.0.0.1'",
                f"port = {self.port}",
                f"unix_socket_directories = '{self.socket_dir}'",
                "fsync = off", "synchronous_commit = off", "full_page_writes = off",
            ]) + "\n")
            try:
                self._run([self._bin("pg_ctl"), "-D", str(self.data_dir), "-l", str(self.log_file),
                           "-w", "-t", str(self.start_timeout_s), "start"], timeout=self.start_timeout_s + 15)
            except (RuntimeError, subprocess.TimeoutExpired) as exc:
                # pg_ctl may give up on a postmaster that is still starting: make sure it is gone.
                self._stop_server("immediate")
                last_error = f"{exc}\n--- server log ---\n{self._log_tail()}"
                if "already in use" in last_error:
                    continue
                break
            self._started = True
            return
        raise RuntimeError(f"PostgreSQL did not start: {last_error}")

    def _stop_server(self, mode: str) -> None:
        try:
            self._run([self._bin("pg_ctl"), "-D", str(self.data_dir), "-m", mode, "-w", "-t", "30", "stop"], timeout=45)
        except (RuntimeError, subprocess.TimeoutExpired):
            self._kill_postmaster()  # also fine when no server runs: there is no pid file then

    def _create_database(self) -> None:
        import psycopg2

        # Over TCP with the password, which is also a check that password auth works as set up.
        deadline = time.monotonic() + 30
        while True:
            try:
                conn = self.connect(db="postgres")
                break
            except psycopg2.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        try:
            with conn.cursor() as cursor:
                cursor.execute(f'CREATE DATABASE "{self.db}"')
        finally:
            conn.close()

    # ------------------------------------------------------------------ plumbing
    def _bin(self, name: str) -> str:
        return os.path.join(self.bin_dir, name)

    @staticmethod
    def _as_user(account: pwd.struct_passwd | None, command: list[str]) -> list[str]:
        if account is None:
            return command
        if shutil.which("runuser"):
            return ["runuser", "-u", account.pw_name, "--", *command]
        # su needs a shell for the user; `nobody` has /usr/sbin/nologin, so name one explicitly.
        return ["su", "-s", "/bin/sh", account.pw_name, "-c", shlex.join(command)]

    def _run(self, command: list[str], timeout: float) -> None:
        account = _server_user()
        # cwd: the server user may not be able to read the caller's cwd (e.g. under /root).
        result = subprocess.run(self._as_user(account, command), check=False, capture_output=True, text=True,
                                timeout=timeout, cwd=self.base_dir)
        if result.returncode != 0:
            raise RuntimeError(f"{shlex.join(command)} failed (exit {result.returncode}): "
                               f"{result.stderr.strip() or result.stdout.strip()}")

    def _kill_postmaster(self) -> None:
        """Last resort when pg_ctl cannot stop the server we started: signal it by its pid file,
        but only if that pid still is a postgres serving our data dir (pids are reused).

        SIGQUIT first (PostgreSQL's immediate shutdown: the postmaster takes its children down),
        SIGKILL if it is still there after a few seconds."""
        try:
            pid = int((self.data_dir / "postmaster.pid").read_text().splitlines()[0])
            command_line = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, ValueError, IndexError):
            return
        if "postgres" not in command_line or str(self.data_dir) not in command_line:
            return
        for sig, wait_s in ((signal.SIGQUIT, 10.0), (signal.SIGKILL, 5.0)):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                return
            deadline = time.monotonic() + wait_s
            while time.monotonic() < deadline:
                if not _alive(pid):
                    return
                time.sleep(0.1)

    def _log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no server log)"
