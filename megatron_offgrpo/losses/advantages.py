"""Group-relative advantages with the all-positive bias (docs/design.md §2).

Advantages are computed at train time from the stored per-trajectory rewards, so that the bias ``b``, the
group size ``G`` and the std mode can change without re-preprocessing the dataset.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["GroupStatistics", "group_statistics", "group_advantages", "opd_advantages"]

_STD_MODES = ("sample", "population", "none")
# Rewards within this range count as "all equal": float noise can make the std of a constant group non-zero.
_EQUAL_TOL = 1e-6


@dataclass
class GroupStatistics:
    """Per-trajectory view of each trajectory's group (all tensors ``[B]``, aligned with the rewards)."""

    group_index: torch.Tensor  # dense 0..num_groups-1 index of the trajectory's group
    size: torch.Tensor  # trajectories in the group (int64)
    mean: torch.Tensor  # float64
    std: torch.Tensor  # float64, per the requested mode (0 for "none" and for groups of one under "sample")
    all_equal: torch.Tensor  # bool: max - min <= 1e-6
    all_positive: torch.Tensor  # bool: every reward of the group > 0
    all_negative: torch.Tensor  # bool: no reward of the group > 0
    num_groups: int


def group_statistics(rewards: torch.Tensor, group_ids: torch.Tensor, std: str = "sample") -> GroupStatistics:
    """Mean, std and all-positive / all-equal flags of each trajectory's group, computed in float64.

    Args:
        rewards: ``[B]`` per-trajectory rewards.
        group_ids: ``[B]`` integer group ids; trajectories of one group need not be contiguous.
        std: ``"sample"`` (unbiased, as verl / DeepSeekMath), ``"population"`` or ``"none"``.
    """
    if std not in _STD_MODES:
        raise ValueError(f"std must be one of {_STD_MODES}, got {std!r}")
    if rewards.dim() != 1 or group_ids.shape != rewards.shape:
        raise ValueError(
            f"rewards and group_ids must both be [B]; got {tuple(rewards.shape)} and {tuple(group_ids.shape)}"
        )
    r = rewards.detach().to(torch.float64)
    _, index = torch.unique(group_ids, return_inverse=True)
    num_groups = int(index.max()) + 1 if index.numel() else 0
    counts = torch.bincount(index, minlength=num_groups)
    sums = torch.zeros(num_groups, dtype=torch.float64, device=r.device).index_add_(0, index, r)
    mean = sums / counts.clamp(min=1)
    sq_dev = torch.zeros_like(sums).index_add_(0, index, (r - mean[index]) ** 2)
    if std == "sample":
        # A group of one has no sample std; it is "all equal", so its normalized part is 0 anyway.
        group_std = torch.sqrt(sq_dev / (counts - 1).clamp(min=1))
    elif std == "population":
        group_std = torch.sqrt(sq_dev / counts.clamp(min=1))
    else:
        group_std = torch.zeros_like(sums)
    gmax = torch.full_like(sums, -torch.inf).scatter_reduce_(0, index, r, "amax")
    gmin = torch.full_like(sums, torch.inf).scatter_reduce_(0, index, r, "amin")
    return GroupStatistics(
        group_index=index,
        size=counts[index],
        mean=mean[index],
        std=group_std[index],
        all_equal=(gmax - gmin <= _EQUAL_TOL)[index],
        all_positive=(gmin > 0)[index],
        all_negative=(gmax <= 0)[index],
        num_groups=num_groups,
    )


def group_advantages(
    rewards: torch.Tensor,
    group_ids: torch.Tensor,
    all_positive_bias: float = 0.5,
    std: str = "sample",
    eps: float = 1e-6,
) -> torch.Tensor:
    """GRPO advantages ``A_i = (r_i - mean) / (std + eps)`` per group, plus ``b`` on all-positive groups.

    * The normalized part is exactly 0 when a group's rewards are all equal (max - min <= 1e-6), including
      groups of a single trajectory.
    * If every reward of a group is > 0, ``all_positive_bias`` (``b``) is added to each of its advantages;
      ``b = 0`` gives plain offline GRPO. All-negative groups keep ``A = 0``.

    Args:
        rewards: ``[B]`` rewards of the G trajectories drawn per group (several groups side by side).
        group_ids: ``[B]`` group id of each trajectory.
        all_positive_bias: ``b``.
        std: ``"sample"`` (default), ``"population"``, or ``"none"`` (no division: ``A = r - mean``).
        eps: added to the std.

    Returns:
        ``[B]`` float32 advantages.
    """
    stats = group_statistics(rewards, group_ids, std)
    centered = rewards.detach().to(torch.float64) - stats.mean
    normalized = centered if std == "none" else centered / (stats.std + eps)
    normalized = torch.where(stats.all_equal, torch.zeros_like(normalized), normalized)
    adv = normalized + all_positive_bias * stats.all_positive.to(torch.float64)
    return adv.to(torch.float32)


def opd_advantages(teacher_logprobs: torch.Tensor, old_logprobs: torch.Tensor) -> torch.Tensor:
    """Lightning OPD per-token advantage ``A_t = teacher_t - old_t`` (docs/design.md §3), detached, fp32."""
    return (teacher_logprobs.detach().float() - old_logprobs.detach().float())
