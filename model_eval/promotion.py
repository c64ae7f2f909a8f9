"""Assignments: which model each task uses, how a champion is promoted through shadow -> partial ->
full, when it is rolled back, and the manual controls. Plain functions over the warehouse.

`model_assignments` is an append-only history; the newest row per task is the current state. In a
row, `model` is the model the row is about: at stage `full` it serves every request; at `shadow` or
`partial` it is the candidate and `previous_model` still serves (all of it in shadow, the rest in partial).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone

import duckdb
import polars as pl

from model_eval.alerts import Alert
from model_eval.deployment import Deployment
from model_eval.errors import InputError
from model_eval.gates import GateResult, gate_verdict, recorded_gates
from model_eval.golden import TaskSpec
from model_eval.metrics import case_accuracies, latest_metrics, paired_differences
from model_eval.production_evidence import (
    RatingWindows,
    advance_waits_for,
    degradation_problems,
    production_window,
    rating_drop,
)
from model_eval.registry import Registry
from model_eval.router import STAGES
from model_eval.stats import binomial_test, paired_confidence

NEXT_STAGE = dict(zip(STAGES, STAGES[1:]))  # shadow -> partial -> full


def _now() -> datetime:
    return datetime.now(timezone.utc).replace(tzinfo=None)


@dataclass(frozen=True)
class AssignmentState:
    task: str
    model: str
    stage: str
    traffic_share: float
    previous_model: str | None
    pinned: bool
    assigned_at: datetime
    baseline_accuracy: float | None
    baseline_success_rate: float | None
    baseline_p95_latency_ms: float | None
    baseline_dataset_version: str | None = None   # baselines are compared on this golden version only
    baseline_eval_run_id: str | None = None

    @property
    def serving(self) -> str:
        """The model answering (most) requests now."""
        return self.model if self.stage == "full" or self.previous_model is None else self.previous_model

    @property
    def candidate(self) -> str | None:
        return None if self.stage == "full" else self.model


@dataclass
class Decision:
    task: str
    # keep | pinned | blocked | hold | cooldown | promote | advance | rollback | abort_rollout | abort_degraded
    action: str
    reason: str
    model: str | None = None          # for changes: the new row's model, stage, share, previous
    stage: str | None = None
    traffic_share: float | None = None
    previous_model: str | None = None
    gates: list[GateResult] = field(default_factory=list)
    champion: str | None = None

    @property
    def changes_assignment(self) -> bool:
        return self.action in ("promote", "advance", "rollback", "abort_rollout", "abort_degraded")


def current_assignments(conn: duckdb.DuckDBPyConnection) -> dict[str, AssignmentState]:
    frame = conn.sql("""
        SELECT * FROM model_assignments QUALIFY row_number() OVER (PARTITION BY task ORDER BY seq DESC) = 1""").pl()
    return {r["task"]: AssignmentState(
        task=r["task"], model=r["model"], stage=r["stage"], traffic_share=r["traffic_share"], previous_model=r["previous_model"],
        pinned=bool(r["pinned"]), assigned_at=r["assigned_at"], baseline_accuracy=r["baseline_accuracy"],
        baseline_success_rate=r["baseline_success_rate"], baseline_p95_latency_ms=r["baseline_p95_latency_ms"],
        baseline_dataset_version=r["baseline_dataset_version"], baseline_eval_run_id=r["baseline_eval_run_id"],
    ) for r in frame.iter_rows(named=True)}


def newest_task_recommendations(conn, tasks: list[TaskSpec]) -> dict[str, dict]:
    """Each task's newest recommendation under its own policy on its current version: champion and qualified models."""
    frame = conn.sql("""
        SELECT task, dataset_version, champion, qualified FROM recommendations WHERE is_task_policy
        QUALIFY row_number() OVER (PARTITION BY task, dataset_version ORDER BY created_at DESC) = 1""").pl()
    current = {(t.name, t.dataset_version) for t in tasks}
    return {r["task"]: r for r in frame.iter_rows(named=True) if (r["task"], r["dataset_version"]) in current}


def newest_champions(conn, tasks: list[TaskSpec]) -> dict[str, str | None]:
    """Each task's champion under its own policy, from its newest recommendation on the current version."""
    return {task: row["champion"] for task, row in newest_task_recommendations(conn, tasks).items()}


def effective_assignments(conn, deployment: Deployment) -> dict[str, AssignmentState]:
    """Current assignments, or for a task with no history yet the one deployment.yaml declares
    (what the promotion step will record before it decides anything)."""
    states = current_assignments(conn)
    for task, model in deployment.initial_assignments.items():
        if task not in states:
            states[task] = AssignmentState(task=task, model=model, stage="full", traffic_share=1.0, previous_model=None,
                                           pinned=False, assigned_at=_now(), baseline_accuracy=None,
                                           baseline_success_rate=None, baseline_p95_latency_ms=None)
    return states


def _latest_metrics(conn, model: str, task: TaskSpec, since: datetime | None = None) -> dict | None:
    return latest_metrics(conn, model, task.name, task.dataset_version, since)


def record(conn, *, task: str, model: str, stage: str, traffic_share: float, previous_model: str | None, pinned: bool,
           action: str, reason: str, assigned_by: str, eval_run_id: str | None = None, baseline: dict | None = None) -> None:
    """Append one assignment row (the caller owns the transaction)."""
    conn.execute("""
        INSERT INTO model_assignments (task, model, stage, traffic_share, previous_model, pinned, action, reason, assigned_by,
                                       assigned_at, eval_run_id, baseline_accuracy, baseline_success_rate, baseline_p95_latency_ms,
                                       baseline_dataset_version, baseline_eval_run_id)
        VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)""",
                 [task, model, stage, traffic_share, previous_model, pinned, action, reason, assigned_by, _now(), eval_run_id,
                  *[(baseline or {}).get(key) for key in ("accuracy", "success_rate", "p95_latency_ms", "dataset_version",
                                                           "eval_run_id")]])


def ensure_initial_assignments(conn, deployment: Deployment, registry: Registry, tasks: list[TaskSpec]) -> list[str]:
    """A fresh install starts from the assignments declared in deployment.yaml."""
    existing = current_assignments(conn)
    added = []
    for task in tasks:
        if task.name in existing:
            continue
        model = deployment.initial_assignments.get(task.name)
        if model is None:
            continue
        if model not in registry.names():
            raise InputError(deployment.path, f"model '{model}' is not in the registry", field=f"initial_assignments.{task.name}")
        record(conn, task=task.name, model=model, stage="full", traffic_share=1.0, previous_model=None, pinned=False,
               action="initial", reason="declared in deployment.yaml", assigned_by="configuration",
               baseline=_latest_metrics(conn, model, task))
        added.append(task.name)
    return added


def _accuracy_drop(conn, task: TaskSpec, state: AssignmentState, latest: dict, deployment: Deployment) -> str | None:
    """A fall in accuracy beyond the limit, on the baseline's golden version and paired by case, that is not noise."""
    limits = deployment.degradation
    if state.baseline_accuracy is None or state.baseline_dataset_version != latest["dataset_version"]:
        return None  # no baseline on this golden version: accuracies on different cases are not comparable
    drop = state.baseline_accuracy - latest["accuracy"]
    if drop <= limits.max_accuracy_drop:
        return None
    before = case_accuracies(conn, state.serving, task.name, latest["dataset_version"], state.baseline_eval_run_id or "")
    after = case_accuracies(conn, state.serving, task.name, latest["dataset_version"], latest["eval_run_id"])
    differences = paired_differences(before, after)
    p_value = 1.0 - paired_confidence(differences) if differences else 1.0
    if p_value >= limits.significance:
        return None
    return (f"accuracy fell from {state.baseline_accuracy:.3f} to {latest['accuracy']:.3f} on {latest['dataset_version']} "
            f"(more than {limits.max_accuracy_drop:.2f}; paired over n={len(differences)} cases, one-sided p={p_value:.2g})")


def degradation_reason(conn, task: TaskSpec, state: AssignmentState, deployment: Deployment, now: datetime) -> str | None:
    """Why the serving model must be replaced, from a newer evaluation or logged production calls; None if healthy."""
    limits = deployment.degradation
    model = state.serving
    problems = []
    latest = _latest_metrics(conn, model, task, since=state.assigned_at)
    if latest is not None:
        if (dropped := _accuracy_drop(conn, task, state, latest, deployment)) is not None:
            problems.append(dropped)
        calls = int(latest["calls"])
        successes = round(latest["success_rate"] * calls)
        test = binomial_test(successes, calls, limits.min_success_rate, "less")
        if test.p_value < limits.significance:
            problems.append(f"success rate {latest['success_rate']:.2f} over {calls} calls in re-evaluation is below "
                            f"{limits.min_success_rate:.2f} (exact one-sided binomial p={test.p_value:.2g})")
        if (state.baseline_p95_latency_ms and latest["p95_latency_ms"]
                and latest["p95_latency_ms"] > limits.max_p95_latency_ratio * state.baseline_p95_latency_ms):
            problems.append(f"p95 latency rose from {state.baseline_p95_latency_ms:.0f} ms to {latest['p95_latency_ms']:.0f} ms")
    window = _window(conn, model, task, state, deployment, now)
    problems += degradation_problems(window, limits, state.baseline_p95_latency_ms)
    if state.stage == "full" and state.previous_model and state.previous_model != model:
        # The model it replaced no longer serves: its ratings over a window of the same length, ending at the switch.
        span = now - window.since
        dropped = rating_drop(conn, task.name, RatingWindows(model, window.since, now, state.previous_model,
                                                             state.assigned_at - span, state.assigned_at), limits)
        if dropped:
            problems.append(dropped)
    return f"{model} degraded: " + "; ".join(problems) if problems else None


def _window(conn, model: str, task: TaskSpec, state: AssignmentState, deployment: Deployment, now: datetime):
    """The model's production calls since it took its current role, within the configured window."""
    start = max(state.assigned_at, now - timedelta(hours=deployment.degradation.production_window_hours))
    return production_window(conn, model, task.name, start, deployment.degradation.min_latency_calls)


def candidate_degradation(conn, task: TaskSpec, state: AssignmentState, deployment: Deployment, now: datetime) -> str | None:
    """Why a candidate in shadow or partial must be stopped, from its logged production calls; None if no evidence."""
    window = _window(conn, state.model, task, state, deployment, now)
    problems = degradation_problems(window, deployment.degradation, state.baseline_p95_latency_ms)
    if state.stage == "partial" and state.previous_model:
        # Both models answer users in partial: their ratings over the very same window are comparable.
        dropped = rating_drop(conn, task.name, RatingWindows(state.model, window.since, now, state.previous_model,
                                                             window.since, now), deployment.degradation)
        if dropped:
            problems.append(dropped)
    return f"candidate {state.model} degraded in {state.stage}: " + "; ".join(problems) if problems else None


def _ready_to_advance(conn, task: TaskSpec, state: AssignmentState, deployment: Deployment, now: datetime) -> str | None:
    """None when the candidate may move to the next stage, else what it still waits for."""
    rollout = deployment.rollout
    hours = (now - state.assigned_at).total_seconds() / 3600
    if hours < rollout.min_hours_in_stage:
        return f"{hours:.1f} h of {rollout.min_hours_in_stage:g} h in {state.stage}"
    window = production_window(conn, state.model, task.name, state.assigned_at, deployment.degradation.min_latency_calls)
    return advance_waits_for(window, rollout, deployment.degradation)


ROLLBACK_ACTIONS = ("rollback", "abort_degraded", "manual_rollback")


def cooldown_reason(conn, task: TaskSpec, champion: str, deployment: Deployment, now: datetime) -> str | None:
    """Why a model rolled back from this task may not be promoted again yet; None when it may.

    New evidence lifts the hold: the task's current golden cases changed after the rollback (the
    champion's standing comes from an evaluation on them), or `rollout.rollback_cooldown_hours` passed.
    """
    rows = conn.execute(f"""
        SELECT assigned_at, action, reason FROM model_assignments
        WHERE task = ? AND previous_model = ? AND action IN ({", ".join(f"'{a}'" for a in ROLLBACK_ACTIONS)})
        ORDER BY seq DESC LIMIT 1""", [task.name, champion]).fetchall()
    if not rows:
        return None
    rolled_back_at, action, reason = rows[0]
    ends = rolled_back_at + timedelta(hours=deployment.rollout.rollback_cooldown_hours)
    if now >= ends:
        return None
    changed = conn.execute("""SELECT count(*) FROM golden_versions WHERE task = ? AND is_current AND ingested_at > ?""",
                           [task.name, rolled_back_at]).fetchall()[0][0]
    if changed:
        return None
    return (f"{champion} was removed from {task.name} by {action} at {rolled_back_at:%Y-%m-%d %H:%M} UTC ({reason}); "
            f"it is not promoted again until the golden cases change or the cool-down ends at {ends:%Y-%m-%d %H:%M} UTC")


def gated_pair(state: AssignmentState | None, champion: str | None) -> tuple[str, str | None] | None:
    """(champion, model it would replace) when the gates must be evaluated for this task now, else None."""
    if state is None or state.pinned or champion is None:
        return None
    if state.stage in NEXT_STAGE:
        return (champion, state.previous_model) if champion == state.model else None
    return None if champion == state.model else (champion, state.model)


def _gated(conn, eval_run_id: str | None, task: TaskSpec, champion: str, incumbent: str | None) -> tuple[bool, str, list[GateResult]]:
    """The gates recorded for this evaluation (never evaluated again here); a missing result blocks."""
    results = recorded_gates(conn, eval_run_id, task.name, champion, incumbent) if eval_run_id else []
    passed, reason = gate_verdict(results, eval_run_id)
    return passed, reason, results


def plan_promotions(conn, tasks: list[TaskSpec], champions: dict[str, str | None], deployment: Deployment,
                    now: datetime | None = None, *, eval_run_id: str | None = None) -> list[Decision]:
    """What should happen to each task's assignment, given the newest champion per task.

    Safety actions (rollback, aborting a rollout) come first and never wait on a gate. A promotion
    or a stage advance needs every gate recorded for this eval run, for this task, to have passed.
    """
    now = now or _now()
    states = current_assignments(conn)
    decisions = []
    for task in tasks:
        state = states.get(task.name)
        champion = champions.get(task.name)
        if state is None:
            decisions.append(Decision(task.name, "keep", "no assignment yet (add it to deployment.yaml)", champion=champion))
            continue
        if state.pinned:
            decisions.append(Decision(task.name, "pinned", f"pinned to {state.serving}; champion is {champion or 'none'} "
                                                           "(reported only)", champion=champion))
            continue
        if state.stage in NEXT_STAGE:
            decisions.append(_plan_rollout(conn, task, state, champion, deployment, now, eval_run_id))
            continue
        degraded = degradation_reason(conn, task, state, deployment, now)
        if degraded:
            if state.previous_model is None:
                decisions.append(Decision(task.name, "hold", degraded + "; no previous model to restore", champion=champion))
            else:
                decisions.append(Decision(task.name, "rollback", degraded + f"; restoring {state.previous_model}",
                                          state.previous_model, "full", 1.0, state.model, champion=champion))
            continue
        if champion is None or champion == state.model:
            reason = "no model qualified; keeping the assignment" if champion is None else f"{champion} is already assigned"
            decisions.append(Decision(task.name, "keep", reason, champion=champion))
            continue
        held = cooldown_reason(conn, task, champion, deployment, now)
        if held:
            decisions.append(Decision(task.name, "cooldown", held, champion=champion))
            continue
        passed, why, gates = _gated(conn, eval_run_id, task, champion, state.model)
        if not passed:
            decisions.append(Decision(task.name, "blocked", f"{champion} not promoted over {state.model}: {why}",
                                      gates=gates, champion=champion))
        else:
            decisions.append(Decision(task.name, "promote", f"{champion} starts in shadow beside {state.model}: {why}",
                                      champion, "shadow", 0.0, state.model, gates, champion))
    return decisions


def _plan_rollout(conn, task: TaskSpec, state: AssignmentState, champion: str | None, deployment: Deployment,
                  now: datetime, eval_run_id: str | None) -> Decision:
    """A candidate in shadow or partial: abort (never gated), hold, or advance one stage."""
    incumbent = state.previous_model
    degraded = candidate_degradation(conn, task, state, deployment, now)
    if degraded:
        return Decision(task.name, "abort_degraded", f"rollout of {state.model} aborted: {degraded}; {incumbent} serves again",
                        incumbent, "full", 1.0, state.model, champion=champion)
    if champion != state.model:
        why = f"recommendation is now {champion or 'no qualified model'}, not {state.model}"
        return Decision(task.name, "abort_rollout", f"rollout of {state.model} stopped: {why}",
                        incumbent, "full", 1.0, state.model, champion=champion)
    passed, why, gates = _gated(conn, eval_run_id, task, champion, incumbent)
    if not passed:
        return Decision(task.name, "blocked", f"{state.model} stays in {state.stage}: {why}", gates=gates, champion=champion)
    waiting = _ready_to_advance(conn, task, state, deployment, now)
    if waiting:
        return Decision(task.name, "hold", f"{state.model} stays in {state.stage}: waiting for {waiting}",
                        gates=gates, champion=champion)
    stage = NEXT_STAGE[state.stage]
    share = deployment.rollout.partial_share if stage == "partial" else 1.0
    return Decision(task.name, "advance", f"{state.model} advances from {state.stage} to {stage}",
                    state.model, stage, share, incumbent, gates, champion)


def apply_decisions(conn, decisions: list[Decision], tasks: list[TaskSpec], eval_run_id: str, assigned_by: str) -> None:
    """Record assignment changes (gate results are already in `promotion_gates`); the caller owns the transaction."""
    by_name = {t.name: t for t in tasks}
    for d in decisions:
        if d.changes_assignment:
            record(conn, task=d.task, model=d.model, stage=d.stage, traffic_share=d.traffic_share,
                   previous_model=d.previous_model, pinned=False, action=d.action, reason=d.reason, assigned_by=assigned_by,
                   eval_run_id=eval_run_id, baseline=_latest_metrics(conn, d.model, by_name[d.task]))


def alert_for(decision: Decision) -> Alert | None:
    kinds = {"promote": ("promotion", "info"), "advance": ("promotion", "info"), "blocked": ("gate_failed", "warning"),
             "rollback": ("rollback", "critical"), "abort_degraded": ("rollback", "critical"),
             "abort_rollout": ("rollback", "warning")}
    if decision.action not in kinds:
        return None
    kind, severity = kinds[decision.action]
    title = f"{decision.task}: {decision.action.replace('_', ' ')}" + (f" -> {decision.model} ({decision.stage})" if decision.model else "")
    return Alert(kind=kind, title=title, details=decision.reason, task=decision.task, model=decision.model or decision.champion,
                 severity=severity, facts={g.gate: g.passed for g in decision.gates})


# ---------------------------------------------------------------- manual control
MANUAL_ACTIONS = ("pin", "unpin", "promote", "rollback")


def manual_action(conn, action: str, task: TaskSpec, registry: Registry, *, model: str | None, by: str, reason: str) -> str:
    """A person's pin, unpin, forced promotion or rollback; recorded with who and why. Returns a summary."""
    if not reason.strip():
        raise ValueError("say why (--reason): every manual change is recorded with its reason")
    state = current_assignments(conn).get(task.name)
    if model is not None and model not in registry.names():
        raise ValueError(f"unknown model '{model}'; registered: {', '.join(registry.names())}")
    if action in ("pin", "promote"):
        if model is None:
            raise ValueError(f"{action} needs a model")
        previous = state.serving if state else None
        record(conn, task=task.name, model=model, stage="full", traffic_share=1.0, previous_model=previous,
               pinned=action == "pin" or bool(state and state.pinned), action=f"manual_{action}", reason=reason,
               assigned_by=by, baseline=_latest_metrics(conn, model, task))
        return f"{task.name}: {model} assigned (full){' and pinned' if action == 'pin' else ''}; previous {previous or 'none'}"
    if state is None:
        raise ValueError(f"task {task.name} has no assignment to {action}")
    if action == "unpin":
        record(conn, task=task.name, model=state.model, stage=state.stage, traffic_share=state.traffic_share,
               previous_model=state.previous_model, pinned=False, action="manual_unpin", reason=reason, assigned_by=by,
               baseline={"accuracy": state.baseline_accuracy, "success_rate": state.baseline_success_rate,
                         "p95_latency_ms": state.baseline_p95_latency_ms})
        return f"{task.name}: unpinned ({state.serving} stays until the pipeline decides otherwise)"
    if action == "rollback":
        target = state.previous_model
        if target is None:
            raise ValueError(f"task {task.name} has no previous model to roll back to")
        record(conn, task=task.name, model=target, stage="full", traffic_share=1.0, previous_model=state.model,
               pinned=state.pinned, action="manual_rollback", reason=reason, assigned_by=by,
               baseline=_latest_metrics(conn, target, task))
        return f"{task.name}: rolled back to {target} (from {state.model})"
    raise ValueError(f"unknown action '{action}'; one of {', '.join(MANUAL_ACTIONS)}")


def snapshot_tasks(states: dict[str, AssignmentState], registry: Registry) -> dict:
    """The routing snapshot applications read (see model_eval.router)."""
    def describe(name: str | None) -> dict | None:
        return None if name is None else registry.get(name).routing_record()

    tasks = {}
    for task, state in sorted(states.items()):
        serving = describe(state.serving)
        tasks[task] = {**serving, "candidate": describe(state.candidate), "stage": state.stage,
                       "traffic_share": state.traffic_share, "pinned": state.pinned}
    return tasks


def history(conn, task: str | None = None) -> pl.DataFrame:
    frame = conn.sql("SELECT * FROM model_assignments ORDER BY seq").pl()
    return frame.filter(pl.col("task") == task) if task else frame
