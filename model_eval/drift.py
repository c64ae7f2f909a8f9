"""Drift: did a model answer the same requests differently from one evaluation run to the next?

A provider can change the model behind a name without notice. The evidence for that is a model
asked anew, in two runs, exactly the same requests: the same case content and the same request
(the response cache key covers the model configuration, the rendered messages, the call parameters
and the repeat). Answers served from the cache are not evidence: they were not asked again.

Per paired case, two figures are compared:

* accuracy - the share of the case's paired repeats answered right (a failed call counts as wrong,
  as in the metrics). Cases that got better versus worse are compared with an exact two-sided sign
  test; with one repeat per case it is exactly McNemar's test on paired right/wrong answers.
* latency  - the case's median latency over its successful calls, compared with a two-sided
  Wilcoxon signed-rank test (exact without ties for up to 50 cases, normal approximation with tie
  correction otherwise).

One run makes many such tests (every model x task x figure), so a handful would come out
"significant" by chance each week. The p-values are adjusted with Holm's method across the run,
and a figure is flagged only when its adjusted p-value is below `drift.significance` (and, for
latency, the median moved by at least `drift.min_latency_change`, so a busier machine does not
read as a new model).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import lru_cache

import duckdb
import polars as pl

from model_eval import warehouse
from model_eval.stats import binomial_cdf, holm_adjust, normal_cdf

EXACT_WILCOXON_MAX_N = 50  # beyond this (or with ties) the normal approximation is used, as scipy does


@dataclass(frozen=True)
class DriftSettings:
    significance: float = 0.05       # family-wise level over one run's drift tests (Holm)
    # Relative change of the median latency needed to flag latency drift: latency also moves with the
    # network and the load of the machine that calls, which a paired test cannot tell from the model.
    min_latency_change: float = 0.50


# ---------------------------------------------------------------- the two paired tests
def sign_test(improved: int, worsened: int) -> float:
    """Two-sided exact sign test on the cases that changed; ties (unchanged cases) carry no information.

    Under "no change" each changed case is a fair coin, so the smaller count is Binomial(n, 1/2)."""
    n = improved + worsened
    return 1.0 if n == 0 else min(1.0, 2 * binomial_cdf(min(improved, worsened), n, 0.5))


def _ranks(values: list[float]) -> list[float]:
    """Ranks 1..n, ties given the average of the ranks they span."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    start = 0
    while start < len(order):
        end = start
        while end + 1 < len(order) and values[order[end + 1]] == values[order[start]]:
            end += 1
        for position in range(start, end + 1):
            ranks[order[position]] = (start + end) / 2 + 1
        start = end + 1
    return ranks


@lru_cache(maxsize=64)
def _signed_rank_counts(n: int) -> tuple[int, ...]:
    """How many of the 2^n sign assignments give each rank sum W+ = 0 .. n(n+1)/2 (no ties)."""
    counts = [1] + [0] * (n * (n + 1) // 2)
    for rank in range(1, n + 1):
        for total in range(len(counts) - 1, rank - 1, -1):
            counts[total] += counts[total - rank]
    return tuple(counts)


@dataclass(frozen=True)
class SignedRankResult:
    statistic: float   # min(W+, W-), as scipy reports for the two-sided test
    p_value: float
    n: int             # non-zero differences
    method: str        # "exact" | "approx"


def wilcoxon_signed_rank(differences: list[float]) -> SignedRankResult:
    """Two-sided Wilcoxon signed-rank test of paired differences; zero differences are dropped."""
    nonzero = [d for d in differences if d != 0]
    n = len(nonzero)
    if n == 0:
        return SignedRankResult(0.0, 1.0, 0, "exact")
    ranks = _ranks([abs(d) for d in nonzero])
    w_plus = sum(r for r, d in zip(ranks, nonzero) if d > 0)
    w_minus = n * (n + 1) / 2 - w_plus
    statistic = min(w_plus, w_minus)
    ties = len(set(ranks)) < n
    if n <= EXACT_WILCOXON_MAX_N and not ties:
        counts = _signed_rank_counts(n)
        tail = sum(counts[: int(statistic) + 1]) / 2 ** n
        return SignedRankResult(statistic, min(1.0, 2 * tail), n, "exact")
    mean = n * (n + 1) / 4
    tie_groups: dict[float, int] = {}
    for rank in ranks:
        tie_groups[rank] = tie_groups.get(rank, 0) + 1
    variance = n * (n + 1) * (2 * n + 1) / 24 - sum(t ** 3 - t for t in tie_groups.values()) / 48
    if variance <= 0:
        return SignedRankResult(statistic, 1.0, n, "approx")
    z = (statistic - mean) / math.sqrt(variance)
    return SignedRankResult(statistic, min(1.0, 2 * normal_cdf(-abs(z))), n, "approx")


# ---------------------------------------------------------------- pairing fresh answers across runs
# Rows of the run asked anew, joined to their scores. A case enters only if its content never
# changed within its dataset version: the warehouse keeps every content ever ingested but not which
# one a past run saw, so a case with two contents cannot be shown to be unchanged.
FRESH_ROWS_SQL = """
WITH unchanged_cases AS (
    SELECT task, dataset_version, case_id FROM golden_cases GROUP BY ALL HAVING count(DISTINCT content_hash) = 1
)
SELECT i.eval_run_id, i.model, i.task, i.dataset_version, i.case_id, i.repeat, i.cache_key,
       s.correct, i.latency_ms, i.error_class IS NULL AS succeeded, r.started_at
FROM inference_results i
JOIN scores s USING (eval_run_id, model, task, dataset_version, case_id, repeat)
JOIN unchanged_cases USING (task, dataset_version, case_id)
JOIN eval_runs r USING (eval_run_id)
WHERE NOT i.from_cache AND EXISTS (
    SELECT 1 FROM inference_results c
    WHERE c.eval_run_id = $run AND NOT c.from_cache AND c.model = i.model AND c.task = i.task)
"""


def _per_case(rows: pl.DataFrame) -> pl.DataFrame:
    return rows.group_by("case_id").agg(
        pl.col("correct").cast(pl.Float64).mean().alias("accuracy"),
        pl.col("latency_ms").filter(pl.col("succeeded")).median().alias("latency"))


def _compare(current: pl.DataFrame, baseline: pl.DataFrame) -> tuple[int, pl.DataFrame]:
    """Per-case figures over the (case, repeat) requests both runs sent anew, identically."""
    pairs = current.join(baseline, on=["case_id", "repeat", "cache_key"], suffix="_base")
    if pairs.is_empty():
        return 0, pairs
    mine = _per_case(pairs)
    theirs = _per_case(pairs.select("case_id", pl.col("correct_base").alias("correct"),
                                    pl.col("latency_ms_base").alias("latency_ms"), pl.col("succeeded_base").alias("succeeded")))
    return pairs.height, mine.join(theirs, on="case_id", suffix="_base").sort("case_id")


def _accuracy_row(cases: pl.DataFrame) -> dict:
    improved = int((cases["accuracy"] > cases["accuracy_base"]).sum())
    worsened = int((cases["accuracy"] < cases["accuracy_base"]).sum())
    before, after = float(cases["accuracy_base"].mean()), float(cases["accuracy"].mean())
    return {"metric": "accuracy", "paired_cases": cases.height, "baseline_value": before, "current_value": after,
            "change": after - before, "relative_change": (after - before) / before if before else None,
            "improved_cases": improved, "worsened_cases": worsened, "test": "sign_test",
            "statistic": float(min(improved, worsened)), "p_value": sign_test(improved, worsened)}


def _latency_row(cases: pl.DataFrame) -> dict | None:
    timed = cases.drop_nulls(["latency", "latency_base"])
    if timed.is_empty():
        return None
    differences = (timed["latency"] - timed["latency_base"]).to_list()
    result = wilcoxon_signed_rank(differences)
    before, after = float(timed["latency_base"].median()), float(timed["latency"].median())
    return {"metric": "latency_ms", "paired_cases": timed.height, "baseline_value": before, "current_value": after,
            "change": after - before, "relative_change": (after - before) / before if before else None,
            # for latency "improved" means faster
            "improved_cases": sum(1 for d in differences if d < 0), "worsened_cases": sum(1 for d in differences if d > 0),
            "test": f"wilcoxon_signed_rank_{result.method}", "statistic": result.statistic, "p_value": result.p_value}


DRIFT_SCHEMA = {
    "eval_run_id": pl.String, "baseline_eval_run_id": pl.String, "model": pl.String, "task": pl.String,
    "dataset_version": pl.String, "metric": pl.String, "paired_cases": pl.Int64, "paired_calls": pl.Int64,
    "baseline_value": pl.Float64, "current_value": pl.Float64, "change": pl.Float64, "relative_change": pl.Float64,
    "improved_cases": pl.Int64, "worsened_cases": pl.Int64, "test": pl.String, "statistic": pl.Float64,
    "p_value": pl.Float64, "p_value_holm": pl.Float64, "drifted": pl.Boolean, "direction": pl.String,
    "detail": pl.String, "computed_at": pl.Datetime("us"),
}


def compute_drift(conn: duckdb.DuckDBPyConnection, eval_run_id: str, settings: DriftSettings = DriftSettings()) -> pl.DataFrame:
    """One row per (model, task, figure) the run can be compared on with an earlier run; see the module doc."""
    rows_all = conn.sql(FRESH_ROWS_SQL, params={"run": eval_run_id}).pl()
    rows = []
    now = datetime.now(timezone.utc).replace(tzinfo=None)
    current_all = rows_all.filter(pl.col("eval_run_id") == eval_run_id)
    if current_all.is_empty():
        return pl.DataFrame(schema=DRIFT_SCHEMA)
    started = current_all["started_at"][0]
    for (model, task, version), current in sorted(current_all.group_by(["model", "task", "dataset_version"]),
                                                  key=lambda item: item[0]):
        earlier = rows_all.filter((pl.col("model") == model) & (pl.col("task") == task) & (pl.col("dataset_version") == version)
                                  & (pl.col("eval_run_id") != eval_run_id) & (pl.col("started_at") < started))
        # The newest earlier run that sent at least one of the same requests anew.
        for baseline_run in earlier.sort("started_at", descending=True)["eval_run_id"].unique(maintain_order=True):
            calls, cases = _compare(current, earlier.filter(pl.col("eval_run_id") == baseline_run))
            if calls:
                break
        else:
            continue
        common = {"eval_run_id": eval_run_id, "baseline_eval_run_id": baseline_run, "model": model, "task": task,
                  "dataset_version": version, "paired_calls": calls, "computed_at": now}
        rows.append({**common, **_accuracy_row(cases)})
        latency = _latency_row(cases)
        if latency is not None:
            rows.append({**common, **latency})
    if not rows:
        return pl.DataFrame(schema=DRIFT_SCHEMA)
    for row, adjusted in zip(rows, holm_adjust([r["p_value"] for r in rows])):
        row["p_value_holm"] = adjusted
        _judge(row, settings)
    return pl.DataFrame(rows, schema=DRIFT_SCHEMA)


def _judge(row: dict, settings: DriftSettings) -> None:
    significant = row["p_value_holm"] < settings.significance
    big_enough = row["metric"] != "latency_ms" or abs(row["relative_change"] or 0.0) >= settings.min_latency_change
    row["drifted"] = significant and big_enough
    if row["change"] == 0 or not row["drifted"]:
        row["direction"] = "none"
    elif row["metric"] == "accuracy":
        row["direction"] = "better" if row["change"] > 0 else "worse"
    else:
        row["direction"] = "better" if row["change"] < 0 else "worse"
    if row["metric"] == "accuracy":
        what = (f"accuracy {row['baseline_value']:.3f} -> {row['current_value']:.3f} on {row['paired_cases']} paired cases "
                f"({row['improved_cases']} better, {row['worsened_cases']} worse)")
    else:
        what = (f"median latency {row['baseline_value']:.0f} -> {row['current_value']:.0f} ms on {row['paired_cases']} paired cases "
                f"({row['improved_cases']} faster, {row['worsened_cases']} slower)")
    verdict = "DRIFT" if row["drifted"] else "no drift"
    reason = f"; significant but under the {settings.min_latency_change:.0%} minimum change" if significant and not big_enough else ""
    row["detail"] = (f"{verdict}: {what}, {row['test']} p={row['p_value']:.4g}, Holm-adjusted p={row['p_value_holm']:.4g} "
                     f"vs run {row['baseline_eval_run_id']}{reason}")


def record_drift(conn: duckdb.DuckDBPyConnection, eval_run_id: str, settings: DriftSettings = DriftSettings()) -> pl.DataFrame:
    """Compute the run's drift rows and replace its slice of `model_drift` (one transaction)."""
    frame = compute_drift(conn, eval_run_id, settings)
    warehouse.replace_slice(conn, "model_drift", frame, {"eval_run_id": eval_run_id})
    return frame

