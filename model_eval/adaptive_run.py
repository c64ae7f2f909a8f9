"""Adaptive evaluation inside the inference step: the plan for one (eval run, model), the engine hooks
that feed it, and the per-task status it ends with (the `evaluation_status` rows).

The core (`model_eval.adaptive`) is pure; this module gives it what the pipeline knows: each task's
cases and threshold, `gates.min_repeats`, the current champion's case accuracies (only for tasks whose
policy ranks by accuracy first), and each answer's correctness, scored the moment it arrives with the
task's own scorer (`scoring.score_row`, the function the scores step uses). Judge tasks need model
calls to be scored, so they are never part of a plan: they are evaluated exhaustively.

The case order is seeded by the model (name and configuration) and the task, not by the eval run: a
run started again after a crash, which is a new eval run, asks the cases in the same order, finds the
answers already given in the response cache, and so reaches the same decisions at the same case.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from typing import Any, Iterable, Iterator

import duckdb

from model_eval.adaptive import CANNOT_BEAT, CANNOT_QUALIFY, COMPLETE, AdaptivePlan
from model_eval.golden import TaskSpec
from model_eval.inference import CallRequest
from model_eval.metrics import case_accuracies, latest_metrics
from model_eval.policies import get_policy
from model_eval.registry import ModelSpec
from model_eval.scoring import score_row

STATUS_COLUMNS = ("eval_run_id", "model", "task", "dataset_version", "status", "reason", "adaptive", "cases_total",
                  "cases_scored", "calls_made", "calls_saved", "decided_at")


def resolve_switch(requested: bool | None, enabled_in_deployment: bool) -> bool:
    """An explicit choice (`--adaptive` / `--no-adaptive`, the run config) wins; otherwise deployment.yaml's."""
    return enabled_in_deployment if requested is None else bool(requested)


@dataclass(frozen=True)
class Champion:
    model: str
    case_scores: dict[str, float]      # case id -> share of right repeats, from its newest complete evaluation


def current_champions(conn: duckdb.DuckDBPyConnection, tasks: list[TaskSpec], model: str) -> dict[str, Champion]:
    """Per task whose policy ranks by accuracy first: the champion of its newest recommendation on the
    current golden version, with its case accuracies. Never the model being evaluated itself."""
    from model_eval.promotion import newest_task_recommendations

    champions = {}
    recommendations = newest_task_recommendations(conn, tasks)
    for task in tasks:
        name = (recommendations.get(task.name) or {}).get("champion")
        if name is None or name == model or not get_policy(task.policy).ranks_by_accuracy_first:
            continue
        metrics = latest_metrics(conn, name, task.name, task.dataset_version)   # complete evaluations only
        if metrics is not None:
            champions[task.name] = Champion(name, case_accuracies(conn, name, task.name, task.dataset_version,
                                                                  metrics["eval_run_id"]))
    return champions


class AdaptiveRun:
    """One model's plan in one eval run, and the hooks `run_model` calls (`admit`, `observe`)."""

    def __init__(self, spec: ModelSpec, tasks: list[TaskSpec], cases: list[dict[str, Any]],
                 expected: dict[tuple[str, str, str], Any], *, min_repeats: int, alpha: float,
                 champions: dict[str, Champion]):
        self.tasks = {t.name: t for t in tasks if not t.is_judged}
        case_ids: dict[str, list[str]] = {name: [] for name in self.tasks}
        for row in cases:
            task = self.tasks.get(row["task"])
            if task is not None and row["dataset_version"] == task.dataset_version:
                case_ids[task.name].append(row["case_id"])
        self.champions = {name: c for name, c in champions.items() if name in self.tasks}
        self.expected = expected
        self.alpha = alpha
        self.plan = AdaptivePlan({name: (ids, self.tasks[name].qualification_threshold) for name, ids in case_ids.items() if ids},
                                 min_repeats, seed=f"{spec.name}:{spec.config_hash}", alpha=alpha,
                                 champions={name: c.case_scores for name, c in self.champions.items()},
                                 repeats={name: t.repeats for name, t in self.tasks.items()})
        self.turned_down: Counter[str] = Counter()

    def arrange(self, requests: Iterable[CallRequest]) -> Iterator[CallRequest]:
        return self.plan.arrange(requests)

    def admit(self, request: CallRequest) -> bool:
        wanted = self.plan.wants(request)
        if not wanted:
            self.turned_down[request.task] += 1
        return wanted

    def observe(self, row: dict[str, Any]) -> None:
        task = self.tasks.get(row["task"])
        if task is None:
            return
        key = (row["task"], row["dataset_version"], row["case_id"])
        correct = score_row(row, task, key in self.expected, self.expected.get(key))["correct"]
        self.plan.observe(row["task"], row["case_id"], row["repeat"], row["response_text"], correct)

    def decision(self, task: str) -> tuple[str, str | None, int | None]:
        """(status, reason, cases the decision rests on) for a task of the plan; None cases: every case."""
        budget = self.plan.tasks.get(task)
        if budget is None:
            return COMPLETE, None, None
        skipped = self.turned_down[task]
        if budget.outcome == COMPLETE:
            return COMPLETE, (f"adaptive: no bound stopped it; {skipped} repeat(s) of cases whose first "
                              f"{self.plan.first_repeats(task)} answers agreed were not asked" if skipped else
                              "adaptive: no bound stopped it; every request was asked"), None
        test = budget.qualification
        n, total = test.seen, len(budget.order)
        seen = budget.order[:n]
        accuracy = test.total / n
        where = (f"after {n} of {total} cases in random order (accuracy {accuracy:.2f} on them, over the first "
                 f"{self.plan.first_repeats(task)} repeat(s) of each)")
        if budget.outcome == CANNOT_QUALIFY:
            reason = (f"{where}, an anytime-valid bound at alpha {self.alpha:g} shows its accuracy over all {total} cases "
                      f"cannot reach the threshold {self.tasks[task].qualification_threshold:.2f}")
        else:
            assert budget.outcome == CANNOT_BEAT
            champion = self.champions[task]
            theirs = sum(champion.case_scores[c] for c in seen) / n
            reason = (f"{where}, against {theirs:.2f} for the champion {champion.model} on the same cases, an anytime-valid "
                      f"bound at alpha {self.alpha:g} shows it cannot be as accurate as {champion.model} over all {total} cases")
        return budget.outcome, reason, n


def status_rows(eval_run_id: str, model: str, tasks: list[TaskSpec], case_counts: dict[str, int],
                answered: dict[str, int], run: AdaptiveRun | None, decided_at) -> list[list]:
    """One `evaluation_status` row per task the model served in this eval run (`STATUS_COLUMNS` order)."""
    rows = []
    for task in tasks:
        cases = case_counts[task.name]
        requested = cases * task.repeats
        status, reason, scored = (COMPLETE, None, None) if run is None else run.decision(task.name)
        made = answered.get(task.name, 0)
        rows.append([eval_run_id, model, task.name, task.dataset_version, status, reason, run is not None and task.name in run.plan.tasks,
                     cases, cases if scored is None else scored, made, requested - made, decided_at])
    return rows


def expected_answers(rows: Iterable[tuple[str, str, str, str | None]]) -> dict[tuple[str, str, str], Any]:
    """(task, dataset_version, case_id, expected_json) rows -> the expected answers, as the scorers take them."""
    return {(task, version, case): None if text is None else json.loads(text) for task, version, case, text in rows}
