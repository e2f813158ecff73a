"""Per-group statistics used for filtering, difficulty-aware sampling and the preprocessing summary."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Dict, Optional, Sequence

ALL_POSITIVE = "all_positive"
MIXED = "mixed"
ALL_NEGATIVE = "all_negative"
GROUP_TYPES = (ALL_POSITIVE, MIXED, ALL_NEGATIVE)


@dataclass(frozen=True)
class GroupStats:
    """Statistics of one group of K trajectories.

    Attributes:
        k: number of trajectories.
        agreement: winning cluster size / k (teacher self-consistency; 1.0 = all answers agree).
        num_distinct: number of distinct answers (equivalence clusters), answerless ones excluded.
        num_no_answer: trajectories without a final answer.
        fraction_positive: mean reward.
        all_positive: every reward is positive (the case that gets the advantage bias ``b``).
        group_type: one of ``all_positive``, ``mixed``, ``all_negative``.
    """

    k: int
    agreement: float
    num_distinct: int
    num_no_answer: int
    fraction_positive: float
    all_positive: bool
    group_type: str

    def as_dict(self) -> Dict[str, object]:
        return asdict(self)


def group_type(rewards: Sequence[float]) -> str:
    """``all_positive`` / ``mixed`` / ``all_negative`` from the rewards (positive means ``r > 0``)."""
    pos = sum(1 for r in rewards if r > 0)
    if pos == len(rewards) and pos > 0:
        return ALL_POSITIVE
    if pos == 0:
        return ALL_NEGATIVE
    return MIXED


def compute_group_stats(
    rewards: Sequence[float], answers: Sequence[Optional[str]], agreement: float, num_distinct: int
) -> GroupStats:
    """Assemble :class:`GroupStats` (pure function of the vote outcome)."""
    k = len(rewards)
    frac = (sum(1 for r in rewards if r > 0) / k) if k else 0.0
    gtype = group_type(rewards)
    return GroupStats(
        k=k,
        agreement=float(agreement),
        num_distinct=int(num_distinct),
        num_no_answer=sum(1 for a in answers if a is None),
        fraction_positive=float(frac),
        all_positive=gtype == ALL_POSITIVE,
        group_type=gtype,
    )
