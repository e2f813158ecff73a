"""Context parallelism for the loss: Megatron's load-balanced sequence split and per-sequence normalization.

Megatron splits every sequence of length ``T`` into ``2*cp`` equal chunks and gives CP rank ``r`` the chunks
``r`` and ``2*cp - 1 - r`` (so that each rank gets an equal share of the causal-attention work). Per-token
log-probs are then local to each rank, but any per-sequence quantity is not: the ``1/|o_i|`` of
``seq-mean-token-mean`` must be the *whole* sequence's response length. Counting only the local tokens divides
by roughly ``|o_i| / cp`` instead, which is the factor-of-CP bug docs/design.md §7 lists.
:func:`cp_sequence_token_counts` all-reduces the counts over the CP group; with them, the CP ranks' losses sum to the CP=1 loss.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

__all__ = [
    "cp_chunk_indices",
    "split_for_context_parallel",
    "packed_cp_indices",
    "split_packed_for_context_parallel",
    "cp_sequence_token_counts",
]


def cp_chunk_indices(seq_len: int, cp_size: int, cp_rank: int, device: Optional[torch.device] = None) -> torch.Tensor:
    """Positions ``[2 * seq_len / (2*cp)]`` of the tokens that CP rank ``cp_rank`` holds, in order.

    Raises ``ValueError`` naming the fix when ``seq_len`` is not a multiple of ``2 * cp_size``.
    """
    if cp_size < 1 or not 0 <= cp_rank < cp_size:
        raise ValueError(f"invalid context-parallel rank {cp_rank} of size {cp_size}")
    n_chunks = 2 * cp_size
    if seq_len % n_chunks:
        raise ValueError(
            f"sequence length {seq_len} is not divisible by 2*cp = {n_chunks}: pad each sequence to a multiple "
            f"of {n_chunks} (the collate's pad_to_multiple_of) before splitting over the context-parallel group"
        )
    chunk = seq_len // n_chunks
    first = torch.arange(cp_rank * chunk, (cp_rank + 1) * chunk, device=device)
    mirror = n_chunks - 1 - cp_rank
    second = torch.arange(mirror * chunk, (mirror + 1) * chunk, device=device)
    return torch.cat([first, second])


def split_for_context_parallel(tensor: torch.Tensor, cp_size: int, cp_rank: int, seq_dim: int = 1) -> torch.Tensor:
    """This CP rank's part of a padded ``[B, T, ...]`` tensor (chunks ``r`` and ``2cp-1-r`` along ``seq_dim``)."""
    if cp_size == 1:
        return tensor
    index = cp_chunk_indices(tensor.shape[seq_dim], cp_size, cp_rank, device=tensor.device)
    return tensor.index_select(seq_dim, index)


def packed_cp_indices(
    cu_seqlens_padded: torch.Tensor, cp_size: int, cp_rank: int, device: Optional[torch.device] = None
) -> torch.Tensor:
    """Positions in a packed THD row of the tokens CP rank ``cp_rank`` holds, in its local order.

    Each packed sequence ``i`` (padded boundaries ``cu_seqlens_padded[i]:cu_seqlens_padded[i+1]``) is split on its
    own into ``2*cp`` chunks, as Megatron / Transformer Engine do for THD: the rank's local row is, sequence after
    sequence, that sequence's chunks ``r`` and ``2cp-1-r``. So sequence ``i`` occupies the local range
    ``cu_seqlens_padded[i] // cp : cu_seqlens_padded[i+1] // cp`` on every rank.
    """
    bounds = [int(x) for x in cu_seqlens_padded.tolist()]
    parts = []
    for start, end in zip(bounds[:-1], bounds[1:]):
        parts.append(start + cp_chunk_indices(end - start, cp_size, cp_rank, device=device))
    if not parts:
        return torch.zeros(0, dtype=torch.int64, device=device)
    return torch.cat(parts)


def split_packed_for_context_parallel(
    tensor: torch.Tensor, cu_seqlens_padded: torch.Tensor, cp_size: int, cp_rank: int, seq_dim: int = 1
) -> torch.Tensor:
    """This CP rank's part of a packed ``[1, S, ...]`` tensor: every sequence split on its own (see above)."""
    if cp_size == 1:
        return tensor
    if int(cu_seqlens_padded[-1]) != tensor.shape[seq_dim]:
        raise ValueError(f"cu_seqlens end at {int(cu_seqlens_padded[-1])} but the packed row has "
                         f"{tensor.shape[seq_dim]} tokens")
    index = packed_cp_indices(cu_seqlens_padded, cp_size, cp_rank, device=tensor.device)
    return tensor.index_select(seq_dim, index)


def cp_sequence_token_counts(loss_mask: torch.Tensor, cp_group: Optional[dist.ProcessGroup]) -> torch.Tensor:
    """Full per-sequence response-token counts ``[B]`` from this rank's ``[B, T_local]`` part of the mask.

    Pass the result as ``sequence_token_counts`` to :func:`policy_loss`. With ``cp_group`` ``None`` (or of
    size 1) the local counts are returned.
    """
    counts = loss_mask.float().sum(dim=-1)
    if cp_group is not None and dist.get_world_size(cp_group) > 1:
        dist.all_reduce(counts, op=dist.ReduceOp.SUM, group=cp_group)
    return counts
