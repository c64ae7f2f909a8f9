"""Calibrating a judge: its verdicts on human-labelled answers, agreement, Cohen's kappa, and the bar.

A judge task's calibration file holds answers a person graded PASS or FAIL (golden/README.md). The
judge grades the same answers with the task's rubric; its verdict is PASS when its score reaches
the task's pass threshold. A judge whose kappa with the humans is below the bar (`min_kappa`) may
not score the task: its accuracy figures would measure the judge, not the candidates.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from typing import Any

import polars as pl

from model_eval.agreement import Confusion, cohens_kappa
from model_eval.golden import TaskSpec
from model_eval.judge import JudgeItem, JudgeRun, JudgeSettings, pointwise_messages, task_prompt
from model_eval.registry import ModelSpec


@dataclass(frozen=True)
class Calibration:
    task: str
    judge_model: str
    judge_config_hash: str
    rubric_hash: str
    calibration_file: str
    calibration_hash: str
    confusion: Confusion
    kappa: float
    kappa_low: float
    kappa_high: float
    min_kappa: float
    min_kappa_source: str
    passed: bool
    reason: str

    def record(self) -> dict[str, Any]:
        """The `judge_calibrations` row (without eval run and time)."""
        c = self.confusion
        return {"task": self.task, "judge_model": self.judge_model, "judge_config_hash": self.judge_config_hash,
                "rubric_hash": self.rubric_hash, "calibration_file": self.calibration_file,
                "calibration_hash": self.calibration_hash, "cases": c.cases, "agreement": _finite(c.agreement),
                "kappa": _finite(self.kappa), "kappa_low": _finite(self.kappa_low), "kappa_high": _finite(self.kappa_high),
                "human_pass_judge_pass": c.pass_pass, "human_pass_judge_fail": c.pass_fail,
                "human_pass_judge_none": c.pass_none, "human_fail_judge_pass": c.fail_pass,
                "human_fail_judge_fail": c.fail_fail, "human_fail_judge_none": c.fail_none, "unparseable": c.unparseable,
                "min_kappa": self.min_kappa, "min_kappa_source": self.min_kappa_source, "passed": self.passed,
                "reason": self.reason}


def _finite(value: float) -> float | None:
    return None if value is None or math.isnan(value) else value


def calibration_hash(cases: pl.DataFrame) -> str:
    """Identity of the calibration set's content (ids, inputs, answers, human verdicts), not of its file bytes."""
    material = json.dumps(cases.select("case_id", "inputs_json", "answer", "human_verdict").rows(), ensure_ascii=False)
    return hashlib.sha256(material.encode()).hexdigest()[:16]


def calibration_items(task: TaskSpec, settings: JudgeSettings, cases: pl.DataFrame) -> list[JudgeItem]:
    """One pointwise judgement per human-labelled answer, with the same prompt the task's answers get."""
    return [JudgeItem(purpose="calibration", task=task.name, dataset_version=None, case_id=row["case_id"], model=None,
                      repeat=0, messages=pointwise_messages(settings, task_prompt(task, json.loads(row["inputs_json"])),
                                                            row["answer"]))
            for row in cases.iter_rows(named=True)]


def summarise(task: TaskSpec, settings: JudgeSettings, spec: ModelSpec, cases: pl.DataFrame, run: JudgeRun) -> Calibration:
    """Agreement, kappa and the bar's decision from the judge's final verdicts on the calibration cases."""
    pairs = []
    for human, verdict in zip(cases["human_verdict"].to_list(), run.final):
        judged = None if verdict.score is None else ("PASS" if verdict.score >= settings.pass_threshold else "FAIL")
        pairs.append((human, judged))
    confusion = Confusion.of(pairs)
    kappa = cohens_kappa(confusion.kappa_table())
    passed = not math.isnan(kappa.kappa) and kappa.kappa >= settings.min_kappa
    shown = "undefined" if math.isnan(kappa.kappa) else f"{kappa.kappa:.2f}"
    detail = (f"kappa {shown} (95% CI {kappa.low:.2f} to {kappa.high:.2f}) " if not math.isnan(kappa.kappa) else f"kappa {shown} ") \
        + f"and agreement {confusion.agreement:.2f} with human verdicts on {confusion.cases} calibration cases" \
        + (f" ({confusion.unparseable} verdict(s) unparseable, counted as disagreeing)" if confusion.unparseable else "")
    bar = f"the bar {settings.min_kappa:.2f} ({settings.min_kappa_source})"
    reason = (f"judge {spec.name} passed calibration: {detail}; at or above {bar}" if passed else
              f"judge {spec.name} failed calibration: {detail}; below {bar}, so it cannot score task {task.name}")
    return Calibration(task=task.name, judge_model=spec.name, judge_config_hash=spec.config_hash,
                       rubric_hash=settings.rubric_hash, calibration_file=str(task.calibration_file()),
                       calibration_hash=calibration_hash(cases), confusion=confusion, kappa=kappa.kappa,
                       kappa_low=kappa.low, kappa_high=kappa.high, min_kappa=settings.min_kappa,
                       min_kappa_source=settings.min_kappa_source, passed=passed, reason=reason)


NEWEST_CALIBRATIONS = """
SELECT task, passed, reason FROM judge_calibrations
WHERE list_contains($tasks::VARCHAR[], task)
QUALIFY row_number() OVER (PARTITION BY task ORDER BY calibrated_at DESC) = 1"""


def newest_calibrations(conn, task_names: list[str]) -> dict[str, tuple[bool, str]]:
    """task -> (passed, reason) of its judge's newest calibration."""
    if not task_names:
        return {}
    rows = conn.sql(NEWEST_CALIBRATIONS, params={"tasks": task_names}).fetchall()
    return {task: (passed, reason) for task, passed, reason in rows}
