"""dagster_sqlite: a real Dagster instance's SQLite files commit with synchronous=NORMAL, nothing else does."""

from __future__ import annotations

import sqlite3

import dagster as dg
import pytest
import sqlalchemy as sa

from model_eval.dagster_sqlite import relax_instance_sync

FULL, NORMAL = 2, 1


def synchronous_of(url: str) -> int:
    engine = sa.create_engine(url)
    with engine.connect() as conn:
        value = conn.exec_driver_sql("PRAGMA synchronous").scalar()
    engine.dispose()
    return value


def make_sqlite(path, wal: bool) -> None:
    conn = sqlite3.connect(path)
    if wal:
        conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("CREATE TABLE t (x)")
    conn.commit()
    conn.close()


@pytest.fixture(scope="module")
def relaxed_home(tmp_path_factory):
    home = tmp_path_factory.mktemp("dagster_home")
    relax_instance_sync(home)
    return home


def test_a_real_instance_stores_its_events_with_synchronous_normal(relaxed_home, monkeypatch):
    monkeypatch.setenv("DAGSTER_HOME", str(relaxed_home))
    (relaxed_home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")

    @dg.asset
    def one() -> int:
        return 1

    with dg.DagsterInstance.get() as instance:
        result = dg.materialize([one], instance=instance)
        assert result.success
        # Dagster's own connections, as it opens them for every event it stores.
        storage = instance.event_log_storage
        with storage.index_connection() as conn:
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == NORMAL
        with storage.run_connection(result.run_id) as conn:
            assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == NORMAL
        assert instance.get_run_by_id(result.run_id).is_success


def test_files_outside_the_instance_or_not_in_wal_mode_keep_full_sync(relaxed_home, tmp_path):
    make_sqlite(tmp_path / "elsewhere.db", wal=True)
    assert synchronous_of(f"sqlite:///{tmp_path / 'elsewhere.db'}") == FULL
    make_sqlite(relaxed_home / "rollback_journal.db", wal=False)
    assert synchronous_of(f"sqlite:///{relaxed_home / 'rollback_journal.db'}") == FULL
    make_sqlite(relaxed_home / "wal.db", wal=True)
    assert synchronous_of(f"sqlite:///{relaxed_home / 'wal.db'}") == NORMAL
