"""Reader of the trajectory dataset format (docs/design.md §5): random access to tokens, rewards and groups."""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import pyarrow.parquet as pq
import torch
from megatron.core.datasets.indexed_dataset import IndexedDataset

from megatron_offgrpo.data.atomic import recover_commit
from megatron_offgrpo.data.format import (
    REBUILD_HINT,
    DatasetFormatError,
    array_prefix,
    group_meta_path,
    recompute_hint,
    seq_meta_path,
)
from megatron_offgrpo.data.verify import dataset_fingerprint, read_manifest, verify_dataset

__all__ = ["DatasetFormatError", "TrajectoryDataset", "load_manifest"]


def load_manifest(prefix: str) -> Dict[str, Any]:
    """Read and validate ``P.json`` after finishing or rolling back a commit of ``P`` whose writer was killed
    (:func:`~.atomic.recover_commit`).

    Raises :class:`DatasetFormatError` when the manifest is missing or foreign, when recovery cannot run (e.g. a
    read-only copy), and :class:`~.atomic.CommitInProgressError` while a live process commits ``P``. The files
    themselves are checked by :func:`~.verify.verify_dataset` (which :class:`TrajectoryDataset` runs).
    """
    try:
        recover_commit(prefix)
    except OSError as e:
        raise DatasetFormatError(
            f"{prefix}.commit.json: a killed commit of {prefix} needs recovery, which failed ({e}); load it once "
            "where the files are writable, or start the next build there"
        ) from None
    return read_manifest(prefix)


class TrajectoryDataset(torch.utils.data.Dataset):
    """Random access to the trajectories of a dataset written by :class:`~.writer.TrajectoryDatasetWriter`.

    ``ds[i]`` is a dict: ``index`` (``i``), ``tokens`` (int64 tensor, prompt + response + EOS), ``prompt_len``
    (int), ``reward`` (float), ``group_id`` (int), ``rollout_index`` (int), and each loaded per-token array (float32
    tensor, same length as ``tokens``; value ``j`` belongs to token ``j``). Tokens come from Megatron-Core's
    ``IndexedDataset`` (memory-mapped); per-sequence metadata is held in NumPy arrays.

    Construction runs :func:`load_manifest` (with commit recovery) and the cheap checks of
    :func:`~.verify.verify_dataset` for the token files and the arrays it loads, and raises
    :class:`DatasetFormatError` listing every problem. ``ds[i]`` raises :class:`DatasetFormatError` when a loaded
    per-token array of sequence ``i`` holds a NaN / inf (``verify_dataset(P, full=True)`` lists them all).

    Args:
        prefix: dataset prefix ``P``.
        per_token_arrays: names to load; ``None`` loads every array the manifest lists.
    """

    def __init__(self, prefix: str, per_token_arrays: Optional[Sequence[str]] = None) -> None:
        self.prefix = prefix
        self.manifest: Dict[str, Any] = load_manifest(prefix)
        listed = list(self.manifest.get("per_token_arrays", {}))
        names = listed if per_token_arrays is None else list(per_token_arrays)
        problems = verify_dataset(prefix, full=False, per_token_arrays=names)
        if problems:
            raise DatasetFormatError(
                f"{prefix}: {len(problems)} problem(s):\n" + "\n".join(f"  - {p}" for p in problems)
            )
        self._tokens = IndexedDataset(prefix, mmap=True)
        meta = pq.read_table(seq_meta_path(prefix))
        n = len(self._tokens)
        if meta.num_rows != n or n != self.manifest["counts"]["sequences"]:
            raise DatasetFormatError(
                f"{prefix}: {n} token sequences, {meta.num_rows} metadata rows, manifest "
                f"{self.manifest['counts']['sequences']}; {REBUILD_HINT}"
            )
        self.group_ids = meta.column("group_id").to_numpy().astype(np.int64)
        self.rollout_indices = meta.column("rollout_index").to_numpy().astype(np.int64)
        self.rewards = meta.column("reward").to_numpy().astype(np.float32)
        self.prompt_lens = meta.column("prompt_len").to_numpy().astype(np.int64)
        self.response_lens = meta.column("response_len").to_numpy().astype(np.int64)
        self.answers: List[Optional[str]] = meta.column("answer").to_pylist()
        self.sequence_lengths = np.asarray(self._tokens.sequence_lengths, dtype=np.int64)
        if not np.array_equal(self.sequence_lengths, self.prompt_lens + self.response_lens):
            raise DatasetFormatError(
                f"{seq_meta_path(prefix)}: token lengths disagree with prompt_len + response_len; {REBUILD_HINT}"
            )
        # Names and lengths of the arrays were checked by verify_dataset above.
        self._arrays: Dict[str, IndexedDataset] = {
            name: IndexedDataset(array_prefix(prefix, name), mmap=True) for name in names
        }
        self._groups: Optional[Dict[int, List[int]]] = None
        self._group_table = None

    def __len__(self) -> int:
        return len(self.sequence_lengths)

    def __getitem__(self, i: int) -> Dict[str, Any]:
        i = int(i)
        if not 0 <= i < len(self):
            raise IndexError(f"sequence index {i} out of range [0, {len(self)})")
        item: Dict[str, Any] = {
            "index": i,
            "tokens": torch.from_numpy(np.asarray(self._tokens[i], dtype=np.int64)),
            "prompt_len": int(self.prompt_lens[i]),
            "reward": float(self.rewards[i]),
            "group_id": int(self.group_ids[i]),
            "rollout_index": int(self.rollout_indices[i]),
        }
        for name, arr in self._arrays.items():
            values = torch.from_numpy(np.array(arr[i], dtype=np.float32))
            if not torch.isfinite(values).all():  # one reduction per array: the common case stays cheap
                j = int(torch.nonzero(~torch.isfinite(values))[0])
                raise DatasetFormatError(
                    f"{array_prefix(self.prefix, name)}.bin: sequence {i} (group {item['group_id']}, rollout_index "
                    f"{item['rollout_index']}) has {float(values[j])} at token {j}; "
                    f"{recompute_hint(self.prefix, name)} (verify_dataset(prefix, full=True) lists every bad value)"
                )
            item[name] = values
        return item

    def fingerprint(self) -> str:
        """:func:`~.verify.dataset_fingerprint` of this dataset over the arrays it loads (path-independent)."""
        return dataset_fingerprint(self.prefix, per_token_arrays=list(self._arrays))

    @property
    def per_token_array_names(self) -> List[str]:
        return list(self._arrays)

    @property
    def num_groups(self) -> int:
        return int(self.manifest["counts"]["groups"])

    def groups(self) -> Dict[int, List[int]]:
        """group_id -> sorted list of sequence indices (every group's sequences, in rollout order)."""
        if self._groups is None:
            order = np.argsort(self.group_ids, kind="stable")
            gids, starts = np.unique(self.group_ids[order], return_index=True)
            bounds = list(starts[1:]) + [len(order)]
            self._groups = {int(g): order[s:e].tolist() for g, s, e in zip(gids, starts, bounds)}
        return self._groups

    def group_metadata(self) -> List[Dict[str, Any]]:
        """Per-group rows (problem id, source, label, agreement, difficulty statistics, ...)."""
        if self._group_table is None:
            self._group_table = pq.read_table(group_meta_path(self.prefix)).to_pylist()
        return self._group_table
