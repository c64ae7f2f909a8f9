"""Warehouse: metrics and recommendations over a long history of scores, and scoring per row.

The scores table is filled by DuckDB itself (range() and hash(), no Python loop) in the real schema
of a temporary warehouse: 5 models x the 3 shipped tasks x several eval runs, 3 repeats per case,
80% correct, 1% failed calls, one model without prices. Then, as the pipeline does:

* `metrics.compute_metrics` over every row, and `policies.recommend` for every policy per task over each model's
  newest metrics (the candidates the pipeline's recommend step would see), timed apart and together;
* the same through the steps `refresh_metrics` + `recommend_tasks`, which also publish the
  warehouse (a private copy of the file, renamed over the public one);
* `scoring.score_results` over synthetic inference rows, extrapolated per row to 1,000,000.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from benchmarks.common import REPO, Figure

from model_eval import warehouse  # noqa: E402
from model_eval.project import Project  # noqa: E402
from model_eval.steps.recommendation import recommend_tasks, refresh_metrics  # noqa: E402

from model_eval.golden import load_task, load_tasks  # noqa: E402
from model_eval.metrics import compute_metrics  # noqa: E402
from model_eval.policies import recommend, registered_policies  # noqa: E402
from model_eval.scoring import score_results  # noqa: E402
from model_eval.settings import ProjectPaths  # noqa: E402
from model_eval.warehouse_slices import write_slice  # noqa: E402

MODELS = 5
EVAL_RUNS = 4
TARGET_RECOMPUTE_1M_S = 10.0          # metrics + recommendations over 1M score rows stay interactive
TARGET_SCORE_AND_METRICS_1M_S = 60.0  # a full re-score of 1M rows plus metrics fits in a minute


def fill_scores(db: Path, rows: int, with_inference: bool = False) -> None:
    """`rows` synthetic score rows: EVAL_RUNS runs x MODELS models x 3 tasks x cases x 3 repeats, written the
    way the pipeline writes them, one (eval run, model) slice at a time; `with_inference` adds the same
    number of inference_results rows."""
    tasks = [t.name for t in load_tasks(REPO / "golden")]
    versions = {t.name: t.dataset_version for t in load_tasks(REPO / "golden")}
    per_slice = rows // (EVAL_RUNS * MODELS)
    task_list = "[" + ", ".join(f"'{t}'" for t in tasks) + "]"
    version_of = "CASE " + " ".join(f"WHEN t = '{t}' THEN '{v}'" for t, v in versions.items()) + " END"
    # j -> (task, case, repeat); hash(run, model, j) gives stable pseudo-random verdicts, failures and
    # latencies. Each run is a day newer, so "newest metrics" is well defined.
    rows_of = f"""
        SELECT ?::VARCHAR AS eval_run_id, ?::VARCHAR AS model, t AS task, {version_of} AS dataset_version,
               'case-' || (j // 9) AS case_id, ((j // 3) % 3)::INTEGER AS repeat, h, ?::INTEGER AS r, ?::INTEGER AS m
        FROM (SELECT j, hash(?, ?, j) AS h, {task_list}[(j % {len(tasks)}) + 1] AS t FROM range({per_slice}) AS s(j))"""
    scores = f"""
        SELECT eval_run_id, model, task, dataset_version, case_id, repeat, 'verdict' AS scorer,
               CASE WHEN h % 10 < 8 THEN 1.0 ELSE 0.0 END AS score, h % 10 < 8 AS correct,
               CASE WHEN h % 100 = 0 THEN NULL WHEN h % 10 < 8 THEN 'PASS' ELSE 'FAIL' END AS parsed,
               'synthetic' AS reason, h % 100 = 0 AS call_failed, 50 + (h % 2000)::DOUBLE AS latency_ms,
               200 + h % 300 AS input_tokens, 1 + h % 5 AS output_tokens,
               CASE WHEN m = {MODELS - 1} THEN NULL ELSE (h % 1000) * 1e-7 END AS cost_usd,
               TIMESTAMP '2026-01-01' + INTERVAL (r) DAY AS scored_at
        FROM ({rows_of})"""
    inference = f"""
        SELECT eval_run_id, model, task, dataset_version, case_id, repeat, md5(h::VARCHAR) AS cache_key,
               CASE WHEN h % 10 < 8 THEN 'PASS' ELSE 'FAIL' END AS response_text, 50 + (h % 2000)::DOUBLE AS latency_ms,
               200 + h % 300 AS input_tokens, 1 + h % 5 AS output_tokens, (h % 1000) * 1e-7 AS cost_usd,
               'stop' AS finish_reason, NULL AS error_class, NULL AS error_message, 1 AS attempts, FALSE AS from_cache,
               1.7e9 + r * 86400 AS completed_at, 'bench' AS dagster_run_id
        FROM ({rows_of})"""
    with warehouse.write_connection(db) as conn, warehouse.transaction(conn):
        for r in range(EVAL_RUNS):
            for m in range(MODELS):
                run, model = f"bench-run-{r}", f"model-{m}"
                params = [run, model, r, m, run, model]
                write_slice(conn, "scores", run, model, scores, params)
                if with_inference:
                    write_slice(conn, "inference_results", run, model, inference, params)
        count = conn.execute("SELECT count(*) FROM scores").fetchall()[0][0]
    if count != per_slice * EVAL_RUNS * MODELS:
        raise RuntimeError(f"expected {per_slice * EVAL_RUNS * MODELS} score rows, found {count}")


def newest_candidates(metrics: pl.DataFrame, task: str, version: str) -> pl.DataFrame:
    """Each model's newest metrics row for the task's version: what the recommend step ranks."""
    rows = metrics.filter((pl.col("task") == task) & (pl.col("dataset_version") == version))
    newest = rows.group_by("model").agg(pl.col("evaluated_at").max())
    return rows.join(newest, on=["model", "evaluated_at"]).rename({"cost_per_case_usd": "cost_per_case"})


def write_registry(path: Path) -> None:
    """The synthetic models, enabled, so the recommendation step considers them."""
    entries = "".join(f"  - {{name: model-{m}, model: openai/fake-{m}, provider: fake, family: fake}}\n"
                      for m in range(MODELS))
    path.write_text("models:\n" + entries)


@dataclass
class WarehouseFigures:
    rows: int
    metric_rows: int
    metrics_s: float
    recommend_s: float
    recommendations: int
    champions: int
    pipeline_s: float
    score_rows: int
    score_s: float

    def figures(self) -> list[Figure]:
        per_1m = 1_000_000 / self.rows
        recompute_1m = (self.metrics_s + self.recommend_s) * per_1m
        score_1m = self.score_s / self.score_rows * 1_000_000
        return [
            Figure(f"4 warehouse: compute_metrics, {self.rows:,} score rows",
                   f"{self.metrics_s:.2f} s ({self.metric_rows} metric rows)"),
            Figure("4 warehouse: policies.recommend per task",
                   f"{self.recommend_s:.3f} s ({self.recommendations} recommendations, {self.champions} champions)"),
            Figure("4 warehouse: metrics + recommendations, per 1M rows", f"{recompute_1m:.2f} s",
                   f"<= {TARGET_RECOMPUTE_1M_S:g} s", recompute_1m <= TARGET_RECOMPUTE_1M_S),
            Figure("4 warehouse: steps refresh_metrics + recommend_tasks", f"{self.pipeline_s:.2f} s (with writes)",
                   f"<= {TARGET_RECOMPUTE_1M_S * self.rows / 1_000_000:g} s",
                   self.pipeline_s <= TARGET_RECOMPUTE_1M_S * self.rows / 1_000_000),
            Figure(f"4 warehouse: score_results (verdict), {self.score_rows:,} rows",
                   f"{self.score_s:.2f} s = {self.score_s / self.score_rows * 1e6:.1f} us/row"),
            Figure("4 warehouse: score + aggregate 1M rows (extrapolated)", f"{score_1m + self.metrics_s * per_1m:.1f} s",
                   f"<= {TARGET_SCORE_AND_METRICS_1M_S:g} s", score_1m + self.metrics_s * per_1m <= TARGET_SCORE_AND_METRICS_1M_S),
        ]


def measure(rows: int, score_rows: int, workdir: Path) -> WarehouseFigures:
    db = workdir / "warehouse-bench" / "model_eval.duckdb"
    fill_scores(db, rows)
    tasks = load_tasks(REPO / "golden")

    # As specified: the two functions, on a read connection, no writes.
    with warehouse.read_connection(db) as conn:
        started = time.perf_counter()
        metrics = compute_metrics(conn)
        metrics_s = time.perf_counter() - started
    started = time.perf_counter()
    results = []
    for task in tasks:
        candidates = newest_candidates(metrics, task.name, task.dataset_version)
        results += [recommend(candidates, policy, task.qualification_threshold) for policy in registered_policies()]
    recommend_s = time.perf_counter() - started

    # As the pipeline's assets run them: metrics swapped in, then recommendations, each published.
    write_registry(workdir / "warehouse-bench" / "models.yaml")
    paths = ProjectPaths(golden_dir=REPO / "golden", registry_file=workdir / "warehouse-bench" / "models.yaml",
                         warehouse_file=db, cache_file=workdir / "warehouse-bench" / "cache.sqlite")
    quiet = logging.getLogger("bench.warehouse")
    started = time.perf_counter()
    refresh_metrics(Project.load(paths), quiet)
    frame = recommend_tasks(Project.load(paths), "bench-recommend", quiet)
    pipeline_s = time.perf_counter() - started
    if frame.filter(pl.col("champion").is_not_null()).height != sum(r.champion is not None for r in results):
        raise RuntimeError("the recommendation step and policies.recommend disagree on the champions")

    score_s = measure_scoring(score_rows)
    return WarehouseFigures(rows=rows, metric_rows=metrics.height, metrics_s=metrics_s, recommend_s=recommend_s,
                            recommendations=len(results), champions=sum(r.champion is not None for r in results),
                            pipeline_s=pipeline_s, score_rows=score_rows, score_s=score_s)


# ---------------------------------------------------------------- scoring, per row
def synthetic_inference(rows: int, cases: int, version: str) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Inference rows with the kinds of replies small models give, and their golden cases."""
    replies = ["PASS", "FAIL", "**PASS**", "Verdict: fail", "PASS. The summary is accurate.",
               "It does not pass. FAIL", "pass", "I think the summary is fine, so my answer is PASS",
               "<think>Is it PASS or FAIL? It invents pay.</think>FAIL", "maybe?", "", None]
    frame = pl.DataFrame({"i": pl.int_range(0, rows, eager=True),
                          "response_text": [replies[i % len(replies)] for i in range(rows)]}).with_columns(
        pl.lit("bench-run").alias("eval_run_id"), pl.lit("model-a").alias("model"), pl.lit("grading").alias("task"),
        pl.lit(version).alias("dataset_version"),
        pl.format("case-{}", (pl.col("i") // 3) % cases).alias("case_id"),
        (pl.col("i") % 3).cast(pl.Int32).alias("repeat"),
        (50 + pl.col("i") % 900).cast(pl.Float64).alias("latency_ms"),
        pl.lit(300, pl.Int64).alias("input_tokens"), pl.lit(2, pl.Int64).alias("output_tokens"),
        pl.lit(3e-4).alias("cost_usd"),
    ).with_columns(
        # The None reply is a failed call, the way the engine records one.
        pl.when(pl.col("response_text").is_null()).then(pl.lit("Timeout")).otherwise(None).alias("error_class"),
    ).drop("i")
    golden = pl.DataFrame({"task": "grading", "dataset_version": version,
                           "case_id": [f"case-{c}" for c in range(cases)],
                           "expected_json": [json.dumps("PASS" if c % 2 else "FAIL") for c in range(cases)]})
    return frame, golden


def measure_scoring(rows: int) -> float:
    task = load_task(REPO / "golden" / "grading")          # the real task: verdict scorer and its settings
    results, cases = synthetic_inference(rows, cases=max(1, rows // 30), version=task.dataset_version)
    started = time.perf_counter()
    scores = score_results(results, cases, {task.name: task})
    seconds = time.perf_counter() - started
    if scores.height != rows:
        raise RuntimeError(f"score_results returned {scores.height} rows for {rows}")
    return seconds
