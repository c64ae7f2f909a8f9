"""The gateway's read API: tasks, decisions, leaderboards and per-model production statistics.

Every read opens the *published* warehouse file read-only (`warehouse.read_connection`). Writers
change a private copy under their own lock and replace the public file by atomic rename, so a
read never waits for a pipeline run and never delays one; a read that started before a publish
finishes on the file it opened. Statistics add the calls still only in the JSONL call logs (past
each file's ingested offset), so they are current even between ingests, and say how many bytes
were left unread when there was more than `max_log_bytes` to catch up on.
"""

from __future__ import annotations

import math
import re
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import polars as pl

from model_eval.duckdb_files import table_exists
from model_eval.metrics import leaderboard
from model_eval.production_log import CALL_SCHEMA, ingested_offsets, read_events
from model_eval.warehouse import read_connection

WINDOW_PATTERN = re.compile(r"^(\d+(?:\.\d+)?)([smhd])$")
WINDOW_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
MAX_WINDOW = timedelta(days=366)
STAT_COLUMNS = ["ts", "model", "task", "role", "latency_ms", "output_tokens", "success", "cost_usd", "rating", "call_id"]


class ReadError(ValueError):
    """Bad read parameters: `field` names the query parameter."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


def parse_window(text: str) -> timedelta:
    """"30m", "24h", "7d", "90s" -> a timedelta (at most a year)."""
    match = WINDOW_PATTERN.match(text.strip()) if isinstance(text, str) else None
    if not match:
        raise ReadError("window", f"must be a number and a unit s, m, h or d (e.g. 24h), got {text!r}")
    window = timedelta(seconds=float(match.group(1)) * WINDOW_UNITS[match.group(2)])
    if window <= timedelta(0) or window > MAX_WINDOW:
        raise ReadError("window", f"must be more than 0 and at most {MAX_WINDOW.days} days, got {text!r}")
    return window


def json_safe(value: Any) -> Any:
    """Values of a warehouse row as JSON: datetimes in ISO form, NaN and infinity as null."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, (datetime, date)):
        return value.isoformat()
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


class Reads:
    """Read-only queries over the published warehouse and the call logs."""

    def __init__(self, warehouse_file: Path, call_log_dir: Path, max_log_bytes: int = 64 * 1024 * 1024):
        self.warehouse_file = Path(warehouse_file)
        self.call_log_dir = Path(call_log_dir)
        self.max_log_bytes = max_log_bytes

    def _published_at(self) -> str | None:
        try:
            return datetime.fromtimestamp(self.warehouse_file.stat().st_mtime, UTC).isoformat()
        except FileNotFoundError:
            return None

    def task_decision(self, task: str) -> dict[str, Any]:
        """The newest recommendation under the task's own policy (champion, runner-up, reasoning) and the last assignment change."""
        out: dict[str, Any] = {"champion": None, "runner_up": None, "reasoning": None, "confidence": None,
                               "dataset_version": None, "eval_run_id": None, "recommended_at": None, "last_change": None,
                               "warehouse_published_at": self._published_at()}
        if not self.warehouse_file.exists():
            out["note"] = "no warehouse yet: run `model-eval run`"
            return out
        with read_connection(self.warehouse_file) as conn:
            if table_exists(conn, "recommendations"):
                rows = conn.execute("""SELECT champion, runner_up, reasoning, confidence, dataset_version, eval_run_id, created_at
                                       FROM recommendations WHERE task = ? AND is_task_policy
                                       ORDER BY created_at DESC LIMIT 1""", [task]).fetchall()
                if rows:
                    keys = ("champion", "runner_up", "reasoning", "confidence", "dataset_version", "eval_run_id", "recommended_at")
                    out.update(zip(keys, rows[0]))
            if table_exists(conn, "model_assignments"):
                rows = conn.execute("""SELECT action, reason, model, stage, assigned_by, assigned_at FROM model_assignments
                                       WHERE task = ? ORDER BY seq DESC LIMIT 1""", [task]).fetchall()
                if rows:
                    out["last_change"] = dict(zip(("action", "reason", "model", "stage", "assigned_by", "assigned_at"), rows[0]))
        return json_safe(out)

    def leaderboard(self, task: str) -> dict[str, Any]:
        """Newest metrics per model on the task's version of its newest recommendation (else every version)."""
        if not self.warehouse_file.exists():
            return {"task": task, "dataset_version": None, "models": [], "note": "no warehouse yet: run `model-eval run`"}
        with read_connection(self.warehouse_file) as conn:
            if not table_exists(conn, "model_task_metrics"):
                return {"task": task, "dataset_version": None, "models": []}
            board = leaderboard(conn, task)
            version = None
            if table_exists(conn, "recommendations"):
                rows = conn.execute("""SELECT dataset_version FROM recommendations WHERE task = ? AND is_task_policy
                                       ORDER BY created_at DESC LIMIT 1""", [task]).fetchall()
                version = rows[0][0] if rows else None
        if version is not None:
            board = board.filter(pl.col("dataset_version") == version)
        # A model adaptive mode stopped early is listed after the ranked ones and marked: its figures
        # cover only the cases it answered, so it is never ranked (docs/decisions.md, adaptive evaluation).
        board = board.with_columns((pl.col("status") == "complete").alias("ranked")).sort("ranked", descending=True,
                                                                                         maintain_order=True)
        return {"task": task, "dataset_version": version, "models": [json_safe(r) for r in board.iter_rows(named=True)],
                "warehouse_published_at": self._published_at()}

    # ------------------------------------------------------------ production statistics
    def _calls_since(self, since: datetime) -> tuple[pl.DataFrame, dict[str, Any]]:
        """Calls made since `since`: the warehouse's rows plus the log lines past its offsets, deduplicated."""
        loaded = pl.DataFrame(schema={c: CALL_SCHEMA[c] for c in STAT_COLUMNS})
        offsets: dict[str, int] = {}
        if self.warehouse_file.exists():
            with read_connection(self.warehouse_file) as conn:
                if table_exists(conn, "production_calls"):
                    offsets = ingested_offsets(conn)
                    loaded = conn.sql(f"SELECT {', '.join(STAT_COLUMNS)} FROM production_calls WHERE ts >= $since",
                                      params={"since": since}).pl().cast({c: CALL_SCHEMA[c] for c in STAT_COLUMNS})
        events = read_events(self.call_log_dir, offsets, self.max_log_bytes)
        fresh = [row for row in events.calls.values() if row["ts"] >= since]
        unloaded = pl.DataFrame([{c: row.get(c) for c in STAT_COLUMNS} for row in fresh],
                                schema={c: CALL_SCHEMA[c] for c in STAT_COLUMNS})
        frame = pl.concat([loaded, unloaded]).unique("call_id", keep="first")
        if events.ratings:
            # Ratings not loaded yet override the stored ones (the latest rating wins, as on ingest).
            newer = pl.DataFrame([{"call_id": k, "new_rating": v["rating"]} for k, v in events.ratings.items()],
                                 schema={"call_id": pl.String, "new_rating": pl.Float64})
            frame = (frame.join(newer, on="call_id", how="left")
                     .with_columns(pl.coalesce("new_rating", "rating").alias("rating")).drop("new_rating"))
        freshness = {"warehouse_calls": loaded.height, "unloaded_calls": len(fresh),
                     "unread_log_bytes": events.bytes_left, "warehouse_published_at": self._published_at()}
        return frame, freshness

    def model_stats(self, model: str, window: timedelta, task: str | None = None) -> dict[str, Any]:
        now = datetime.now(UTC).replace(tzinfo=None)   # warehouse timestamps are naive UTC
        frame, freshness = self._calls_since(now - window)
        frame = frame.filter(pl.col("model") == model)
        if task is not None:
            frame = frame.filter(pl.col("task") == task)
        ok = frame.filter(pl.col("success"))
        latency = ok["latency_ms"].drop_nulls()
        rates = (ok.filter(pl.col("output_tokens").is_not_null() & (pl.col("latency_ms") > 0))
                 .select(pl.col("output_tokens") / (pl.col("latency_ms") / 1000.0)).to_series())
        costs = frame["cost_usd"]
        rated = frame["rating"].drop_nulls()

        def quantile(q: float) -> float | None:
            # Latency over successful calls, as in the evaluation (a fast failure is not fast service).
            return float(latency.quantile(q, interpolation="linear")) if latency.len() else None

        return json_safe({
            "model": model, "task": task, "window_s": window.total_seconds(), "since": now - window, "until": now,
            "calls": frame.height, "successes": ok.height,
            "success_rate": ok.height / frame.height if frame.height else None,
            "by_role": {r: n for r, n in frame.group_by("role").len().iter_rows()} if frame.height else {},
            "latency_ms": {"p50": quantile(0.5), "p95": quantile(0.95), "p99": quantile(0.99)},
            "output_tokens_per_s": {"median": float(rates.median()) if rates.len() else None, "calls": rates.len()},
            "cost_usd": {"total_known": float(costs.drop_nulls().sum()) if costs.drop_nulls().len() else None,
                         "calls_with_known_cost": costs.drop_nulls().len(), "calls_with_unknown_cost": costs.null_count()},
            "ratings": {"n": rated.len(), "mean": float(rated.mean()) if rated.len() else None},
            "freshness": freshness,
        })
