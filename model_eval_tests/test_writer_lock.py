"""Waiting for the warehouse writer lock is visible and bounded: the waiter names the holder, sleeps
instead of spinning, gives up with an error saying how to free the lock, and a SIGKILLed holder
frees it at once (the kernel drops its flock) without leaving a half-made change behind."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time

import pytest

from model_eval import warehouse
from model_eval.settings import PROJECT_ROOT

HOLDER = """
import sys, time
from pathlib import Path
from model_eval import file_lock, warehouse
file_lock.set_holder_label("Dagster run holder-run-1")
with warehouse.write_connection(Path(sys.argv[1])) as conn:
    conn.execute("CREATE TABLE half_made AS SELECT 1 AS x")
    print("holding", flush=True)
    time.sleep(120)
"""


@pytest.fixture
def holder(tmp_path):
    path = tmp_path / "warehouse" / "model_eval.duckdb"
    with warehouse.write_connection(path) as conn:
        conn.execute("CREATE TABLE kept AS SELECT 42 AS answer")
    process = subprocess.Popen([sys.executable, "-c", HOLDER, str(path)], cwd=PROJECT_ROOT, stdout=subprocess.PIPE, text=True,
                               env={**os.environ, "PYTHONPATH": str(PROJECT_ROOT)})
    assert process.stdout.readline().strip() == "holding"
    yield path, process
    process.kill()
    process.wait()


def test_a_waiter_names_the_holder_sleeps_and_gives_up_with_how_to_free_it(holder, caplog, monkeypatch):
    path, process = holder
    monkeypatch.setenv(warehouse.WRITE_LOCK_TIMEOUT_ENV, "2")
    caplog.set_level(logging.WARNING, logger="model_eval.warehouse")
    cpu, wall = time.process_time(), time.monotonic()
    with pytest.raises(warehouse.WriterLockTimeout) as failure:
        with warehouse.write_connection(path):
            pass
    cpu, wall = time.process_time() - cpu, time.monotonic() - wall
    message = str(failure.value)
    for words in (f"pid {process.pid}", "Dagster run holder-run-1", "gave up after 2 s", "kill", warehouse.WRITE_LOCK_TIMEOUT_ENV):
        assert words in message, message
    waiting = [r.getMessage() for r in caplog.records if "waiting for the warehouse writer lock" in r.getMessage()]
    assert waiting and f"pid {process.pid}" in waiting[0] and "Dagster run holder-run-1" in waiting[0]
    assert cpu < 0.1 * wall, (cpu, wall)   # it slept while it waited


def test_a_sigkilled_holder_frees_the_lock_and_leaves_no_half_change(holder):
    path, process = holder
    process.send_signal(signal.SIGKILL)
    process.wait()
    with warehouse.write_connection(path, lock_timeout_s=5) as conn:
        tables = {t for (t,) in conn.sql("SELECT table_name FROM information_schema.tables").fetchall()}
    assert "kept" in tables and "half_made" not in tables
