"""Publishing: writing one run into a warehouse that already holds 1,000,000 result rows, versus an empty one.

Two temporary projects share one golden set (the shipped `grading` task: 14 cases, 1 repeat), one
registry (a model at the instant fake endpoint) and one response cache. One warehouse starts empty;
the other gets `rows` inference_results rows and as many scores rows first (benchmarks/warehouse.py's
generator: 4 eval runs x 5 models), then one untimed run, so both are in their steady state. Then a
run is written into each, `rounds` times, alternating: every step of the pipeline that writes, as the
assets call them (golden ingestion, registry sync and initial assignments, inference with every answer
from the cache, scoring, metrics, recommendations, promotion). The figure is the ratio of the medians.
"""

from __future__ import annotations

import logging
import shutil
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

from benchmarks.common import REPO, Endpoint, Figure
from benchmarks.warehouse import fill_scores

from model_eval.project import Project  # noqa: E402
from model_eval.settings import ProjectPaths  # noqa: E402
from model_eval.steps.evaluation import run_inference, score_model  # noqa: E402
from model_eval.steps.golden import ingest_golden  # noqa: E402
from model_eval.steps.models import ensure_assignments, sync_registry  # noqa: E402
from model_eval.steps.promotion import promote  # noqa: E402
from model_eval.steps.recommendation import recommend_tasks, refresh_metrics  # noqa: E402

TARGET_RATIO = 1.5
MODEL = "bench"
QUIET = logging.getLogger("bench.publish")


def write_project(root: Path, shared: Path, api_base: str) -> ProjectPaths:
    golden = shared / "golden"
    if not golden.exists():
        (golden / "grading" / "cases").mkdir(parents=True)
        task = (REPO / "golden" / "grading" / "task.yaml").read_text()
        (golden / "grading" / "task.yaml").write_text(task.replace("\nrepeats: 3\n", "\nrepeats: 1\n"))
        shutil.copyfile(REPO / "golden" / "grading" / "cases" / "v1.jsonl", golden / "grading" / "cases" / "v1.jsonl")
        (shared / "models.yaml").write_text(
            f"models:\n  - {{name: {MODEL}, model: openai/fake, api_base: '{api_base}', max_concurrency: 32,"
            " price_per_million: {input: 1.0, output: 2.0}}\n")
        deployment = (REPO / "deployment.yaml").read_text()
        start, end = deployment.index("initial_assignments:"), deployment.index("\n# Gates")
        deployment = deployment[:start] + f"initial_assignments:\n  grading: {MODEL}\n" + deployment[end:]
        (shared / "deployment.yaml").write_text(
            deployment.replace("log_file: warehouse/alerts.log", f"log_file: {shared / 'alerts.log'}"))
    return ProjectPaths(golden_dir=golden, registry_file=shared / "models.yaml", warehouse_file=root / "model_eval.duckdb",
                        cache_file=shared / "cache.sqlite", deployment_file=shared / "deployment.yaml")


def write_run(paths: ProjectPaths, eval_run_id: str) -> float:
    """Every writing step of one run, as the assets call them; returns seconds."""
    started = time.perf_counter()
    ingest_golden(Project.load(paths), eval_run_id, QUIET)
    sync_registry(Project.load(paths), eval_run_id, QUIET)
    ensure_assignments(Project.load(paths), QUIET)
    stats = run_inference(Project.load(paths), MODEL, eval_run_id, QUIET, trigger="bench")
    score_model(Project.load(paths), MODEL, eval_run_id, QUIET)
    refresh_metrics(Project.load(paths), QUIET, completing=eval_run_id)   # as the recommend run of a finished evaluation
    recommend_tasks(Project.load(paths), eval_run_id, QUIET)
    promote(Project.load(paths), eval_run_id, QUIET)
    seconds = time.perf_counter() - started
    cases = sum(1 for line in (paths.golden_dir / "grading" / "cases" / "v1.jsonl").open() if line.strip())
    if stats.errors or stats.total != cases:
        raise RuntimeError(f"the run made {stats.total} calls with {stats.errors} errors; expected {cases} clean ones")
    return seconds


@dataclass
class PublishFigures:
    rows: int
    empty_s: list[float]
    full_s: list[float]
    public_mb: tuple[float, float]

    def figures(self) -> list[Figure]:
        empty, full = statistics.median(self.empty_s), statistics.median(self.full_s)
        ratio = full / empty
        return [
            Figure("6 publish: write a 14-case run, empty warehouse",
                   f"{empty:.2f} s median ({', '.join(f'{s:.2f}' for s in self.empty_s)}); DuckDB file {self.public_mb[0]:.1f} MB"),
            Figure(f"6 publish: same, warehouse holding {self.rows:,} + {self.rows:,} result rows",
                   f"{full:.2f} s median ({', '.join(f'{s:.2f}' for s in self.full_s)}); DuckDB file {self.public_mb[1]:.1f} MB"),
            Figure("6 publish: full / empty", f"{ratio:.2f}x", f"<= {TARGET_RATIO:g}x", ratio <= TARGET_RATIO),
        ]


def measure(rows: int, rounds: int, workdir: Path) -> PublishFigures:
    base = workdir / "publish"
    shutil.rmtree(base, ignore_errors=True)
    with Endpoint() as endpoint:
        empty = write_project(base / "empty", base / "shared", endpoint.api_base)
        full = write_project(base / "full", base / "shared", endpoint.api_base)
        fill_scores(full.warehouse_file, rows, with_inference=True)
        write_run(empty, "warm-up-empty")   # fills the response cache; later runs call nothing
        write_run(full, "warm-up-full")     # metrics of the prefilled rows are computed once here
        empty_s, full_s = [], []
        for r in range(rounds):
            order = ((empty, empty_s), (full, full_s)) if r % 2 == 0 else ((full, full_s), (empty, empty_s))
            for paths, times in order:
                times.append(write_run(paths, f"bench-{r}"))
        sent = endpoint.sent()
    if sent != 14:
        raise RuntimeError(f"the endpoint saw {sent} calls; the timed runs must all come from the cache")
    size = (empty.warehouse_file.stat().st_size / 1e6, full.warehouse_file.stat().st_size / 1e6)
    return PublishFigures(rows=rows, empty_s=empty_s, full_s=full_s, public_mb=size)
