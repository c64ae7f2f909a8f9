"""Evaluate every task's promotion gates once per run, and record every result in `promotion_gates`.

A gate decides per task: one task's failure never blocks another. The Dagster gate checks call
`evaluate_all_tasks` once, write its rows, and report each gate per task; promotion then reads the
rows back (`gates.recorded_gates`) instead of evaluating anything again.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timezone

from model_eval.deployment import Deployment
from model_eval.gates import GateResult, evaluate_gates, record_gate_results
from model_eval.golden import TaskSpec
from model_eval.promotion import effective_assignments, gated_pair, newest_task_recommendations


@dataclass(frozen=True)
class TaskGates:
    task: TaskSpec
    champion: str | None
    incumbent: str | None
    results: list[GateResult] = field(default_factory=list)   # empty: nothing to promote on this task
    note: str = ""                                            # why no gate applies

    @property
    def applicable(self) -> bool:
        return bool(self.results)

    def result(self, gate: str) -> GateResult | None:
        return next((g for g in self.results if g.gate == gate), None)


def _not_applicable(state, champion: str | None) -> str:
    if state is None:
        return "no assignment (add the task to deployment.yaml)"
    if state.pinned:
        return f"pinned to {state.serving}"
    if champion is None:
        return "no qualified champion"
    return f"{champion} is already assigned"


def evaluate_all_tasks(conn, tasks: list[TaskSpec], deployment: Deployment) -> list[TaskGates]:
    """The gates of every task with a promotion or a rollout pending, evaluated once."""
    states = effective_assignments(conn, deployment)
    recommendations = newest_task_recommendations(conn, tasks)
    evaluated = []
    for task in tasks:
        recommendation = recommendations.get(task.name) or {}
        champion = recommendation.get("champion")
        state = states.get(task.name)
        pair = gated_pair(state, champion)
        if pair is None:
            evaluated.append(TaskGates(task, champion, state.serving if state else None, note=_not_applicable(state, champion)))
            continue
        results = evaluate_gates(conn, task, *pair, deployment.gates, challengers=recommendation.get("qualified") or [])
        evaluated.append(TaskGates(task, pair[0], pair[1], results))
    return evaluated


def record_all(conn, eval_run_id: str, evaluated: list[TaskGates]) -> int:
    """One `promotion_gates` row per gate per applicable task, all with one timestamp. Returns rows written."""
    checked_at = datetime.now(timezone.utc).replace(tzinfo=None)
    rows = 0
    for entry in evaluated:
        if entry.applicable:
            record_gate_results(conn, eval_run_id, entry.task, entry.champion, entry.incumbent, entry.results, checked_at)
            rows += len(entry.results)
    return rows
