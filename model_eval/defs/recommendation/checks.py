"""The promotion gates as asset checks on `recommendations`: evaluated once per run, reported per task.

One step evaluates every gate for every task and records each result in `promotion_gates`; each gate
is then reported as its own check. The checks are blocking, so `model_assignments` waits for them
(and does not run if the step itself crashes), but a gate that fails for some task is reported with
WARN severity: downstream still runs and acts only on the tasks whose gates all passed.
"""

from collections.abc import Iterator

import dagster as dg

from model_eval.defs.resources import ModelEvalResource, eval_run_id
from model_eval.gates import GATE_NAMES
from model_eval.steps.recommendation import check_gates

GATE_DESCRIPTIONS = {
    "threshold": "The champion's accuracy over cases meets the task's qualification threshold on the current golden version.",
    "sample_size": "The evaluation is big enough (minimum cases and repeats) and the golden set passed validation.",
    "non_inferiority": "The champion is at most gates.non_inferiority_margin less accurate than the assigned model: "
                       "one-sided paired test over cases, Holm-corrected across challengers.",
    "costs_known": "The champion's cost is known: no missing prices, no undeclared zero prices.",
}


def _cell(text: str) -> str:
    return text.replace("|", "/").replace("\n", " ")


@dg.multi_asset_check(
    specs=[dg.AssetCheckSpec(name=f"gate_{gate}", asset="recommendations", blocking=True,
                             description=GATE_DESCRIPTIONS[gate]) for gate in GATE_NAMES],
)
def promotion_gates(context: dg.AssetCheckExecutionContext, model_eval: ModelEvalResource) -> Iterator[dg.AssetCheckResult]:
    evaluated = check_gates(model_eval.project(), eval_run_id(context))
    for gate in GATE_NAMES:
        rows, failed, passed = [], [], []
        for entry in evaluated:
            result = entry.result(gate)
            if result is None:
                rows.append(f"| {entry.task.name} | - | - | not applicable: {_cell(entry.note)} |")
                continue
            (passed if result.passed else failed).append(entry.task.name)
            n = "-" if result.n_cases is None else str(result.n_cases)
            rows.append(f"| {entry.task.name} | {'pass' if result.passed else 'FAIL'} | {n} | {_cell(result.detail)} |")
        yield dg.AssetCheckResult(
            check_name=f"gate_{gate}",
            passed=not failed,
            # WARN, not ERROR: a failure blocks only its own task's promotion, which model_assignments enforces per task.
            severity=dg.AssetCheckSeverity.WARN,
            description=(f"failed for {', '.join(failed)}" if failed else "passed")
                        + (f"; passed for {', '.join(passed)}" if failed and passed else "")
                        + ("" if failed or passed else ": no task has a promotion pending"),
            metadata={
                "tasks": dg.MetadataValue.md("| task | result | n | detail |\n|---|---|---|---|\n" + "\n".join(rows)),
                "failed_tasks": dg.MetadataValue.json(failed),
                "passed_tasks": dg.MetadataValue.json(passed),
            },
        )
