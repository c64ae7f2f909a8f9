"""Dagster's SQLite instance files: without an fsync per commit in the processes that run our jobs, and
opened safely by two processes at once (`open_instance`).

Dagster's SQLite storage opens a connection for every event it stores and commits each one. Under
SQLite's default (synchronous=FULL) every commit waits for the disk: a warm 20-case `model-eval run`
makes some 290 commits, about 0.5 s of its ~5 s here. Dagster keeps these files in WAL mode, where
synchronous=NORMAL still leaves the database consistent after any crash; only a power loss or an
operating-system crash can lose the last commits (SQLite's documentation of PRAGMA synchronous). A
killed process loses nothing: what it committed is in the kernel's cache. So run history stays
whole, and the warehouse (DuckDB, published by atomic rename after an fsync) is not concerned.

Only SQLite files inside the given Dagster instance folder that are in WAL mode are changed; a
PostgreSQL instance, the response cache and any other SQLite file are left as they are.
"""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

from sqlalchemy import event
from sqlalchemy.engine import Engine

OPEN_LOCK = ".open.lock"   # in the instance folder, held while a process opens the instance

# Instance folders (each ending in a separator) whose files this process relaxes; one listener serves all.
_relaxed_homes: list[str] = []


def relax_instance_sync(dagster_home: Path) -> None:
    """From now on, in this process, connections to the instance's WAL-mode SQLite files commit with
    synchronous=NORMAL. Calling it again for the same folder does nothing."""
    inside = os.path.realpath(dagster_home) + os.sep
    if inside in _relaxed_homes:
        return
    if not _relaxed_homes:
        event.listen(Engine, "connect", _on_connect)
    _relaxed_homes.append(inside)


def _on_connect(dbapi_connection, _connection_record) -> None:
    if not isinstance(dbapi_connection, sqlite3.Connection):
        return
    main_file = next((row[2] for row in dbapi_connection.execute("PRAGMA database_list") if row[1] == "main"), "")
    if not main_file or not os.path.realpath(main_file).startswith(tuple(_relaxed_homes)):
        return
    # A file Dagster has just created is not in WAL mode yet: it stays as it is for this connection.
    if dbapi_connection.execute("PRAGMA journal_mode").fetchone()[0] == "wal":
        dbapi_connection.execute("PRAGMA synchronous=NORMAL")


def open_instance(timeout_s: float = 120.0):
    """`DagsterInstance.get()`, one process at a time per instance folder. The first `model-eval run` on
    a new instance creates its SQLite tables while the warm runner it started in the background opens
    the same instance; both creating them failed one with "table jobs already exists", and a process
    that opened the tables between the other's creating and stamping them could record the schema
    version twice ("more than one head"), breaking the instance for good (both seen in the test suite).
    Under this lock the second process finds the tables made and stamped."""
    import dagster as dg

    from model_eval.file_lock import exclusive_lock

    home = Path(os.environ["DAGSTER_HOME"])

    def gave_up() -> Exception:
        return TimeoutError(f"{home / OPEN_LOCK}: another process has been opening this Dagster instance "
                            f"for {timeout_s:.0f} s")

    with exclusive_lock(home / OPEN_LOCK, timeout_s, gave_up):
        return dg.DagsterInstance.get()
