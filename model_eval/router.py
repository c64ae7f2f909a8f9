"""The application side of a rollout: which model answers a request, and a log of what happened.

The pipeline keeps each task's assignment in the DuckDB warehouse, but applications never open that
file (DuckDB allows one writer at a time, and an app holding it would block the pipeline). Instead
the pipeline publishes a small JSON *snapshot* after every change, with `write_snapshot`, and
applications read it with a `Router`:

    router = Router(Path("warehouse/routing.json"))
    decision = router.route("grading", request_key=user_id)
    choice = decision.primary
    send = litellm.text_completion if choice.uses_text_completion else litellm.completion
    answer = send(**choice.completion_kwargs(), **choice.call_arguments(messages))
    if decision.shadow is not None:      # shadow stage: call the candidate too, off the hot path
        ...                              # log its answer, never show it to the user

Routing is a pure function of (task, request_key) and the snapshot: the same user keeps getting the
same model during a partial rollout, and every process of an app agrees without sharing state.

`CallLog` writes what happened in production to per-process JSONL files; the pipeline loads them
into the warehouse with `model_eval.production_log.ingest_call_logs`.

Snapshot format (one entry per task; `write_snapshot` fills the optional fields):

    {"generated_at": "2025-01-01T00:00:00+00:00",
     "tasks": {"grading": {
        "model": "smollm2-135m", "litellm_model": "openai/smollm2-135m",
        "api_base": "http://127.0.0.1:8765/v1", "api_key_env": null, "params": {"temperature": 0.3},
        "mode": "chat",                       # optional; "completion": a base model, asked with
        "completion_template": null,          #   one prompt laid out by this template
        "candidate": {<the same fields>} | null,
        "stage": "shadow" | "partial" | "full",
        "traffic_share": 0.2,
        "pinned": false}}}

Extra keys in a task entry are kept and ignored, so the pipeline can add bookkeeping fields.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import socket
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any, Literal

from model_eval.errors import InputError, ModelEvalError
from model_eval.prompts import MODES, CompletionTemplate, TemplateError, build_input

logger = logging.getLogger(__name__)

# The rollout stages, in order; the one place their names are defined (promotion and the snapshot use them).
STAGES = ("shadow", "partial", "full")
ROLES = ("primary", "shadow")

# These are set by the router from the entry's own fields; letting `params` set them would let a
# snapshot smuggle in a key or silently point a model somewhere else.
_RESERVED_PARAMS = ("model", "api_base", "api_key", "messages")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_CHOICE_FIELDS = ("model", "litellm_model", "api_base", "api_key_env", "params")

# Stored instead of the raw request key (often a user id): enough bits to group calls by key
# without keeping the identifier itself in files that get copied around.
REQUEST_KEY_HASH_CHARS = 16


class SnapshotError(InputError):
    """The routing snapshot is missing or malformed: names the file and the field to fix."""


class MissingApiKeyError(ModelEvalError):
    """A model's api_key_env names an environment variable that is not set in this process."""


# --------------------------------------------------------------------------------------------------
# What the router hands out


@dataclass(frozen=True)
class ModelChoice:
    """One model as an application calls it: the registry name plus how to reach it."""

    model: str
    litellm_model: str
    api_base: str | None = None
    api_key_env: str | None = None  # the NAME of the variable; the key is read at call time
    params: dict[str, Any] = field(default_factory=dict, hash=False)
    # How the model was evaluated, so an application asks it the same way: chat messages, or
    # (base models) one prompt laid out by the template and sent to the text completion endpoint.
    mode: str = "chat"
    completion_template: dict[str, Any] | None = field(default=None, hash=False)

    @property
    def uses_text_completion(self) -> bool:
        return self.mode == "completion"

    def call_arguments(self, messages: list[dict[str, str]]) -> dict[str, Any]:
        """`messages=` for litellm.completion, or `prompt=` and `stop=` for litellm.text_completion."""
        template = CompletionTemplate.from_mapping(self.completion_template) if self.uses_text_completion else None
        return build_input(messages, self.mode, template).litellm_arguments()

    def completion_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for `litellm.completion(**kwargs, messages=...)`.

        The key is read from the environment on every call rather than when the snapshot is
        loaded, so rotating a key in a long-lived process works and the key is never held in (or
        printed with) the snapshot or a `RouteDecision`.
        """
        kwargs: dict[str, Any] = {"model": self.litellm_model}
        if self.api_base:
            kwargs["api_base"] = self.api_base
        if self.api_key_env:
            key = os.environ.get(self.api_key_env)
            if not key:
                raise MissingApiKeyError(
                    f"model '{self.model}': environment variable {self.api_key_env} (its API key) is not set"
                )
            kwargs["api_key"] = key
        elif self.api_base:
            # Local OpenAI-compatible servers need no key, but the openai client refuses to start
            # without one; the inference engine sends the same placeholder.
            kwargs["api_key"] = "sk-no-key"
        kwargs.update(self.params)
        return kwargs

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model, "litellm_model": self.litellm_model, "api_base": self.api_base,
            "api_key_env": self.api_key_env, "params": dict(self.params), "mode": self.mode,
            "completion_template": self.completion_template,
        }

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ModelChoice:
        """Build from a snapshot entry (already validated by `_normalize_choice`)."""
        return cls(
            model=raw["model"], litellm_model=raw["litellm_model"], api_base=raw.get("api_base"),
            api_key_env=raw.get("api_key_env"), params=dict(raw.get("params") or {}),
            mode=raw.get("mode") or "chat", completion_template=raw.get("completion_template"),
        )


@dataclass(frozen=True)
class RouteDecision:
    """Who answers one request.

    `primary` answers the user. `shadow`, when set, should also be called with the same messages
    and its answer logged (role "shadow") but never returned: that is how a candidate is compared
    on real traffic before it serves anyone.
    """

    task: str | None              # None: a registry model asked for by name, not routed (the gateway's stage "direct")
    request_key: str
    primary: ModelChoice
    shadow: ModelChoice | None
    stage: str
    bucket: float  # in [0, 1); the request's fixed position in the traffic split


def bucket_for(task: str, request_key: str) -> float:
    """The request's position in [0, 1): the first 8 bytes of sha256(task NUL key), big-endian, / 2**64.

    The task is part of the hash so rollouts of different tasks split users independently (the same
    users are not always the guinea pigs); the NUL keeps ("ab", "c") and ("a", "bc") apart.
    """
    digest = hashlib.sha256(f"{task}\0{request_key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def hash_request_key(request_key: str) -> str:
    """What the call log stores instead of the request key: a sha256 hex prefix."""
    return hashlib.sha256(request_key.encode("utf-8")).hexdigest()[:REQUEST_KEY_HASH_CHARS]


# --------------------------------------------------------------------------------------------------
# Snapshot validation, shared by the writer and the reader so the format lives in one place


def _normalize_choice(raw: Any, path: Path | str, where: str) -> dict[str, Any]:
    def fail(message: str, name: str | None = None) -> SnapshotError:
        return SnapshotError(path, message, field=f"{where}.{name}" if name else where)

    if isinstance(raw, ModelChoice):
        raw = raw.to_dict()
    if not isinstance(raw, dict):
        raise fail(f"must be an object with {', '.join(_CHOICE_FIELDS)}, got {type(raw).__name__}")
    for name in ("model", "litellm_model"):
        if not isinstance(raw.get(name), str) or not raw[name].strip():
            raise fail("is required and must be a non-empty string", name)
    api_base = raw.get("api_base")
    if api_base is not None and not isinstance(api_base, str):
        raise fail("must be a string or null", "api_base")
    key_env = raw.get("api_key_env")
    if key_env is not None and (not isinstance(key_env, str) or not _ENV_NAME.match(key_env)):
        # A value that is not a variable name is most likely a pasted key: refuse to publish it.
        raise fail("must be the NAME of an environment variable (never the key itself) or null", "api_key_env")
    params = raw.get("params") or {}
    if not isinstance(params, dict):
        raise fail("must be an object", "params")
    reserved = [k for k in _RESERVED_PARAMS if k in params]
    if reserved:
        raise fail(f"may not set {', '.join(reserved)} (use the entry's own fields)", "params")
    mode = raw.get("mode") or "chat"
    if mode not in MODES:
        raise fail(f"must be one of {', '.join(MODES)}, got {mode!r}", "mode")
    template = raw.get("completion_template")
    if mode == "completion":
        try:
            template = CompletionTemplate.from_mapping(template).as_record()
        except TemplateError as exc:
            raise fail(str(exc), "completion_template" + (f".{exc.field}" if exc.field else "")) from None
    elif template is not None:
        raise fail("only used with mode 'completion'", "completion_template")
    return {"model": raw["model"], "litellm_model": raw["litellm_model"], "api_base": api_base or None,
            "api_key_env": key_env, "params": dict(params), "mode": mode, "completion_template": template}


def _normalize_task(task: Any, raw: Any, path: Path | str) -> dict[str, Any]:
    where = f"tasks.{task}"
    if not isinstance(task, str) or not task:
        raise SnapshotError(path, f"task names must be non-empty strings, got {task!r}", field="tasks")
    if not isinstance(raw, dict):
        raise SnapshotError(path, f"must be an object, got {type(raw).__name__}", field=where)
    entry = dict(raw)  # keep extra bookkeeping keys the pipeline may add
    entry.update(_normalize_choice(raw, path, where))

    stage = raw.get("stage", "full")
    if stage not in STAGES:
        raise SnapshotError(path, f"must be one of {', '.join(STAGES)}, got {stage!r}", field=f"{where}.stage")
    candidate = raw.get("candidate")
    if candidate is not None:
        candidate = _normalize_choice(candidate, path, f"{where}.candidate")
    if stage in ("shadow", "partial") and candidate is None:
        raise SnapshotError(path, f"stage '{stage}' needs a candidate", field=f"{where}.candidate")
    if stage == "full" and candidate is not None:
        # After a full rollout the new model becomes `model`; a leftover candidate is ambiguous
        # (would it answer everyone, or no one?), so it is refused rather than guessed.
        raise SnapshotError(
            path, "must be null in stage 'full' (write the promoted model as 'model')", field=f"{where}.candidate"
        )

    share = raw.get("traffic_share", 0.0)
    if isinstance(share, bool) or not isinstance(share, (int, float)) or not (0.0 <= share <= 1.0):
        raise SnapshotError(path, f"must be a number between 0 and 1, got {share!r}", field=f"{where}.traffic_share")
    pinned = raw.get("pinned", False)
    if not isinstance(pinned, bool):
        raise SnapshotError(path, f"must be true or false, got {pinned!r}", field=f"{where}.pinned")
    entry.update(candidate=candidate, stage=stage, traffic_share=float(share), pinned=pinned)
    return entry


def _normalize_tasks(tasks: Any, path: Path | str) -> dict[str, dict[str, Any]]:
    if not isinstance(tasks, dict):
        raise SnapshotError(path, f"must be an object of task -> assignment, got {type(tasks).__name__}", field="tasks")
    return {task: _normalize_task(task, raw, path) for task, raw in tasks.items()}


def write_snapshot(path: Path, tasks: dict[str, dict[str, Any]]) -> None:
    """Validate the assignments and publish them atomically at `path`.

    Readers see either the old file or the new one, never a half-written one: the JSON goes to a
    temporary file in the same folder (same filesystem, so the rename is atomic) and replaces the
    old file with os.replace. A structure the router could not follow is refused here, in the
    pipeline, instead of breaking applications later.
    """
    path = Path(path)
    normalized = _normalize_tasks(tasks, path)
    document = {"generated_at": datetime.now(UTC).isoformat(), "tasks": normalized}
    try:
        text = json.dumps(document, indent=2, sort_keys=True, allow_nan=False) + "\n"
    except (TypeError, ValueError) as exc:
        raise SnapshotError(path, f"cannot be written as JSON: {exc}", field="tasks") from exc

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())  # the rename must not land before the data does
        os.chmod(tmp_name, 0o644)      # mkstemp creates 0600; apps may run as another user
        os.replace(tmp_name, path)
    except BaseException:
        try:
            os.unlink(tmp_name)
        except FileNotFoundError:
            pass
        raise


def read_snapshot(path: Path) -> tuple[str | None, dict[str, dict[str, Any]]]:
    """Load and validate a snapshot: (generated_at, tasks). Errors name the file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SnapshotError(path, "routing snapshot not found (the pipeline publishes it when it assigns a model)") from None
    except OSError as exc:
        raise SnapshotError(path, f"cannot read routing snapshot: {exc}") from exc
    try:
        document = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        line = getattr(exc, "lineno", None)
        raise SnapshotError(path, f"not valid JSON ({exc})", line=line) from exc
    if not isinstance(document, dict) or "tasks" not in document:
        raise SnapshotError(path, "must be a JSON object with a 'tasks' object")
    generated_at = document.get("generated_at")
    return (str(generated_at) if generated_at is not None else None), _normalize_tasks(document["tasks"], path)


# --------------------------------------------------------------------------------------------------
# The router


@dataclass(frozen=True)
class _Loaded:
    signature: tuple[int, int, int]  # (inode, mtime_ns, size): os.replace always changes the inode
    generated_at: str | None
    tasks: dict[str, dict[str, Any]]
    choices: dict[str, tuple[ModelChoice, ModelChoice | None]]


class Router:
    """Routes requests using the published snapshot, following promotions and rollbacks.

    Safe to share between threads. The file is stat-ed at most every `reload_every_s` seconds and
    re-read only when it changed, so `route` costs a hash and a dict lookup on the hot path.

    A missing or garbled snapshot at start-up raises `SnapshotError`. If the file later turns bad,
    the router keeps serving the last good snapshot (an outage of the routing file must not become
    an outage of the application), logs a warning, exposes the problem as `last_error`, and keeps
    checking.
    """

    def __init__(self, snapshot_path: Path, reload_every_s: float = 5.0):
        self.snapshot_path = Path(snapshot_path)
        self.reload_every_s = float(reload_every_s)
        self.last_error: SnapshotError | None = None
        self._lock = threading.Lock()
        self._loaded = self._load()
        self._checked_at = time.monotonic()

    # -- public ---------------------------------------------------------------------------------

    @property
    def tasks(self) -> list[str]:
        return sorted(self._current().tasks)

    @property
    def generated_at(self) -> str | None:
        return self._current().generated_at

    def assignment(self, task: str) -> dict[str, Any]:
        """The task's snapshot entry (a copy), e.g. to show the stage and share in a status page."""
        return json.loads(json.dumps(self._entry(self._current(), task)))

    def route(self, task: str, request_key: str) -> RouteDecision:
        if not isinstance(request_key, str):
            # str(123) and "123" would share a bucket silently; make the caller choose.
            raise TypeError(f"request_key must be a str, got {type(request_key).__name__}")
        loaded = self._current()
        entry = self._entry(loaded, task)
        assigned, candidate = loaded.choices[task]
        stage = entry["stage"]
        bucket = bucket_for(task, request_key)

        primary, shadow = assigned, None
        if stage == "shadow":
            shadow = candidate
        elif stage == "partial" and bucket < entry["traffic_share"]:
            primary = candidate
        return RouteDecision(task=task, request_key=request_key, primary=primary, shadow=shadow,
                             stage=stage, bucket=bucket)

    def reload(self) -> bool:
        """Check the file now (ignoring the interval). True when a new snapshot was loaded."""
        with self._lock:
            return self._refresh()

    # -- internals ------------------------------------------------------------------------------

    def _entry(self, loaded: _Loaded, task: str) -> dict[str, Any]:
        try:
            return loaded.tasks[task]
        except KeyError:
            known = ", ".join(sorted(loaded.tasks)) or "none"
            raise KeyError(f"unknown task '{task}' in {self.snapshot_path} (known tasks: {known})") from None

    def _current(self) -> _Loaded:
        due = time.monotonic() - self._checked_at >= self.reload_every_s
        # Non-blocking: if another thread is already checking, use the snapshot we have.
        if due and self._lock.acquire(blocking=False):
            try:
                if time.monotonic() - self._checked_at >= self.reload_every_s:  # not just done by another thread
                    self._refresh()
            finally:
                self._lock.release()
        return self._loaded

    def _signature(self) -> tuple[int, int, int]:
        try:
            st = os.stat(self.snapshot_path)
        except FileNotFoundError:
            raise SnapshotError(self.snapshot_path, "routing snapshot not found (the pipeline publishes it when it assigns a model)") from None
        return (st.st_ino, st.st_mtime_ns, st.st_size)

    def _load(self) -> _Loaded:
        signature = self._signature()
        generated_at, tasks = read_snapshot(self.snapshot_path)
        choices = {
            task: (ModelChoice.from_dict(entry),
                   ModelChoice.from_dict(entry["candidate"]) if entry["candidate"] else None)
            for task, entry in tasks.items()
        }
        return _Loaded(signature=signature, generated_at=generated_at, tasks=tasks, choices=choices)

    def _refresh(self) -> bool:
        self._checked_at = time.monotonic()
        try:
            if self._signature() == self._loaded.signature:
                self.last_error = None
                return False
            self._loaded = self._load()
        except SnapshotError as exc:
            if str(exc) != str(self.last_error):  # warn once per distinct problem, not every check
                logger.warning("keeping the last good routing snapshot: %s", exc)
            self.last_error = exc
            return False
        self.last_error = None
        logger.info("routing snapshot reloaded from %s (generated_at %s)", self.snapshot_path, self._loaded.generated_at)
        return True


# --------------------------------------------------------------------------------------------------
# The production call log


def _safe_host() -> str:
    return re.sub(r"[^A-Za-z0-9.-]", "_", socket.gethostname()) or "host"


class CallLog:
    """Appends one JSON line per production call to `<folder>/calls-<YYYYMMDD>-<host>-<pid>.jsonl`.

    Each process writes its own file, so appends never contend with another process nor with the
    pipeline's DuckDB writes. Within a process (several threads), every line goes out in a single
    O_APPEND write, which the kernel does not interleave with other appends to the same file. The
    date is the UTC date of the call, so files roll over daily; the pid is looked up per call, so a
    CallLog created before a fork still gives each worker its own file.

    Privacy: the request key is stored only as a sha256 prefix, and any API key the decision's
    models use is redacted from the line (error messages sometimes echo request headers). Do not
    put raw user data in `extra`.
    """

    MAX_ERROR_CHARS = 2000

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self._host = _safe_host()
        self._current: tuple[tuple[date, int], Path] | None = None   # ((UTC date, pid), its file)

    def path_for(self, when: datetime | None = None) -> Path:
        when = when or datetime.now(UTC)
        return self.folder / f"calls-{when:%Y%m%d}-{self._host}-{os.getpid()}.jsonl"

    def _file_for(self, now: datetime) -> Path:
        """path_for(now), built once per day and process: formatting it costs more than the write itself."""
        key = (now.date(), os.getpid())
        current = self._current   # one tuple, replaced whole: threads never see a key with another day's file
        if current is None or current[0] != key:
            current = self._current = (key, self.path_for(now))
        return current[1]

    def record(
        self,
        decision: RouteDecision,
        model: str,
        *,
        latency_ms: float,
        input_tokens: int | None,
        output_tokens: int | None,
        success: bool,
        error: str | None = None,
        rating: float | None = None,
        role: Literal["primary", "shadow"],
        extra: dict[str, Any] | None = None,
        call_id: str | None = None,
        cost_usd: float | None = None,
    ) -> str:
        """Log one call and return its call_id (keep it to `rate` the answer later).

        `cost_usd` is None when the price or the token counts are unknown (never 0 for unknown).
        """
        if role not in ROLES:
            raise ValueError(f"role must be one of {', '.join(ROLES)}, got {role!r}")
        if role == "shadow" and decision.shadow is None:
            raise ValueError(f"role 'shadow' but the decision for task '{decision.task}' has no shadow model")
        now = datetime.now(UTC)
        call_id = call_id or str(uuid.uuid4())
        line = {
            "event": "call", "call_id": call_id, "ts": now.isoformat(), "task": decision.task,
            "request_key_hash": hash_request_key(decision.request_key), "model": model, "role": role,
            "stage": decision.stage, "bucket": decision.bucket, "latency_ms": float(latency_ms),
            "input_tokens": None if input_tokens is None else int(input_tokens),
            "output_tokens": None if output_tokens is None else int(output_tokens),
            "success": bool(success),
            "error": None if error is None else str(error)[: self.MAX_ERROR_CHARS],
            "rating": _check_rating(rating), "extra": extra or None,
            "cost_usd": None if cost_usd is None else float(cost_usd),
        }
        secrets = [os.environ.get(c.api_key_env) for c in (decision.primary, decision.shadow) if c and c.api_key_env]
        self._append(line, now, [s for s in secrets if s])
        return call_id

    def rate(self, call_id: str, rating: float, comment: str | None = None) -> None:
        """Attach a rating (e.g. user feedback) to an earlier call; the latest rating wins on ingest.

        May be called from any process: ingestion matches ratings to calls across files. The gateway
        takes ratings in [0, 1] (thumbs up 1, down 0) so every task's ratings share one scale.
        """
        if not isinstance(call_id, str) or not call_id:
            raise ValueError("call_id must be the non-empty string returned by record()")
        if rating is None:
            raise ValueError("rating must be a number")
        now = datetime.now(UTC)
        event = {"event": "rating", "call_id": call_id, "ts": now.isoformat(), "rating": _check_rating(rating)}
        if comment:
            event["comment"] = str(comment)[: self.MAX_ERROR_CHARS]
        self._append(event, now, [])

    def _append(self, record: dict[str, Any], now: datetime, secrets: list[str]) -> None:
        try:
            text = json.dumps(record, separators=(",", ":"), allow_nan=False, default=str)
        except ValueError as exc:
            raise ValueError(f"call log line is not valid JSON (NaN or infinity?): {exc}") from exc
        for secret in secrets:
            text = text.replace(secret, "[REDACTED]").replace(json.dumps(secret)[1:-1], "[REDACTED]")
        data = (text + "\n").encode("utf-8")
        fd = os.open(self._file_for(now), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            written = os.write(fd, data)
            # Regular files practically never take a short write (disk full aside); if one does,
            # finish the line rather than leave a fragment that would glue onto the next one.
            while written < len(data):
                written += os.write(fd, data[written:])
        finally:
            os.close(fd)


def _check_rating(rating: float | None) -> float | None:
    if rating is None:
        return None
    if isinstance(rating, bool) or not isinstance(rating, (int, float)) or not math.isfinite(rating):
        raise ValueError(f"rating must be a finite number, got {rating!r}")
    return float(rating)
