"""Group sampler: global batches of whole groups, G trajectories drawn per group, sharded across DP ranks.

Contract (docs/design.md §§5.8 and 4.4):

- A *global batch* is ``groups_per_batch`` groups; from each group ``group_size`` (G) of its K trajectories are
  drawn without replacement, deterministically from ``(seed, epoch, group_id)`` (sorted by rollout order).
  So a global batch is always ``groups_per_batch * G`` sequences (Megatron's ``global_batch_size``).
- Groups with fewer than G trajectories cannot give G draws; they are left out (counted in
  :attr:`GroupBatchSampler.num_skipped_groups`, with a warning) rather than giving uneven batches.
- Each epoch visits the eligible groups in a permutation drawn from ``(seed, epoch)``; the ``n % groups_per_batch``
  groups at the end of that permutation wait for a later epoch (a different permutation), so a group is never
  split across global batches.
- **DP sharding**: rank ``r`` of ``dp_size`` gets the contiguous slice of *whole groups*
  ``[r * groups_per_batch / dp_size, (r + 1) * groups_per_batch / dp_size)`` of each global batch, so group
  statistics (advantages) are computable locally. ``groups_per_batch`` must be divisible by ``dp_size``.
- **Resume**: ``consumed_samples`` (sequences of the global batch, all ranks, as Megatron counts them) selects the
  global batch to continue from; batch ``b`` is ``(epoch = b // batches_per_epoch, b % batches_per_epoch)``, so a
  resume exactly at an epoch boundary starts the next epoch.
"""

from __future__ import annotations

import warnings
from typing import Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import numpy as np


class GroupBatchSampler:
    """Yields, per global batch, this DP rank's flat list of sequence indices (its groups, G each, contiguous).

    Usable as ``torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=...)``; the trainer splits
    the rank's list into microbatches. ``consumed_samples`` advances by the global batch size per yielded batch.

    Args:
        groups: ``group_id -> sequence indices`` (e.g. ``TrajectoryDataset.groups()``), in rollout order.
        groups_per_batch: groups per global batch (all DP ranks together).
        group_size: G, trajectories drawn per group.
        dp_rank / dp_size: data-parallel coordinates.
        seed: base seed of the permutations and the draws.
        consumed_samples: sequences already consumed (resume point); a multiple of the global batch size.
        num_epochs: stop after this many epochs (counted from epoch 0); ``None`` iterates forever.
    """

    def __init__(
        self,
        groups: Mapping[int, Sequence[int]],
        groups_per_batch: int,
        group_size: int,
        dp_rank: int = 0,
        dp_size: int = 1,
        seed: int = 0,
        consumed_samples: int = 0,
        num_epochs: Optional[int] = None,
    ) -> None:
        if groups_per_batch <= 0 or group_size <= 0:
            raise ValueError("groups_per_batch and group_size must be positive")
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank {dp_rank} not in [0, {dp_size})")
        if groups_per_batch % dp_size:
            raise ValueError(f"groups_per_batch {groups_per_batch} must be divisible by dp_size {dp_size} "
                             "(each rank gets whole groups)")
        self.groups: Dict[int, List[int]] = {int(g): list(ix) for g, ix in groups.items()}
        self.eligible = np.array(sorted(g for g, ix in self.groups.items() if len(ix) >= group_size), dtype=np.int64)
        self.num_skipped_groups = len(self.groups) - len(self.eligible)
        if self.num_skipped_groups:
            warnings.warn(f"GroupBatchSampler: {self.num_skipped_groups} groups have fewer than G={group_size} "
                          "trajectories and are never sampled")
        self.groups_per_batch = groups_per_batch
        self.group_size = group_size
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.seed = seed
        self.num_epochs = num_epochs
        self.batches_per_epoch = len(self.eligible) // groups_per_batch
        if self.batches_per_epoch == 0:
            raise ValueError(f"{len(self.eligible)} eligible groups cannot fill one batch of {groups_per_batch}")
        self.global_batch_size = groups_per_batch * group_size
        if consumed_samples % self.global_batch_size:
            raise ValueError(f"consumed_samples {consumed_samples} is not a multiple of the global batch size "
                             f"{self.global_batch_size} (groups_per_batch x G): a resume must land between steps")
        self.consumed_samples = consumed_samples

    def epoch_order(self, epoch: int) -> np.ndarray:
        """The permutation of eligible group ids visited in ``epoch``."""
        rng = np.random.default_rng([self.seed, epoch])
        return self.eligible[rng.permutation(len(self.eligible))]

    def draw(self, group_id: int, epoch: int) -> List[int]:
        """The G sequence indices drawn from ``group_id`` in ``epoch`` (a function of seed, epoch, group_id)."""
        members = self.groups[group_id]
        rng = np.random.default_rng([self.seed, epoch, group_id])
        picks = np.sort(rng.choice(len(members), size=self.group_size, replace=False))
        return [members[i] for i in picks]

    def global_batch(self, batch_index: int) -> List[Tuple[int, List[int]]]:
        """All groups of global batch ``batch_index`` as ``(group_id, sequence indices)``."""
        epoch, within = divmod(batch_index, self.batches_per_epoch)
        order = self.epoch_order(epoch)
        gids = order[within * self.groups_per_batch:(within + 1) * self.groups_per_batch]
        return [(int(g), self.draw(int(g), epoch)) for g in gids]

    def rank_batch(self, batch_index: int) -> List[int]:
        """This rank's flat sequence indices of global batch ``batch_index`` (whole groups, contiguous)."""
        per_rank = self.groups_per_batch // self.dp_size
        mine = self.global_batch(batch_index)[self.dp_rank * per_rank:(self.dp_rank + 1) * per_rank]
        return [i for _, ix in mine for i in ix]

    @property
    def batch_index(self) -> int:
        """Index of the next global batch."""
        return self.consumed_samples // self.global_batch_size

    @property
    def epoch(self) -> int:
        return self.batch_index // self.batches_per_epoch

    def __iter__(self) -> Iterator[List[int]]:
        end = None if self.num_epochs is None else self.num_epochs * self.batches_per_epoch
        while end is None or self.batch_index < end:
            batch = self.rank_batch(self.batch_index)
            self.consumed_samples += self.global_batch_size
            yield batch

    def __len__(self) -> int:
        if self.num_epochs is None:
            raise TypeError("an endless GroupBatchSampler (num_epochs=None) has no length")
        return max(0, self.num_epochs * self.batches_per_epoch - self.batch_index)

    def state_dict(self) -> Dict[str, int]:
        return {"consumed_samples": self.consumed_samples, "seed": self.seed}
