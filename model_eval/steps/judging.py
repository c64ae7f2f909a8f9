"""The judging half of step `scores`: a judge task's answers graded by its judge model, once the judge
has passed calibration on the task's human-labelled answers. Returns rows; `evaluation.score_model`
writes them with the other scores in one transaction. (Pairwise win rates compare models, so they are
judged once every model has answered: `steps/pairwise.py`.)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import polars as pl

from model_eval.golden import TaskSpec, read_calibration_cases
from model_eval.inference import CompletionFn, RetryPolicy
from model_eval.judge import JudgeItem, JudgeRun, JudgeSettings, judge_items, pointwise_messages, task_prompt
from model_eval.judge_calibration import Calibration, calibration_items, summarise
from model_eval.project import Project
from model_eval.registry import ModelSpec, availability
from model_eval.response_cache import ResponseCache
from model_eval.scorers.similarity import tokens
from model_eval.serving import local_models_served
from model_eval.steps._common import Log, utc_now


@dataclass(frozen=True)
class TaskJudgement:
    task: str
    judge_model: str
    scored: bool
    reason: str                          # why it was or was not scored: the run says it
    calibration: Calibration | None


@dataclass
class Judging:
    scores: list[dict[str, Any]] = field(default_factory=list)                 # rows for `scores`
    judge_frames: list[pl.DataFrame] = field(default_factory=list)             # rows for `judge_results`
    calibrations: list[Calibration] = field(default_factory=list)
    tasks: dict[str, TaskJudgement] = field(default_factory=dict)
    calls_sent: int = 0
    calls_cached: int = 0

    def judge_results(self, eval_run_id: str) -> pl.DataFrame:
        frames = [f for f in self.judge_frames if f.height]
        if not frames:
            return pl.DataFrame()
        return pl.concat(frames).with_columns(pl.lit(eval_run_id).alias("eval_run_id"), pl.lit(utc_now()).alias("judged_at"))


def judge_model_results(project: Project, model_name: str, results: pl.DataFrame,
                        cases: dict[tuple[str, str, str], tuple[dict[str, Any], Any]], log: Log, *,
                        retry: RetryPolicy = RetryPolicy(), completion: CompletionFn | None = None) -> Judging:
    """Judge `results` (inference rows of judge tasks, one model, one eval run); `cases` maps the current
    golden cases (task, version, case) to (inputs, reference answer or None)."""
    judging = Judging()
    tasks = {t.name: t for t in project.tasks if t.is_judged}
    names = sorted(set(results["task"].to_list()) & set(tasks))
    if not names:
        return judging
    with ResponseCache(project.paths.cache_file) as cache:
        for name in names:
            task = tasks[name]
            settings = JudgeSettings.of(task, project.deployment.judges.min_kappa)
            spec, unusable = judge_of(project, settings)
            if unusable:
                reason = f"judge {settings.judge_model} cannot run ({unusable}), so task {name} is not scored"
                judging.tasks[name] = TaskJudgement(name, settings.judge_model, False, reason, None)
                log.warning(f"task {name}: {reason}")
                continue
            rows = results.filter(pl.col("task") == name)
            with local_models_served(project.registry, [spec], project.paths.warehouse_file.parent / "run"):
                calibration = _calibrate(task, settings, spec, cache, judging, retry, completion)
                if not calibration.passed:
                    judging.tasks[name] = TaskJudgement(name, spec.name, False, calibration.reason, calibration)
                    log.warning(f"task {name}: {calibration.reason}")
                    continue
                log.info(f"task {name}: {calibration.reason}")
                _judge_answers(task, settings, spec, model_name, rows, cases, cache, judging, retry, completion)
            judging.tasks[name] = TaskJudgement(name, spec.name, True, calibration.reason, calibration)
    return judging


def judge_of(project: Project, settings: JudgeSettings) -> tuple[ModelSpec | None, str | None]:
    """The judge's registry entry, or why it cannot run now. Like a candidate whose key is missing, a judge
    that cannot run skips its task with the reason; the other tasks run."""
    if settings.judge_model not in project.registry.names():
        return None, f"it is not in the registry {project.registry.path.name}"
    spec = project.registry.get(settings.judge_model)
    unusable = "it is disabled in the registry" if not spec.enabled else availability(spec)
    return (None, unusable) if unusable else (spec, None)


def _run(spec: ModelSpec, items: list[JudgeItem], cache, settings, judging: Judging, retry, completion) -> JudgeRun:
    run = judge_items(spec, items, cache, settings, retry=retry, completion=completion)
    judging.calls_sent += run.calls_sent
    judging.calls_cached += run.calls_cached
    judging.judge_frames.append(run.frame().with_columns(pl.lit(settings.rubric_hash).alias("rubric_hash")))
    return run


def _calibrate(task: TaskSpec, settings: JudgeSettings, spec: ModelSpec, cache, judging: Judging, retry, completion) -> Calibration:
    cases = read_calibration_cases(task)
    run = _run(spec, calibration_items(task, settings, cases), cache, settings, judging, retry, completion)
    calibration = summarise(task, settings, spec, cases, run)
    judging.calibrations.append(calibration)
    return calibration


def _judge_answers(task, settings, spec, model_name, rows: pl.DataFrame, cases, cache, judging: Judging, retry, completion) -> None:
    items, bases = [], []
    for row in rows.iter_rows(named=True):
        base = {k: row[k] for k in ("eval_run_id", "model", "task", "dataset_version", "case_id", "repeat", "latency_ms",
                                    "input_tokens", "output_tokens", "cost_usd")} | {"scorer": task.scorer}
        key = (row["task"], row["dataset_version"], row["case_id"])
        if key not in cases:
            judging.scores.append({**base, "score": 0.0, "correct": False, "parsed": None,
                                   "reason": "case is not in the current golden set", "call_failed": row["error_class"] is not None})
        elif row["error_class"] is not None:
            judging.scores.append({**base, "score": 0.0, "correct": False, "parsed": None,
                                   "reason": f"call failed: {row['error_class']}", "call_failed": True})
        elif not (row["response_text"] or "").strip():
            judging.scores.append({**base, "score": 0.0, "correct": False, "parsed": None, "reason": "empty response",
                                   "call_failed": False})
        else:
            inputs, reference = cases[key]
            items.append(JudgeItem(purpose="score", task=task.name, dataset_version=row["dataset_version"], case_id=row["case_id"],
                                   model=model_name, repeat=row["repeat"],
                                   messages=pointwise_messages(settings, task_prompt(task, inputs), row["response_text"], reference)))
            bases.append((base, row["response_text"]))
    if not items:
        return
    run = _run(spec, items, cache, settings, judging, retry, completion)
    for (base, answer), verdict in zip(bases, run.final):
        # Repeats that say the same thing in the same words count as consistent.
        parsed = " ".join(tokens(answer)) or None
        if verdict.score is None:
            judging.scores.append({**base, "score": 0.0, "correct": False, "parsed": parsed, "call_failed": False,
                                   "reason": f"judge {spec.name} gave no usable verdict after {settings.max_verdict_attempts} "
                                             f"attempt(s): {verdict.problem}"})
            continue
        correct = verdict.score >= settings.pass_threshold
        judging.scores.append({**base, "score": verdict.score, "correct": correct, "parsed": parsed, "call_failed": False,
                               "reason": f"judge {spec.name}: {verdict.score:.2f} ({'at or above' if correct else 'below'} "
                                         f"{settings.pass_threshold:g}): {verdict.reason}"[:2000]})
