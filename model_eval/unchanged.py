"""Evaluations a run would repeat exactly, which `model-eval run` reuses instead of running again.

An evaluation of a model on a task is unchanged since an earlier one when that earlier one is the
newest evaluation of the model on the task's current golden version (the one recommendations rest on),
ended complete with every call answered and none failed, and everything that decides its rows is the
same now:

* the requests: their cache keys cover the model's settings, the rendered prompts, the call parameters
  and the repeats;
* the golden cases file (its hash: the expected answers) and task.yaml (the scorer and its settings);
* the scoring code;
* the model's prices (the registry's, else litellm's price map), which cost each answer;

and every answer is still in the response cache, young enough for this run's cache age (`--fresh`
asks for age 0, so it never reuses). Its inference rows, scores and metrics would come out the same, so
the run records which evaluation it reused (`reused_evaluations`) and the recommendation rests on that
evaluation's metrics, as it always rests on each model's newest evaluation.

Judged tasks are always run: their scores depend on a judge model's answers, which are not covered here.
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from model_eval.duckdb_files import table_exists
from model_eval.golden import TaskSpec
from model_eval.golden_validation import file_sha256
from model_eval.inference import iter_requests, prices_per_million
from model_eval.project import Project
from model_eval.registry import ModelSpec

PACKAGE_DIR = Path(__file__).resolve().parent

# The newest evaluation of each task by one model on the task's current golden version, as the
# recommendation picks it (metrics.LATEST_METRICS_SQL), with how it ended and what it was made of.
NEWEST_EVALUATIONS_SQL = """
WITH newest AS (
    SELECT m.eval_run_id, m.task, m.dataset_version FROM model_task_metrics m
    JOIN golden_versions v ON v.task = m.task AND v.dataset_version = m.dataset_version AND v.is_current
    WHERE m.model = $model
    QUALIFY row_number() OVER (PARTITION BY m.task ORDER BY m.evaluated_at DESC) = 1)
SELECT n.task, n.eval_run_id, s.status, s.calls_saved, s.inputs_fingerprint
FROM newest n JOIN evaluation_status s ON s.eval_run_id = n.eval_run_id AND s.model = $model AND s.task = n.task"""

CURRENT_GOLDEN_FILES_SQL = "SELECT task, file_hash FROM golden_versions WHERE is_current"


@functools.cache
def scoring_code_version() -> str:
    """A hash of the code that turns answers into scores: a change to it makes every evaluation new."""
    digest = hashlib.sha256()
    for path in sorted([PACKAGE_DIR / "scoring.py", *(PACKAGE_DIR / "scorers").rglob("*.py")]):
        digest.update(f"{path.relative_to(PACKAGE_DIR)}\0".encode() + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def inputs_fingerprint(request_keys: list[str], golden_file_hash: str, task_file_sha256: str,
                       prices: tuple[float, float] | None, scoring_code: str | None = None) -> str:
    """What decides one (model, task) evaluation's rows, other than the answers the keys stand for.
    `prices`: USD per million input and output tokens (a price is not part of a request's key: a new
    price leaves every answer valid, but not the cost recorded with it)."""
    parts = {"keys": hashlib.sha256("\n".join(sorted(request_keys)).encode()).hexdigest(),
             "golden_file": golden_file_hash, "task_file": task_file_sha256,
             "prices": None if prices is None else [float(p) for p in prices],
             "scoring_code": scoring_code or scoring_code_version()}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]


def recorded_fingerprints(conn, spec: ModelSpec, tasks: list[TaskSpec], part_files: list[str]) -> dict[str, str | None]:
    """Per task, the fingerprint of `spec`'s evaluation just answered (its rows in `part_files`); None
    where a call failed (a later run asks it again, so nothing can be reused from this one)."""
    if not part_files:
        return {}
    golden = dict(conn.sql(CURRENT_GOLDEN_FILES_SQL).fetchall())
    rows = conn.execute("""SELECT task, list(cache_key), count(*) FILTER (WHERE error_class IS NOT NULL)
                           FROM read_parquet(?) GROUP BY task""", [part_files]).fetchall()
    by_name = {t.name: t for t in tasks}
    prices = prices_per_million(spec)
    return {task: inputs_fingerprint(keys, golden[task], file_sha256(by_name[task].task_file), prices)
            if not failed and task in golden and task in by_name else None
            for task, keys, failed in rows}


@dataclass(frozen=True)
class Reuse:
    task: str
    eval_run_id: str      # the evaluation reused


def reusable_evaluations(conn, cache, project: Project, spec: ModelSpec, task_names: list[str],
                         cache_max_age_s: float | None) -> list[Reuse]:
    """The tasks among `task_names` on which evaluating `spec` again would repeat its newest evaluation
    exactly (see the module docstring). `conn`: a warehouse connection; `cache`: the response cache."""
    tasks = [t for t in project.select_tasks(task_names) if spec.serves(t.name, t.tier) and not t.is_judged]
    if not tasks or cache_max_age_s == 0 or not table_exists(conn, "evaluation_status"):
        return []
    newest = {task: (run, status, saved, fingerprint) for task, run, status, saved, fingerprint
              in conn.sql(NEWEST_EVALUATIONS_SQL, params={"model": spec.name}).fetchall()}
    candidates = [t for t in tasks if t.name in newest and newest[t.name][1] == "complete" and not newest[t.name][2]
                  and newest[t.name][3] is not None]
    if not candidates:
        return []
    from model_eval.steps.evaluation import CURRENT_CASES_FOR_INFERENCE

    golden = dict(conn.sql(CURRENT_GOLDEN_FILES_SQL).fetchall())
    cases = conn.sql(CURRENT_CASES_FOR_INFERENCE, params={"tasks": [t.name for t in candidates]}).fetchall()
    columns = ("task", "dataset_version", "case_id", "inputs_json")
    keys: dict[str, list[str]] = defaultdict(list)
    for request in iter_requests(spec, candidates, (dict(zip(columns, row)) for row in cases)):
        keys[request.task].append(request.key)
    reuses = []
    prices = prices_per_million(spec)
    for task in candidates:
        wanted = inputs_fingerprint(keys[task.name], golden.get(task.name, ""), file_sha256(task.task_file), prices)
        if wanted == newest[task.name][3] and cache.count_present(keys[task.name], cache_max_age_s) == len(set(keys[task.name])):
            reuses.append(Reuse(task.name, newest[task.name][0]))
    return reuses


def served_tasks(project: Project, spec: ModelSpec, task_names: list[str]) -> list[str]:
    return [t.name for t in project.select_tasks(task_names) if spec.serves(t.name, t.tier)]


def reusable_by_model(project: Project, models: list[ModelSpec], task_names: list[str],
                      max_cache_age_hours: float | None) -> dict[str, list[Reuse]]:
    """`reusable_evaluations` for each model, from one warehouse read and one open cache."""
    from model_eval import warehouse
    from model_eval.response_cache import ResponseCache

    found: dict[str, list[Reuse]] = {spec.name: [] for spec in models}
    paths = project.paths
    if max_cache_age_hours == 0 or not paths.warehouse_file.exists() or not paths.cache_file.exists():
        return found
    age_s = None if max_cache_age_hours is None else max_cache_age_hours * 3600
    with warehouse.read_connection(paths.warehouse_file) as conn, ResponseCache(paths.cache_file) as cache:
        for spec in models:
            found[spec.name] = reusable_evaluations(conn, cache, project, spec, task_names, age_s)
    return found


def record_reuses(warehouse_file: Path, eval_run_id: str, reused: dict[str, list[Reuse]]) -> None:
    from model_eval import warehouse
    from model_eval.steps._common import utc_now

    rows = [[eval_run_id, model, r.task, r.eval_run_id, utc_now()] for model, reuses in reused.items() for r in reuses]
    with warehouse.write_connection(warehouse_file) as conn, warehouse.transaction(conn):
        conn.execute("DELETE FROM reused_evaluations WHERE eval_run_id = ?", [eval_run_id])
        conn.executemany("INSERT INTO reused_evaluations VALUES (?, ?, ?, ?, ?)", rows)
