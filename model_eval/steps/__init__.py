"""The pipeline's steps as plain functions, one module per asset group: what each Dagster asset does,
without Dagster. Each step receives the `Project` its caller loaded, reads its inputs, computes in
memory and writes its slice of the warehouse in one transaction at the end, so a failure anywhere
leaves the warehouse exactly as it was.

| module | assets |
| --- | --- |
| `golden.py` | golden_cases |
| `models.py` | model_registry (and the initial assignments) |
| `evaluation.py` | inference_results, scores (judge tasks' scores: `judging.py`) |
| `consensus.py`, `pairwise.py` | consensus, pairwise_win_rates |
| `recommendation.py` | model_task_metrics, recommendations |
| `promotion.py` | production_calls, model_assignments |
| `report.py` | model_drift; the report `recommendations` and `model_assignments` write; the summary after a scheduled run |
"""
