"""dagster_sqlite: a real Dagster instance's SQLite files commit with synchronous=NORMAL, nothing else does;
opening an instance whose tables another process is creating."""

from __future__ import annotations

import contextlib
import os
import sqlite3
import subprocess
import sys
import time

import dagster as dg
import pytest
import sqlalchemy as sa

from model_eval.dagster_sqlite import OPEN_LOCK, relax_instance_sync
from model_eval.file_lock import exclusive_lock
from model_eval.settings import PROJECT_ROOT

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


OPENER = """
import sys, time
from model_eval.dagster_sqlite import open_instance
start_at = float(sys.argv[1])
time.sleep(max(0.0, start_at - time.time()))
instance = open_instance()
print("opened", len(instance.get_runs()), flush=True)
"""


def _opener(home, start_at: float) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", OPENER, str(start_at)], env={**os.environ, "DAGSTER_HOME": str(home)},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=PROJECT_ROOT)


def test_processes_opening_a_new_instance_at_once_all_succeed_and_stamp_it_once(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    (home / "dagster.yaml").write_text((PROJECT_ROOT / "dagster.yaml").read_text())
    openers = [_opener(home, time.time() + 4) for _ in range(3)]   # all past their imports, then at once
    for opener in openers:
        out, err = opener.communicate(timeout=120)
        assert opener.returncode == 0 and out.strip() == "opened 0", err[-2000:]
    stamped = [path for path in home.rglob("*.db") if _has_table(path, "alembic_version")]
    assert stamped
    for path in stamped:
        with contextlib.closing(sqlite3.connect(path)) as conn:
            assert conn.execute("SELECT count(*) FROM alembic_version").fetchone()[0] == 1, path


def _has_table(path, name: str) -> bool:
    with contextlib.closing(sqlite3.connect(path)) as conn:
        return conn.execute("SELECT count(*) FROM sqlite_master WHERE name = ?", [name]).fetchone()[0] == 1


def test_a_process_waits_for_the_one_opening_the_instance(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    with exclusive_lock(home / OPEN_LOCK, 10, lambda: TimeoutError("test")):
        opener = _opener(home, 0)
        time.sleep(6)   # longer than importing dagster and opening an instance takes here
        assert opener.poll() is None
    out, err = opener.communicate(timeout=120)
    assert opener.returncode == 0 and out.strip() == "opened 0", err[-2000:]
