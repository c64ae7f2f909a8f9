"""Adaptive evaluation: stop spending calls on a model once the evidence says it cannot win a task.

Two rules, both decided case by case while the model runs (docs/decisions.md explains the bounds):

* **cannot qualify**: an anytime-valid test rejects "the model's accuracy over all N cases of the
  task is at or above the threshold". Every policy requires that accuracy, so such a model can
  never be champion, whatever else it measures.
* **cannot beat the champion** (only for policies that rank by accuracy first, i.e. `quality`): the
  same test on the paired per-case differences with the current champion rejects "at least as
  accurate as the champion".

The test is a betting martingale for sampling without replacement: cases are taken in a random
order fixed before the first call (seeded), each case's score is the mean correctness of its first
`min_repeats` answers, and the bettor's wealth is a nonnegative supermartingale under the null
hypothesis, so by Ville's inequality the chance it ever reaches 1/alpha is at most alpha, however
often it is looked at. A third, budget-only rule: once a case's first `min_repeats` answers are
identical, its further repeats are not asked.

Pure: no I/O. The engine asks `AdaptivePlan.wants(request)` before each call and tells it
`observe(row, correct)` after; the caller orders the requests with `arrange`.
"""

from __future__ import annotations

import math
import random
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Protocol

CANNOT_QUALIFY = "stopped: cannot qualify"
CANNOT_BEAT = "stopped: cannot beat the champion"
COMPLETE = "complete"
# Never bet more than this share of the wealth the worst outcome could cost: a bettor that can lose
# everything on one case stops being informative (the usual choice in the betting literature is 1/2-3/4).
MAX_BET_SHARE = 0.5


class _Request(Protocol):
    task: str
    case_id: str
    repeat: int


@dataclass
class WithoutReplacementTest:
    """Anytime-valid test of H0: the mean of `population` values in [0, 1] is >= `null_mean`.

    Values arrive one by one in a uniformly random order of the whole population (sampling without
    replacement). Under H0, before value t the unseen values must average at least
    m_t = (N * null_mean - sum of seen) / (N - t + 1); the bettor stakes lambda_t * (m_t - x_t), a
    fair-or-worse bet under H0, so its wealth prod(1 + lambda_t * (m_t - x_t)) is a nonnegative
    supermartingale. lambda_t depends only on earlier values (predictable): the growth-optimal
    stake for the running mean and variance estimates, clipped to [0, MAX_BET_SHARE / (1 - m_t)].
    When m_t > 1 no ordering of the unseen values can reach the null mean: rejected outright.
    """

    population: int
    null_mean: float
    alpha: float = 0.05
    seen: int = 0
    total: float = 0.0
    wealth: float = 1.0
    _squares: float = 0.0          # sum of squared deviations from the running mean (Welford)
    _mean: float = 0.0

    def __post_init__(self) -> None:
        if self.population < 1 or not 0.0 <= self.null_mean <= 1.0 or not 0.0 < self.alpha < 1.0:
            raise ValueError(f"need population >= 1, null_mean in [0, 1], alpha in (0, 1); got "
                             f"{self.population}, {self.null_mean}, {self.alpha}")

    @property
    def required_mean(self) -> float:
        """What the unseen values must average for the population mean to reach the null mean."""
        unseen = self.population - self.seen
        if unseen == 0:
            return math.inf if self.total < self.population * self.null_mean - 1e-9 else -math.inf
        return (self.population * self.null_mean - self.total) / unseen

    @property
    def rejected(self) -> bool:
        return self.required_mean > 1.0 + 1e-9 or self.wealth >= 1.0 / self.alpha

    def _stake(self, required: float) -> float:
        if required <= 0.0 or required >= 1.0:
            return 0.0   # H0 already certain, or already impossible (then `rejected` says so)
        # Estimates from earlier values only, shrunk toward 1/2 and 1/4 so the first bets are small.
        mean = (0.5 + self.seen * self._mean) / (self.seen + 1)
        variance = (0.25 + self._squares) / (self.seen + 1)
        edge = required - mean
        if edge <= 0.0:
            return 0.0   # no evidence the model is below what it needs: keep the wealth
        return min(edge / (variance + edge * edge), MAX_BET_SHARE / (1.0 - required))

    def update(self, value: float) -> None:
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"values must lie in [0, 1], got {value}")
        if self.seen >= self.population:
            raise ValueError(f"more values than the population of {self.population}")
        required = self.required_mean
        if not self.rejected:
            self.wealth *= 1.0 + self._stake(required) * (required - value)
        self.seen += 1
        self.total += value
        delta = value - self._mean
        self._mean += delta / self.seen
        self._squares += delta * (value - self._mean)


@dataclass
class TaskBudget:
    """One task of the plan: its cases in their random order and the two tests on it."""

    name: str
    order: list[str]                                  # case ids, the order the tests see them in
    qualification: WithoutReplacementTest
    against_champion: WithoutReplacementTest | None = None
    champion_scores: dict[str, float] = field(default_factory=dict)
    outcome: str = COMPLETE
    next_index: int = 0                               # first case of `order` not yet fed to the tests


class AdaptivePlan:
    """Which calls are still worth making for one model; see the module docstring.

    `tasks` maps task name -> (case ids, threshold); `champions` maps task name -> the current
    champion's case scores, for tasks whose policy ranks by accuracy first (only then may a model
    be stopped for not beating it). `seed` fixes the case order. `repeats` (task name -> repeats per
    case) caps `min_repeats` for a task that asks fewer repeats than that.
    """

    def __init__(self, tasks: dict[str, tuple[list[str], float]], min_repeats: int, *, seed: str,
                 alpha: float = 0.05, champions: dict[str, dict[str, float]] | None = None,
                 repeats: dict[str, int] | None = None):
        if min_repeats < 1:
            raise ValueError("min_repeats must be at least 1")
        self.min_repeats = min_repeats
        self._repeats_of = {name: max(1, min(min_repeats, n)) for name, n in (repeats or {}).items()}
        self.tasks: dict[str, TaskBudget] = {}
        for name, (case_ids, threshold) in tasks.items():
            order = sorted(set(case_ids))
            random.Random(f"{seed}:{name}").shuffle(order)
            budget = TaskBudget(name, order, WithoutReplacementTest(len(order), threshold, alpha))
            champion = (champions or {}).get(name)
            if champion and all(case in champion for case in order):
                # Paired differences d in [-1, 1] as (1 + d) / 2 in [0, 1]; "at least as accurate" is mean >= 1/2.
                budget.against_champion = WithoutReplacementTest(len(order), 0.5, alpha)
                budget.champion_scores = champion
            self.tasks[name] = budget
        self._answers: dict[tuple[str, str], dict[int, tuple[str | None, bool]]] = defaultdict(dict)
        self.skipped_repeats = 0
        self.skipped_stopped = 0

    def first_repeats(self, task: str) -> int:
        """How many repeats of each case of `task` the tests read (and are always asked)."""
        return self._repeats_of.get(task, self.min_repeats)

    # ------------------------------------------------------------ order
    def arrange(self, requests: Iterable[_Request]) -> Iterator[_Request]:
        """Requests in the order the tests need: every task's cases in their random order, tasks
        interleaved, the first `min_repeats` repeats of each case together; the later repeats after
        all of those (by then most cases' stability is known)."""
        by_case: dict[tuple[str, str], list] = defaultdict(list)
        for request in requests:
            by_case[(request.task, request.case_id)].append(request)
        queues = [[(name, case) for case in budget.order if (name, case) in by_case] for name, budget in self.tasks.items()]
        later = []
        for key in _round_robin(queues):
            for request in sorted(by_case[key], key=lambda r: r.repeat):
                if request.repeat < self.first_repeats(request.task):
                    yield request
                else:
                    later.append(request)
        yield from later

    # ------------------------------------------------------------ decisions
    def wants(self, request: _Request) -> bool:
        """Whether this call is still worth making (asked just before it is sent)."""
        budget = self.tasks.get(request.task)
        if budget is None:
            return True
        if budget.outcome != COMPLETE:
            self.skipped_stopped += 1
            return False
        needed = self.first_repeats(request.task)
        if request.repeat >= needed:
            answers = self._answers.get((request.task, request.case_id), {})
            first = [answers[r][0] for r in range(needed) if r in answers]
            # Failed calls (None) are never "stable": an outage says nothing about the model's answer.
            if len(first) == needed and len(set(first)) == 1 and first[0] is not None:
                self.skipped_repeats += 1
                return False
        return True

    def observe(self, task: str, case_id: str, repeat: int, response_text: str | None, correct: bool) -> None:
        """One finished call (a failed call: text None, not correct)."""
        budget = self.tasks.get(task)
        if budget is None:
            return
        self._answers[(task, case_id)][repeat] = ((response_text or "").strip() if response_text is not None else None,
                                                   correct)
        self._advance(budget)

    def _case_score(self, task: str, case_id: str) -> float | None:
        needed = self.first_repeats(task)
        answers = self._answers.get((task, case_id), {})
        first = [answers[r][1] for r in range(needed) if r in answers]
        return sum(first) / len(first) if len(first) == needed else None

    def _advance(self, budget: TaskBudget) -> None:
        """Feed the tests every case, in the plan's order, whose first repeats are all in."""
        while budget.outcome == COMPLETE and budget.next_index < len(budget.order):
            case_id = budget.order[budget.next_index]
            score = self._case_score(budget.name, case_id)
            if score is None:
                return
            budget.next_index += 1
            budget.qualification.update(score)
            if budget.qualification.rejected:
                budget.outcome = CANNOT_QUALIFY
            elif budget.against_champion is not None:
                budget.against_champion.update((1.0 + score - budget.champion_scores[case_id]) / 2.0)
                if budget.against_champion.rejected:
                    budget.outcome = CANNOT_BEAT

    def outcomes(self) -> dict[str, str]:
        return {name: budget.outcome for name, budget in self.tasks.items()}


def _round_robin(queues: list[list]) -> Iterator:
    longest = max((len(q) for q in queues), default=0)
    for i in range(longest):
        for queue in queues:
            if i < len(queue):
                yield queue[i]
