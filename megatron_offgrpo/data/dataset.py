"""Reader of the trajectory dataset format (DESIGN 5): random access to tokens, rewards and group structure."""

from __future__ import annotations

import json
import os
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import pyarrow.parquet as pq
import torch
from megatron.core.datasets.indexed_dataset import IndexedDataset

from megatron_offgrpo.data.format import (
    FORMAT_NAME,
    FORMAT_VERSION,
    array_prefix,
    group_meta_path,
    manifest_path,
    seq_meta_path,
)


class DatasetFormatError(RuntimeError):
    """The files at a prefix are missing, incomplete or inconsistent with their manifest."""


def load_manifest(prefix: str) -> Dict[str, Any]:
    """Read and validate ``P.json``; raises :class:`DatasetFormatError` when it is missing or foreign."""
    path = manifest_path(prefix)
    if not os.path.exists(path):
        raise DatasetFormatError(
            f"{path}: no manifest, so {prefix} is not a complete dataset (never built, or the writer was killed "
            "before it finished)"
        )
    with open(path) as f:
        manifest = json.load(f)
    if manifest.get("format") != FORMAT_NAME:
        raise DatasetFormatError(f"{path}: format {manifest.get('format')!r} is not {FORMAT_NAME!r}")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise DatasetFormatError(
            f"{path}: format_version {manifest.get('format_version')} not supported (this reader: {FORMAT_VERSION})"
        )
    base = os.path.basename(prefix)
    for suffix, rec in manifest.get("files", {}).items():
        fpath = os.path.join(os.path.dirname(prefix) or ".", base + suffix)
        if not os.path.exists(fpath):
            raise DatasetFormatError(f"{fpath}: listed in the manifest but missing")
        if os.path.getsize(fpath) != rec["bytes"]:
            raise DatasetFormatError(
                f"{fpath}: {os.path.getsize(fpath)} bytes, manifest says {rec['bytes']} (a partial or foreign file)"
            )
    return manifest


class TrajectoryDataset(torch.utils.data.Dataset):
    """Random access to the trajectories of a dataset written by :class:`~.writer.TrajectoryDatasetWriter`.

    ``ds[i]`` is a dict: ``tokens`` (int64 tensor, prompt + response + EOS), ``prompt_len`` (int), ``reward``
    (float), ``group_id`` (int), ``rollout_index`` (int), and each loaded per-token array (float32 tensor, same
    length as ``tokens``; value ``j`` belongs to token ``j``). Tokens come from Megatron-Core's ``IndexedDataset``
    (memory-mapped); per-sequence metadata is held in NumPy arrays.

    Args:
        prefix: dataset prefix ``P``.
        per_token_arrays: names to load; ``None`` loads every array the manifest lists.
    """

    def __init__(self, prefix: str, per_token_arrays: Optional[Sequence[str]] = None) -> None:
        self.prefix = prefix
        self.manifest: Dict[str, Any] = load_manifest(prefix)
        self._tokens = IndexedDataset(prefix, mmap=True)
        meta = pq.read_table(seq_meta_path(prefix))
        n = len(self._tokens)
        if meta.num_rows != n or n != self.manifest["counts"]["sequences"]:
            raise DatasetFormatError(
                f"{prefix}: {n} token sequences, {meta.num_rows} metadata rows, manifest "
                f"{self.manifest['counts']['sequences']}"
            )
        self.group_ids = meta.column("group_id").to_numpy().astype(np.int64)
        self.rollout_indices = meta.column("rollout_index").to_numpy().astype(np.int64)
        self.rewards = meta.column("reward").to_numpy().astype(np.float32)
        self.prompt_lens = meta.column("prompt_len").to_numpy().astype(np.int64)
        self.response_lens = meta.column("response_len").to_numpy().astype(np.int64)
        self.answers: List[Optional[str]] = meta.column("answer").to_pylist()
        self.sequence_lengths = np.asarray(self._tokens.sequence_lengths, dtype=np.int64)
        if not np.array_equal(self.sequence_lengths, self.prompt_lens + self.response_lens):
            raise DatasetFormatError(f"{prefix}: token lengths disagree with prompt_len + response_len in metadata")

        listed = list(self.manifest.get("per_token_arrays", {}))
        names = listed if per_token_arrays is None else list(per_token_arrays)
        self._arrays: Dict[str, IndexedDataset] = {}
        for name in names:
            if name not in listed:
                raise DatasetFormatError(f"{prefix}: per-token array {name!r} not in manifest (has: {listed})")
            arr = IndexedDataset(array_prefix(prefix, name), mmap=True)
            if not np.array_equal(np.asarray(arr.sequence_lengths), self.sequence_lengths):
                raise DatasetFormatError(f"{array_prefix(prefix, name)}: lengths do not match the token sequences")
            self._arrays[name] = arr
        self._groups: Optional[Dict[int, List[int]]] = None
        self._group_table = None

    def __len__(self) -> int:
        return len(self.sequence_lengths)

    def __getitem__(self, i: int) -> Dict[str, Any]:
        i = int(i)
        if not 0 <= i < len(self):
            raise IndexError(f"sequence index {i} out of range [0, {len(self)})")
        item: Dict[str, Any] = {
            "tokens": torch.from_numpy(np.asarray(self._tokens[i], dtype=np.int64)),
            "prompt_len": int(self.prompt_lens[i]),
            "reward": float(self.rewards[i]),
            "group_id": int(self.group_ids[i]),
            "rollout_index": int(self.rollout_indices[i]),
        }
        for name, arr in self._arrays.items():
            item[name] = torch.from_numpy(np.array(arr[i], dtype=np.float32))
        return item

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
