"""Atomic writer of the trajectory dataset format (docs/design.md §5, :mod:`.format`).

Everything is written under temporary names (``P.tmp<pid>.*``), hashed, and renamed into place at :meth:`commit`
through the journaled commit of :mod:`.atomic`; the manifest ``P.json`` is written last. A run killed at any point
leaves the previous complete dataset (byte-identical, once the next reader or writer has run recovery), or, after
the manifest is written, the new one. Temporaries of killed writers are removed by the next writer of the prefix.
Per-token arrays must be finite: a NaN / inf is refused when written, naming the sequence and token.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

from megatron_offgrpo.data.atomic import commit_files, remove_stale_temps
from megatron_offgrpo.data.format import (
    FORMAT_NAME,
    FORMAT_VERSION,
    GROUP_COLUMNS,
    array_prefix,
    file_record,
    group_meta_path,
    seq_meta_path,
)


@dataclass
class SequenceRecord:
    """One trajectory to write: token ids (prompt + response + EOS) and its per-sequence metadata."""

    tokens: np.ndarray
    prompt_len: int
    reward: float
    rollout_index: int
    answer: Optional[str] = None
    truncated: bool = False
    per_token: Dict[str, np.ndarray] = field(default_factory=dict)


def first_non_finite(values: np.ndarray) -> Optional[Tuple[int, float]]:
    """``(position, value)`` of the first NaN / inf of a 1-D array, or ``None`` when all values are finite."""
    ok = np.isfinite(values)
    if ok.all():
        return None
    j = int(np.argmin(ok))
    return j, float(values[j])


def _manifest_key(prefix: str, path: str) -> str:
    """Manifest ``files`` key of ``path``: its suffix after the prefix's base name (e.g. ``.ref_logp.idx``)."""
    return os.path.basename(path)[len(os.path.basename(prefix)):]


class TrajectoryDatasetWriter:
    """Streams groups of trajectories into the dataset format; nothing is visible at ``prefix`` until commit.

    Args:
        prefix: output prefix ``P``.
        vocab_size: tokenizer vocabulary size; picks the smallest token dtype (Megatron-Core's rule).
        per_token_arrays: names of per-token float32 arrays every sequence will carry.

    Use as a context manager: an exception before :meth:`commit` removes the temporary files. Construction first
    recovers an interrupted commit of ``prefix`` and removes the temporaries of dead writers (logged); it raises
    :class:`~.atomic.CommitInProgressError` while another live process commits ``prefix``.
    """

    def __init__(self, prefix: str, vocab_size: int, per_token_arrays: Sequence[str] = ()) -> None:
        self.prefix = prefix
        os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
        remove_stale_temps(prefix)
        self._tmp_prefix = f"{prefix}.tmp{os.getpid()}"
        self.token_dtype = DType.optimal_dtype(vocab_size)
        self._tokens = IndexedDatasetBuilder(self._tmp_prefix + ".bin", dtype=self.token_dtype)
        self._arrays = {}
        for name in per_token_arrays:
            p = array_prefix(self._tmp_prefix, name)
            self._arrays[name] = IndexedDatasetBuilder(p + ".bin", dtype=np.float32)
        self._seq_cols: Dict[str, List[Any]] = {
            k: [] for k in ("group_id", "rollout_index", "reward", "prompt_len", "response_len", "answer", "truncated")
        }
        self._group_rows: List[Dict[str, Any]] = []
        self.num_tokens = 0
        self.num_response_tokens = 0
        self._committed = False

    @property
    def num_groups(self) -> int:
        return len(self._group_rows)

    @property
    def num_sequences(self) -> int:
        return len(self._seq_cols["group_id"])

    def add_group(self, group_meta: Mapping[str, Any], sequences: Sequence[SequenceRecord]) -> int:
        """Append one group (its sequences get consecutive indices); returns the new group's id.

        Raises ValueError, before anything of the group is written, for a sequence without response tokens, a
        per-token array of the wrong set or shape, or a per-token value that is NaN / inf (the message names the
        group, the sequence and the token position).
        """
        if not sequences:
            raise ValueError("a group needs at least one sequence")
        gid = len(self._group_rows)
        pid = group_meta.get("problem_id")
        where = f"group {gid}" + (f" (problem_id {pid!r})" if pid is not None else "")
        # Validate the whole group first so that a bad group leaves the files untouched.
        for j, seq in enumerate(sequences):
            n = int(len(seq.tokens))
            if not 0 < seq.prompt_len < n:
                raise ValueError(f"{where}: prompt_len {seq.prompt_len} must be in (0, {n}) (no response tokens?)")
            if set(seq.per_token) != set(self._arrays):
                raise ValueError(f"{where}: per-token arrays {sorted(seq.per_token)} != {sorted(self._arrays)}")
            for name in self._arrays:
                values = np.asarray(seq.per_token[name], dtype=np.float32)
                if values.shape != (n,):
                    raise ValueError(f"{where}: per-token array {name} has shape {values.shape}, tokens ({n},)")
                bad = first_non_finite(values)
                if bad is not None:
                    raise ValueError(
                        f"{where}, sequence {j} of the group (dataset sequence {self.num_sequences + j}, rollout_index "
                        f"{seq.rollout_index}): per-token array {name} is {bad[1]} at token {bad[0]}; only finite "
                        "values can be trained on (fix the producer of the array)"
                    )
        for seq in sequences:
            n = int(len(seq.tokens))
            self._tokens.add_item(torch.from_numpy(np.asarray(seq.tokens, dtype=np.int64)))
            self._tokens.end_document()
            for name, builder in self._arrays.items():
                builder.add_item(torch.from_numpy(np.asarray(seq.per_token[name], dtype=np.float32)))
                builder.end_document()
            c = self._seq_cols
            c["group_id"].append(gid)
            c["rollout_index"].append(int(seq.rollout_index))
            c["reward"].append(float(seq.reward))
            c["prompt_len"].append(int(seq.prompt_len))
            c["response_len"].append(n - int(seq.prompt_len))
            c["answer"].append(seq.answer)
            c["truncated"].append(bool(seq.truncated))
            self.num_tokens += n
            self.num_response_tokens += n - int(seq.prompt_len)
        row = {k: group_meta.get(k) for k in GROUP_COLUMNS}
        row["group_id"] = gid
        row["k"] = len(sequences)
        self._group_rows.append(row)
        return gid

    def _tmp_files(self) -> List[str]:
        files = [self._tmp_prefix + s for s in (".bin", ".idx", ".meta.parquet", ".meta.groups.parquet")]
        for name in self._arrays:
            files += [array_prefix(self._tmp_prefix, name) + s for s in (".bin", ".idx")]
        return files

    def commit(
        self, manifest_extra: Optional[Mapping[str, Any]] = None, extra_moves: Sequence[Tuple[str, str]] = ()
    ) -> Dict[str, Any]:
        """Finish all files, hash them, and move them into place with the journaled commit of :mod:`.atomic`;
        the manifest is written last. Returns the manifest.

        Every file record carries its size and sha256 (the ``.bin`` files included), hashed from the just-written
        temporary, so the manifest describes exactly the bytes that get renamed. ``extra_moves`` are
        ``(temporary, final)`` pairs of files the caller wrote next to the dataset (the build's rejects JSONL) that
        must be replaced in the same commit: a failed or killed commit keeps their previous version too.
        """
        if self.num_sequences == 0:
            raise ValueError(f"refusing to write an empty dataset at {self.prefix} (every record was rejected?)")
        tp = self._tmp_prefix
        self._tokens.finalize(tp + ".idx")
        for name, builder in self._arrays.items():
            builder.finalize(array_prefix(tp, name) + ".idx")
        seq_types = {
            "group_id": pa.int64(), "rollout_index": pa.int32(), "reward": pa.float32(), "prompt_len": pa.int32(),
            "response_len": pa.int32(), "answer": pa.string(), "truncated": pa.bool_(),
        }
        pq.write_table(
            pa.table({k: pa.array(v, type=seq_types[k]) for k, v in self._seq_cols.items()}), tp + ".meta.parquet"
        )
        pq.write_table(pa.Table.from_pylist(self._group_rows), tp + ".meta.groups.parquet")

        # Destination of each temporary file. The manifest is absent for the whole rename window (commit_files),
        # so the order only matters to readers that skip it: the token index goes last, so that Megatron-Core's
        # IndexedDataset.exists(P) is False until the new token files are in place when there was no old dataset.
        moves = [(tp + ".meta.parquet", seq_meta_path(self.prefix)), (tp + ".meta.groups.parquet", group_meta_path(self.prefix))]
        for name in self._arrays:
            moves += [(array_prefix(tp, name) + s, array_prefix(self.prefix, name) + s) for s in (".bin", ".idx")]
        moves += [(tp + ".bin", self.prefix + ".bin"), (tp + ".idx", self.prefix + ".idx")]
        files = {_manifest_key(self.prefix, dst): file_record(src) for src, dst in moves}
        manifest: Dict[str, Any] = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "created_unix": time.time(),
            "token_dtype": np.dtype(self.token_dtype).name,
            "counts": {
                "sequences": self.num_sequences,
                "groups": self.num_groups,
                "tokens": self.num_tokens,
                "response_tokens": self.num_response_tokens,
            },
            "files": files,
            "per_token_arrays": {name: {} for name in self._arrays},
        }
        if manifest_extra:
            for k, v in manifest_extra.items():
                if k == "per_token_arrays":
                    manifest[k].update(v)
                else:
                    manifest[k] = v
        commit_files(self.prefix, [*moves, *extra_moves], manifest)
        self._committed = True
        return json.loads(json.dumps(manifest))  # what a reader of P.json gets

    def abort(self) -> None:
        """Remove the temporary files (nothing at ``prefix`` is touched)."""
        for b in [self._tokens, *self._arrays.values()]:
            try:
                b.data_file.close()
            except Exception:  # noqa: BLE001 - best-effort cleanup
                pass
        for f in self._tmp_files():
            if os.path.exists(f):
                os.remove(f)

    def __enter__(self) -> "TrajectoryDatasetWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if not self._committed:
            self.abort()


def add_per_token_array(
    prefix: str, name: str, arrays: Sequence[np.ndarray] | Any, producer: Mapping[str, Any]
) -> None:
    """Attach a per-token float32 array (e.g. precomputed ``ref_logp``) to an existing dataset.

    ``arrays`` yields one array per sequence, in dataset order, each as long as the sequence's tokens and finite
    (a NaN / inf raises ValueError naming the sequence and the token). The array files are written under
    temporary names, hashed, and committed together with the new manifest through :mod:`.atomic`, so a failure or
    a kill leaves the dataset as it was (an array it replaces included). ``producer`` (e.g.
    ``{"model": ..., "checkpoint": ...}``) is recorded in the manifest: docs/design.md §3 refuses a teacher/reference
    mismatch at train time. Only the token files are verified first, so that a damaged array can be recomputed.
    """
    from megatron_offgrpo.data.dataset import TrajectoryDataset

    remove_stale_temps(prefix)
    ds = TrajectoryDataset(prefix, per_token_arrays=())
    lengths = ds.sequence_lengths
    tmp = array_prefix(f"{prefix}.tmp{os.getpid()}", name)
    builder = IndexedDatasetBuilder(tmp + ".bin", dtype=np.float32)
    count = 0
    try:
        for i, arr in enumerate(arrays):
            a = np.asarray(arr, dtype=np.float32)
            if i >= len(lengths) or a.shape != (lengths[i],):
                raise ValueError(f"{name}: sequence {i} has shape {a.shape}, expected ({lengths[i] if i < len(lengths) else '-'},)")
            bad = first_non_finite(a)
            if bad is not None:
                raise ValueError(
                    f"{name}: sequence {i} (group {int(ds.group_ids[i])}, rollout_index {int(ds.rollout_indices[i])}) "
                    f"is {bad[1]} at token {bad[0]}; only finite log-probs can be stored (check the scoring model)"
                )
            builder.add_item(torch.from_numpy(a))
            builder.end_document()
            count += 1
        if count != len(lengths):
            raise ValueError(f"{name}: got {count} arrays for {len(lengths)} sequences")
        builder.finalize(tmp + ".idx")
        manifest = json.loads(json.dumps(ds.manifest))
        dst = array_prefix(prefix, name)
        moves = [(tmp + s, dst + s) for s in (".bin", ".idx")]
        for src, final in moves:
            manifest["files"][_manifest_key(prefix, final)] = file_record(src)
        manifest["per_token_arrays"] = {**manifest.get("per_token_arrays", {}), name: {"producer": dict(producer)}}
        commit_files(prefix, moves, manifest)
    except BaseException:
        builder.data_file.close()
        for s in (".bin", ".idx"):
            if os.path.exists(tmp + s):
                os.remove(tmp + s)
        raise
