"""Majority voting over a group's final answers (docs/design.md §2).

Answers are clustered greedily in order: each answer joins the first existing cluster whose representative (its
first member) it is equivalent to, else it opens a new cluster. The largest cluster's representative is the
pseudo-label; ties go to the cluster whose first member came first; ``None`` (no answer) is never clustered and
so never wins. ``reward_i = 1`` for members of the winning cluster, else 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence

from megatron_offgrpo.rewards.equivalence import EquivalenceChecker


@dataclass(frozen=True)
class VoteResult:
    """Outcome of a vote over K answers.

    Attributes:
        label: the winning cluster's representative answer, ``None`` when no trajectory has an answer.
        label_index: index of that representative among the K answers (-1 when ``label`` is None).
        cluster_of: per answer, its cluster id (clusters numbered by first appearance), -1 for ``None``.
        cluster_sizes: size of each cluster.
        rewards: per answer, 1.0 if in the winning cluster else 0.0.
        agreement: winning cluster size / K (K counts answerless trajectories too).
        accepted: ``agreement >= min_agreement`` and a label exists.
    """

    label: Optional[str]
    label_index: int
    cluster_of: List[int]
    cluster_sizes: List[int]
    rewards: List[float]
    agreement: float
    accepted: bool

    @property
    def num_distinct(self) -> int:
        """Number of distinct (non-equivalent) answers."""
        return len(self.cluster_sizes)


def cluster_answers(answers: Sequence[Optional[str]], checker: EquivalenceChecker) -> List[int]:
    """Greedy equivalence clustering; returns the cluster id of each answer (-1 for ``None``)."""
    reps: List[str] = []
    cluster_of: List[int] = []
    for ans in answers:
        if ans is None:
            cluster_of.append(-1)
            continue
        for cid, rep in enumerate(reps):
            # The representative is the gold side: membership means "equivalent to the cluster's first answer".
            if checker.equivalent(rep, ans):
                cluster_of.append(cid)
                break
        else:
            reps.append(ans)
            cluster_of.append(len(reps) - 1)
    return cluster_of


def majority_vote(
    answers: Sequence[Optional[str]], checker: EquivalenceChecker, min_agreement: float = 0.5
) -> VoteResult:
    """Vote a pseudo-label from ``answers``; see the module docstring for the exact rules.

    Args:
        answers: the K extracted answers of one group (``None`` = no answer).
        checker: equivalence checker (its counters record fast-path hits, timeouts and errors).
        min_agreement: minimum fraction of K that the winning cluster must reach for the group to be accepted.
    """
    k = len(answers)
    cluster_of = cluster_answers(answers, checker)
    n_clusters = max(cluster_of, default=-1) + 1
    sizes = [0] * n_clusters
    for c in cluster_of:
        if c >= 0:
            sizes[c] += 1
    if n_clusters == 0:
        return VoteResult(None, -1, cluster_of, sizes, [0.0] * k, 0.0, False)
    # max() returns the first maximal element: clusters are numbered by first appearance, so this is the tie rule.
    win = max(range(n_clusters), key=lambda c: sizes[c])
    label_index = cluster_of.index(win)
    rewards = [1.0 if c == win else 0.0 for c in cluster_of]
    agreement = sizes[win] / k
    return VoteResult(
        label=answers[label_index],
        label_index=label_index,
        cluster_of=cluster_of,
        cluster_sizes=sizes,
        rewards=rewards,
        agreement=agreement,
        accepted=agreement >= min_agreement,
    )


def rewards_against_reference(
    answers: Sequence[Optional[str]], reference: str, checker: EquivalenceChecker
) -> List[float]:
    """Rewards against a known ground-truth ``reference`` answer (1.0 when equivalent, else 0.0)."""
    return [1.0 if checker.equivalent(reference, a) else 0.0 for a in answers]
