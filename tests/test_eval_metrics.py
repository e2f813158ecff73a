"""Evaluation metrics and grading against independent computations (docs/design.md §8).

pass@k is checked against an exact enumeration of all k-subsets (itertools.combinations) and exact rational
arithmetic; avg@n, maj@n and the grading rules against hand-computed cases; the bootstrap interval against its
normal approximation."""

import itertools
import math
from fractions import Fraction

import numpy as np
import pytest

from megatron_offgrpo.eval.grading import GradeItem, grade_problem, grade_problems, normalize_reference
from megatron_offgrpo.eval.metrics import (
    avg_at_n,
    bootstrap_ci,
    check_samples,
    maj_at_n,
    majority_correct,
    mean_pass_at_k,
    pass_at_k,
    pass_at_k_levels,
    pass_at_k_table,
    per_problem_accuracy,
)
from megatron_offgrpo.rewards import EquivalenceChecker

T, F = True, False

# Hand-built samples: the correct ones at arbitrary positions (the estimator must not depend on them).
PROBLEMS = [
    [T, F, F, T, F, F, F, F],
    [F, F, F, F, F, F, F, F],
    [T, T, T, T, T, T, T, T],
    [F, F, F, F, F, F, F, T],
    [F, T, T, F, T, T, F, T],
]


def _enumerated_pass_at_k(samples, k):
    """Fraction of the k-subsets of ``samples`` that contain at least one correct sample (exact)."""
    subsets = list(itertools.combinations(range(len(samples)), k))
    hits = sum(any(samples[i] for i in s) for s in subsets)
    return Fraction(hits, len(subsets))


@pytest.mark.parametrize("k", [1, 2, 3, 4, 5, 8])
def test_pass_at_k_equals_enumeration_over_k_subsets(k):
    for samples in PROBLEMS:
        expected = _enumerated_pass_at_k(samples, k)
        assert pass_at_k(len(samples), sum(samples), k) == pytest.approx(float(expected), abs=1e-12), (samples, k)
    mean = sum(_enumerated_pass_at_k(s, k) for s in PROBLEMS) / len(PROBLEMS)
    assert mean_pass_at_k(PROBLEMS, k) == pytest.approx(100 * float(mean), abs=1e-10)


def test_pass_at_k_large_n_matches_exact_binomials():
    # The product form must agree with exact big-integer binomials where floats of C(n, k) would overflow.
    for n, c, k in [(1000, 3, 500), (1024, 1, 1), (1024, 10, 64), (300, 299, 2), (64, 0, 16)]:
        exact = 1 - Fraction(math.comb(n - c, k), math.comb(n, k))
        assert pass_at_k(n, c, k) == pytest.approx(float(exact), rel=1e-12, abs=1e-15), (n, c, k)


def test_pass_at_1_is_avg_and_table_levels():
    assert mean_pass_at_k(PROBLEMS, 1) == pytest.approx(avg_at_n(PROBLEMS))
    assert pass_at_k_levels(1) == [1]
    assert pass_at_k_levels(6) == [1, 2, 4]
    assert pass_at_k_levels(16) == [1, 2, 4, 8, 16]
    assert list(pass_at_k_table(PROBLEMS)) == [1, 2, 4, 8]
    # pass@n: 1 for any problem with a correct sample
    assert pass_at_k_table(PROBLEMS)[8] == pytest.approx(100 * 4 / 5)
    with pytest.raises(ValueError, match="k <= n"):
        pass_at_k(4, 1, 5)
    with pytest.raises(ValueError, match="c <= n"):
        pass_at_k(4, 5, 1)


def test_avg_at_n_hand_computed():
    # 2 + 0 + 8 + 1 + 5 = 16 correct of 40 samples
    assert avg_at_n(PROBLEMS) == pytest.approx(40.0)
    assert per_problem_accuracy(PROBLEMS) == pytest.approx([0.25, 0.0, 1.0, 0.125, 0.625])
    assert avg_at_n([[T, F, F]]) == pytest.approx(100 / 3)


def test_sample_table_is_checked():
    with pytest.raises(ValueError, match="no problems"):
        avg_at_n([])
    with pytest.raises(ValueError, match="problem 1 has 2 samples but problem 0 has 3"):
        check_samples([[T, F, F], [T, F]])
    with pytest.raises(ValueError, match="problem 0 has no samples"):
        check_samples([[]])


def test_maj_at_n_votes_with_the_project_equivalence():
    checker = EquivalenceChecker()
    answers = [
        # 1/2, \frac{1}{2} and 0.5 are one cluster of 3: it beats "3" (2 votes) only through the equivalence.
        ["3", "1/2", "\\frac{1}{2}", "0.5", "3"],
        # the majority (8) is wrong although a correct sample exists
        ["7", "8", "8", None, None],
        # no answer at all: not correct
        [None, None, None, None, None],
        # a tie goes to the cluster seen first (voting.py's rule): 4 first, correct
        ["4", "5", None, None, None],
    ]
    correct = [
        [F, T, T, T, F],
        [T, F, F, F, F],
        [F, F, F, F, F],
        [T, F, F, F, F],
    ]
    flags = [majority_correct(a, c, checker) for a, c in zip(answers, correct)]
    assert flags == [True, False, False, True]
    assert maj_at_n(answers, correct, checker) == pytest.approx(50.0)
    # the same votes with the tie reversed: 5 first, wrong
    assert majority_correct(["5", "4"], [F, T], checker) is False


def test_bootstrap_ci_deterministic_covers_estimate_and_matches_normal_approximation():
    rng = np.random.default_rng(11)
    scores = 100.0 * (rng.random(400) < 0.5)
    mean = float(scores.mean())
    a = bootstrap_ci(scores, num_resamples=2000, confidence=0.95, seed=3)
    b = bootstrap_ci(scores, num_resamples=2000, confidence=0.95, seed=3)
    c = bootstrap_ci(scores, num_resamples=2000, confidence=0.95, seed=4)
    assert a == b  # same seed, same interval, bit for bit
    assert a != c
    assert a[0] < mean < a[1]
    # Normal approximation of the mean of 400 Bernoulli(p) scores: half-width 1.96 * sd / sqrt(N).
    half = 1.96 * scores.std() / math.sqrt(scores.size)
    assert (a[1] - a[0]) / 2 == pytest.approx(half, rel=0.12)
    narrow = bootstrap_ci(scores, num_resamples=2000, confidence=0.5, seed=3)
    assert a[0] < narrow[0] < mean < narrow[1] < a[1]
    # per-problem accuracies of the hand-built table: the point estimate is inside
    acc = [100 * x for x in per_problem_accuracy(PROBLEMS)]
    low, high = bootstrap_ci(acc, seed=0)
    assert low <= avg_at_n(PROBLEMS) <= high
    assert bootstrap_ci([42.0], seed=0) == (42.0, 42.0)
    assert bootstrap_ci([10.0, 10.0, 10.0], seed=0) == (10.0, 10.0)
    with pytest.raises(ValueError):
        bootstrap_ci([])
    with pytest.raises(ValueError, match="NaN"):
        bootstrap_ci([1.0, float("nan")])


def test_grading_rules():
    item = GradeItem(
        "p0", "$\\frac{1}{2}$",
        responses=[
            "<think>maybe \\boxed{3}</think> so the answer is $\\boxed{0.5}$",  # correct (think box ignored)
            "The answer is \\boxed{1/2}",  # correct, equivalent form
            "I get \\boxed{3}",  # wrong
            "no box here",  # no answer
            "truncated but boxed early \\boxed{1/2} and then",  # finish_reason length: wrong, does not vote
            "truncated \\boxed{1/2} again",
            "truncated \\boxed{1/2} thrice",
        ],
        finish_reasons=["stop", "stop", "stop", "stop", "length", "length", "length"],
    )
    g = grade_problem(item)
    assert [s.correct for s in g.samples] == [T, T, F, F, F, F, F]
    assert [s.truncated for s in g.samples] == [F, F, F, F, T, T, T]
    assert [s.extracted_answer for s in g.samples] == ["0.5", "1/2", "3", None, "1/2", "1/2", "1/2"]
    assert g.majority_correct and g.majority_answer == "0.5"
    # Truncated samples do not vote: here they would have outvoted the two complete ones.
    g2 = grade_problem(GradeItem("p1", "7", ["\\boxed{8}", "\\boxed{7}", "\\boxed{7}", "\\boxed{7}"],
                                 ["stop", "length", "length", "length"]))
    assert g2.majority_answer == "8" and not g2.majority_correct
    assert normalize_reference(" \\boxed{42} ") == "42" and normalize_reference("$x^2$") == "x^2"
    assert normalize_reference("$$\\frac{1}{2}$$") == "\\frac{1}{2}" and normalize_reference("5\\$") == "5\\$"
    with pytest.raises(ValueError, match="empty reference"):
        normalize_reference("  $ $ ")
    # Order of results does not depend on the number of workers.
    items = [item, GradeItem("p1", "7", ["\\boxed{7}", "\\boxed{8}"], ["stop", "stop"])] * 2
    serial = grade_problems(items, workers=1, progress=False)
    assert [g.problem_id for g in serial] == ["p0", "p1", "p0", "p1"]
    assert [[s.correct for s in g.samples] for g in serial][1] == [T, F]
    pooled = grade_problems(items, workers=2, progress=False)
    assert [(g.problem_id, g.samples, g.majority_answer) for g in pooled] == \
        [(g.problem_id, g.samples, g.majority_answer) for g in serial]
