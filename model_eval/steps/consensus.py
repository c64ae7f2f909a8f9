"""Step `consensus`: for every task with a `consensus` section, each case's consensus answer across the
enabled models (each model's newest answers on the current golden version) and each model's agreement
with it. Rules: `model_eval/consensus.py`."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import polars as pl

from model_eval import eval_runs, warehouse
from model_eval.consensus import agrees_with, case_consensus, model_answer, normalise
from model_eval.project import Project
from model_eval.steps._common import Log, utc_now

NEWEST_ANSWERS = """
WITH newest AS (
    SELECT model, eval_run_id FROM inference_results
    WHERE task = $task AND dataset_version = $version AND list_contains($models::VARCHAR[], model)
      -- as for metrics: no evaluation still running or left incomplete, except the one being completed now
      AND eval_run_id NOT IN (SELECT eval_run_id FROM eval_runs
                              WHERE list_contains($unfinished::VARCHAR[], status) AND eval_run_id IS DISTINCT FROM $completing)
    GROUP BY model, eval_run_id
    QUALIFY row_number() OVER (PARTITION BY model ORDER BY max(completed_at) DESC) = 1)
SELECT r.model, r.eval_run_id, r.case_id, r.repeat, r.response_text, r.error_class
FROM inference_results r JOIN newest USING (model, eval_run_id)
WHERE r.task = $task AND r.dataset_version = $version"""

ANSWER_COLUMN_TYPES = {"consensus_answer": pl.String, "consensus_text": pl.String, "consensus_model": pl.String, "supporters": pl.List(pl.String),
                       "agreement": pl.Float64, "tie_broken_by": pl.String, "source_eval_runs": pl.List(pl.String)}
AGREEMENT_COLUMN_TYPES = {"agreement_rate": pl.Float64, "loo_agreement_rate": pl.Float64, "loo_cases": pl.Int64}


@dataclass(frozen=True)
class ConsensusResult:
    answers: pl.DataFrame        # rows of `consensus_answers`
    agreement: pl.DataFrame      # rows of `consensus_agreement`


def compute_consensus(project: Project, eval_run_id: str, log: Log, completing: str | None = None) -> ConsensusResult:
    """Compute and record (replacing this eval run's rows) the consensus of every task that asks for one, from
    complete evaluations only (and `completing`, whose partitions have all finished), as metrics are."""
    models = [m.name for m in project.registry.models if m.enabled]
    answer_rows, agreement_rows = [], []
    with warehouse.read_connection(project.paths.warehouse_file) as conn:
        for task in project.tasks:
            if task.consensus is None:
                continue
            frame = newest_answers(conn, task.name, task.dataset_version, models, completing)
            answers, replies, runs = _answers_by_case(frame, task.output_kind, task.consensus)
            if len({m for per_case in answers.values() for m in per_case}) < 2:
                log.info(f"task {task.name}: consensus needs answers from at least 2 models; found {len(runs)}")
                continue
            rows, agreements = _task_consensus(task, answers, replies, runs, eval_run_id)
            answer_rows += rows
            agreement_rows += agreements
            reached = [r for r in rows if r["consensus_answer"] is not None]
            log.info(f"task {task.name}: consensus on {len(reached)} of {len(rows)} cases; agreement with it: "
                     + ", ".join(f"{a['model']} {a['agreement_rate']:.2f}" for a in agreements if a["agreement_rate"] is not None))
    answers_frame = pl.DataFrame(answer_rows, schema_overrides=ANSWER_COLUMN_TYPES)
    agreement_frame = pl.DataFrame(agreement_rows, schema_overrides=AGREEMENT_COLUMN_TYPES)
    with warehouse.write_connection(project.paths.warehouse_file) as conn, warehouse.transaction(conn):
        warehouse.replace_rows(conn, "consensus_answers", answers_frame, {"eval_run_id": eval_run_id})
        warehouse.replace_rows(conn, "consensus_agreement", agreement_frame, {"eval_run_id": eval_run_id})
    return ConsensusResult(answers_frame, agreement_frame)


def newest_answers(conn, task: str, version: str, models: list[str], completing: str | None = None) -> pl.DataFrame:
    """Each of `models`' answers (every case and repeat) from its newest complete eval run on this task version."""
    # Not eval_runs.admitted: that lists runs with scores, and a judge task whose judge failed calibration has none.
    return conn.sql(NEWEST_ANSWERS, params={"task": task, "version": version, "models": models, "completing": completing,
                                            "unfinished": [eval_runs.RUNNING, eval_runs.INCOMPLETE]}).pl()


def _answers_by_case(frame: pl.DataFrame, output_kind: str, spec):
    """case -> model -> the model's answer (None when it gave no usable one); (case, model) -> a reply as the
    model wrote it that has that answer; model -> the eval run used."""
    repeats: dict[tuple[str, str], list[tuple[int, str | None, str | None]]] = defaultdict(list)
    runs = {}
    for row in frame.iter_rows(named=True):
        text = None if row["error_class"] is not None else row["response_text"]
        repeats[(row["case_id"], row["model"])].append((row["repeat"], normalise(text, output_kind, spec), text))
        runs[row["model"]] = row["eval_run_id"]
    answers: dict[str, dict[str, str | None]] = defaultdict(dict)
    replies: dict[tuple[str, str], str | None] = {}
    for (case_id, model), values in repeats.items():
        values.sort(key=lambda v: v[0])
        answer = model_answer([normalised for _, normalised, _ in values])
        answers[case_id][model] = answer
        replies[(case_id, model)] = next((text for _, normalised, text in values if normalised == answer), None)
    return answers, replies, runs


def _task_consensus(task, answers, replies, runs, eval_run_id):
    spec, kind = task.consensus, task.output_kind
    rows = []
    agreed, counted = defaultdict(int), defaultdict(int)
    loo_agreed, loo_counted = defaultdict(int), defaultdict(int)
    now = utc_now()
    for case_id in sorted(answers):
        per_model = answers[case_id]
        consensus = case_consensus(per_model, kind, spec)
        rows.append({"eval_run_id": eval_run_id, "task": task.name, "dataset_version": task.dataset_version, "case_id": case_id,
                     "output_kind": kind, "method": "token_f1" if kind == "text" else "normalised_match",
                     "models_answering": consensus.models_answering, "consensus_answer": consensus.answer,
                     "consensus_text": replies.get((case_id, consensus.model)) if consensus.model else None,
                     "consensus_model": consensus.model, "supporters": list(consensus.supporters),
                     "agreement": consensus.agreement, "tie_broken_by": consensus.tie_broken_by, "reason": consensus.reason,
                     "source_eval_runs": sorted(set(runs.values())), "computed_at": now})
        for model, answer in per_model.items():
            if consensus.answer is not None:
                counted[model] += 1
                agreed[model] += agrees_with(answer, consensus, kind, spec)
            # Leave-one-out: the consensus of the other models only, so a model never agrees with itself.
            others = case_consensus({m: a for m, a in per_model.items() if m != model}, kind, spec)
            if others.answer is not None:
                loo_counted[model] += 1
                loo_agreed[model] += agrees_with(answer, others, kind, spec)
    agreements = [{"eval_run_id": eval_run_id, "task": task.name, "dataset_version": task.dataset_version, "model": model,
                   "source_eval_run_id": runs[model], "cases": counted[model], "agreed": agreed[model],
                   "agreement_rate": agreed[model] / counted[model] if counted[model] else None,
                   "loo_cases": loo_counted[model],
                   "loo_agreement_rate": loo_agreed[model] / loo_counted[model] if loo_counted[model] else None,
                   "computed_at": now}
                  for model in sorted(runs)]
    return rows, agreements
