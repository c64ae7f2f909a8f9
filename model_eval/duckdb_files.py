"""DuckDB files opened through one in-memory DuckDB instance per process, attached for each use.

Why: `duckdb.connect(file)` starts a new database instance, which builds DuckDB's whole catalog of
built-in functions and starts its worker threads: about 30 ms to open and 8 ms to close on a 2-core
machine, even for `:memory:`. A run opens the warehouse some 20 times. ATTACH on an instance that is
already running takes about 8 ms, and DETACH 2 ms.

A use is a cursor (a connection of its own, so threads may each have one) whose default database is
the attached file, so unqualified table names mean what they mean under `duckdb.connect(file)`; the
catalog name is the file's stem, as `duckdb.connect` names it, unless another attached file already
uses that name. Uses of the same file at once share one attachment (DuckDB refuses to attach a file
twice); the last one to finish detaches it, which closes the file: a later use sees the file as it is
then (e.g. after a writer replaced it), and a writer can copy a file it has finished with.
"""

from __future__ import annotations

import os
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import duckdb

RESERVED_NAMES = frozenset({"memory", "temp", "system"})


@dataclass
class _Attachment:
    name: str
    read_only: bool
    users: int = 0


class _Instance:
    def __init__(self):
        self._lock = threading.Lock()
        self._pid: int | None = None
        self._base: duckdb.DuckDBPyConnection | None = None
        self._attached: dict[str, _Attachment] = {}
        self._inherited: list[duckdb.DuckDBPyConnection] = []

    def _running_base(self) -> duckdb.DuckDBPyConnection:
        if self._pid != os.getpid():
            # A forked child inherits the parent's instance without its worker threads. It starts
            # its own and keeps the inherited one referenced for good: closing it would wait for
            # threads that do not exist in the child, forever.
            if self._base is not None:
                self._inherited.append(self._base)
            self._base, self._pid, self._attached = duckdb.connect(":memory:"), os.getpid(), {}
        return self._base

    def _free_name(self, path: Path) -> str:
        taken = RESERVED_NAMES | {a.name for a in self._attached.values()}
        stem = path.stem or "db"
        name, number = stem, 2
        while name.lower() in taken:
            name, number = f"{stem}_{number}", number + 1
        return name

    @contextmanager
    def open(self, path: Path, read_only: bool) -> Iterator[duckdb.DuckDBPyConnection]:
        key = os.path.abspath(path)
        with self._lock:
            base = self._running_base()
            attachment = self._attached.get(key)
            if attachment is None:
                attachment = _Attachment(self._free_name(path), read_only)
                mode = " (READ_ONLY)" if read_only else ""
                base.execute(f"ATTACH {_quote_literal(key)} AS {_quote_name(attachment.name)}{mode}")
                self._attached[key] = attachment
            elif attachment.read_only and not read_only:
                raise RuntimeError(f"{path}: already open read-only in this process; close it before writing")
            attachment.users += 1
            cursor = base.cursor()
        try:
            cursor.execute(f"USE {_quote_name(attachment.name)}")
            yield cursor
        finally:
            cursor.close()
            with self._lock:
                attachment.users -= 1
                if attachment.users == 0 and self._attached.get(key) is attachment:
                    del self._attached[key]
                    base.execute(f"DETACH {_quote_name(attachment.name)}")


def _quote_literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _quote_name(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


_INSTANCE = _Instance()


def open_file(path: Path, read_only: bool = False) -> Iterator[duckdb.DuckDBPyConnection]:
    """A context manager: a connection whose default database is the DuckDB file at `path`."""
    return _INSTANCE.open(path, read_only)


def table_exists(conn: duckdb.DuckDBPyConnection, name: str) -> bool:
    """Whether the connection's own database has a table or view `name` (other attached files, which
    information_schema lists too, do not count)."""
    return bool(conn.execute("""SELECT count(*) FROM information_schema.tables
                                WHERE table_catalog = current_database() AND table_name = ?""",
                             [name]).fetchall()[0][0])
