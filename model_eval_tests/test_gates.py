"""The gate matrix: each gate failing and passing, both directions of the paired test, graded tasks,
Holm's correction, repeat shuffling, and the rows every evaluation leaves in `promotion_gates`.

A real DuckDB warehouse filled with hand-made scores; metrics come from the pipeline's own SQL.
"""

from __future__ import annotations

import pytest
from scipy import stats as sps

from model_eval.gates import GATE_NAMES, evaluate_gates, gate_verdict, recorded_gates
from model_eval.stats import holm_adjust
from model_eval_tests.decision_warehouse import DecisionWarehouse, deployment, make_task, outcomes

GATES = deployment().gates  # the shipped defaults: margin 0.05, one-sided 0.05


@pytest.fixture
def wh(tmp_path):
    warehouse = DecisionWarehouse(tmp_path)
    yield warehouse
    warehouse.close()


def _gate(results, name):
    return next(g for g in results if g.gate == name)


def _setup(wh, task, champion_right, incumbent_right, cases=20, repeats=3, price=True):
    wh.golden(task, cases)
    wh.model("inc")
    wh.model("new", price=price)
    wh.evaluate(task, "inc", "e0", outcomes(incumbent_right, cases, repeats))
    wh.evaluate(task, "new", "e1", outcomes(champion_right, cases, repeats))


# ---------------------------------------------------------------- threshold and sample size
def test_threshold_gate_is_on_point_accuracy_with_the_lower_bound_shown(wh):
    task = make_task()   # threshold 0.80
    _setup(wh, task, champion_right=16, incumbent_right=10)
    passing = _gate(evaluate_gates(wh.conn, task, "new", "inc", GATES), "threshold")
    assert passing.passed and passing.n_cases == 20 and passing.effect_size == pytest.approx(0.8)
    assert round(passing.ci_low, 3) == 0.584   # Wilson over 20 cases; shown, not gated
    assert "n=20 cases" in passing.detail and "0.584" in passing.detail
    wh.evaluate(task, "new", "e1", outcomes(15))
    failing = _gate(evaluate_gates(wh.conn, task, "new", "inc", GATES), "threshold")
    assert not failing.passed and "is below the threshold 0.80" in failing.detail


@pytest.mark.parametrize("cases,repeats,validated,problem", [
    (20, 3, True, None), (8, 3, True, "8 cases < 10"), (20, 1, True, "1 repeat(s) per case < 2"),
    (20, 3, False, "has not passed validation")])
def test_sample_size_gate(wh, cases, repeats, validated, problem):
    task = make_task()
    wh.golden(task, cases, validated=validated)
    wh.model("new")
    wh.evaluate(task, "new", "e1", outcomes(cases, cases, repeats))
    result = _gate(evaluate_gates(wh.conn, task, "new", None, GATES), "sample_size")
    assert result.passed is (problem is None)
    if problem:
        assert problem in result.detail


# ---------------------------------------------------------------- non-inferiority
def test_a_clearly_better_champion_passes_non_inferiority(wh):
    task = make_task()
    _setup(wh, task, champion_right=19, incumbent_right=14)   # the alpha: 19/20 against 14/20
    result = _gate(evaluate_gates(wh.conn, task, "new", "inc", GATES), "non_inferiority")
    assert result.passed and result.n_cases == 20
    assert result.effect_size == pytest.approx(-0.25)          # assigned minus champion
    assert result.ci_high < GATES.non_inferiority_margin and result.p_value < GATES.significance
    assert result.margin == 0.05 and result.alpha == 0.05 and result.test == "paired_t_noninferiority_holm"
    # The row's figures are the one-sample t test on per-case differences plus the two pseudo-cases.
    differences = [0.0] * 14 + [-1.0] * 5 + [0.0] + [1.0, -1.0]
    assert result.p_value == pytest.approx(sps.ttest_1samp(differences, 0.05, alternative="less").pvalue)


def test_a_worse_champion_fails_non_inferiority(wh):
    task = make_task()
    _setup(wh, task, champion_right=15, incumbent_right=20)   # wrong on 5 more of 20 cases
    result = _gate(evaluate_gates(wh.conn, task, "new", "inc", GATES), "non_inferiority")
    assert not result.passed and result.effect_size == pytest.approx(0.25) and result.ci_low > 0
    assert "not shown non-inferior" in result.detail


def test_an_equal_champion_on_few_cases_cannot_show_non_inferiority_and_says_why(wh):
    task = make_task()
    _setup(wh, task, champion_right=10, incumbent_right=10, cases=14)
    result = _gate(evaluate_gates(wh.conn, task, "new", "inc", GATES), "non_inferiority")
    assert not result.passed and result.n_cases == 14
    assert result.detectable_difference > 0.2
    assert f"with 14 cases this gate resolves only differences of {result.detectable_difference * 100:.0f} points" in result.detail


def test_graded_task_uses_the_same_test_on_fractional_case_scores(wh):
    task = make_task("extract", kind="json")
    wh.golden(task, 20)
    wh.model("inc")
    wh.model("new")
    # Graded scores: a case is right when its score is >= 0.8, and a case's accuracy is its share of right repeats.
    incumbent = [[0.9, 0.7, 0.9] if case < 12 else [0.3, 0.3, 0.9] for case in range(20)]
    champion = [[0.95, 0.95, 0.85] if case < 18 else [0.5, 0.85, 0.2] for case in range(20)]
    wh.evaluate(task, "inc", "e0", incumbent)
    wh.evaluate(task, "new", "e1", champion)
    result = _gate(evaluate_gates(wh.conn, task, "new", "inc", GATES), "non_inferiority")
    right = lambda repeats: sum(score >= 0.8 for score in repeats) / 3  # noqa: E731
    differences = [right(i) - right(c) for i, c in zip(incumbent, champion)]
    assert result.n_cases == 20 and result.effect_size == pytest.approx(sum(differences) / 20)
    expected = sps.ttest_1samp(differences + [1.0, -1.0], 0.05, alternative="less").pvalue
    assert result.p_value == pytest.approx(expected) and result.passed is bool(expected < 0.05)
    assert result.passed


def test_missing_incumbent_results_fail_and_no_incumbent_passes(wh):
    task = make_task()
    wh.golden(task, 20)
    wh.model("new")
    wh.evaluate(task, "new", "e1", outcomes(19))
    assert not _gate(evaluate_gates(wh.conn, task, "new", "inc", GATES), "non_inferiority").passed
    assert _gate(evaluate_gates(wh.conn, task, "new", None, GATES), "non_inferiority").passed


def _alone_and_in_family(wh, others: dict[str, int]):
    """The champion (28/30) against the incumbent (24/30), tested alone and among `others` (name -> right cases)."""
    task = make_task()
    wh.golden(task, 30)
    wh.model("inc")
    wh.evaluate(task, "inc", "e0", outcomes(24, 30))
    wh.evaluate(task, "new", "e1", outcomes(28, 30))
    for name, right in others.items():
        wh.evaluate(task, name, "e1", outcomes(right, 30))
    alone = _gate(evaluate_gates(wh.conn, task, "new", "inc", GATES), "non_inferiority")
    family = _gate(evaluate_gates(wh.conn, task, "new", "inc", GATES, challengers=["new", *others]), "non_inferiority")
    raw = [_gate(evaluate_gates(wh.conn, task, name, "inc", GATES), "non_inferiority").p_value for name in ("new", *others)]
    return alone, family, raw


def test_holm_corrects_the_champion_for_having_been_picked_among_challengers(wh):
    alone, family, raw = _alone_and_in_family(wh, {"other1": 26, "other2": 25})
    assert alone.comparisons == 1 and alone.p_adjusted == pytest.approx(alone.p_value)
    assert family.comparisons == 3 and family.p_value == pytest.approx(alone.p_value)
    assert family.p_adjusted == pytest.approx(holm_adjust(raw)[0]) and family.p_adjusted > family.p_value
    assert family.passed is (family.p_adjusted < 0.05)
    assert "Holm across 3 challengers" in family.detail


def test_holm_can_block_what_a_single_test_would_pass(wh):
    # Four weak challengers (worse than the incumbent) still count: the champion was picked among five.
    alone, family, _ = _alone_and_in_family(wh, {f"weak{i}": 20 for i in range(4)})
    assert family.p_adjusted == pytest.approx(min(1.0, 5 * alone.p_value))   # the smallest p-value times 5
    assert 0.01 < alone.p_value < 0.05 and alone.passed and not family.passed


def test_shuffling_repeats_changes_no_gate_outcome(wh):
    task = make_task()
    wh.golden(task, 20)
    wh.model("inc")
    wh.model("new")
    # Same per-case accuracies in both arrangements; only which repeat number holds which answer differs.
    incumbent = [[1.0, 1.0, 1.0] if case < 10 else [1.0, 0.0, 0.0] for case in range(20)]
    aligned = [[1.0, 1.0, 1.0] if case < 18 else [1.0, 0.0, 0.0] for case in range(20)]
    shuffled = [[1.0, 1.0, 1.0] if case < 18 else [0.0, 0.0, 1.0] for case in range(20)]
    wh.evaluate(task, "inc", "e0", incumbent)

    def call_level_mcnemar(champion):  # the old gate: pairs by (case, repeat)
        pairs = [(c, i) for cc, ii in zip(champion, incumbent) for c, i in zip(cc, ii)]
        champion_only = sum(1 for c, i in pairs if c > i)
        incumbent_only = sum(1 for c, i in pairs if i > c)
        return sps.binomtest(champion_only, champion_only + incumbent_only, 0.5).pvalue

    results = []
    for arrangement in (aligned, shuffled):
        wh.evaluate(task, "new", "e1", arrangement)
        results.append(evaluate_gates(wh.conn, task, "new", "inc", GATES))
    assert call_level_mcnemar(aligned) != pytest.approx(call_level_mcnemar(shuffled))
    # Equal up to the last bit of a float: DuckDB may sum the cases in another order.
    for before, after in zip(*results, strict=True):
        for name, value in vars(before).items():
            assert (getattr(after, name) == pytest.approx(value)) if isinstance(value, float) else getattr(after, name) == value, name


# ---------------------------------------------------------------- costs
@pytest.mark.parametrize("price,cost,passed,message", [
    (True, 0.001, True, "per case"), (False, None, False, "no known price"), (False, 0.0, False, "zero cost"),
    (True, 0.0, True, "declared price")])
def test_costs_known_gate(wh, price, cost, passed, message):
    task = make_task()
    wh.golden(task, 20)
    wh.model("new", price=price)
    wh.evaluate(task, "new", "e1", outcomes(19), cost=cost)
    result = _gate(evaluate_gates(wh.conn, task, "new", None, GATES), "costs_known")
    assert result.passed is passed and message in result.detail


# ---------------------------------------------------------------- recorded rows
def test_every_gate_evaluation_is_a_row_and_a_missing_row_blocks(wh):
    alpha, beta, gamma = make_task("alpha"), make_task("beta"), make_task("gamma")
    settings = deployment()
    for task in (alpha, beta, gamma):
        wh.golden(task, 20)
    wh.model("inc")
    wh.model("good")
    wh.model("unpriced", price=False)
    for task in (alpha, beta, gamma):
        wh.evaluate(task, "inc", "e0", outcomes(14))
        wh.assign(task, "inc")
    wh.evaluate(alpha, "good", "e1", outcomes(19))
    wh.evaluate(beta, "unpriced", "e1", outcomes(19), cost=None)
    wh.recommend(alpha, "good")
    wh.recommend(beta, "unpriced")
    wh.recommend(gamma, "inc")        # nothing to promote: no gate applies
    evaluated = wh.record_gates([alpha, beta, gamma], settings)
    assert [e.applicable for e in evaluated] == [True, True, False] and "already assigned" in evaluated[2].note
    rows = wh.conn.execute("SELECT task, gate, passed, n_cases FROM promotion_gates ORDER BY task, gate").fetchall()
    assert len(rows) == 2 * len(GATE_NAMES)
    assert ("beta", "costs_known", False, None) in rows and ("alpha", "non_inferiority", True, 20) in rows

    assert gate_verdict(recorded_gates(wh.conn, "e1", "alpha", "good", "inc"), "e1") == (True, "all gates passed")
    passed, why = gate_verdict(recorded_gates(wh.conn, "e1", "beta", "unpriced", "inc"), "e1")
    assert not passed and "costs_known" in why
    passed, why = gate_verdict(recorded_gates(wh.conn, "another-run", "alpha", "good", "inc"), "another-run")
    assert not passed and "no recorded result" in why
    # Evaluated again in the same eval run: the newest evaluation is the one that counts.
    wh.evaluate(alpha, "good", "e1", outcomes(12))
    wh.record_gates([alpha], settings)
    passed, why = gate_verdict(recorded_gates(wh.conn, "e1", "alpha", "good", "inc"), "e1")
    assert not passed and "threshold" in why
    assert wh.conn.execute("SELECT count(*) FROM promotion_gates WHERE task = 'alpha'").fetchall()[0][0] == 8
