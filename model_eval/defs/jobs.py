import dagster as dg

from model_eval.defs.partitions import MODELS

# `model-eval run` (and later the schedule and sensor) run these three in order:
# prepare once, evaluate each model partition, then recommend over everything evaluated.
prepare_job = dg.define_asset_job(
    "prepare", selection=["golden_cases", "model_registry"],
    description="Ingest and validate golden sets; sync the model registry (adds model partitions).")
evaluate_model_job = dg.define_asset_job(
    "evaluate_model", selection=["inference_results", "scores"], partitions_def=MODELS,
    description="Run and score one model (partition) on every task it serves.")
recommend_job = dg.define_asset_job(
    "recommend", selection=["model_task_metrics", "recommendations", "production_calls", "model_assignments"],
    description="Recompute metrics, pick a champion and runner-up per task, then gate and stage promotions.")
