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
from model_eval.gates import GateResult, evaluate_gates
from model_eval.golden import TaskSpec
from model_eval.metrics import latest_metrics
from model_eval.registry import Registry
from model_eval.router import STAGES

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
    action: str                       # keep | pinned | blocked | hold | promote | advance | rollback | abort_rollout
    reason: str
    model: str | None = None          # for changes: the new row's model, stage, share, previous
    stage: str | None = None
    traffic_share: float | None = None
    previous_model: str | None = None
    gates: list[GateResult] = field(default_factory=list)
    champion: str | None = None

    @property
    def changes_assignment(self) -> bool:
        return self.action in ("promote", "advance", "rollback", "abort_rollout")


def current_assignments(conn: duckdb.DuckDBPyConnection) -> dict[str, AssignmentState]:
    frame = conn.sql("""
        SELECT * FROM model_assignments QUALIFY row_number() OVER (PARTITION BY task ORDER BY seq DESC) = 1""").pl()
    return {r["task"]: AssignmentState(
        task=r["task"], model=r["model"], stage=r["stage"], traffic_share=r["traffic_share"], previous_model=r["previous_model"],
        pinned=bool(r["pinned"]), assigned_at=r["assigned_at"], baseline_accuracy=r["baseline_accuracy"],
        baseline_success_rate=r["baseline_success_rate"], baseline_p95_latency_ms=r["baseline_p95_latency_ms"],
    ) for r in frame.iter_rows(named=True)}


def newest_champions(conn, tasks: list[TaskSpec]) -> dict[str, str | None]:
    """Each task's champion under its own policy, from its newest recommendation on the current version."""
    frame = conn.sql("""
        SELECT task, dataset_version, champion FROM recommendations WHERE is_task_policy
        QUALIFY row_number() OVER (PARTITION BY task, dataset_version ORDER BY created_at DESC) = 1""").pl()
    current = {(t.name, t.dataset_version) for t in tasks}
    return {r["task"]: r["champion"] for r in frame.iter_rows(named=True) if (r["task"], r["dataset_version"]) in current}


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
                                       assigned_at, eval_run_id, baseline_accuracy, baseline_success_rate, baseline_p95_latency_ms)
        VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)""",
                 [task, model, stage, traffic_share, previous_model, pinned, action, reason, assigned_by, _now(), eval_run_id,
                  (baseline or {}).get("accuracy"), (baseline or {}).get("success_rate"), (baseline or {}).get("p95_latency_ms")])


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


def production_health(conn, model: str, task: str, since: datetime) -> dict | None:
    """Logged production calls of `model` on `task` since `since`: calls, success rate, p95 latency."""
    exists = conn.sql("SELECT count(*) FROM information_schema.tables WHERE table_name = 'production_calls'").fetchall()[0][0]
    if not exists:
        return None
    rows = conn.sql("""
        SELECT count(*) AS calls, avg(success::DOUBLE) AS success_rate, quantile_cont(latency_ms, 0.95) AS p95_latency_ms
        FROM production_calls WHERE model = $model AND task = $task AND ts >= $since""",
                    params={"model": model, "task": task, "since": since}).pl().row(0, named=True)
    return rows if rows["calls"] else None


def degradation_reason(conn, task: TaskSpec, state: AssignmentState, deployment: Deployment, now: datetime) -> str | None:
    """Why the serving model must be replaced, from a newer evaluation or logged production calls; None if healthy."""
    limits = deployment.degradation
    model = state.serving
    problems = []
    latest = _latest_metrics(conn, model, task, since=state.assigned_at)
    if latest is not None:
        if state.baseline_accuracy is not None and latest["accuracy"] < state.baseline_accuracy - limits.max_accuracy_drop:
            problems.append(f"accuracy fell from {state.baseline_accuracy:.3f} to {latest['accuracy']:.3f} "
                            f"(more than {limits.max_accuracy_drop:.2f})")
        if latest["success_rate"] < limits.min_success_rate:
            problems.append(f"success rate {latest['success_rate']:.2f} in re-evaluation is below {limits.min_success_rate:.2f}")
        if (state.baseline_p95_latency_ms and latest["p95_latency_ms"]
                and latest["p95_latency_ms"] > limits.max_p95_latency_ratio * state.baseline_p95_latency_ms):
            problems.append(f"p95 latency rose from {state.baseline_p95_latency_ms:.0f} ms to {latest['p95_latency_ms']:.0f} ms")
    window_start = max(state.assigned_at, now - timedelta(hours=limits.production_window_hours))
    health = production_health(conn, model, task.name, window_start)
    if health is not None:
        if health["success_rate"] < limits.min_success_rate:
            problems.append(f"{health['calls']} logged production calls succeeded at {health['success_rate']:.2f}, "
                            f"below {limits.min_success_rate:.2f}")
        if (state.baseline_p95_latency_ms and health["p95_latency_ms"]
                and health["p95_latency_ms"] > limits.max_p95_latency_ratio * state.baseline_p95_latency_ms):
            problems.append(f"production p95 latency {health['p95_latency_ms']:.0f} ms is over "
                            f"{limits.max_p95_latency_ratio:g}x the {state.baseline_p95_latency_ms:.0f} ms at promotion")
    return f"{model} degraded: " + "; ".join(problems) if problems else None


def _ready_to_advance(conn, task: TaskSpec, state: AssignmentState, deployment: Deployment, now: datetime) -> str | None:
    """None when the candidate may move to the next stage, else what it still waits for."""
    rollout = deployment.rollout
    hours = (now - state.assigned_at).total_seconds() / 3600
    if hours < rollout.min_hours_in_stage:
        return f"{hours:.1f} h of {rollout.min_hours_in_stage:g} h in {state.stage}"
    health = production_health(conn, state.model, task.name, state.assigned_at)
    calls = health["calls"] if health else 0
    if calls < rollout.min_production_calls:
        return f"{calls} of {rollout.min_production_calls} logged production calls in {state.stage}"
    if health and health["success_rate"] < deployment.degradation.min_success_rate:
        return f"candidate's production success rate {health['success_rate']:.2f} is too low"
    return None


def gated_pair(state: AssignmentState | None, champion: str | None) -> tuple[str, str | None] | None:
    """(champion, model it would replace) when the gates must be evaluated for this task now, else None."""
    if state is None or state.pinned or champion is None:
        return None
    if state.stage in NEXT_STAGE:
        return (champion, state.previous_model) if champion == state.model else None
    return None if champion == state.model else (champion, state.model)


def plan_promotions(conn, tasks: list[TaskSpec], champions: dict[str, str | None], deployment: Deployment,
                    now: datetime | None = None) -> list[Decision]:
    """What should happen to each task's assignment, given the newest champion per task."""
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
        degraded = degradation_reason(conn, task, state, deployment, now)
        if degraded and state.stage == "full":
            if state.previous_model is None:
                decisions.append(Decision(task.name, "hold", degraded + "; no previous model to restore", champion=champion))
            else:
                decisions.append(Decision(task.name, "rollback", degraded + f"; restoring {state.previous_model}",
                                          state.previous_model, "full", 1.0, state.model, champion=champion))
            continue
        if state.stage in NEXT_STAGE:
            incumbent = state.previous_model
            if champion != state.model:
                why = f"recommendation is now {champion or 'no qualified model'}, not {state.model}"
                decisions.append(Decision(task.name, "abort_rollout", f"rollout of {state.model} stopped: {why}",
                                          incumbent, "full", 1.0, state.model, champion=champion))
                continue
            gates = evaluate_gates(conn, task, *gated_pair(state, champion), deployment.gates)
            failed = [g for g in gates if not g.passed]
            waiting = _ready_to_advance(conn, task, state, deployment, now)
            if failed:
                decisions.append(Decision(task.name, "blocked", "gate(s) failed: " + "; ".join(g.detail for g in failed),
                                          gates=gates, champion=champion))
            elif waiting:
                decisions.append(Decision(task.name, "hold", f"{state.model} stays in {state.stage}: waiting for {waiting}",
                                          gates=gates, champion=champion))
            else:
                stage = NEXT_STAGE[state.stage]
                share = deployment.rollout.partial_share if stage == "partial" else 1.0
                decisions.append(Decision(task.name, "advance", f"{state.model} advances from {state.stage} to {stage}",
                                          state.model, stage, share, incumbent, gates, champion))
            continue
        if champion is None or champion == state.model:
            reason = "no model qualified; keeping the assignment" if champion is None else f"{champion} is already assigned"
            decisions.append(Decision(task.name, "keep", reason, champion=champion))
            continue
        gates = evaluate_gates(conn, task, *gated_pair(state, champion), deployment.gates)
        failed = [g for g in gates if not g.passed]
        if failed:
            decisions.append(Decision(task.name, "blocked", f"{champion} not promoted over {state.model}: "
                                      + "; ".join(g.detail for g in failed), gates=gates, champion=champion))
        else:
            decisions.append(Decision(task.name, "promote", f"{champion} starts in shadow beside {state.model}: all gates passed",
                                      champion, "shadow", 0.0, state.model, gates, champion))
    return decisions


def apply_decisions(conn, decisions: list[Decision], tasks: list[TaskSpec], eval_run_id: str, assigned_by: str) -> None:
    """Record gate outcomes and assignment changes; the caller wraps this in one transaction."""
    by_name = {t.name: t for t in tasks}
    states = current_assignments(conn)
    for d in decisions:
        for g in d.gates:
            conn.execute("INSERT INTO promotion_gates VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                         [eval_run_id, d.task, d.champion, states[d.task].serving if d.task in states else None, g.gate,
                          g.passed, g.detail, g.test, g.p_value, g.effect_size, _now()])
        if d.changes_assignment:
            record(conn, task=d.task, model=d.model, stage=d.stage, traffic_share=d.traffic_share,
                   previous_model=d.previous_model, pinned=False, action=d.action, reason=d.reason, assigned_by=assigned_by,
                   eval_run_id=eval_run_id, baseline=_latest_metrics(conn, d.model, by_name[d.task]))


def alert_for(decision: Decision) -> Alert | None:
    kinds = {"promote": ("promotion", "info"), "advance": ("promotion", "info"), "blocked": ("gate_failed", "warning"),
             "rollback": ("rollback", "critical"), "abort_rollout": ("rollback", "warning")}
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
        if name is None:
            return None
        spec = registry.get(name)
        return {"model": spec.name, "litellm_model": spec.litellm_model, "api_base": spec.api_base,
                "api_key_env": spec.api_key_env, "params": spec.params}

    tasks = {}
    for task, state in sorted(states.items()):
        serving = describe(state.serving)
        tasks[task] = {**serving, "candidate": describe(state.candidate), "stage": state.stage,
                       "traffic_share": state.traffic_share, "pinned": state.pinned}
    return tasks


def history(conn, task: str | None = None) -> pl.DataFrame:
    frame = conn.sql("SELECT * FROM model_assignments ORDER BY seq").pl()
    return frame.filter(pl.col("task") == task) if task else frame
