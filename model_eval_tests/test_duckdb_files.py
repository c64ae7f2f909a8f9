"""duckdb_files: DuckDB files attached to one instance per process, on real files."""

from __future__ import annotations

import multiprocessing
import os
import threading

import duckdb
import pytest

from model_eval.duckdb_files import open_file, table_exists


def make_file(path, table: str, rows: int) -> None:
    conn = duckdb.connect(str(path))
    conn.execute(f"CREATE TABLE {table} AS SELECT range AS i FROM range({rows})")
    conn.close()


def test_a_use_sees_its_own_file_by_unqualified_names_and_the_stem_as_catalog(tmp_path):
    make_file(tmp_path / "warehouse.duckdb", "results", 7)
    with open_file(tmp_path / "warehouse.duckdb", read_only=True) as conn:
        assert conn.sql("SELECT count(*) FROM results").fetchall() == [(7,)]
        assert conn.sql("SELECT current_database()").fetchall() == [("warehouse",)]
        assert conn.sql("SELECT count(*) FROM warehouse.main.results").fetchall() == [(7,)]


def test_files_with_one_stem_open_at_once_keep_their_own_tables(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    make_file(tmp_path / "a" / "w.duckdb", "only_in_a", 2)
    make_file(tmp_path / "b" / "w.duckdb", "only_in_b", 3)
    with open_file(tmp_path / "a" / "w.duckdb") as a, open_file(tmp_path / "b" / "w.duckdb", read_only=True) as b:
        assert a.sql("SELECT count(*) FROM only_in_a").fetchall() == [(2,)]
        assert b.sql("SELECT count(*) FROM only_in_b").fetchall() == [(3,)]
        # information_schema lists both files; table_exists counts the connection's own only.
        assert table_exists(a, "only_in_a") and not table_exists(a, "only_in_b")
        assert table_exists(b, "only_in_b") and not table_exists(b, "only_in_a")
        assert {a.sql("SELECT current_database()").fetchall()[0][0],
                b.sql("SELECT current_database()").fetchall()[0][0]} == {"w", "w_2"}


def test_nested_uses_of_one_file_share_it_and_the_last_one_closes_it(tmp_path):
    path = tmp_path / "w.duckdb"
    make_file(path, "t", 1)
    with open_file(path) as outer:
        outer.execute("INSERT INTO t VALUES (10)")
        with open_file(path) as inner:   # DuckDB alone would refuse a second attach of the file
            assert inner.sql("SELECT count(*) FROM t").fetchall() == [(2,)]
        assert outer.sql("SELECT count(*) FROM t").fetchall() == [(2,)]
        outer.execute("CHECKPOINT")
    # Closed: another DuckDB instance (as another process would) can open it for writing.
    other = duckdb.connect(str(path))
    assert other.sql("SELECT count(*) FROM t").fetchall() == [(2,)]
    other.close()


def test_a_file_replaced_between_uses_is_read_anew(tmp_path):
    path = tmp_path / "w.duckdb"
    make_file(path, "t", 1)
    with open_file(path, read_only=True) as conn:
        assert conn.sql("SELECT count(*) FROM t").fetchall() == [(1,)]
    replacement = tmp_path / "next.duckdb"
    make_file(replacement, "t", 5)
    os.replace(replacement, path)   # what publishing the warehouse does
    with open_file(path, read_only=True) as conn:
        assert conn.sql("SELECT count(*) FROM t").fetchall() == [(5,)]


def test_a_file_open_read_only_cannot_be_opened_for_writing_meanwhile(tmp_path):
    path = tmp_path / "w.duckdb"
    make_file(path, "t", 1)
    with open_file(path, read_only=True):
        with pytest.raises(RuntimeError, match="already open read-only"):
            with open_file(path):
                pass
    with open_file(path) as conn:   # and can once it is closed
        conn.execute("INSERT INTO t VALUES (2)")


def test_a_failed_attach_leaves_nothing_attached(tmp_path):
    path = tmp_path / "not_a_database.duckdb"
    path.write_text("plain text, not DuckDB\n")
    with pytest.raises(duckdb.Error):
        with open_file(path, read_only=True):
            pass
    path.unlink()
    make_file(path, "t", 3)
    with open_file(path, read_only=True) as conn:
        assert conn.sql("SELECT count(*) FROM t").fetchall() == [(3,)]


def test_threads_each_with_a_use_of_one_file(tmp_path):
    path = tmp_path / "w.duckdb"
    make_file(path, "t", 1000)
    counts, errors = [], []

    def read() -> None:
        try:
            for _ in range(20):
                with open_file(path, read_only=True) as conn:
                    counts.append(conn.sql("SELECT sum(i) FROM t").fetchall()[0][0])
        except Exception as exc:  # collected: an assert in a thread would not fail the test
            errors.append(exc)

    threads = [threading.Thread(target=read) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert counts == [sum(range(1000))] * 80


def _count_in_child(path, queue) -> None:
    with open_file(path, read_only=True) as conn:
        queue.put(conn.sql("SELECT count(*) FROM t").fetchall()[0][0])


def test_a_forked_child_opens_files_with_an_instance_of_its_own(tmp_path):
    path = tmp_path / "w.duckdb"
    make_file(path, "t", 4)
    with open_file(path, read_only=True) as conn:   # the parent's instance is running
        assert conn.sql("SELECT count(*) FROM t").fetchall() == [(4,)]
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_count_in_child, args=(path, queue))
    child.start()
    try:
        child.join(60)
        assert child.exitcode == 0, "the child hung or failed"
        assert queue.get(timeout=5) == 4
    finally:
        if child.is_alive():
            child.kill()
