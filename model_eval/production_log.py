"""Load the applications' call logs (written by `model_eval.router.CallLog`) into the warehouse.

Applications append JSON lines to per-process files; this module is the only thing that moves them
into DuckDB, on the pipeline's schedule and under the pipeline's single-writer discipline.

Tables (created when missing):

* ``production_calls`` - one row per logged call (primary and shadow), keyed by ``call_id``.
  ``rating`` is the latest rating event for the call (by its timestamp), ``rated_at`` when it was
  given, ``rating_comment`` its comment; ``extra_json`` is the caller's ``extra`` dict as JSON;
  ``cost_usd`` is NULL when unknown. ``task`` is NULL (stage ``direct``) for a registry model the
  gateway was asked for by name.
* ``production_log_offsets`` - per log file, how many bytes have been ingested. Files only grow,
  so the next ingest starts where the last one stopped.
* ``production_pending_ratings`` - ratings whose call has not been ingested yet (a rating is often
  logged by another worker process, i.e. in another file, and may be read first). They are applied
  as soon as the call arrives.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import duckdb
import polars as pl

from model_eval.warehouse import CREATE_PRODUCTION_TABLES, transaction

logger = logging.getLogger(__name__)

LOG_GLOB = "calls-*.jsonl"

CALL_SCHEMA = {
    "call_id": pl.String, "ts": pl.Datetime("us"), "task": pl.String, "request_key_hash": pl.String,
    "model": pl.String, "role": pl.String, "stage": pl.String, "bucket": pl.Float64,
    "latency_ms": pl.Float64, "input_tokens": pl.Int64, "output_tokens": pl.Int64,
    "success": pl.Boolean, "error": pl.String, "rating": pl.Float64, "source_file": pl.String,
    "rated_at": pl.Datetime("us"), "extra_json": pl.String, "cost_usd": pl.Float64, "rating_comment": pl.String,
}
RATING_SCHEMA = {"call_id": pl.String, "rating": pl.Float64, "rated_at": pl.Datetime("us"), "source_file": pl.String,
                 "rating_comment": pl.String}


class BadLine(ValueError):
    """A complete line that is not a call or rating event; it is skipped with a warning."""


def _utc_naive(text: Any) -> datetime:
    # Warehouse timestamps are naive UTC (TIMESTAMP, not TIMESTAMPTZ), like the rest of the tables.
    if not isinstance(text, str):
        raise BadLine(f"ts must be an ISO timestamp, got {text!r}")
    try:
        moment = datetime.fromisoformat(text)
    except ValueError as exc:
        raise BadLine(f"ts: {exc}") from None
    if moment.tzinfo is not None:
        moment = moment.astimezone(UTC).replace(tzinfo=None)
    return moment


def _string(obj: dict, key: str, required: bool = True) -> str | None:
    value = obj.get(key)
    if value is None and not required:
        return None
    if not isinstance(value, str) or (required and not value):
        raise BadLine(f"{key} must be a non-empty string, got {value!r}")
    return value


def _number(obj: dict, key: str, kind: type, required: bool = False) -> Any:
    value = obj.get(key)
    if value is None:
        if required:
            raise BadLine(f"{key} is required")
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise BadLine(f"{key} must be a number, got {value!r}")
    return kind(value)


def _parse_call(obj: dict, source_file: str) -> dict[str, Any]:
    success = obj.get("success")
    if not isinstance(success, bool):
        raise BadLine(f"success must be true or false, got {success!r}")
    rating = _number(obj, "rating", float)
    ts = _utc_naive(obj.get("ts"))
    extra = obj.get("extra")
    return {
        "call_id": _string(obj, "call_id"), "ts": ts, "task": _string(obj, "task", required=False),
        "request_key_hash": _string(obj, "request_key_hash", required=False), "model": _string(obj, "model"),
        "role": _string(obj, "role"), "stage": _string(obj, "stage", required=False),
        "bucket": _number(obj, "bucket", float), "latency_ms": _number(obj, "latency_ms", float),
        "input_tokens": _number(obj, "input_tokens", int), "output_tokens": _number(obj, "output_tokens", int),
        "success": success, "error": _string(obj, "error", required=False), "rating": rating,
        "source_file": source_file, "rated_at": ts if rating is not None else None,
        "extra_json": json.dumps(extra, sort_keys=True) if extra else None,
        "cost_usd": _number(obj, "cost_usd", float), "rating_comment": None,
    }


def _parse_rating(obj: dict, source_file: str) -> dict[str, Any]:
    return {"call_id": _string(obj, "call_id"), "rating": _number(obj, "rating", float, required=True),
            "rated_at": _utc_naive(obj.get("ts")), "source_file": source_file,
            "rating_comment": _string(obj, "comment", required=False)}


def _read_new_lines(path: Path, offset: int, max_bytes: int | None = None) -> tuple[list[tuple[int, bytes]], int]:
    """Complete lines after `offset` as (byte position, line), and the offset after the last one.

    A last line without its newline is still being written (or its writer died mid-write); it is
    left for the next ingest, which starts again at its first byte. With `max_bytes`, reading stops
    at the first line that would go past it.
    """
    lines: list[tuple[int, bytes]] = []
    with open(path, "rb") as handle:
        handle.seek(offset)
        position = offset
        for line in handle:
            if not line.endswith(b"\n") or (max_bytes is not None and position + len(line) - offset > max_bytes):
                break
            lines.append((position, line))
            position += len(line)
    return lines, position


@dataclass
class LogEvents:
    """What the log files hold after the given offsets: calls and (latest per call) ratings."""

    calls: dict[str, dict[str, Any]] = field(default_factory=dict)
    ratings: dict[str, dict[str, Any]] = field(default_factory=dict)
    new_offsets: list[tuple[str, int]] = field(default_factory=list)   # (file, offset after its last complete line)
    bytes_left: int = 0          # bytes past the offsets not read (over `max_bytes`, or an unfinished last line)


def has_call_logs(folder: Path) -> bool:
    return folder.is_dir() and any(folder.glob(LOG_GLOB))


def read_events(folder: Path, offsets: dict[str, int], max_bytes: int | None = None) -> LogEvents:
    """Parse every complete line of `<folder>/calls-*.jsonl` after each file's offset (0 for new files).

    Shared by ingestion and by the gateway's statistics, which add the calls not loaded yet.
    `max_bytes` bounds the bytes read over all files; what is left is counted in `bytes_left`.
    """
    folder = Path(folder)
    files = sorted(folder.glob(LOG_GLOB)) if folder.is_dir() else []
    events = LogEvents()
    budget = max_bytes
    for path in files:
        name = str(path.resolve())
        start = offsets.get(name, 0)
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            continue
        if size < start:
            # Files are append-only; a shorter file was replaced or truncated. Re-read it all:
            # call_id keeps rows unique.
            logger.warning("%s is shorter than the %d bytes already ingested; reading it again", name, start)
            start = 0
        if size == start:
            continue
        lines, end = _read_new_lines(path, start, budget)
        events.bytes_left += size - end
        if budget is not None:
            budget = max(0, budget - (end - start))
        for position, raw in lines:
            try:
                obj = json.loads(raw)
                if not isinstance(obj, dict):
                    raise BadLine("not a JSON object")
                event = obj.get("event", "call")
                if event == "call":
                    row = _parse_call(obj, name)
                    events.calls.setdefault(row["call_id"], row)
                elif event == "rating":
                    row = _parse_rating(obj, name)
                    kept = events.ratings.get(row["call_id"])
                    if kept is None or row["rated_at"] >= kept["rated_at"]:
                        events.ratings[row["call_id"]] = row
                else:
                    raise BadLine(f"unknown event {event!r}")
            except (ValueError, UnicodeDecodeError) as exc:  # BadLine and JSONDecodeError are ValueErrors
                logger.warning("%s, byte %d: skipping a line that is not a call log event: %s", name, position, exc)
        if end != start:
            events.new_offsets.append((name, end))
    return events


def ingested_offsets(conn: duckdb.DuckDBPyConnection) -> dict[str, int]:
    """Per log file, the bytes already in the warehouse (its high-water mark)."""
    return dict(conn.execute('SELECT file, "offset" FROM production_log_offsets').fetchall())


def ingest_call_logs(folder: Path, conn: duckdb.DuckDBPyConnection) -> int:
    """Load new complete lines from `<folder>/calls-*.jsonl` into `production_calls`; returns rows added.

    Idempotent: each file's ingested byte offset is stored alongside the rows in the same
    transaction, so a crash re-reads exactly what was not committed, and call_id is the primary key
    in case a file is ever read twice (e.g. the folder moved). Rating events set the rating of
    their call; the latest (by event time) wins. Complete lines that are not valid events are
    skipped with a warning instead of blocking every later line of the file.
    """
    with transaction(conn):
        conn.execute(CREATE_PRODUCTION_TABLES)
        events = read_events(folder, ingested_offsets(conn))
        calls, ratings, new_offsets = events.calls, events.ratings, events.new_offsets

        before = conn.execute("SELECT count(*) FROM production_calls").fetchall()[0][0]
        if calls:
            frame = pl.DataFrame(list(calls.values()), schema=CALL_SCHEMA)
            conn.register("incoming_calls", frame.to_arrow())
            conn.execute("INSERT OR IGNORE INTO production_calls BY NAME SELECT * FROM incoming_calls")
            conn.unregister("incoming_calls")
        added = conn.execute("SELECT count(*) FROM production_calls").fetchall()[0][0] - before

        if ratings:
            # Park every rating first, keeping the latest per call, then apply whatever now has a call.
            frame = pl.DataFrame(list(ratings.values()), schema=RATING_SCHEMA)
            conn.register("incoming_ratings", frame.to_arrow())
            conn.execute(
                """
                INSERT INTO production_pending_ratings BY NAME SELECT * FROM incoming_ratings
                ON CONFLICT (call_id) DO UPDATE SET rating = excluded.rating, rated_at = excluded.rated_at,
                    source_file = excluded.source_file, rating_comment = excluded.rating_comment
                WHERE excluded.rated_at >= production_pending_ratings.rated_at
                """
            )
            conn.unregister("incoming_ratings")
        conn.execute(
            """
            UPDATE production_calls AS c SET rating = p.rating, rated_at = p.rated_at, rating_comment = p.rating_comment
            FROM production_pending_ratings AS p
            WHERE c.call_id = p.call_id AND (c.rated_at IS NULL OR p.rated_at >= c.rated_at)
            """
        )
        conn.execute(
            "DELETE FROM production_pending_ratings WHERE call_id IN (SELECT call_id FROM production_calls)"
        )

        for name, end in new_offsets:
            conn.execute(
                'INSERT INTO production_log_offsets VALUES (?, ?) ON CONFLICT (file) DO UPDATE SET "offset" = excluded."offset"',
                [name, end],
            )
    return added
