"""LLM-as-judge: prompts, structured verdicts, and judge calls through the inference engine.

A judge is a registry model. Its calls go through `inference.run_model`, so they are cached,
retried on provider faults, bounded by a deadline, costed, and their errors have keys redacted,
exactly like a candidate's calls. On top of that, a reply that is not a parseable verdict is asked
again (the judge is shown its reply and told what was wrong) up to `max_verdict_attempts` times in
all; after that the item is recorded as a judge failure.

Verdicts:
* pointwise: `{"score": <0..1>, "reason": "..."}`; the answer is right when score >= pass_threshold;
* pairwise: `{"winner": "A" | "B" | "tie", "reason": "..."}`; each pair is judged in both orders
  and the two verdicts averaged, so a judge that prefers a position gives a tie, not a win.

No Dagster and no warehouse here: `model_eval/steps/judging.py` decides what to judge and records it.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from dataclasses import dataclass, field
from typing import Any

import polars as pl

from model_eval.golden import TaskSpec
from model_eval.inference import CallRequest, CompletionFn, RetryPolicy, run_model
from model_eval.registry import ModelSpec
from model_eval.response_cache import ResponseCache, cache_key
from model_eval.scorers.base import strip_reasoning
from model_eval.scorers.json_fields import extract_json_object
from model_eval.scorers.judge import DEFAULT_PASS_THRESHOLD, DEFAULT_VERDICT_ATTEMPTS

# Part of the rubric hash: a change to the prompts below is a different judge, to be calibrated anew.
PROMPT_VERSION = "judge-prompt-1"
DEFAULT_JUDGE_PARAMS = {"temperature": 0.0, "max_tokens": 200}

SYSTEM_PROMPT = ("You are a strict, fair evaluator. You grade answers against the rubric you are given "
                 "and reply with one JSON object only.")

POINTWISE_TEMPLATE = """Rubric:
{rubric}

The task the answer responds to:
<<<
{task_prompt}
>>>
{reference}
The answer to grade:
<<<
{answer}
>>>

Grade the answer against the rubric. Reply with only this JSON object:
{{"score": <a number from 0 (fails the rubric) to 1 (fully meets it)>, "reason": "<one short sentence>"}}"""

PAIRWISE_TEMPLATE = """Rubric:
{rubric}

The task both answers respond to:
<<<
{task_prompt}
>>>

Answer A:
<<<
{first}
>>>

Answer B:
<<<
{second}
>>>

Which answer meets the rubric better? Reply with only this JSON object:
{{"winner": "A" or "B" or "tie", "reason": "<one short sentence>"}}"""

REPAIR_PROMPT = ("Your reply could not be used: {problem}. Reply again with only the JSON object, "
                 "exactly in the format asked for.")


@dataclass(frozen=True)
class JudgeSettings:
    """A judge task's `scorer.settings`, with defaults applied and the kappa bar resolved."""

    judge_model: str
    rubric: str
    calibration: str
    pass_threshold: float
    max_verdict_attempts: int
    min_kappa: float
    min_kappa_source: str              # "task.yaml" or "deployment.yaml": the run says which bar applied
    call_params: dict[str, Any]
    reference_model: str | None

    @classmethod
    def of(cls, task: TaskSpec, default_min_kappa: float) -> "JudgeSettings":
        s = task.scorer_settings
        return cls(
            judge_model=s["judge_model"], rubric=s["rubric"].strip(), calibration=s["calibration"],
            pass_threshold=float(s.get("pass_threshold", DEFAULT_PASS_THRESHOLD)),
            max_verdict_attempts=int(s.get("max_verdict_attempts", DEFAULT_VERDICT_ATTEMPTS)),
            min_kappa=float(s.get("min_kappa", default_min_kappa)),
            min_kappa_source="task.yaml" if "min_kappa" in s else "deployment.yaml",
            call_params={**DEFAULT_JUDGE_PARAMS, **(s.get("call_params") or {})},
            reference_model=(s.get("pairwise") or {}).get("reference_model"),
        )

    @property
    def rubric_hash(self) -> str:
        """Identity of what decides a verdict besides the judge model: rubric, pass mark and prompt version."""
        material = json.dumps({"rubric": self.rubric, "pass_threshold": self.pass_threshold, "prompt": PROMPT_VERSION},
                              sort_keys=True)
        return hashlib.sha256(material.encode()).hexdigest()[:16]


def task_prompt(task: TaskSpec, inputs: dict[str, Any]) -> str:
    """What the candidate was asked (the rendered user message), shown to the judge as context."""
    return task.prompt_template.format_map(inputs).strip()


def pointwise_messages(settings: JudgeSettings, prompt: str, answer: str, reference: Any = None) -> list[dict[str, str]]:
    reference_block = ""
    if reference is not None:
        shown = reference if isinstance(reference, str) else json.dumps(reference, ensure_ascii=False, sort_keys=True)
        reference_block = f"\nA reference answer (guidance, not the only acceptable answer):\n<<<\n{shown}\n>>>\n"
    user = POINTWISE_TEMPLATE.format(rubric=settings.rubric, task_prompt=prompt, reference=reference_block, answer=answer)
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user}]


def pairwise_messages(settings: JudgeSettings, prompt: str, first: str, second: str) -> list[dict[str, str]]:
    user = PAIRWISE_TEMPLATE.format(rubric=settings.rubric, task_prompt=prompt, first=first, second=second)
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user}]


# ---------------------------------------------------------------- verdicts
@dataclass(frozen=True)
class Verdict:
    score: float | None          # pointwise score, or the first answer's preference (A=1, tie=0.5, B=0)
    winner: str | None           # pairwise: "A", "B" or "tie"
    reason: str | None
    problem: str | None          # why the reply is not a usable verdict (None when it is)


def _unusable(problem: str) -> Verdict:
    return Verdict(None, None, None, problem)


def parse_pointwise(text: str | None) -> Verdict:
    """`{"score": 0..1, "reason": "..."}` anywhere in the reply (fenced or not); anything else is unusable."""
    obj = _verdict_object(text)
    if isinstance(obj, str):
        return _unusable(obj)
    score = obj.get("score")
    if isinstance(score, bool) or not isinstance(score, (int, float)) or not 0 <= score <= 1:
        return _unusable(f'"score" must be a number from 0 to 1, got {score!r}')
    return Verdict(float(score), None, _reason(obj), None)


def parse_pairwise(text: str | None) -> Verdict:
    """`{"winner": "A" | "B" | "tie", "reason": "..."}`; the winner is read case-insensitively."""
    obj = _verdict_object(text)
    if isinstance(obj, str):
        return _unusable(obj)
    winner = obj.get("winner")
    normalised = winner.strip().upper() if isinstance(winner, str) else None
    if normalised not in ("A", "B", "TIE"):
        return _unusable(f'"winner" must be "A", "B" or "tie", got {winner!r}')
    winner = "tie" if normalised == "TIE" else normalised
    return Verdict({"A": 1.0, "tie": 0.5, "B": 0.0}[winner], winner, _reason(obj), None)


def _verdict_object(text: str | None) -> dict[str, Any] | str:
    if text is None or not text.strip():
        return "the reply is empty"
    obj, _ = extract_json_object(strip_reasoning(text))
    if obj is None:
        return "no JSON object in the reply"
    return obj


def _reason(obj: dict[str, Any]) -> str:
    reason = obj.get("reason")
    return (reason if isinstance(reason, str) else json.dumps(reason))[:1000] if reason is not None else ""


# ---------------------------------------------------------------- judge calls
@dataclass(frozen=True)
class JudgeItem:
    """One thing to judge: an answer (pointwise) or an ordered pair of answers (pairwise)."""

    purpose: str                  # "score", "pairwise" or "calibration"
    task: str
    dataset_version: str | None
    case_id: str
    model: str | None             # the judged model (None for calibration answers)
    repeat: int
    messages: list[dict[str, str]]
    mode: str = "pointwise"       # or "pairwise"
    position: str | None = None   # pairwise: "candidate_first" or "reference_first"
    reference_model: str | None = None


JUDGE_RESULT_SCHEMA = {
    "task": pl.String, "dataset_version": pl.String, "case_id": pl.String, "model": pl.String, "repeat": pl.Int32,
    "purpose": pl.String, "position": pl.String, "reference_model": pl.String, "judge_model": pl.String,
    "judge_config_hash": pl.String, "verdict_attempt": pl.Int32, "final": pl.Boolean, "cache_key": pl.String,
    "response_text": pl.String, "verdict_score": pl.Float64, "verdict_winner": pl.String, "verdict_reason": pl.String,
    "verdict_problem": pl.String, "latency_ms": pl.Float64, "input_tokens": pl.Int64, "output_tokens": pl.Int64,
    "cost_usd": pl.Float64, "error_class": pl.String, "error_message": pl.String, "attempts": pl.Int32,
    "from_cache": pl.Boolean, "completed_at": pl.Float64,
}


@dataclass
class JudgeRun:
    rows: list[dict[str, Any]] = field(default_factory=list)        # every judge call, one row per verdict attempt
    final: list[Verdict] = field(default_factory=list)             # each item's last verdict (usable or not), in order
    calls_sent: int = 0
    calls_cached: int = 0

    def frame(self) -> pl.DataFrame:
        return pl.DataFrame(self.rows, schema=JUDGE_RESULT_SCHEMA)


def judge_items(spec: ModelSpec, items: list[JudgeItem], cache: ResponseCache, settings: JudgeSettings, *,
                retry: RetryPolicy = RetryPolicy(), completion: CompletionFn | None = None) -> JudgeRun:
    """Judge every item with `spec`, asking again (with the reason) while its verdict is unusable."""
    return asyncio.run(_judge_items(spec, items, cache, settings, retry, completion))


async def _judge_items(spec, items, cache, settings, retry, completion) -> JudgeRun:
    run = JudgeRun()
    final: dict[int, Verdict] = {}
    params = {**spec.params, **settings.call_params}
    pending = {index: item.messages for index, item in enumerate(items)}
    kwargs = {"completion": completion} if completion is not None else {}
    for attempt in range(1, settings.max_verdict_attempts + 1):
        if not pending:
            break
        # Items with the same messages (the same answer to the same case) share one call.
        keys = {index: cache_key(spec.config_hash, messages, params, items[index].repeat) for index, messages in pending.items()}
        requests = {}
        for index, messages in pending.items():
            item = items[index]
            requests.setdefault(keys[index], CallRequest(item.task, item.dataset_version or "", item.case_id, item.repeat,
                                                         messages, params, keys[index]))
        frame, stats = await run_model(spec, list(requests.values()), cache, retry=retry, **kwargs)
        run.calls_sent += stats.sent
        run.calls_cached += stats.cached
        by_key = {row["cache_key"]: row for row in frame.iter_rows(named=True)}
        still = {}
        for index, messages in pending.items():
            item, call = items[index], by_key[keys[index]]
            if call["error_class"] is not None:
                verdict = _unusable(f"judge call failed: {call['error_class']}")
            else:
                verdict = (parse_pairwise if item.mode == "pairwise" else parse_pointwise)(call["response_text"])
            # A failed call was already retried by the engine; only an unusable reply is asked again.
            again = verdict.problem is not None and call["error_class"] is None and attempt < settings.max_verdict_attempts
            run.rows.append(_row(item, spec, attempt, not again, call, verdict))
            if again:
                repair = REPAIR_PROMPT.format(problem=verdict.problem)
                still[index] = [*messages, {"role": "assistant", "content": call["response_text"] or ""},
                               {"role": "user", "content": repair}]
            else:
                final[index] = verdict
        pending = still
    run.final = [final[index] for index in range(len(items))]
    return run


def _row(item: JudgeItem, spec: ModelSpec, attempt: int, final: bool, call: dict[str, Any], verdict: Verdict) -> dict[str, Any]:
    return {
        "task": item.task, "dataset_version": item.dataset_version, "case_id": item.case_id, "model": item.model,
        "repeat": item.repeat, "purpose": item.purpose, "position": item.position, "reference_model": item.reference_model,
        "judge_model": spec.name, "judge_config_hash": spec.config_hash, "verdict_attempt": attempt, "final": final,
        "cache_key": call["cache_key"], "response_text": call["response_text"], "verdict_score": verdict.score,
        "verdict_winner": verdict.winner, "verdict_reason": verdict.reason, "verdict_problem": verdict.problem,
        **{k: call[k] for k in ("latency_ms", "input_tokens", "output_tokens", "cost_usd", "error_class", "error_message",
                                "attempts", "from_cache")},
        "completed_at": call["completed_at"] if call["completed_at"] is not None else time.time(),
    }


def candidate_preference(position: str, verdict: Verdict) -> float | None:
    """The judged (candidate) answer's share of the win in one order: 1 won, 0.5 tie, 0 lost; None if unusable."""
    if verdict.score is None:
        return None
    return verdict.score if position == "candidate_first" else 1.0 - verdict.score

