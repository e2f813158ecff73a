"""Benchmark metrics over graded samples: avg@n, unbiased pass@k, maj@n and a bootstrap interval (docs/design.md §8).

Every function is pure (no I/O, no global state) and takes per-problem lists: ``correct[i][j]`` is whether sample
``j`` of problem ``i`` was graded correct. Scores are returned in **percent**. A benchmark without problems, or a
problem without samples, is an error (a metric never shows 0 for "no data").

* **avg@n**: mean correctness over all ``N x n`` samples; with the same ``n`` for every problem (required here)
  it equals the mean over problems of the per-problem accuracy, i.e. the mean pass@1. The blog's tables are avg@n.
* **pass@k** (Chen et al., 2021, "Evaluating Large Language Models Trained on Code"): the unbiased estimate of the
  probability that at least one of ``k`` samples drawn without replacement from the ``n`` is correct,
  ``1 - C(n - c, k) / C(n, k)`` for a problem with ``c`` correct samples, averaged over problems.
* **maj@n**: the problem counts as solved when the majority vote over its ``n`` extracted answers (the project's
  voting: :func:`megatron_offgrpo.rewards.voting.majority_vote`, the same equivalence as grading, so ``1/2`` and
  ``\\frac{1}{2}`` vote together) picks a correct answer.
* **bootstrap CI**: the percentile interval of the mean per-problem score over problems resampled with
  replacement, from a seeded generator (the same seed gives the same interval).
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

__all__ = [
    "check_samples", "pass_at_k", "pass_at_k_levels", "avg_at_n", "mean_pass_at_k", "pass_at_k_table",
    "majority_correct", "maj_at_n", "per_problem_accuracy", "bootstrap_ci",
]


def check_samples(correct: Sequence[Sequence[bool]]) -> int:
    """Validate a per-problem correctness table and return its common number of samples ``n``.

    Raises ``ValueError`` for no problems, a problem without samples, or problems with different sample counts
    (naming the first offending problem index): the metrics here assume one ``n`` for the whole benchmark.
    """
    if len(correct) == 0:
        raise ValueError("no problems: a metric over zero problems is undefined")
    n = len(correct[0])
    for i, row in enumerate(correct):
        if len(row) == 0:
            raise ValueError(f"problem {i} has no samples")
        if len(row) != n:
            raise ValueError(f"problem {i} has {len(row)} samples but problem 0 has {n}: every problem needs the "
                             "same number of samples")
    return n


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one problem with ``c`` correct among ``n`` samples, as a fraction in [0, 1].

    ``1 - C(n - c, k) / C(n, k)``, computed as the product ``prod_{i = n - c + 1}^{n} (1 - k / i)`` so that large
    ``n`` neither overflows nor loses precision. Requires ``0 <= c <= n`` and ``1 <= k <= n``.
    """
    if not 0 <= c <= n:
        raise ValueError(f"need 0 <= c <= n, got c={c}, n={n}")
    if not 1 <= k <= n:
        raise ValueError(f"need 1 <= k <= n, got k={k}, n={n}")
    if n - c < k:  # every k-subset contains a correct sample
        return 1.0
    prod = 1.0
    for i in range(n - c + 1, n + 1):
        prod *= 1.0 - k / i
    return 1.0 - prod


def pass_at_k_levels(n: int) -> List[int]:
    """The k reported for ``n`` samples: the powers of two ``1, 2, 4, ... <= n``."""
    if n < 1:
        raise ValueError(f"need n >= 1, got {n}")
    levels, k = [], 1
    while k <= n:
        levels.append(k)
        k *= 2
    return levels


def per_problem_accuracy(correct: Sequence[Sequence[bool]]) -> List[float]:
    """Per problem, the fraction of its samples graded correct (in [0, 1])."""
    check_samples(correct)
    return [sum(bool(x) for x in row) / len(row) for row in correct]


def avg_at_n(correct: Sequence[Sequence[bool]]) -> float:
    """avg@n in percent: the mean correctness over all samples of all problems (= mean pass@1)."""
    n = check_samples(correct)
    total = sum(sum(bool(x) for x in row) for row in correct)
    return 100.0 * total / (len(correct) * n)


def mean_pass_at_k(correct: Sequence[Sequence[bool]], k: int) -> float:
    """pass@k in percent: :func:`pass_at_k` of each problem, averaged over problems."""
    n = check_samples(correct)
    return 100.0 * sum(pass_at_k(n, sum(bool(x) for x in row), k) for row in correct) / len(correct)


def pass_at_k_table(correct: Sequence[Sequence[bool]]) -> Dict[int, float]:
    """``{k: pass@k in percent}`` for every k of :func:`pass_at_k_levels`."""
    n = check_samples(correct)
    return {k: mean_pass_at_k(correct, k) for k in pass_at_k_levels(n)}


def majority_correct(answers: Sequence[Optional[str]], correct: Sequence[bool], checker) -> bool:
    """Whether the majority vote over one problem's extracted ``answers`` picks a correct answer.

    The vote is :func:`megatron_offgrpo.rewards.voting.majority_vote` with ``checker`` (an
    :class:`~megatron_offgrpo.rewards.equivalence.EquivalenceChecker`): equivalent answers form one cluster, the
    largest cluster wins, ties go to the cluster seen first, ``None`` never votes. The vote is correct when its
    winning representative was graded correct (``correct[label_index]``); no answer at all is not correct.
    Pass ``None`` for a sample that must not vote (e.g. a truncated generation).
    """
    from megatron_offgrpo.rewards.voting import majority_vote

    if len(answers) != len(correct):
        raise ValueError(f"{len(answers)} answers but {len(correct)} correctness flags")
    vote = majority_vote(answers, checker, min_agreement=0.0)
    return vote.label is not None and bool(correct[vote.label_index])


def maj_at_n(answers: Sequence[Sequence[Optional[str]]], correct: Sequence[Sequence[bool]], checker) -> float:
    """maj@n in percent: the fraction of problems whose majority-voted answer is correct (:func:`majority_correct`)."""
    check_samples(correct)
    if len(answers) != len(correct):
        raise ValueError(f"answers for {len(answers)} problems but correctness for {len(correct)}")
    return 100.0 * sum(majority_correct(a, c, checker) for a, c in zip(answers, correct)) / len(correct)


def bootstrap_ci(
    per_problem_scores: Sequence[float],
    num_resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> Tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``per_problem_scores`` (same unit as the scores).

    Problems are resampled with replacement ``num_resamples`` times from ``numpy.random.default_rng(seed)``; the
    interval is the ``(1 - confidence) / 2`` and ``(1 + confidence) / 2`` quantiles of the resampled means.
    Deterministic for a seed. One problem gives the degenerate interval ``(score, score)``.
    """
    scores = np.asarray(per_problem_scores, dtype=np.float64)
    if scores.ndim != 1 or scores.size == 0:
        raise ValueError("bootstrap_ci needs a non-empty 1-D list of per-problem scores")
    if not np.all(np.isfinite(scores)):
        raise ValueError("bootstrap_ci: a per-problem score is NaN or infinite")
    if num_resamples < 1:
        raise ValueError(f"num_resamples must be >= 1, got {num_resamples}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, scores.size, size=(num_resamples, scores.size))
    means = scores[idx].mean(axis=1)
    alpha = (1.0 - confidence) / 2.0
    low, high = np.quantile(means, [alpha, 1.0 - alpha])
    # Quantile interpolation can land a hair outside [min, max] of the means in float; clamp for a clean report.
    return float(max(low, means.min())), float(min(high, means.max()))

