"""Peak memory of one model's evaluation, by golden-set size, each in a fresh process.

The parent (run.py, through `measure`) writes a temporary project per size: a golden set with one
task (golden/classification/task.yaml with `repeats: 1`) and N synthetic cases, and a registry with
one model pointing at the instant fake endpoint. It then runs this module as child processes:

    python -m benchmarks.memory ingest PROJECT...   # idle RSS first, then ingest_golden + sync_registry
    python -m benchmarks.memory evaluate PROJECT    # steps.evaluation.run_inference of the model, timed

A child reports its own peak resident set on its last stdout line, as JSON: VmHWM from
/proc/self/status, because ru_maxrss in a child inherits the parent's peak (see `peak_rss_mb`).
The idle baseline is the ingest child's peak right after the imports an evaluation makes.
Ingestion runs in a process of its own per size, so that its peak (Great Expectations validates the
cases in chunks of pandas rows) is not counted as the evaluation's, and each size's ingestion peak
is its own: the 10x-cases ingestion must also stay under 2x the memory.

The parent watches each child with a time limit: if it runs out, the child is killed and its peak
so far is read from /proc/<pid>/status (VmHWM), with how far it got.

`--client http` (the default of run.py) sends run_inference's calls over the engine's lean HTTP
client (`client: http` in the registry, the path `openai/` models take anyway); `--client litellm`
sends them through litellm, which spends ~8 ms of CPU a call on this machine, so 100,000 calls take
15-25 minutes. The memory of interest is the engine's and the pipeline's (requests, rows, batches).
"""

from __future__ import annotations

import argparse
import json
import logging
import queue
import random
import resource
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from benchmarks.common import REPO, Figure

# The modules an evaluation imports; the idle baseline imports exactly these.
import aiohttp  # noqa: E402,F401  (the HTTP client's transport)
import litellm  # noqa: E402,F401  (the litellm path imports it lazily at the first call; count it in the baseline)

from model_eval.project import Project  # noqa: E402
from model_eval.steps.evaluation import run_inference  # noqa: E402
from model_eval.steps.golden import ingest_golden  # noqa: E402
from model_eval.steps.models import sync_registry  # noqa: E402
from model_eval.settings import ProjectPaths  # noqa: E402

MODEL = "bench"
EVAL_RUN_ID = "bench-memory"
TARGET_RATIO = 2.0   # 10x the cases in under 2x the memory: results must not all be held at once


# ================================================================ the children
def peak_rss_mb() -> float:
    """This process's peak resident set: VmHWM, which is what ru_maxrss should be.

    ru_maxrss cannot be used in a child: Linux carries the parent's peak across vfork + exec (which
    subprocess uses), so a child of a 600 MB parent reports >= 600 MB however little it touches.
    Measured here: a bare `python -c` reported ru_maxrss 611 MB and VmHWM 10 MB. VmHWM belongs to
    the address space exec created, so it counts this program only.
    """
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024   # kilobytes on Linux


def project_paths(root: Path) -> ProjectPaths:
    """The files of a project written by `prepare_project`."""
    return ProjectPaths(golden_dir=root / "golden", registry_file=root / "models.yaml",
                        warehouse_file=root / "warehouse" / "model_eval.duckdb",
                        cache_file=root / "warehouse" / "cache" / "responses.sqlite")


def child_ingest(roots: list[Path]) -> dict:
    log = logging.getLogger("bench.ingest")
    result = {"idle_rss_mb": peak_rss_mb(), "projects": {}}   # nothing done yet but the imports
    for root in roots:
        paths = project_paths(root)
        started = time.perf_counter()
        ingestion = ingest_golden(Project.load(paths), "bench-ingest", log)
        ingest_s = time.perf_counter() - started
        started = time.perf_counter()
        synced = sync_registry(Project.load(paths), "bench-ingest", log)
        if [m.name for m in synced.available] != [MODEL]:
            raise RuntimeError(f"model {MODEL} is not available: {synced.skipped}")
        # The peak only grows: after the smallest-first sizes it is each size's own peak.
        result["projects"][str(root)] = {"ingest_s": ingest_s, "sync_s": time.perf_counter() - started,
                                         "cases": ingestion.new_cases, "peak_rss_mb": peak_rss_mb()}
    result["peak_rss_mb"] = peak_rss_mb()
    return result


def child_evaluate(root: Path, client: str) -> dict:
    log = logging.getLogger("bench.evaluate")
    next_report = [0]

    def progress(stats) -> None:
        # run_model calls this every 10 calls; a line every 2% is enough for the parent's watch.
        if stats.done >= next_report[0] or stats.done == stats.total:
            print(json.dumps({"done": stats.done, "total": stats.total}), flush=True)
            next_report[0] = stats.done + max(1, stats.total // 50)

    paths = project_paths(root)
    # The client is chosen here, in the registry the step reads, as a user would choose it.
    paths.registry_file.write_text(paths.registry_file.read_text().replace("client: http", f"client: {client}"))
    started = time.perf_counter()
    stats = run_inference(Project.load(paths), MODEL, EVAL_RUN_ID, log, on_progress=progress)
    return {"seconds": time.perf_counter() - started, "calls": stats.total, "sent": stats.sent, "errors": stats.errors,
            "peak_rss_mb": peak_rss_mb()}


def child_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="A child of the memory benchmark (started by benchmarks/run.py).")
    parser.add_argument("mode", choices=["ingest", "evaluate"])
    parser.add_argument("projects", nargs="+", type=Path, help="project folders written by prepare_project")
    parser.add_argument("--client", choices=["http", "litellm"], default="http")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    if args.mode == "ingest":
        result = child_ingest(args.projects)
    else:
        result = child_evaluate(args.projects[0], args.client)
    print(json.dumps(result), flush=True)
    return 0


# ================================================================ the parent
LABELS = ["software", "healthcare", "finance", "education", "retail", "manufacturing", "logistics", "hospitality",
          "construction", "marketing"]
ROLES = ["Analyst", "Coordinator", "Engineer", "Assistant", "Manager", "Technician", "Specialist", "Clerk"]
CITIES = ["Leeds", "Tucson, AZ", "Lyon", "Charlotte, NC", "Porto", "Utrecht", "Denver, CO", "Gdansk"]


def synthetic_case(i: int, rng: random.Random) -> dict:
    """A job posting of typical length (~450 characters), different for every case."""
    label = LABELS[i % len(LABELS)]
    role, city = rng.choice(ROLES), rng.choice(CITIES)
    posting = (f"{role} - Company {i:06d}, {city}\n\nCompany {i:06d} works in {label}. We are hiring a {role.lower()} "
               f"to join a team of {rng.randint(3, 40)} people. You will plan the weekly work, keep records up to date, "
               f"and talk to customers and suppliers every day. {rng.randint(1, 6)} years of experience are required; "
               f"training is provided. Salary {rng.randint(25, 90) * 1000:,} - {rng.randint(91, 140) * 1000:,} a year, "
               f"reference {rng.getrandbits(48):012x}.")
    return {"id": f"synthetic-{i:06d}", "inputs": {"posting": posting}, "expected": label}


def prepare_project(root: Path, cases: int, api_base: str) -> Path:
    """A golden set of `cases` synthetic cases and a one-model registry pointing at `api_base`."""
    task_dir = root / "golden" / "classification"
    (task_dir / "cases").mkdir(parents=True)
    template = (REPO / "golden" / "classification" / "task.yaml").read_text()
    if "\nrepeats: 3\n" not in template:
        raise RuntimeError("golden/classification/task.yaml changed: set `repeats: 1` in this benchmark another way")
    (task_dir / "task.yaml").write_text(template.replace("\nrepeats: 3\n", "\nrepeats: 1\n"))
    rng = random.Random(cases)
    with (task_dir / "cases" / "v1.jsonl").open("w") as out:
        for i in range(cases):
            out.write(json.dumps(synthetic_case(i, rng)) + "\n")
    (root / "models.yaml").write_text(f"""\
models:
  - name: {MODEL}
    model: openai/fake
    api_base: {api_base}
    price_per_million: {{input: 1.0, output: 2.0}}
    provider: fake
    family: fake
    max_concurrency: 32
    timeout_s: 30
    max_attempts: 3
    client: http
""")
    return root


@dataclass
class Child:
    """What a child process reported, or how far it got before its time limit."""

    result: dict | None          # its final JSON line; None when it did not finish
    seconds: float
    peak_rss_mb: float           # its own peak (VmHWM), or VmHWM read by us when it was killed
    progress: dict | None        # its last progress line
    error: str | None = None


def _vm_hwm_mb(pid: int) -> float | None:
    """Peak resident set of a running process (see `peak_rss_mb`)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def run_child(args: list[str], limit_s: float, log_file: Path) -> Child:
    command = [sys.executable, "-m", "benchmarks.memory", *args]
    started = time.perf_counter()
    with log_file.open("w") as stderr:
        proc = subprocess.Popen(command, cwd=REPO, stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=stderr, text=True)
        lines: queue.Queue[str] = queue.Queue()
        reader = threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True)
        reader.start()
        last, progress, peak = None, None, 0.0
        # Bounded: every pass waits at most 0.5 s, and the loop ends at the deadline.
        while time.perf_counter() - started < limit_s:
            try:
                line = lines.get(timeout=0.5)
            except queue.Empty:
                line = None
            if line and line.startswith("{"):
                last = json.loads(line)
                progress = last if "done" in last else progress
            peak = max(peak, _vm_hwm_mb(proc.pid) or 0.0)
            if proc.poll() is not None and lines.empty() and not reader.is_alive():
                break
        finished = proc.poll() is not None
        if not finished:
            peak = max(peak, _vm_hwm_mb(proc.pid) or 0.0)
            proc.kill()
        proc.wait(10)
    seconds = time.perf_counter() - started
    if not finished:
        return Child(None, seconds, peak, progress, error=f"did not finish within {limit_s:.0f} s")
    if proc.returncode != 0 or last is None or "peak_rss_mb" not in last:
        tail = log_file.read_text()[-2000:]
        return Child(None, seconds, peak, progress, error=f"exit code {proc.returncode}: {tail}")
    return Child(last, seconds, last["peak_rss_mb"], progress)


@dataclass
class MemoryFigures:
    sizes: list[int]
    client: str
    ingest: Child                 # one child ingested every size
    evaluate: dict[int, Child]

    def idle_mb(self) -> float | None:
        return self.ingest.result["idle_rss_mb"] if self.ingest.result else None

    def figures(self) -> list[Figure]:
        out = []
        if self.ingest.result is None:
            return [Figure("3 memory: ingest the golden sets", f"FAILED: {self.ingest.error[:100]}", "finishes", False)]
        out.append(Figure("3 memory: idle interpreter, same imports (RSS)", f"{self.idle_mb():,.0f} MB"))
        for n in self.sizes:
            ing = self.ingest.result["projects"][str(n)]
            out.append(Figure(f"3 memory: ingest {n:,} cases (GX validation + write)",
                              f"{ing['ingest_s']:.1f} s (peak {ing['peak_rss_mb']:,.0f} MB; sync registry {ing['sync_s']:.1f} s)"))
        small_peak = self.ingest.result["projects"][str(self.sizes[0])]["peak_rss_mb"]
        large_peak = self.ingest.result["projects"][str(self.sizes[-1])]["peak_rss_mb"]
        ratio = large_peak / small_peak
        out.append(Figure(f"3 memory: ingest peak {self.sizes[-1]:,} / peak {self.sizes[0]:,} cases", f"{ratio:.2f}",
                          f"< {TARGET_RATIO:g}", ratio < TARGET_RATIO))
        for n in self.sizes:
            ev = self.evaluate[n]
            label = f"3 memory: peak RSS, {n:,} cases, run_inference ({self.client})"
            if ev.result:
                rate = ev.result["calls"] / ev.result["seconds"]
                ok = ev.result["errors"] == 0 and ev.result["calls"] == n
                out.append(Figure(label, f"{ev.peak_rss_mb:,.0f} MB ({ev.result['seconds']:.0f} s, {rate:,.0f} calls/s)",
                                  "no errors", ok))
            else:
                done = f"{ev.progress['done']:,} of {n:,} calls done" if ev.progress else "no call done"
                out.append(Figure(label, f"{ev.peak_rss_mb:,.0f} MB so far; {ev.error[:60]}; {done}", "finishes", False))
        small, large = self.sizes[0], self.sizes[-1]
        a, b = self.evaluate[small], self.evaluate[large]
        label = f"3 memory: peak {large:,} / peak {small:,} cases"
        if a.result and b.result:
            ratio = b.peak_rss_mb / a.peak_rss_mb
            # Above the idle interpreter: the part the evaluation itself adds, a stricter view.
            above = (b.peak_rss_mb - self.idle_mb()) / max(1.0, a.peak_rss_mb - self.idle_mb())
            out.append(Figure(label, f"{ratio:.2f} (above idle: {above:.2f})", f"< {TARGET_RATIO:g}", ratio < TARGET_RATIO))
        else:
            out.append(Figure(label, "not measured: a run did not finish", f"< {TARGET_RATIO:g}", False))
        return out


def measure(sizes: list[int], workdir: Path, limit_s: float, client: str, api_base: str) -> MemoryFigures:
    """Ingest, then evaluate, a golden set of each size; `api_base` must be an instant endpoint.

    Each size is ingested by a child of its own, so each ingestion's peak is its own (a peak only grows)."""
    sizes = sorted(sizes)
    roots = [prepare_project(workdir / "memory" / str(n), n, api_base) for n in sizes]
    ingest = Child({"projects": {}, "idle_rss_mb": None}, 0.0, 0.0, None)
    for n, root in zip(sizes, roots):
        child = run_child(["ingest", str(root)], limit_s, workdir / f"memory-ingest-{n}.log")
        if child.result is None:
            ingest = child
            break
        ingest.result["projects"][str(n)] = child.result["projects"][str(root)]
        ingest.result["idle_rss_mb"] = child.result["idle_rss_mb"]
        ingest.seconds += child.seconds
    evaluate = {}
    for n, root in zip(sizes, roots):
        if ingest.result is None:
            evaluate[n] = Child(None, 0.0, 0.0, None, error="ingestion failed")
            continue
        evaluate[n] = run_child(["evaluate", str(root), "--client", client], limit_s, workdir / f"memory-{n}.log")
    return MemoryFigures(sizes=sizes, client=client, ingest=ingest, evaluate=evaluate)


if __name__ == "__main__":
    raise SystemExit(child_main())
