"""Label one group (extract -> vote -> rewards -> statistics), serially or in process workers.

Process workers, not threads: the verifier's timeout is a signal alarm (see :mod:`.equivalence`). They run in the
project's one pool (:class:`~megatron_offgrpo.utils.pool.OrderedProcessPool`); results come back in input order
whatever the number of workers, so the written dataset does not depend on ``workers``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import islice
from typing import Iterable, Iterator, List, Optional, Sequence, Tuple

from megatron_offgrpo.rewards.equivalence import EquivalenceChecker, VerifierCounters
from megatron_offgrpo.rewards.extraction import extract_final_answer
from megatron_offgrpo.rewards.stats import GroupStats, compute_group_stats
from megatron_offgrpo.rewards.voting import majority_vote, rewards_against_reference

REJECT_NO_ANSWER = "no_answer"
REJECT_LOW_AGREEMENT = "low_agreement"
REJECT_NO_REFERENCE = "missing_reference"


@dataclass(frozen=True)
class LabelConfig:
    """How groups are labelled.

    Attributes:
        min_agreement: minimum winning-cluster fraction of K for a voted group to be kept (0.5, docs/design.md
            §2).
        timeout_s: per parse / per verify wall-time budget for math-verify.
        label_source: ``vote`` (majority vote; the OpenThoughts3 case) or ``reference`` (reward against the
            ground-truth ``answer`` field; groups without one are rejected).
    """

    min_agreement: float = 0.5
    timeout_s: Optional[float] = 5.0
    label_source: str = "vote"

    def __post_init__(self) -> None:
        if self.label_source not in ("vote", "reference"):
            raise ValueError(f"label_source must be 'vote' or 'reference', got {self.label_source!r}")
        if not 0.0 <= self.min_agreement <= 1.0:
            raise ValueError(f"min_agreement must be a fraction in [0, 1], got {self.min_agreement}")


@dataclass
class GroupLabel:
    """Labelling outcome for one group.

    ``reference_match`` compares the vote's label with the ground-truth ``answer`` when one exists (vote accuracy);
    ``None`` when there is no reference. ``reject_reason`` is ``None`` for kept groups.
    """

    answers: List[Optional[str]]
    rewards: List[float]
    label: Optional[str]
    stats: GroupStats
    reject_reason: Optional[str]
    reference_match: Optional[bool]
    counters: VerifierCounters = field(default_factory=VerifierCounters)


def label_group(responses: Sequence[str], reference: Optional[str], config: LabelConfig) -> GroupLabel:
    """Extract each response's final answer, vote (or compare to ``reference``), and compute the statistics."""
    checker = EquivalenceChecker(timeout_s=config.timeout_s)
    answers = [extract_final_answer(r) for r in responses]
    vote = majority_vote(answers, checker, config.min_agreement)
    reference_match: Optional[bool] = None
    if reference is not None and vote.label is not None:
        reference_match = checker.equivalent(reference, vote.label)

    reject: Optional[str] = None
    if config.label_source == "vote":
        rewards, label = vote.rewards, vote.label
        if vote.label is None:
            reject = REJECT_NO_ANSWER
        elif not vote.accepted:
            reject = REJECT_LOW_AGREEMENT
    else:
        if reference is None:
            rewards, label, reject = [0.0] * len(answers), None, REJECT_NO_REFERENCE
        else:
            rewards, label = rewards_against_reference(answers, reference, checker), reference
    stats = compute_group_stats(rewards, answers, vote.agreement, vote.num_distinct)
    return GroupLabel(answers, rewards, label, stats, reject, reference_match, checker.counters)


def _label_chunk(task: Tuple[LabelConfig, List[Tuple[Sequence[str], Optional[str]]]]) -> List[GroupLabel]:
    config, items = task
    return [label_group(responses, reference, config) for responses, reference in items]


def label_groups(
    items: Iterable[Tuple[Sequence[str], Optional[str]]],
    config: LabelConfig,
    workers: int = 1,
    chunksize: int = 64,
) -> Iterator[GroupLabel]:
    """Label ``(responses, reference)`` items in order; ``workers > 1`` runs chunks of ``chunksize`` groups in
    process workers (one task per chunk, so that the per-task overhead is paid once per many groups)."""
    from megatron_offgrpo.utils.pool import OrderedProcessPool

    it = iter(items)
    chunks = iter(lambda: list(islice(it, max(1, chunksize))), [])
    with OrderedProcessPool(workers) as pool:
        for labels in pool.imap(_label_chunk, ((config, chunk) for chunk in chunks)):
            yield from labels
