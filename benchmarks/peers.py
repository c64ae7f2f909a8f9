"""Peers: `model-eval run` end to end against promptfoo and Inspect AI, on the same cases and stub.

Every runner is a separate program started as a child process; its wall time is from process start to
exit, and its CPU (user + sys of it and its children) from the kernel's accounting of waited children.
The suite is single-turn: one system + one user message per case, one call per case, the stub
answering "PASS" after `--delay-ms` (20 ms by default) from a process of its own
(`fake_endpoint.py --delay-ms`). Medians of `rounds` runs; the rounds run the runners in turn
(model-eval, promptfoo, inspect | model-eval, ...), so slow drift of the shared machine weighs on
each alike.

model-eval is measured four ways:

* `fresh`: the golden set is unchanged since the warm-up run (validated, ingested), every case is
  asked again (`--fresh`): what a person waits for after changing a model or a prompt parameter.
  The warm-up run started the instance's warm runner (runner_client.py), which serves this run;
* `re-run`: nothing changed; every answer comes from the response cache (also served warm);
* `fresh in-process` (20 cases only): `fresh` with `--in-process`, as every run was before the warm
  runner, and as the first run after the runner has gone idle or the code changed;
* `cold` (20 cases only, once): a new warehouse, a new Dagster instance, a never-validated golden set.

A run served by the warm runner spends its CPU in the runner, not in the child this benchmark waits
for: the runner's own CPU over the run (from /proc) is added to model-eval's figure.

promptfoo runs with its cache off (`--no-cache`) and writes no results database (`--no-write`);
Inspect AI with `--no-log-samples`-free defaults but its log in the round's folder. Each gets one
warm-up run (npm's and Python's first start reads more from disk). A runner that is not installed is
skipped with the reason: promptfoo is looked for in `benchmarks/.peers/node_modules/.bin` then on
PATH, Inspect AI in `benchmarks/.venv-peers/bin` then on PATH (see benchmarks/README.md).
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from benchmarks.common import REPO, Endpoint, Figure

TASK = "bench"
MODEL = "stub"
SYSTEM_PROMPT = "You check summaries of job postings. Answer with one word only, PASS or FAIL."
TARGET_STARTUP_RATIO = 1.5      # model-eval fresh, 20 cases: at most 1.5x promptfoo's wall time
RUN_LIMIT_S = 600.0             # any one program run


# ================================================================ the suite, as each runner reads it
def suite_cases(n: int) -> list[dict]:
    """`n` single-turn cases; half PASS, half FAIL, every prompt different."""
    cases = []
    for i in range(n):
        posting = (f"Clerk {i:05d} at Company {i % 97:03d}, Leeds. Keep records, answer customers, "
                   f"{1 + i % 5} years of experience, salary {25 + i % 40},000 a year.")
        summary = f"Company {i % 97:03d} hires a clerk in Leeds ({1 + i % 5} years of experience)."
        cases.append({"id": f"case-{i:05d}", "inputs": {"posting": posting, "summary": summary},
                      "expected": "PASS" if i % 2 == 0 else "FAIL"})
    return cases


def user_prompt(inputs: dict) -> str:
    return f"Job posting:\n{inputs['posting']}\n\nSummary:\n{inputs['summary']}\n\nOne word, PASS or FAIL:"


PROMPT_TEMPLATE = "Job posting:\n{posting}\n\nSummary:\n{summary}\n\nOne word, PASS or FAIL:"


def write_model_eval_project(root: Path, cases: list[dict], api_base: str, concurrency: int) -> Path:
    """A golden set with one task, a one-model registry at the stub, and a deployment naming it."""
    folder = root / "golden" / TASK
    (folder / "cases").mkdir(parents=True, exist_ok=True)
    (folder / "task.yaml").write_text(json.dumps({
        "name": TASK, "description": "benchmark suite", "tier": 1, "output_kind": "verdict",
        "system_prompt": SYSTEM_PROMPT, "prompt_template": PROMPT_TEMPLATE,
        "scorer": {"name": "verdict", "settings": {}}, "repeats": 1, "qualification_threshold": 0.4,
        "policy": "weighted", "call_params": {"max_tokens": 8}}, indent=1))   # JSON is YAML
    (folder / "cases" / "v1.jsonl").write_text("".join(json.dumps(c) + "\n" for c in cases))
    (root / "models.yaml").write_text(json.dumps({"models": [{
        "name": MODEL, "model": "openai/fake", "api_base": api_base, "price_per_million": {"input": 1.0, "output": 2.0},
        "provider": "fake", "family": "fake", "max_concurrency": concurrency, "timeout_s": 30, "max_attempts": 3}]}, indent=1))
    deployment = (REPO / "deployment.yaml").read_text()
    start, end = deployment.index("initial_assignments:"), deployment.index("\n# Gates")
    deployment = deployment[:start] + f"initial_assignments:\n  {TASK}: {MODEL}\n" + deployment[end:]
    deployment = deployment.replace("log_file: warehouse/alerts.log", f"log_file: {root / 'warehouse' / 'alerts.log'}")
    (root / "deployment.yaml").write_text(deployment)
    return root


def model_eval_env(root: Path) -> dict[str, str]:
    return {"MODEL_EVAL_GOLDEN_DIR": str(root / "golden"), "MODEL_EVAL_REGISTRY": str(root / "models.yaml"),
            "MODEL_EVAL_DEPLOYMENT": str(root / "deployment.yaml"),
            "MODEL_EVAL_WAREHOUSE": str(root / "warehouse" / "model_eval.duckdb"),
            "DAGSTER_HOME": str(root / "dagster_home")}


def write_promptfoo_config(root: Path, cases: list[dict], api_base: str) -> Path:
    """promptfoo's config: the same messages, the stub as an OpenAI-compatible provider, an `equals` assert."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "prompt.json").write_text(json.dumps([
        {"role": "system", "content": SYSTEM_PROMPT},
        {"role": "user", "content": PROMPT_TEMPLATE.replace("{posting}", "{{posting}}").replace("{summary}", "{{summary}}")}]))
    config = {
        "description": "model_eval benchmark suite",
        "prompts": ["file://prompt.json"],
        "providers": [{"id": "openai:chat:fake", "config": {"apiBaseUrl": api_base, "apiKey": "sk-no-key", "max_tokens": 8}}],
        "tests": [{"vars": c["inputs"], "assert": [{"type": "equals", "value": c["expected"]}]} for c in cases],
    }
    path = root / "promptfooconfig.json"
    path.write_text(json.dumps(config))
    return path


INSPECT_TASK = '''\
"""The benchmark suite as an Inspect AI task (written by model_eval's benchmarks/peers.py)."""
from inspect_ai import Task, task
from inspect_ai.dataset import json_dataset
from inspect_ai.scorer import exact
from inspect_ai.solver import generate, system_message


@task
def bench():
    return Task(dataset=json_dataset("samples.jsonl"), solver=[system_message({system!r}), generate()], scorer=exact())
'''


def write_inspect_task(root: Path, cases: list[dict]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "samples.jsonl").write_text("".join(
        json.dumps({"id": c["id"], "input": user_prompt(c["inputs"]), "target": c["expected"]}) + "\n" for c in cases))
    path = root / "bench_task.py"
    path.write_text(INSPECT_TASK.replace("{system!r}", repr(SYSTEM_PROMPT)))
    return path


# ================================================================ the runners
@dataclass(frozen=True)
class Timing:
    wall_s: float
    cpu_s: float        # user + sys of the process and every child it waited for


def timed(command: list[str], env: dict[str, str], cwd: Path, log: Path, ok_codes: frozenset[int] = frozenset({0})) -> Timing:
    """Run `command` to its end; raise with the tail of its output if it fails."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    with log.open("w") as out:
        proc = subprocess.run(command, env=env, cwd=cwd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                              timeout=RUN_LIMIT_S)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode not in ok_codes:
        raise RuntimeError(f"{' '.join(command[:3])} ... exited with {proc.returncode}: {log.read_text()[-1500:]}")
    return Timing(wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime))


def base_env() -> dict[str, str]:
    env = dict(os.environ)
    # model-eval from this checkout, whatever the interpreter has installed.
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env.update({"no_proxy": "127.0.0.1", "NO_PROXY": "127.0.0.1", "LITELLM_LOCAL_MODEL_COST_MAP": "True",
                "GX_ANALYTICS_ENABLED": "false", "DAGSTER_DISABLE_TELEMETRY": "1",
                "PROMPTFOO_DISABLE_TELEMETRY": "1", "PROMPTFOO_DISABLE_UPDATE": "1"})
    return env


def find_promptfoo() -> tuple[list[str] | None, str]:
    local = REPO / "benchmarks" / ".peers" / "node_modules" / ".bin" / "promptfoo"
    found = str(local) if local.exists() else shutil.which("promptfoo")
    if not found:
        return None, "promptfoo is not installed (npm install --prefix benchmarks/.peers promptfoo)"
    version = subprocess.run([found, "--version"], capture_output=True, text=True, timeout=120,
                             env=base_env()).stdout.strip().splitlines()
    return [found], f"promptfoo {version[-1] if version else '?'}"


def find_inspect() -> tuple[list[str] | None, str]:
    local = REPO / "benchmarks" / ".venv-peers" / "bin" / "inspect"
    found = str(local) if local.exists() else shutil.which("inspect")
    if not found:
        return None, "Inspect AI is not installed (python -m venv benchmarks/.venv-peers; pip install inspect-ai openai)"
    python = Path(found).parent / "python"
    version = subprocess.run([str(python), "-c", "import importlib.metadata as m; print(m.version('inspect_ai'))"],
                             capture_output=True, text=True, timeout=120).stdout.strip()
    return [found], f"Inspect AI {version or '?'}"


@dataclass
class Runner:
    """One program on one suite size and concurrency: how to start it, and its timings."""

    name: str
    command: list[str]
    env: dict[str, str]
    cwd: Path
    reset: Callable[[], None] | None = None   # called before each run (e.g. a fresh log folder)
    helper_cpu: Callable[[], float] | None = None   # CPU seconds so far of a process that works for it (the warm runner)
    ok_codes: frozenset[int] = frozenset({0})
    timings: list[Timing] = field(default_factory=list)
    failed: str | None = None       # why it stopped being measured (a crash of its own, twice in a row)

    def run(self, log: Path) -> Timing | None:
        """One run, retried once if the program fails; after a second failure the runner is dropped."""
        for attempt in (1, 2):
            if self.reset:
                self.reset()
            try:
                helper_before = self.helper_cpu() if self.helper_cpu else 0.0
                timing = timed(self.command, self.env, self.cwd, log, self.ok_codes)
                if self.helper_cpu:
                    timing = Timing(timing.wall_s, timing.cpu_s + self.helper_cpu() - helper_before)
            except (RuntimeError, subprocess.TimeoutExpired) as exc:
                if attempt == 2:
                    self.failed = str(exc).splitlines()[0][:160]
                    return None
                continue
            self.timings.append(timing)
            return timing
        return None

    def median_wall(self) -> float:
        return statistics.median(t.wall_s for t in self.timings)

    def median_cpu(self) -> float:
        return statistics.median(t.cpu_s for t in self.timings)


def model_eval_command() -> list[str]:
    return [sys.executable, "-m", "model_eval.cli"]


def runner_cpu_s(dagster_home: Path) -> float:
    """User + sys CPU seconds so far of the instance's warm runner (0 if there is none)."""
    log = dagster_home / "runner.log"
    pids = [line.split("runner ", 1)[1].split(":", 1)[0] for line in log.read_text().splitlines()
            if ": serving " in line] if log.exists() else []
    try:
        fields = Path(f"/proc/{pids[-1]}/stat").read_text().rsplit(")", 1)[1].split()
    except (IndexError, OSError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wait_for_warm_runner(dagster_home: Path, timeout_s: float = 120.0) -> None:
    """The warm-up run starts the runner in the background; timed runs begin once it serves."""
    from model_eval.runner_client import runner_is_up

    deadline = time.monotonic() + timeout_s
    while not runner_is_up(dagster_home):
        if time.monotonic() > deadline:
            raise RuntimeError(f"no warm runner for {dagster_home} after {timeout_s:.0f} s; see its runner.log")
        time.sleep(0.2)


def build_runners(root: Path, n: int, concurrency: int, api_base: str, peers: dict[str, list[str] | None]) -> list[Runner]:
    cases = suite_cases(n)
    project = write_model_eval_project(root / "model_eval", cases, api_base, concurrency)
    env = {**base_env(), **model_eval_env(project)}
    cpu = lambda: runner_cpu_s(Path(env["DAGSTER_HOME"]))   # noqa: E731
    runners = [
        Runner("model-eval fresh", [*model_eval_command(), "run", "-q", "--fresh"], env, REPO, helper_cpu=cpu),
        Runner("model-eval re-run", [*model_eval_command(), "run", "-q"], env, REPO, helper_cpu=cpu),
    ]
    if n <= 20:
        runners.append(Runner("model-eval fresh in-process", [*model_eval_command(), "run", "-q", "--fresh", "--in-process"],
                              env, REPO))
    if peers.get("promptfoo"):
        config = write_promptfoo_config(root / "promptfoo", cases, api_base)
        # No debug/error log files: promptfoo 0.121's file logger crashed at exit ("write after end") in a 2,000-case run.
        pf_env = {**base_env(), "PROMPTFOO_CONFIG_DIR": str(root / "promptfoo" / "home"), "OPENAI_API_KEY": "sk-no-key",
                  "PROMPTFOO_DISABLE_DEBUG_LOG": "true", "PROMPTFOO_DISABLE_ERROR_LOG": "true"}
        runners.append(Runner("promptfoo", [*peers["promptfoo"], "eval", "-c", str(config), "--no-cache", "--no-write",
                                            "--no-table", "--no-progress-bar", "-j", str(concurrency)],
                              # 100: "some assertions failed", which they do: the stub says PASS to every case.
                              pf_env, config.parent, ok_codes=frozenset({0, 100})))
    if peers.get("inspect"):
        task_file = write_inspect_task(root / "inspect", cases)
        logs = root / "inspect" / "logs"
        # openai-api/<name>/<model>: Inspect's OpenAI-compatible chat provider, configured by <NAME>_BASE_URL and
        # <NAME>_API_KEY (its openai/ provider speaks the Responses API, which the stub does not serve).
        in_env = {**base_env(), "STUB_API_KEY": "sk-no-key", "STUB_BASE_URL": api_base, "INSPECT_LOG_DIR": str(logs),
                  "INSPECT_DISPLAY": "none"}
        runners.append(Runner("inspect", [*peers["inspect"], "eval", task_file.name, "--model", "openai-api/stub/fake",
                                          "--max-connections", str(concurrency), "--display", "none"],
                              in_env, task_file.parent, reset=lambda: shutil.rmtree(logs, ignore_errors=True)))
    return runners


def cold_model_eval(root: Path, api_base: str, n: int, concurrency: int) -> Timing:
    """A first run: new warehouse, new instance, a golden set never validated."""
    from model_eval.runner_client import stop_runner

    project = write_model_eval_project(root, suite_cases(n), api_base, concurrency)
    env = {**base_env(), **model_eval_env(project)}
    timing = timed([*model_eval_command(), "run", "-q"], env, REPO, root / "cold.log")
    wait_for_warm_runner(Path(env["DAGSTER_HOME"]))   # it started one: let it load, then stop it
    stop_runner(Path(env["DAGSTER_HOME"]))
    return timing


# ================================================================ the measurement
@dataclass
class PeerFigures:
    versions: dict[str, str]
    skipped: dict[str, str]
    results: dict[tuple[int, int], list[Runner]] = field(default_factory=dict)   # (cases, concurrency) -> runners
    cold: Timing | None = None
    calls_sent: dict[tuple[int, int, str], int] = field(default_factory=dict)

    def figures(self) -> list[Figure]:
        out = [Figure(f"5 peers: {name}", f"skipped: {reason}") for name, reason in self.skipped.items()]
        for (n, c), runners in self.results.items():
            for r in [r for r in runners if r.failed]:
                out.append(Figure(f"5 peers {n:,} cases c={c}: {r.name}", f"failed: {r.failed}"))
            runners = [r for r in runners if not r.failed]
            for r in runners:
                walls = ", ".join(f"{t.wall_s:.2f}" for t in r.timings)
                out.append(Figure(f"5 peers {n:,} cases c={c}: {r.name}",
                                  f"{r.median_wall():.2f} s wall ({walls}), {n / r.median_wall():,.0f} cases/s, "
                                  f"CPU {r.median_cpu():.1f} s"))
            fresh, rerun, pf, in_process = (next((r for r in runners if r.name == x), None) for x in (
                "model-eval fresh", "model-eval re-run", "promptfoo", "model-eval fresh in-process"))
            if fresh is None or rerun is None:
                continue
            if pf is not None:
                ratio = fresh.median_wall() / pf.median_wall()
                if n <= 20:
                    out.append(Figure(f"5 peers {n:,} cases c={c}: model-eval fresh / promptfoo wall", f"{ratio:.2f}x",
                                      f"<= {TARGET_STARTUP_RATIO:g}x", ratio <= TARGET_STARTUP_RATIO))
                    if in_process is not None:
                        out.append(Figure(f"5 peers {n:,} cases c={c}: model-eval fresh in-process / promptfoo wall",
                                          f"{in_process.median_wall() / pf.median_wall():.2f}x", "(no warm runner: for reference)"))
                else:
                    speed = pf.median_wall() / fresh.median_wall()
                    out.append(Figure(f"5 peers {n:,} cases c={c}: model-eval / promptfoo throughput", f"{speed:.2f}x",
                                      ">= 2x (issue 11 item 2)", speed >= 2))
            if n <= 20:
                out.append(Figure(f"5 peers {n:,} cases c={c}: re-run / fresh wall",
                                  f"{rerun.median_wall() / fresh.median_wall():.2f}x", "< 1x",
                                  rerun.median_wall() < fresh.median_wall()))
            if (n, c, "re-run") in self.calls_sent:
                sent = self.calls_sent[(n, c, "re-run")]
                out.append(Figure(f"5 peers {n:,} cases c={c}: re-run calls sent", f"{sent}", "= 0", sent == 0))
        if self.cold is not None:
            out.append(Figure("5 peers 20 cases: model-eval cold (new warehouse, instance, validation)",
                              f"{self.cold.wall_s:.2f} s wall, CPU {self.cold.cpu_s:.1f} s"))
        return out


def measure(sizes: list[int], concurrencies: list[int], rounds: int, delay_ms: float, workdir: Path) -> PeerFigures:
    from model_eval.runner_client import stop_runner

    promptfoo, pf_reason = find_promptfoo()
    inspect, in_reason = find_inspect()
    versions, skipped = {}, {}
    for name, command, reason in (("promptfoo", promptfoo, pf_reason), ("inspect", inspect, in_reason)):
        (versions if command else skipped)[name] = reason
    peers = {"promptfoo": promptfoo, "inspect": inspect}
    result = PeerFigures(versions=versions, skipped=skipped)
    with Endpoint(delay_ms=delay_ms, limit_s=4 * 3600) as endpoint:   # 2,000-case rounds of 4 runners take a while
        result.cold = cold_model_eval(workdir / "peers-cold", endpoint.api_base, 20, concurrencies[0])
        for n in sizes:
            for c in concurrencies:
                root = workdir / f"peers-{n}-{c}"
                runners = build_runners(root, n, c, endpoint.api_base, peers)
                for runner in runners:   # warm-up, untimed: ingests and validates the golden set once, fills caches
                    runner.run(root / f"{runner.name.replace(' ', '-')}-warm.log")
                    runner.timings.clear()
                home = Path(runners[0].env["DAGSTER_HOME"])
                wait_for_warm_runner(home)
                for r in range(rounds):
                    for runner in [x for x in runners if not x.failed]:
                        before = endpoint.sent()
                        if runner.run(root / f"{runner.name.replace(' ', '-')}-{r}.log") is None:
                            continue
                        sent = endpoint.sent() - before
                        if runner.name == "model-eval re-run":
                            result.calls_sent[(n, c, "re-run")] = max(sent, result.calls_sent.get((n, c, "re-run"), 0))
                        elif sent != n:
                            runner.failed = f"sent {sent} calls for {n} cases: not comparable"
                result.results[(n, c)] = runners
                stop_runner(home)
    return result
