"""The warehouse's big tables as immutable Parquet slices, so publishing does not grow with the warehouse.

`inference_results` and `scores` grow with every run (millions of rows), and they are only ever
written one (eval run, model) slice at a time. Each slice is one Parquet file under
`<warehouse>.slices/<table>/`, written once to a temporary name and renamed into place, never changed
afterwards. The DuckDB file keeps a manifest (`warehouse_slices`: which file holds which slice) and,
under the public table names, views over exactly the files the manifest lists. So:

* publishing copies the small DuckDB file only: the time to write a run does not depend on how many
  result rows the warehouse already holds;
* a slice is replaced atomically: the new file gets a new name, and the manifest row and the view
  change in the writer's transaction; readers see the new file from the moment the DuckDB file that
  lists it is published, and a connection opened before keeps seeing the old one;
* SQL users query `inference_results` and `scores` as before (they are views), from any DuckDB client.

A file no published manifest lists any more (replaced, or written by a writer that failed before
publishing) is deleted by a later writer once it is older than `GARBAGE_GRACE_S`, so a reader's
connection opened on an older snapshot keeps working for that long.
"""

from __future__ import annotations

import os
import time
import uuid
from pathlib import Path

import duckdb

# The columns of the sliced tables, in order. Every slice file is written with exactly these types.
SLICED_TABLES: dict[str, str] = {
    "inference_results": """
        eval_run_id VARCHAR, model VARCHAR, task VARCHAR, dataset_version VARCHAR, case_id VARCHAR,
        repeat INTEGER, cache_key VARCHAR, response_text VARCHAR, latency_ms DOUBLE, input_tokens BIGINT,
        output_tokens BIGINT, cost_usd DOUBLE, finish_reason VARCHAR, error_class VARCHAR,
        error_message VARCHAR, attempts INTEGER, from_cache BOOLEAN, completed_at DOUBLE,
        dagster_run_id VARCHAR, output_tokens_per_s DOUBLE""",
    "scores": """
        eval_run_id VARCHAR, model VARCHAR, task VARCHAR, dataset_version VARCHAR, case_id VARCHAR,
        repeat INTEGER, scorer VARCHAR, score DOUBLE, correct BOOLEAN, parsed VARCHAR, reason VARCHAR,
        call_failed BOOLEAN, latency_ms DOUBLE, input_tokens BIGINT, output_tokens BIGINT, cost_usd DOUBLE,
        scored_at TIMESTAMP""",
}

MANIFEST_DDL = """
CREATE TABLE IF NOT EXISTS warehouse_slices (
    table_name VARCHAR, eval_run_id VARCHAR, model VARCHAR,
    file VARCHAR,                 -- relative to the slices folder
    rows BIGINT, written_at TIMESTAMP,
    summarised_at TIMESTAMP,      -- scores only: when model_task_metrics were last computed from this file
    PRIMARY KEY (table_name, eval_run_id, model)
);
"""

GARBAGE_GRACE_S = 3600.0
GLOB_CHARACTERS = set("*?[]{}")


def slices_dir(public: Path) -> Path:
    """Where the slice files of the warehouse published at `public` live."""
    return public.parent / f"{public.stem}.slices"


def columns(table: str) -> list[tuple[str, str]]:
    """(name, type) of each column of a sliced table, in order."""
    pairs = [part.split() for part in SLICED_TABLES[table].replace("\n", " ").split(",")]
    return [(name, kind) for name, kind in pairs]


def table_ddl(table: str) -> str:
    """CREATE TABLE for a sliced table, for an in-memory database that needs its shape (e.g. tests)."""
    return f"CREATE TABLE IF NOT EXISTS {table} ({SLICED_TABLES[table]})"


def no_rows(table: str) -> str:
    """A query with the table's columns and no rows (an empty slice)."""
    return f"SELECT {', '.join(f'NULL::{kind} AS {name}' for name, kind in columns(table))} WHERE FALSE"


def _literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def database_file_or_none(conn: duckdb.DuckDBPyConnection) -> Path | None:
    path = conn.sql("SELECT path FROM duckdb_databases() WHERE database_name = current_database()").fetchall()[0][0]
    return Path(path) if path and path != ":memory:" else None


def _database_file(conn: duckdb.DuckDBPyConnection) -> Path:
    path = database_file_or_none(conn)
    if path is None:
        raise ValueError("slices need a warehouse file; this connection is to an in-memory database")
    return path


def public_file(conn: duckdb.DuckDBPyConnection) -> Path:
    """The published warehouse a writer's connection belongs to (writers open a private copy in .writer/)."""
    path = _database_file(conn)
    return path.parent.parent / path.name if path.parent.name == ".writer" else path


def _view_sql(table: str, root: Path, files: list[str]) -> str:
    if not files:
        return f"CREATE OR REPLACE VIEW {table} AS {no_rows(table)}"
    typed = ", ".join(f"CAST({name} AS {kind}) AS {name}" for name, kind in columns(table))
    paths = ", ".join(_literal(str(root / f)) for f in files)
    return f"CREATE OR REPLACE VIEW {table} AS SELECT {typed} FROM read_parquet([{paths}], union_by_name = true)"


def refresh_view(conn: duckdb.DuckDBPyConnection, table: str, root: Path) -> None:
    """Point the table's view at exactly the files its manifest lists."""
    if GLOB_CHARACTERS & set(str(root)):
        raise ValueError(f"{root}: the warehouse folder's path may not contain any of {''.join(sorted(GLOB_CHARACTERS))} "
                         "(DuckDB would read them as a file pattern)")
    files = [f for (f,) in conn.execute("SELECT file FROM warehouse_slices WHERE table_name = ? ORDER BY file",
                                        [table]).fetchall()]
    conn.execute(_view_sql(table, root, files))


def unsummarised_scores(conn: duckdb.DuckDBPyConnection, eval_run_ids: list[str]) -> str | None:
    """A subquery over the score slices of `eval_run_ids` written since model_task_metrics were last
    computed from them (None when there are none): metrics are per (eval run, model), so only those need it."""
    files = [f for (f,) in conn.execute("""SELECT file FROM warehouse_slices WHERE table_name = 'scores' AND summarised_at IS NULL
                                           AND list_contains(?::VARCHAR[], eval_run_id) ORDER BY file""", [eval_run_ids]).fetchall()]
    if not files:
        return None
    root = slices_dir(public_file(conn))
    return f"({_view_sql('scores', root, files).split(' AS ', 1)[1]})"


def mark_summarised(conn: duckdb.DuckDBPyConnection, eval_run_ids: list[str]) -> None:
    conn.execute("""UPDATE warehouse_slices SET summarised_at = now()::TIMESTAMP
                    WHERE table_name = 'scores' AND summarised_at IS NULL AND list_contains(?::VARCHAR[], eval_run_id)""",
                 [eval_run_ids])


def _write_file(conn: duckdb.DuckDBPyConnection, table: str, target: Path, query: str, params: list) -> int:
    """COPY the query's rows, cast to the table's columns, to `target` atomically; returns the rows written."""
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    typed = ", ".join(f"CAST({name} AS {kind}) AS {name}" for name, kind in columns(table))
    # Columns the query lacks are NULL; every column gets the table's type.
    copied = conn.execute(f"COPY (SELECT {typed} FROM ({no_rows(table)} UNION ALL BY NAME ({query}))) "
                          f"TO {_literal(str(temporary))} (FORMAT parquet, COMPRESSION zstd)", params).fetchall()
    with open(temporary, "rb") as handle:
        os.fsync(handle.fileno())
    os.replace(temporary, target)
    directory = os.open(target.parent, os.O_RDONLY)
    try:
        os.fsync(directory)   # the rename itself survives a power cut
    finally:
        os.close(directory)
    return int(copied[0][0]) if copied and copied[0] else 0


def _safe(text: str) -> str:
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in text)[:80]


def write_slice(conn: duckdb.DuckDBPyConnection, table: str, eval_run_id: str, model: str,
                query: str, params: list | None = None) -> int:
    """Replace the (eval run, model) slice of `table` with the rows of `query`; returns rows written.

    Call inside the writer's transaction: the new file is in place at once, but only the manifest
    row and view changed in that transaction make it visible, when the warehouse is published.
    """
    root = slices_dir(public_file(conn))
    relative = f"{table}/{_safe(eval_run_id)}--{_safe(model)}--{uuid.uuid4().hex[:12]}.parquet"
    rows = _write_file(conn, table, root / relative, query, params or [])
    conn.execute("DELETE FROM warehouse_slices WHERE table_name = ? AND eval_run_id = ? AND model = ?", [table, eval_run_id, model])
    conn.execute("INSERT INTO warehouse_slices VALUES (?, ?, ?, ?, ?, now()::TIMESTAMP, NULL)",
                 [table, eval_run_id, model, relative, rows])
    refresh_view(conn, table, root)
    return rows


def append_rows(conn: duckdb.DuckDBPyConnection, table: str, relation: str) -> int:
    """Add the rows of the registered relation `relation` to the slices of `table` they belong to
    (each (eval run, model) slice is rewritten whole). For tests and repairs; the pipeline replaces slices."""
    keys = conn.execute(f"SELECT DISTINCT eval_run_id, model FROM {relation}").fetchall()
    for eval_run_id, model in keys:
        write_slice(conn, table, eval_run_id, model,
                    f"""SELECT * FROM {table} WHERE eval_run_id = $1 AND model = $2
                        UNION ALL BY NAME SELECT * FROM {relation} WHERE eval_run_id = $1 AND model = $2""",
                    [eval_run_id, model])
    return len(keys)


def _is_base_table(conn: duckdb.DuckDBPyConnection, table: str) -> bool:
    return bool(conn.execute("""SELECT count(*) FROM duckdb_tables()
                                WHERE database_name = current_database() AND schema_name = 'main' AND table_name = ?""",
                             [table]).fetchall()[0][0])


def prepare(conn: duckdb.DuckDBPyConnection) -> None:
    """The manifest and the views (idempotent). A warehouse from before slices has its tables moved into
    slice files here, once, in one transaction: a failure leaves it as it was."""
    conn.execute(MANIFEST_DDL)
    if database_file_or_none(conn) is None:
        # An in-memory database (tests, scratch work) has no folder for slices: plain tables, same columns.
        for table in SLICED_TABLES:
            conn.execute(table_ddl(table))
        return
    root = slices_dir(public_file(conn))
    for table in SLICED_TABLES:
        if _is_base_table(conn, table):
            _migrate(conn, table, root)
        else:
            refresh_view(conn, table, root)   # also re-points the view after the warehouse folder moved


def _migrate(conn: duckdb.DuckDBPyConnection, table: str, root: Path) -> None:
    keys = conn.execute(f"SELECT DISTINCT eval_run_id, model FROM {table}").fetchall()
    conn.execute("BEGIN TRANSACTION")
    try:
        conn.execute(f"ALTER TABLE {table} RENAME TO {table}_before_slices")
        for name, kind in columns(table):   # columns added since that warehouse was written: NULL
            conn.execute(f"ALTER TABLE {table}_before_slices ADD COLUMN IF NOT EXISTS {name} {kind}")
        for eval_run_id, model in keys:
            write_slice(conn, table, eval_run_id, model,
                        f"SELECT * FROM {table}_before_slices WHERE eval_run_id IS NOT DISTINCT FROM ? AND model IS NOT DISTINCT FROM ?",
                        [eval_run_id, model])
        refresh_view(conn, table, root)
        conn.execute(f"DROP TABLE {table}_before_slices")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def listed_files(conn: duckdb.DuckDBPyConnection) -> set[str]:
    """The slice files the connection's manifest lists (relative to the slices folder)."""
    return {f for (f,) in conn.execute("SELECT file FROM warehouse_slices").fetchall()}


def collect_garbage(public: Path, listed: set[str], grace_s: float = GARBAGE_GRACE_S) -> int:
    """Delete slice files the newest published manifest (`listed`) does not list, once older than `grace_s`.

    Call under the writer lock, after publishing: no other writer is adding files, and every reader
    opened in the last `grace_s` seconds finds the files of the snapshot it opened.
    """
    root = slices_dir(public)
    if not root.is_dir():
        return 0
    cutoff = time.time() - grace_s
    removed = 0
    for path in root.glob("*/*"):
        if path.relative_to(root).as_posix() in listed:
            continue
        try:
            if path.stat().st_mtime < cutoff:
                path.unlink()
                removed += 1
        except FileNotFoundError:
            pass
    return removed
