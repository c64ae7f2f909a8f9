"""A response cache keyed by everything that decides a model's answer.

It lives in its own SQLite file (WAL mode), not in the DuckDB warehouse: inference writes each
finished call here at once, so a run killed half-way resumes without repeating finished calls, and
several model partitions can write at the same time without taking DuckDB's single write lock.
Only successful calls are cached: a failed call is tried again on the next run.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import time
from pathlib import Path
from typing import Any


def cache_key(config_hash: str, messages: list[dict], params: dict[str, Any], repeat: int,
              completion: dict[str, Any] | None = None) -> str:
    """Hash of everything that decides an answer. `completion` (mode, prompt text, stop sequences) is
    given for completion-mode calls only, so chat calls keep the keys they had before modes existed."""
    parts = {"config": config_hash, "messages": messages, "params": params, "repeat": repeat}
    if completion is not None:
        parts["completion"] = completion
    material = json.dumps(parts, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(material.encode()).hexdigest()


class ResponseCache:
    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        # isolation_level=None: autocommit, each put is durable on its own.
        self._conn = sqlite3.connect(path, timeout=30, isolation_level=None, check_same_thread=False)
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=NORMAL")
        self._conn.execute(
            "CREATE TABLE IF NOT EXISTS responses (key TEXT PRIMARY KEY, model TEXT NOT NULL, payload TEXT NOT NULL, created_at REAL NOT NULL)"
        )

    def get_many(self, keys: list[str], max_age_s: float | None = None) -> dict[str, dict[str, Any]]:
        """Cached payloads by key; with `max_age_s`, only answers younger than that (older ones are asked again)."""
        return {key: json.loads(payload) for key, payload in self._select("key, payload", keys, max_age_s)}

    def count_present(self, keys: list[str], max_age_s: float | None = None) -> int:
        """How many of `keys` (distinct) have an answer, young enough with `max_age_s`."""
        return sum(1 for _ in self._select("key", list(dict.fromkeys(keys)), max_age_s))

    def _select(self, columns: str, keys: list[str], max_age_s: float | None):
        oldest = time.time() - max_age_s if max_age_s is not None else 0.0
        # SQLite limits bound parameters per statement; 500 stays well under it.
        for start in range(0, len(keys), 500):
            chunk = keys[start:start + 500]
            marks = ",".join("?" * len(chunk))
            yield from self._conn.execute(f"SELECT {columns} FROM responses WHERE key IN ({marks}) AND created_at >= ?",
                                          [*chunk, oldest])

    def put(self, key: str, model: str, payload: dict[str, Any]) -> None:
        self.put_many([(key, model, payload)])

    def put_many(self, entries: list[tuple[str, str, dict[str, Any]]]) -> None:
        """Write several responses in one transaction (one fsync instead of one per call)."""
        if not entries:
            return
        now = time.time()
        rows = [(key, model, json.dumps(payload, ensure_ascii=False), now) for key, model, payload in entries]
        with self._conn:  # a transaction even in autocommit mode
            self._conn.execute("BEGIN")
            self._conn.executemany("INSERT OR REPLACE INTO responses (key, model, payload, created_at) VALUES (?, ?, ?, ?)", rows)

    def count(self, model: str | None = None) -> int:
        if model is None:
            return self._conn.execute("SELECT count(*) FROM responses").fetchone()[0]
        return self._conn.execute("SELECT count(*) FROM responses WHERE model = ?", (model,)).fetchone()[0]

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> "ResponseCache":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
