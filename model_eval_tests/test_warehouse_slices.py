"""Publishing: result slices are Parquet files behind views, replaced atomically, read while being written,
and the published DuckDB file does not grow with the result rows."""

from __future__ import annotations

import threading
from pathlib import Path

import duckdb
import polars as pl
import pytest

from model_eval import warehouse, warehouse_slices
from model_eval.cli import main as cli_main


def _scores(eval_run_id: str, model: str, rows: int, generation: int) -> pl.DataFrame:
    """`rows` score rows of one slice; every row carries `generation` in `reason`, to tell versions apart."""
    return pl.DataFrame({
        "eval_run_id": [eval_run_id] * rows, "model": [model] * rows, "task": ["grading"] * rows,
        "dataset_version": ["v1"] * rows, "case_id": [f"case-{i:06d}" for i in range(rows)], "repeat": [0] * rows,
        "scorer": ["verdict"] * rows, "score": [1.0] * rows, "correct": [True] * rows, "parsed": ["PASS"] * rows,
        "reason": [f"generation {generation}"] * rows, "call_failed": [False] * rows, "latency_ms": [10.0] * rows,
        "input_tokens": [12] * rows, "output_tokens": [1] * rows, "cost_usd": [1e-6] * rows,
    }).with_columns(pl.lit("2026-01-01").str.to_datetime().alias("scored_at"))


def _write(path: Path, frame: pl.DataFrame) -> None:
    eval_run_id, model = frame["eval_run_id"][0], frame["model"][0]
    with warehouse.write_connection(path) as conn:
        warehouse.replace_slice(conn, "scores", frame, {"eval_run_id": eval_run_id, "model": model})


def _generations(path: Path, model: str = "m") -> dict[str, int]:
    with warehouse.read_connection(path) as conn:
        return dict(conn.sql(f"SELECT reason, count(*) FROM scores WHERE model = '{model}' GROUP BY reason").fetchall())


@pytest.fixture
def db(tmp_path) -> Path:
    return tmp_path / "warehouse" / "model_eval.duckdb"


def test_a_slice_is_replaced_whole_and_an_open_reader_keeps_its_snapshot(db):
    _write(db, _scores("r1", "m", 300, generation=1))
    _write(db, _scores("r1", "other", 50, generation=1))
    with warehouse.read_connection(db) as before:
        _write(db, _scores("r1", "m", 120, generation=2))
        # The connection opened before the change still sees the first version, whole.
        assert dict(before.sql("SELECT reason, count(*) FROM scores WHERE model = 'm' GROUP BY reason").fetchall()) == {"generation 1": 300}
    assert _generations(db) == {"generation 2": 120}
    assert _generations(db, "other") == {"generation 1": 50}   # other slices untouched
    with warehouse.read_connection(db) as conn:
        listed = conn.sql("SELECT table_name, eval_run_id, model, rows FROM warehouse_slices ORDER BY model").fetchall()
    assert listed == [("scores", "r1", "m", 120), ("scores", "r1", "other", 50)]


def test_readers_during_writes_only_ever_see_whole_slices(db):
    sizes = {generation: 200 + 37 * generation for generation in range(1, 9)}
    _write(db, _scores("r1", "m", sizes[1], generation=1))
    seen, errors, done = [], [], threading.Event()

    def read_while_writing() -> None:
        while not done.is_set():
            try:
                seen.append(_generations(db))
            except Exception as exc:  # noqa: BLE001 - any failure to read is what this test looks for
                errors.append(exc)

    reader = threading.Thread(target=read_while_writing)
    reader.start()
    try:
        for generation in range(2, 9):
            _write(db, _scores("r1", "m", sizes[generation], generation=generation))
    finally:
        done.set()
        reader.join(30)
    assert not errors
    assert len(seen) > 1
    for snapshot in seen:
        # Exactly one version of the slice, with all of its rows.
        assert len(snapshot) == 1, snapshot
        ((reason, count),) = snapshot.items()
        assert count == sizes[int(reason.split()[1])]


def test_a_failed_write_publishes_nothing_and_its_file_is_collected_later(db):
    _write(db, _scores("r1", "m", 100, generation=1))
    before = db.read_bytes()
    with pytest.raises(RuntimeError, match="boom"):
        with warehouse.write_connection(db) as conn, warehouse.transaction(conn):
            warehouse_slices.write_slice(conn, "scores", "r1", "m", "SELECT * FROM scores")   # a new file...
            raise RuntimeError("boom")                                                        # ...never listed
    assert db.read_bytes() == before and _generations(db) == {"generation 1": 100}
    folder = warehouse_slices.slices_dir(db) / "scores"
    assert len(list(folder.iterdir())) == 2
    with warehouse.write_connection(db) as conn:
        listed = warehouse_slices.listed_files(conn)
    assert warehouse_slices.collect_garbage(db, listed, grace_s=3600) == 0   # young: a reader may still want it
    assert warehouse_slices.collect_garbage(db, listed, grace_s=0) == 1
    assert [p.relative_to(folder.parent).as_posix() for p in folder.iterdir()] == sorted(listed)
    assert _generations(db) == {"generation 1": 100}


def test_the_published_file_does_not_grow_with_result_rows(db):
    _write(db, _scores("r0", "m", 10, generation=0))
    small = db.stat().st_size
    for run in range(1, 5):
        _write(db, _scores(f"r{run}", "m", 50_000, generation=run))
    with warehouse.read_connection(db) as conn:
        assert conn.sql("SELECT count(*) FROM scores").fetchall() == [(200_010,)]
    # Only manifest rows were added to the DuckDB file; the rows are in the slice files.
    assert db.stat().st_size <= small + 64 * 1024
    assert sum(p.stat().st_size for p in warehouse_slices.slices_dir(db).rglob("*.parquet")) > 64 * 1024


OLD_RESULT_TABLES = """
CREATE TABLE inference_results (
    eval_run_id VARCHAR, model VARCHAR, task VARCHAR, dataset_version VARCHAR, case_id VARCHAR,
    repeat INTEGER, cache_key VARCHAR, response_text VARCHAR, latency_ms DOUBLE, input_tokens BIGINT,
    output_tokens BIGINT, cost_usd DOUBLE, finish_reason VARCHAR, error_class VARCHAR,
    error_message VARCHAR, attempts INTEGER, from_cache BOOLEAN, completed_at DOUBLE, dagster_run_id VARCHAR);
CREATE TABLE scores (
    eval_run_id VARCHAR, model VARCHAR, task VARCHAR, dataset_version VARCHAR, case_id VARCHAR,
    repeat INTEGER, scorer VARCHAR, score DOUBLE, correct BOOLEAN, parsed VARCHAR, reason VARCHAR,
    call_failed BOOLEAN, latency_ms DOUBLE, input_tokens BIGINT, output_tokens BIGINT, cost_usd DOUBLE,
    scored_at TIMESTAMP);
"""


def test_a_warehouse_from_before_slices_is_readable_then_migrated_on_the_next_write(db, capsys, monkeypatch):
    db.parent.mkdir(parents=True)
    conn = duckdb.connect(str(db))   # the layout older versions wrote: plain tables
    conn.execute(OLD_RESULT_TABLES)
    for run, model, rows in (("r1", "a", 30), ("r1", "b", 20), ("r2", "a", 10)):
        conn.register("f", _scores(run, model, rows, generation=0).to_arrow())
        conn.execute("INSERT INTO scores BY NAME SELECT * FROM f")
        conn.execute("""INSERT INTO inference_results (eval_run_id, model, task, dataset_version, case_id, repeat, response_text)
                        SELECT eval_run_id, model, task, dataset_version, case_id, repeat, parsed FROM f""")
        conn.unregister("f")
    conn.close()
    query = "SELECT eval_run_id, model, count(*), min(case_id), max(case_id) FROM {} GROUP BY ALL ORDER BY ALL"
    with warehouse.read_connection(db) as conn:   # readable as it is
        old = {t: conn.sql(query.format(t)).fetchall() for t in ("scores", "inference_results")}
    with warehouse.write_connection(db):
        pass                                       # any write migrates
    plain = duckdb.connect(str(db), read_only=True)   # any DuckDB client, by the public names
    try:
        kinds = dict(plain.sql("SELECT table_name, table_type FROM information_schema.tables "
                               "WHERE table_name IN ('scores', 'inference_results')").fetchall())
        assert kinds == {"scores": "VIEW", "inference_results": "VIEW"}
        assert {t: plain.sql(query.format(t)).fetchall() for t in old} == old
        assert plain.sql("SELECT count(*) FROM warehouse_slices").fetchall() == [(6,)]
    finally:
        plain.close()
    # `model-eval sql` reads the views too.
    monkeypatch.setenv("MODEL_EVAL_WAREHOUSE", str(db))
    assert cli_main(["sql", "SELECT model, count(*) AS n FROM scores GROUP BY model ORDER BY model"]) == 0
    out = capsys.readouterr().out
    assert "40" in out and "20" in out


def test_a_slice_must_be_named_by_eval_run_and_model(db):
    with pytest.raises(ValueError, match="one \\(eval_run_id, model\\) slice at a time"):
        with warehouse.write_connection(db) as conn:
            warehouse.replace_slice(conn, "scores", _scores("r1", "m", 1, 0), {"eval_run_id": "r1"})


def test_a_moved_warehouse_folder_is_readable_again_after_its_next_write(db, tmp_path):
    _write(db, _scores("r1", "m", 40, generation=1))
    moved = tmp_path / "elsewhere"
    db.parent.rename(moved)
    db = moved / db.name
    with warehouse.write_connection(db):
        pass
    assert _generations(db) == {"generation 1": 40}


def test_tables_are_created_again_only_when_their_definitions_change(tmp_path, monkeypatch):
    public = tmp_path / "warehouse" / "model_eval.duckdb"
    with warehouse.write_connection(public) as conn:
        first = conn.execute("SELECT fingerprint FROM warehouse_schema").fetchall()
    executed: list[str] = []
    monkeypatch.setattr(warehouse_slices, "prepare", lambda conn: executed.append("prepare"))
    with warehouse.write_connection(public) as conn:
        assert conn.execute("SELECT fingerprint FROM warehouse_schema").fetchall() == first
    assert executed == []                                  # unchanged definitions: nothing re-created
    # A release that adds a table (or a migration) changes the fingerprint: the next writer creates it.
    monkeypatch.setattr(warehouse, "ALL_DDL", (*warehouse.ALL_DDL, "CREATE TABLE IF NOT EXISTS added_later (x INTEGER)"))
    with warehouse.write_connection(public) as conn:
        assert conn.execute("SELECT count(*) FROM added_later").fetchall() == [(0,)]
        assert conn.execute("SELECT fingerprint FROM warehouse_schema").fetchall() != first
    assert executed == ["prepare"]
