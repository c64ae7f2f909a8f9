"""Adaptive mode: the calls it makes, and the champion it names, against a full run of the same suite.

The suite: 8 models x 2 tasks x 500 cases x 3 repeats = 24,000 calls in a full run. The stub (the
test double FakeOpenAIServer, in a thread of this process: only calls are counted here, not time)
answers from a script: model k "knows" a case with probability ACCURACY[k] (a seeded hash of model
and case, so every repeat gives the same answer), except on UNSTABLE_SHARE of cases, where each
repeat draws afresh. Every answer is "PASS" or "FAIL"; the right one is the case's expected verdict.

Both runs go through `run_model` over the HTTP client, one model after another in registry order.
The champion of each task comes from `policies.recommend` under the task's policy, over the
models that completed it (the adaptive run leaves out models it stopped). In the adaptive run the
"current champion" for the accuracy-first task is the best model completed so far; `min_repeats` 2.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl

from benchmarks.common import Figure
from model_eval.adaptive import COMPLETE, AdaptivePlan
from model_eval.inference import CallRequest, RetryPolicy, run_model
from model_eval.policies import recommend
from model_eval.registry import ModelSpec
from model_eval.response_cache import ResponseCache, cache_key
from model_eval.stats import wilson_interval
from model_eval_tests.fake_openai_server import FakeOpenAIServer, RequestInfo, ok

# Registry order on purpose not sorted by accuracy: the best model is evaluated third.
ACCURACY = {"m1": 0.62, "m2": 0.81, "m3": 0.93, "m4": 0.55, "m5": 0.88, "m6": 0.70, "m7": 0.45, "m8": 0.76}
TASKS = {"verdicts": ("quality", 0.80), "screening": ("weighted", 0.75)}   # name -> (policy, threshold)
UNSTABLE_SHARE = 0.10
CASES, REPEATS, MIN_REPEATS = 500, 3, 2
TARGET_CALL_SHARE = 0.5


def _unit(*parts: object) -> float:
    digest = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def expected(task: str, case: int) -> str:
    return "PASS" if _unit("expected", task, case) < 0.5 else "FAIL"


def script(info: RequestInfo):
    """The scripted model: which model is asked comes from the body, the case from the prompt."""
    model = info.payload["model"]
    task, case = info.last_message.split(" case ")[0], int(info.last_message.split(" case ")[1].split(":")[0])
    right = expected(task, case)
    wrong = "FAIL" if right == "PASS" else "PASS"
    if _unit("unstable", model, task, case) < UNSTABLE_SHARE:
        knows = _unit("draw", model, task, case, info.attempt) < ACCURACY[model]
    else:
        knows = _unit("knows", model, task, case) < ACCURACY[model]
    return ok(right if knows else wrong)


def requests_for(spec: ModelSpec) -> list[CallRequest]:
    out = []
    for task in TASKS:
        for case in range(CASES):
            messages = [{"role": "user", "content": f"{task} case {case}: PASS or FAIL?"}]
            out += [CallRequest(task, "v1", f"{case:04d}", r, messages, {}, cache_key(spec.config_hash, messages, {}, r))
                    for r in range(REPEATS)]
    return out


def correct(row: dict) -> bool:
    return row["error_class"] is None and row["response_text"] == expected(row["task"], int(row["case_id"]))


def candidate(model: str, rows: pl.DataFrame) -> dict:
    """The columns `policies.recommend` reads, from one model's rows on one task."""
    rows = rows.with_columns(pl.struct("task", "case_id", "response_text", "error_class")
                             .map_elements(correct, return_dtype=pl.Boolean).alias("correct"))
    by_case = rows.group_by("case_id").agg(pl.col("correct").mean().alias("share"),
                                           pl.col("response_text").n_unique().alias("answers"))
    cases = by_case.height
    accuracy = float(by_case["share"].mean())
    low, high = wilson_interval(accuracy * cases, cases)
    ok_rows = rows.filter(pl.col("error_class").is_null())
    return {"model": model, "accuracy": accuracy, "accuracy_low": low, "accuracy_high": high,
            "correctness": float((by_case["share"] == 1.0).mean()), "consistency": float((by_case["answers"] == 1).mean()),
            "success_rate": ok_rows.height / rows.height, "p50_latency_ms": float(ok_rows["latency_ms"].median()),
            "cost_per_case": float(rows["cost_usd"].sum()) / cases, "cases": cases, "calls": rows.height}


def spec_of(model: str, api_base: str, index: int) -> ModelSpec:
    # Different prices, so the weighted policy's cost part differs between models as it would in life.
    price = 0.1 * (index + 1)
    return ModelSpec(name=model, litellm_model=f"openai/{model}", provider="stub", family="stub", api_base=api_base,
                     price_input_per_million=price, price_output_per_million=2 * price, max_concurrency=32,
                     timeout_s=30.0, client="http")


@dataclass
class Run:
    calls: int = 0
    seconds: float = 0.0
    champions: dict[str, str | None] = field(default_factory=dict)
    outcomes: dict[str, dict[str, str]] = field(default_factory=dict)      # model -> task -> outcome
    skipped_repeats: int = 0


def evaluate(api_base: str, workdir: Path, adaptive: bool) -> Run:
    result = Run()
    completed: dict[str, list[dict]] = {task: [] for task in TASKS}
    case_scores: dict[str, dict[str, dict[str, float]]] = {task: {} for task in TASKS}   # task -> model -> case -> share
    started = time.perf_counter()
    for index, model in enumerate(ACCURACY):
        spec = spec_of(model, api_base, index)
        requests = requests_for(spec)
        kwargs = {}
        plan = None
        if adaptive:
            champions = {}
            for task, (policy, threshold) in TASKS.items():
                if policy == "quality" and completed[task]:
                    best = recommend(pl.DataFrame(completed[task]), policy, threshold).champion
                    if best is not None:
                        champions[task] = case_scores[task][best]
            plan = AdaptivePlan({task: ([f"{c:04d}" for c in range(CASES)], threshold)
                                 for task, (_, threshold) in TASKS.items()},
                                MIN_REPEATS, seed=f"bench:{model}", champions=champions)
            requests = list(plan.arrange(requests))
            kwargs = {"admit": plan.wants,
                      "observe": lambda row, plan=plan: plan.observe(row["task"], row["case_id"], row["repeat"],
                                                                    row["response_text"], correct(row))}
        with ResponseCache(workdir / f"{'adaptive' if adaptive else 'full'}-{model}.sqlite") as cache:
            frame, stats = asyncio.run(run_model(spec, requests, cache, retry=RetryPolicy(0.01, 0.05, 0.05), **kwargs))
        result.calls += stats.sent
        outcomes = plan.outcomes() if plan else {task: COMPLETE for task in TASKS}
        result.outcomes[model] = outcomes
        result.skipped_repeats += plan.skipped_repeats if plan else 0
        for task in TASKS:
            if outcomes[task] != COMPLETE:
                continue        # stopped: never ranked on its partial rows
            rows = frame.filter(pl.col("task") == task)
            completed[task].append(candidate(model, rows))
            shares = rows.with_columns(pl.struct("task", "case_id", "response_text", "error_class")
                                       .map_elements(correct, return_dtype=pl.Boolean).alias("correct"))
            case_scores[task][model] = dict(shares.group_by("case_id").agg(pl.col("correct").mean()).iter_rows())
    result.seconds = time.perf_counter() - started
    for task, (policy, threshold) in TASKS.items():
        result.champions[task] = recommend(pl.DataFrame(completed[task]), policy, threshold).champion
    return result


@dataclass
class AdaptiveFigures:
    full: Run
    adaptive: Run

    def figures(self) -> list[Figure]:
        share = self.adaptive.calls / self.full.calls
        same = self.adaptive.champions == self.full.champions
        stops = [outcome for outcomes in self.adaptive.outcomes.values() for outcome in outcomes.values() if outcome != COMPLETE]
        reasons = ", ".join(f"{stops.count(o)} {o.removeprefix('stopped: ')}" for o in sorted(set(stops)))
        full_models = len(ACCURACY)
        return [
            Figure(f"6 adaptive: full run, {full_models} models x {len(TASKS)} tasks x {CASES} cases x {REPEATS} repeats",
                   f"{self.full.calls:,} calls ({self.full.seconds:.0f} s)"),
            Figure("6 adaptive: adaptive run", f"{self.adaptive.calls:,} calls ({self.adaptive.seconds:.0f} s; "
                   f"{self.adaptive.skipped_repeats:,} stable repeats not asked)"),
            Figure("6 adaptive: calls, adaptive / full", f"{share:.3f}", f"<= {TARGET_CALL_SHARE}", share <= TARGET_CALL_SHARE),
            Figure("6 adaptive: champion per task, full vs adaptive",
                   ", ".join(f"{t}: {self.full.champions[t]} vs {self.adaptive.champions[t]}" for t in TASKS),
                   "the same", same),
            Figure(f"6 adaptive: (model, task) pairs stopped, of {len(ACCURACY) * len(TASKS)}", f"{len(stops)}: {reasons or 'none'}"),
        ]


def measure(workdir: Path) -> AdaptiveFigures:
    with FakeOpenAIServer(script, keep_records=False) as server:
        full = evaluate(server.api_base, workdir, adaptive=False)
        adaptive = evaluate(server.api_base, workdir, adaptive=True)
    return AdaptiveFigures(full, adaptive)


if __name__ == "__main__":   # python -m benchmarks.adaptive: this section alone
    import tempfile

    from benchmarks.common import format_table

    with tempfile.TemporaryDirectory() as tmp:
        figures = measure(Path(tmp))
        print(format_table(figures.figures()))
        for model, outcomes in figures.adaptive.outcomes.items():
            print(f"  {model} (accuracy {ACCURACY[model]:.2f}): {outcomes}")
