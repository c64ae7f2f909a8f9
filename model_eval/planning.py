"""Before a run: how many calls each model and task needs, how many tokens, what they cost and how long
they take, and whether a run fits a budget. Read-only: golden files, the response cache, the warehouse.

Where the figures come from, per (model, task):
- calls: cases of the task's current version x repeats; those whose answer is in the response cache
  (and young enough for the run's cache age) are counted apart: they are not sent and cost nothing.
- tokens per call: the model's history on this task (its own answers in `inference_results`, each once:
  same dataset version if it has some, else any), else the prompt-length rule: input = characters of the
  rendered messages / 4 + 4 per message (about 4 characters a token in English, plus chat framing);
  output = the call's max_tokens (so the cost is an upper bound), else 256.
- cost: the registry's price, else litellm's price map; neither: unknown (never 0).
- time: the model's mean latency per call on this task, else its expected output tokens over its median
  output tokens/s on other tasks; no history: unknown. Calls run max_concurrency at a time, models one
  after another (as `model-eval run` does), so the time is sum(latency) / max_concurrency, added up.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from model_eval import model_map
from model_eval.golden import TaskSpec, read_cases
from model_eval.inference import iter_requests
from model_eval.project import Project
from model_eval.registry import ModelSpec

CHARS_PER_TOKEN = 4
TOKENS_PER_MESSAGE = 4
DEFAULT_OUTPUT_TOKENS = 256
ESTIMATE_RULE = (f"input = characters / {CHARS_PER_TOKEN} + {TOKENS_PER_MESSAGE} per message; "
                 f"output = max_tokens, else {DEFAULT_OUTPUT_TOKENS}")

# Each answer once, as measured when the model gave it (rows served from the cache repeat that measurement).
HISTORY_SQL = """
SELECT model, task, dataset_version, count(*) AS calls, avg(input_tokens) AS input_tokens,
       avg(output_tokens) AS output_tokens, avg(latency_ms) AS latency_ms,
       median(output_tokens * 1000.0 / nullif(latency_ms, 0)) AS output_tokens_per_s
FROM inference_results WHERE error_class IS NULL AND NOT from_cache AND input_tokens IS NOT NULL
GROUP BY ALL"""


@dataclass(frozen=True)
class History:
    calls: int
    input_tokens: float
    output_tokens: float
    latency_ms: float
    output_tokens_per_s: float | None


@dataclass(frozen=True)
class PlanRow:
    model: str
    task: str
    dataset_version: str
    calls: int
    cached: int
    input_tokens_per_call: float
    output_tokens_per_call: float
    tokens_basis: str
    cost_usd: float | None           # of the calls to send; None: unknown price
    price_basis: str
    seconds: float | None            # None: no latency history
    time_basis: str
    skipped: str | None = None       # why the run would skip this model

    @property
    def to_send(self) -> int:
        return self.calls - self.cached

    @property
    def expected_tokens(self) -> int:
        return round(self.to_send * (self.input_tokens_per_call + self.output_tokens_per_call))


@dataclass
class Plan:
    rows: list[PlanRow] = field(default_factory=list)

    @property
    def runnable(self) -> list[PlanRow]:
        return [r for r in self.rows if r.skipped is None]

    @property
    def known_cost_usd(self) -> float:
        return sum(r.cost_usd for r in self.runnable if r.cost_usd is not None)

    @property
    def unknown_cost(self) -> list[PlanRow]:
        return [r for r in self.runnable if r.cost_usd is None]

    @property
    def unknown_time(self) -> list[PlanRow]:
        return [r for r in self.runnable if r.seconds is None]

    @property
    def known_seconds(self) -> float:
        return sum(r.seconds for r in self.runnable if r.seconds is not None)


def _history(warehouse_file: Path) -> dict[tuple[str, str, str], History]:
    from model_eval import warehouse

    if not warehouse_file.exists():
        return {}
    with warehouse.read_connection(warehouse_file) as conn:
        rows = conn.sql(HISTORY_SQL).fetchall()
    return {(model, task, version): History(n, tokens_in, tokens_out, latency, rate)
            for model, task, version, n, tokens_in, tokens_out, latency, rate in rows}


def _pick_history(history: dict, model: str, task: TaskSpec) -> History | None:
    """This model on this task: the current dataset version's history, else the most calls on another version."""
    if (model, task.name, task.dataset_version) in history:
        return history[(model, task.name, task.dataset_version)]
    others = [h for (m, t, _), h in history.items() if m == model and t == task.name]
    return max(others, key=lambda h: h.calls, default=None)


def _price(spec: ModelSpec) -> tuple[tuple[float, float] | None, str]:
    if spec.price_input_per_million is not None and spec.price_output_per_million is not None:
        return (spec.price_input_per_million, spec.price_output_per_million), "registry price"
    price = model_map.price_per_million(spec.litellm_model)
    if price is not None:
        return price, "litellm price map"
    return None, "no price in the registry or litellm's price map"


def _model_rate(history: dict, model: str, task_name: str) -> float | None:
    """The model's median output tokens/s over its other tasks (their medians' median, weighting tasks alike)."""
    rates = sorted(h.output_tokens_per_s for (m, t, _), h in history.items()
                   if m == model and t != task_name and h.output_tokens_per_s)
    return rates[len(rates) // 2] if rates else None


def plan_model_task(spec: ModelSpec, task: TaskSpec, cases: list[dict], history: dict, cached_keys,
                    skipped: str | None) -> PlanRow:
    """`cases`: the task's current cases (task, dataset_version, case_id, inputs_json); `cached_keys(keys) -> set`
    says which request keys the response cache would answer."""
    requests = list(iter_requests(spec, [task], cases))
    cached = len(cached_keys([r.key for r in requests]))
    params = {**spec.params, **task.call_params}
    own = _pick_history(history, spec.name, task)
    if own is not None:
        tokens_in, tokens_out = own.input_tokens, own.output_tokens
        tokens_basis = f"history ({own.calls} calls)"
    else:
        chars = sum(len(m["content"]) for r in requests for m in r.messages)
        messages = sum(len(r.messages) for r in requests)
        tokens_in = math.ceil((chars / CHARS_PER_TOKEN + TOKENS_PER_MESSAGE * messages) / max(1, len(requests)))
        max_tokens = params.get("max_tokens")
        tokens_out = float(max_tokens) if isinstance(max_tokens, int) and max_tokens > 0 else float(DEFAULT_OUTPUT_TOKENS)
        tokens_basis = "estimate (prompt-length rule)"
    to_send = len(requests) - cached
    price, price_basis = _price(spec)
    if to_send == 0:
        cost, price_basis = 0.0, "nothing to send"
    else:
        cost = None if price is None else to_send * (tokens_in * price[0] + tokens_out * price[1]) / 1e6
    if own is not None:
        seconds, time_basis = to_send * own.latency_ms / 1000 / spec.max_concurrency, "latency history"
    elif (rate := _model_rate(history, spec.name, task.name)) is not None:
        seconds, time_basis = to_send * tokens_out / rate / spec.max_concurrency, f"output tokens/s on other tasks ({rate:.1f})"
    else:
        seconds, time_basis = (0.0, "nothing to send") if to_send == 0 else (None, "no latency history")
    return PlanRow(spec.name, task.name, task.dataset_version, len(requests), cached, tokens_in, tokens_out, tokens_basis,
                   cost, price_basis, seconds, time_basis, skipped)


def plan_run(project: Project, specs: list[ModelSpec], tasks: list[TaskSpec], *, skipped: dict[str, str] | None = None,
             cache_max_age_s: float | None = None) -> Plan:
    """The plan for these models on the tasks each serves; `skipped` models are shown but not counted."""
    history = _history(project.paths.warehouse_file)
    plan = Plan()
    cache = None
    if project.paths.cache_file.exists():
        from model_eval.response_cache import ResponseCache

        cache = ResponseCache(project.paths.cache_file)

    def cached_keys(keys: list[str]) -> set[str]:
        return set() if cache is None else set(cache.get_many(keys, max_age_s=cache_max_age_s))

    cases: dict[str, list[dict]] = {}
    try:
        for spec in specs:
            for task in tasks:
                if not spec.serves(task.name, task.tier):
                    continue
                if task.name not in cases:
                    cases[task.name] = read_cases(task).select("task", "dataset_version", "case_id", "inputs_json").to_dicts()
                plan.rows.append(plan_model_task(spec, task, cases[task.name], history, cached_keys, (skipped or {}).get(spec.name)))
    finally:
        if cache is not None:
            cache.close()
    return plan


def plan_selection(project: Project, model_names: list[str] | None, task_names: list[str] | None,
                   cache_max_age_s: float | None = None) -> Plan:
    """The plan for models and tasks named as `model-eval run` names them; models the run would skip are
    shown with the reason and left out of the totals."""
    from model_eval.capacity import measured_memory_mb
    from model_eval.registry import split_by_availability

    tasks = project.select_tasks(task_names)
    chosen = project.registry.select(model_names)
    _, skipped = split_by_availability(chosen, measured_memory_mb(project.paths.warehouse_file, chosen))
    return plan_run(project, chosen, tasks, skipped=skipped, cache_max_age_s=cache_max_age_s)


def budget_refusal(plan: Plan, max_cost_usd: float, allow_unknown_cost: bool = False) -> str | None:
    """Why a run must not start under `--max-cost`, or None when it may."""
    unknown = plan.unknown_cost
    if unknown and not allow_unknown_cost:
        which = ", ".join(f"{r.model}/{r.task} ({r.to_send} calls)" for r in unknown)
        return (f"the cost of {which} is unknown (no price in the registry or litellm's price map), so --max-cost "
                f"{max_cost_usd:g} USD cannot be checked; the known part is {plan.known_cost_usd:.6f} USD. "
                "Add price_per_million to models.yaml, or pass --allow-unknown-cost to run anyway")
    if plan.known_cost_usd > max_cost_usd:
        over = plan.known_cost_usd - max_cost_usd
        return (f"expected cost {plan.known_cost_usd:.6f} USD exceeds --max-cost {max_cost_usd:g} USD by {over:.6f} USD"
                + (f" (and {len(unknown)} model x task cost(s) are unknown)" if unknown else ""))
    return None


def _money(value: float | None) -> str:
    return "unknown" if value is None else f"{value:.6f}"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "unknown"
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def format_plan(plan: Plan) -> str:
    header = (f"{'model':<22}{'task':<16}{'calls':>7}{'cached':>8}{'to send':>9}{'tokens/call':>14}"
              f"{'exp. tokens':>13}{'cost USD':>12}{'time':>10}  basis")
    lines = [header]
    for r in plan.rows:
        per_call = f"{r.input_tokens_per_call:.0f}+{r.output_tokens_per_call:.0f}"
        basis = f"tokens: {r.tokens_basis}; cost: {r.price_basis}; time: {r.time_basis}"
        if r.skipped:
            basis = f"SKIPPED by the run: {r.skipped}"
        lines.append(f"{r.model:<22}{r.task:<16}{r.calls:>7}{r.cached:>8}{r.to_send:>9}{per_call:>14}"
                     f"{r.expected_tokens:>13}{_money(r.cost_usd):>12}{_duration(r.seconds):>10}  {basis}")
    runnable = plan.runnable
    cost = f"{plan.known_cost_usd:.6f} USD" + (f" + unknown for {len(plan.unknown_cost)} model x task" if plan.unknown_cost else "")
    time = _duration(plan.known_seconds) + (f" + unknown for {len(plan.unknown_time)} model x task" if plan.unknown_time else "")
    lines += ["", f"total over {len(runnable)} model x task: {sum(r.calls for r in runnable)} calls, "
                  f"{sum(r.cached for r in runnable)} cached (free), {sum(r.to_send for r in runnable)} to send, "
                  f"{sum(r.expected_tokens for r in runnable)} tokens; cost {cost}; time {time}",
              f"token estimates without history: {ESTIMATE_RULE}"]
    return "\n".join(lines)
