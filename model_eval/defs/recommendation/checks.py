"""Blocking asset checks on `recommendations`: the promotion gates, visible in the UI.

A failed check stops `model_assignments` in the same run. The promotion step evaluates the same
gates again itself, so a gate keeps blocking when promotion runs on its own later.
"""

import dagster as dg

from model_eval.alerts import Alert, send_alert
from model_eval.defs.resources import ModelEvalResource
from model_eval.gates import GATE_NAMES, evaluate_gates
from model_eval.promotion import effective_assignments, gated_pair, newest_champions
from model_eval.warehouse import read_connection

GATE_DESCRIPTIONS = {
    "threshold": "The champion meets the task's qualification threshold on the current golden version.",
    "sample_size": "The evaluation is big enough (minimum cases and repeats) and the golden set passed validation.",
    "not_worse": "The champion is not significantly worse than the assigned model on the same cases (McNemar / paired bootstrap).",
    "costs_known": "The champion's cost is known: no missing prices, no undeclared zero prices.",
}


def _gate_check(gate: str) -> dg.AssetChecksDefinition:
    @dg.asset_check(asset="recommendations", name=f"gate_{gate}", blocking=True, description=GATE_DESCRIPTIONS[gate])
    def check(model_eval: ModelEvalResource) -> dg.AssetCheckResult:
        project = model_eval.project()
        deployment, tasks = project.deployment, list(project.tasks)
        rows, failed = [], []
        with read_connection(project.paths.warehouse_file) as conn:
            states = effective_assignments(conn, deployment)
            champions = newest_champions(conn, tasks)
            for task in tasks:
                pair = gated_pair(states.get(task.name), champions.get(task.name))
                if pair is None:
                    rows.append(f"| {task.name} | - | not applicable (nothing to promote) |")
                    continue
                result = next(g for g in evaluate_gates(conn, task, *pair, deployment.gates) if g.gate == gate)
                rows.append(f"| {task.name} | {'pass' if result.passed else 'FAIL'} | {result.detail} |")
                if not result.passed:
                    failed.append(task.name)
        if failed:
            # The promotion step will not run in this run, so the alert for the blocked promotion goes from here.
            send_alert(Alert(kind="gate_failed", title=f"promotion gate '{gate}' failed for {', '.join(failed)}",
                             details="\n".join(r for r in rows if "FAIL" in r), severity="warning",
                             task=failed[0] if len(failed) == 1 else None), deployment.alerts)
        return dg.AssetCheckResult(
            passed=not failed,
            severity=dg.AssetCheckSeverity.ERROR,
            description=f"failed for: {', '.join(failed)}" if failed else "passed for every task with a promotion pending",
            metadata={"tasks": dg.MetadataValue.md("| task | result | detail |\n|---|---|---|\n" + "\n".join(rows))},
        )

    return check


@dg.definitions
def gate_checks() -> dg.Definitions:
    return dg.Definitions(asset_checks=[_gate_check(gate) for gate in GATE_NAMES])
