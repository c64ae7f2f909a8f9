"""The jobs: `model-eval run` runs prepare once, evaluate_model per model partition, then recommend;
the schedule and sensors launch refresh_model per model and recommend once the batch is done."""

import dagster as dg

prepare_job = dg.define_asset_job(
    "prepare", selection=["golden_cases", "model_registry"],
    description="Ingest and validate golden sets; sync the model registry (adds model partitions).")
evaluate_model_job = dg.define_asset_job(
    "evaluate_model", selection=["inference_results", "scores"],
    description="Run and score one model (partition) on every task it serves.")
# Each run is self-contained (ingest, sync, run, score), so several can be requested at once without
# ordering between them; ingestion is idempotent.
refresh_model_job = dg.define_asset_job(
    "refresh_model", selection=["golden_cases", "model_registry", "inference_results", "scores"],
    description="Ingest golden sets, sync the registry, then run and score one model (partition).")
recommend_job = dg.define_asset_job(
    "recommend", selection=["consensus", "pairwise_win_rates", "model_task_metrics", "model_drift", "recommendations",
                            "production_calls", "model_assignments"],
    description="Consensus and pairwise win rates across models, recompute metrics and drift, pick a champion and runner-up "
                "per task, write the report, then gate and stage promotions.")
