"""The loss core: per-token log-probs on vocab-parallel logits, group advantages, and the registered policy losses."""

from .advantages import GroupStatistics, group_advantages, group_statistics, opd_advantages
from .context_parallel import (
    cp_chunk_indices,
    cp_sequence_token_counts,
    packed_cp_indices,
    split_for_context_parallel,
    split_packed_for_context_parallel,
)
from .fused_output import fused_output_loss, fused_vocab_parallel_logprobs, logprobs_from_model_output
from .logprobs import vocab_parallel_logprobs
from .policy import LOSS_AGGREGATIONS, LOSS_KINDS, aggregate_token_loss, per_token_policy_loss, policy_loss
from .registry import LossSpec, TokenLoss, get_loss, loss_names, register_loss, required_arrays

__all__ = [
    "vocab_parallel_logprobs",
    "fused_vocab_parallel_logprobs",
    "fused_output_loss",
    "logprobs_from_model_output",
    "group_advantages",
    "group_statistics",
    "GroupStatistics",
    "opd_advantages",
    "policy_loss",
    "per_token_policy_loss",
    "aggregate_token_loss",
    "LOSS_KINDS",
    "LOSS_AGGREGATIONS",
    "LossSpec",
    "TokenLoss",
    "get_loss",
    "loss_names",
    "register_loss",
    "required_arrays",
    "cp_chunk_indices",
    "split_for_context_parallel",
    "packed_cp_indices",
    "split_packed_for_context_parallel",
    "cp_sequence_token_counts",
]
