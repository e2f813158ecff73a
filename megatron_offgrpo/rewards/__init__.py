"""Rewards for offline GRPO: final-answer extraction, math equivalence, majority voting, group statistics.

See docs/design.md §2. Typical use::

    from megatron_offgrpo.rewards import LabelConfig, label_group
    out = label_group(responses, reference=None, config=LabelConfig(min_agreement=0.5))
    out.rewards, out.label, out.stats.group_type
"""

from megatron_offgrpo.rewards.equivalence import EquivalenceChecker, VerifierCounters, VerifierTimeout, time_limit
from megatron_offgrpo.rewards.extraction import (
    boxed_spans,
    extract_final_answer,
    final_answer_elements,
    final_solution_part,
    normalize_answer_string,
    rewrite_euler_e,
    set_literal,
    set_literal_elements,
)
from megatron_offgrpo.rewards.labeling import (
    REJECT_LOW_AGREEMENT,
    REJECT_NO_ANSWER,
    REJECT_NO_REFERENCE,
    GroupLabel,
    LabelConfig,
    label_group,
    label_groups,
)
from megatron_offgrpo.rewards.stats import (
    ALL_NEGATIVE,
    ALL_POSITIVE,
    GROUP_TYPES,
    MIXED,
    GroupStats,
    compute_group_stats,
    group_type,
)
from megatron_offgrpo.rewards.voting import VoteResult, cluster_answers, majority_vote, rewards_against_reference

__all__ = [
    "ALL_NEGATIVE", "ALL_POSITIVE", "GROUP_TYPES", "MIXED", "REJECT_LOW_AGREEMENT", "REJECT_NO_ANSWER",
    "REJECT_NO_REFERENCE", "EquivalenceChecker", "GroupLabel", "GroupStats", "LabelConfig", "VerifierCounters",
    "VerifierTimeout", "VoteResult", "boxed_spans", "cluster_answers", "compute_group_stats", "extract_final_answer",
    "final_answer_elements", "final_solution_part", "group_type", "label_group", "label_groups", "majority_vote",
    "normalize_answer_string", "rewards_against_reference", "rewrite_euler_e", "set_literal", "set_literal_elements",
    "time_limit",
]
