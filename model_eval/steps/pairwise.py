"""Step `pairwise_win_rates`: for judge tasks that name a `pairwise.reference_model`, every other enabled
model's newest answers judged against the reference's, answer by answer, in both orders.

It runs once every model has answered (in the `recommend` job), because a pair needs both answers. A
judge only compares when its newest calibration for this rubric passed; otherwise the log says why.
The win rate is reported beside accuracy, never as accuracy.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import polars as pl

from model_eval import warehouse
from model_eval.golden import TaskSpec
from model_eval.inference import CompletionFn, RetryPolicy
from model_eval.judge import JudgeItem, JudgeSettings, candidate_preference, judge_items, pairwise_messages, task_prompt
from model_eval.project import Project
from model_eval.response_cache import ResponseCache
from model_eval.serving import local_models_served
from model_eval.stats import wilson_interval
from model_eval.steps._common import Log, utc_now
from model_eval.steps.consensus import newest_answers
from model_eval.steps.judging import judge_of

CALIBRATION_OF = """
SELECT passed, reason FROM judge_calibrations
WHERE task = $task AND judge_config_hash = $judge AND rubric_hash = $rubric ORDER BY calibrated_at DESC LIMIT 1"""

CURRENT_INPUTS = """
SELECT c.case_id, c.inputs_json FROM golden_cases c JOIN golden_versions v USING (task, dataset_version, file_hash)
WHERE v.is_current AND c.task = $task"""


@dataclass(frozen=True)
class PairwiseOutcome:
    win_rates: pl.DataFrame      # rows of `pairwise_win_rates`
    calls_sent: int
    notes: dict[str, str]        # task -> what happened, for logs and metadata


def compute_win_rates(project: Project, eval_run_id: str, log: Log, completing: str | None = None, *,
                      retry: RetryPolicy = RetryPolicy(), completion: CompletionFn | None = None) -> PairwiseOutcome:
    """Win rates from each model's newest complete evaluation (and `completing`, whose partitions have all finished)."""
    models = [m.name for m in project.registry.models if m.enabled]
    rows, judge_frames, notes, sent = [], [], {}, 0
    pairwise_tasks = [task for task in project.tasks if task.is_judged and task.scorer_settings.get("pairwise")]
    if not pairwise_tasks:
        # Nothing to judge, nothing to write: a warehouse write costs a copy of the file.
        return PairwiseOutcome(pl.DataFrame(), 0, notes)
    with ResponseCache(project.paths.cache_file) as cache:
        for task in pairwise_tasks:
            settings = JudgeSettings.of(task, project.deployment.judges.min_kappa)
            spec, unusable = judge_of(project, settings)
            with warehouse.read_connection(project.paths.warehouse_file) as conn:
                calibration = None if spec is None else conn.sql(CALIBRATION_OF, params={
                    "task": task.name, "judge": spec.config_hash, "rubric": settings.rubric_hash}).fetchall()
                answers = newest_answers(conn, task.name, task.dataset_version, models, completing)
                inputs = {c: json.loads(i) for c, i in conn.sql(CURRENT_INPUTS, params={"task": task.name}).fetchall()}
            reference = settings.reference_model
            if unusable:
                notes[task.name] = f"no win rates: judge {settings.judge_model} cannot run ({unusable})"
            elif not calibration or not calibration[0][0]:
                notes[task.name] = ("no win rates: " + calibration[0][1]) if calibration else \
                    f"no win rates: judge {spec.name} has not been calibrated with this rubric yet"
            elif answers.filter(pl.col("model") == reference).is_empty():
                notes[task.name] = f"no win rates: reference model {reference} has no answers on version {task.dataset_version}"
            else:
                with local_models_served(project.registry, [spec], project.paths.warehouse_file.parent / "run"):
                    task_rows, frame, calls = _task_win_rates(task, settings, spec, answers, inputs, cache, retry, completion)
                rows += task_rows
                judge_frames.append(frame)
                sent += calls
                notes[task.name] = "; ".join(f"{r['model']} against {reference}: win rate "
                                             f"{'-' if r['win_rate'] is None else format(r['win_rate'], '.2f')} over {r['cases']} cases"
                                             for r in task_rows) or "no other model answered"
            log.info(f"task {task.name}: {notes[task.name]}")
    now = utc_now()
    win_rates = pl.DataFrame([{**r, "eval_run_id": eval_run_id, "judged_at": now} for r in rows])
    judged = [f for f in judge_frames if f.height]
    with warehouse.write_connection(project.paths.warehouse_file) as conn, warehouse.transaction(conn):
        warehouse.replace_rows(conn, "pairwise_win_rates", win_rates, {"eval_run_id": eval_run_id})
        calls = pl.concat(judged).with_columns(pl.lit(eval_run_id).alias("eval_run_id"), pl.lit(now).alias("judged_at")) \
            if judged else pl.DataFrame()
        warehouse.replace_rows(conn, "judge_results", calls, {"eval_run_id": eval_run_id, "purpose": "pairwise"})
    return PairwiseOutcome(win_rates, sent, notes)


def _task_win_rates(task: TaskSpec, settings: JudgeSettings, spec, answers: pl.DataFrame, inputs: dict[str, Any],
                    cache, retry, completion):
    """Each (case, repeat) judged twice, the candidate first then the reference first; the verdicts averaged."""
    reference = settings.reference_model
    theirs = {(r["case_id"], r["repeat"]): r for r in answers.filter(pl.col("model") == reference).iter_rows(named=True)
              if r["error_class"] is None and (r["response_text"] or "").strip()}
    reference_run = answers.filter(pl.col("model") == reference)["eval_run_id"][0]
    items, decided = [], defaultdict(dict)
    for row in answers.filter(pl.col("model") != reference).iter_rows(named=True):
        pair = (row["case_id"], row["repeat"])
        if pair not in theirs or row["case_id"] not in inputs:
            continue                                   # nothing to compare with: left out
        if row["error_class"] is not None or not (row["response_text"] or "").strip():
            decided[row["model"]][pair] = 0.0          # no answer loses to an answer, without asking the judge
            continue
        prompt = task_prompt(task, inputs[row["case_id"]])
        mine, other = row["response_text"], theirs[pair]["response_text"]
        for position, first, second in (("candidate_first", mine, other), ("reference_first", other, mine)):
            items.append(JudgeItem(purpose="pairwise", task=task.name, dataset_version=task.dataset_version,
                                   case_id=row["case_id"], model=row["model"], repeat=row["repeat"], mode="pairwise",
                                   position=position, reference_model=reference,
                                   messages=pairwise_messages(settings, prompt, first, second)))
    orders: dict[str, dict[tuple[str, int], list[float | None]]] = defaultdict(lambda: defaultdict(list))
    frame, sent = pl.DataFrame(), 0
    if items:
        run = judge_items(spec, items, cache, settings, retry=retry, completion=completion)
        frame, sent = run.frame().with_columns(pl.lit(settings.rubric_hash).alias("rubric_hash")), run.calls_sent
        for item, verdict in zip(items, run.final):
            orders[item.model][(item.case_id, item.repeat)].append(candidate_preference(item.position, verdict))
    runs = dict(answers.select("model", "eval_run_id").unique().iter_rows())
    rows = [{**win_rate_row(model, task, reference, reference_run, spec.name, settings.rubric_hash,
                            decided.get(model, {}), orders.get(model, {})), "candidate_eval_run_id": runs[model]}
            for model in sorted(set(decided) | set(orders))]
    return rows, frame, sent


def win_rate_row(model: str, task: TaskSpec, reference: str, reference_run: str, judge: str, rubric_hash: str,
                 decided: dict[tuple[str, int], float], orders: dict[tuple[str, int], list[float | None]]) -> dict[str, Any]:
    """Win rate over cases (each case the mean of its repeats' outcomes), with a Wilson interval over cases.

    A comparison's outcome is the mean of its two orders (1 win, 0.5 tie, 0 loss); a comparison with
    an unusable verdict in either order is unresolved and left out. Position consistency is the share
    of judged comparisons whose two orders agree."""
    outcomes = dict(decided)
    unresolved = consistent = 0
    for pair, preferences in orders.items():
        if len(preferences) != 2 or any(p is None for p in preferences):
            unresolved += 1
            continue
        outcomes[pair] = sum(preferences) / 2
        consistent += preferences[0] == preferences[1]
    per_case: dict[str, list[float]] = defaultdict(list)
    for (case_id, _), outcome in outcomes.items():
        per_case[case_id].append(outcome)
    case_rates = [sum(v) / len(v) for v in per_case.values()]
    n = len(case_rates)
    low, high = wilson_interval(sum(case_rates), n) if n else (None, None)
    judged = len(outcomes) - len(decided)
    return {"model": model, "task": task.name, "dataset_version": task.dataset_version, "reference_model": reference,
            "reference_eval_run_id": reference_run, "judge_model": judge, "rubric_hash": rubric_hash, "cases": n,
            "comparisons": len(outcomes), "wins": sum(o > 0.5 for o in outcomes.values()),
            "ties": sum(o == 0.5 for o in outcomes.values()), "losses": sum(o < 0.5 for o in outcomes.values()),
            "unresolved": unresolved, "win_rate": sum(case_rates) / n if n else None, "win_rate_low": low,
            "win_rate_high": high, "position_consistency": consistent / judged if judged else None}
