"""Integrity checks of a dataset against its manifest, with Megatron-Core's own index reader as the oracle for the
``.idx`` files, and the dataset's content identity.

:func:`verify_dataset` returns human-readable problems, each naming the file and the fix; an empty list means the
dataset is sound. The default checks are cheap -- they read the manifest, stat every file, hash the small files
(``.idx``, Parquet) and walk the index arrays, but never read a ``.bin`` -- and run on every
:class:`~megatron_offgrpo.data.dataset.TrajectoryDataset` construction. ``full=True`` also hashes the ``.bin`` files
and scans every per-token value (finite) and every token id (below the tokenizer's vocabulary size).

Manifests written before the ``.bin`` files were hashed stay loadable: a missing hash is a *note*
(:attr:`VerifyReport.notes`, logged by :func:`verify_dataset`), not a problem -- the size and the index checks
still guard those files, and rebuilding adds the hash.

:func:`dataset_fingerprint` is what a checkpoint records to recognise its dataset after the files moved.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from megatron_offgrpo.data.format import (
    FORMAT_NAME,
    FORMAT_VERSION,
    REBUILD_HINT,
    DatasetFormatError,
    commit_journal_path,
    manifest_path,
    recompute_hint,
    seq_meta_path,
    sha256_file,
)

logger = logging.getLogger(__name__)

TOKEN_FILES = (".bin", ".idx", ".meta.parquet", ".meta.groups.parquet")
_MAX_LISTED = 5  # occurrences named per problem; the count says how many more


@dataclass
class VerifyReport:
    """Result of :func:`check_dataset`: ``problems`` make the dataset unusable; ``notes`` do not."""

    problems: List[str] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def read_manifest(prefix: str) -> Dict[str, Any]:
    """Read ``P.json`` and check that it is a manifest of this format and version (no recovery, no file checks;
    :func:`~megatron_offgrpo.data.dataset.load_manifest` adds the recovery). Raises :class:`DatasetFormatError`."""
    path = manifest_path(prefix)
    if not os.path.exists(path):
        raise DatasetFormatError(
            f"{path}: no manifest, so {prefix} is not a complete dataset (never built, or the writer was killed "
            f"before it finished); {REBUILD_HINT}"
        )
    try:
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
    except ValueError as e:
        raise DatasetFormatError(f"{path}: not valid JSON ({e}); {REBUILD_HINT}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        got = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise DatasetFormatError(f"{path}: format {got!r} is not {FORMAT_NAME!r}; {REBUILD_HINT}")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise DatasetFormatError(
            f"{path}: format_version {manifest.get('format_version')} not supported (this reader: {FORMAT_VERSION}); "
            f"{REBUILD_HINT}"
        )
    for key in ("files", "counts"):
        if not isinstance(manifest.get(key), dict):
            raise DatasetFormatError(f"{path}: no {key!r} section; {REBUILD_HINT}")
    return manifest


def _file_path(prefix: str, suffix: str) -> str:
    return prefix + suffix


def _array_of(suffix: str) -> Optional[str]:
    """Per-token array name of a manifest key like ``.ref_logp.bin`` (None for the token / metadata files)."""
    if suffix in TOKEN_FILES:
        return None
    for ext in (".bin", ".idx"):
        if suffix.endswith(ext) and suffix.count(".") == 2:
            return suffix[1:-len(ext)]
    return None


def _fix(prefix: str, suffix: str) -> str:
    name = _array_of(suffix)
    return REBUILD_HINT if name is None else recompute_hint(prefix, name)


@dataclass
class _Index:
    """The arrays of one ``.idx`` (copied out of Megatron's memory map, which closes with its reader)."""

    dtype: np.dtype
    lengths: np.ndarray
    pointers: np.ndarray


def _check_index(
    prefix: str, suffix: str, dtype: Optional[np.dtype], n_expected: int, problems: List[str]
) -> Optional[_Index]:
    """Sanity of ``prefix+suffix`` (an ``.idx``) read by Megatron-Core's ``_IndexReader``; appends problems and
    returns the index when its pointers describe its ``.bin`` exactly."""
    from megatron.core.datasets.indexed_dataset import _IndexReader

    idx_path = _file_path(prefix, suffix)
    bin_path = idx_path[: -len(".idx")] + ".bin"
    fix = _fix(prefix, suffix)
    if not os.path.exists(idx_path):
        return None  # reported by the file checks
    try:
        reader = _IndexReader(idx_path, multimodal=False)
        got_dtype = np.dtype(reader.dtype)
        lengths = np.array(reader.sequence_lengths, dtype=np.int64)
        pointers = np.array(reader.sequence_pointers, dtype=np.int64)
        docs = np.array(reader.document_indices, dtype=np.int64)
        del reader
    except Exception as e:  # noqa: BLE001 - bad header, bad dtype code, counts beyond the file: all one verdict
        problems.append(f"{idx_path}: Megatron-Core cannot read this index ({type(e).__name__}: {e}); {fix}")
        return None
    n = len(lengths)
    before = len(problems)
    itemsize = got_dtype.itemsize
    if dtype is not None and got_dtype != dtype:
        problems.append(f"{idx_path}: dtype {got_dtype.name}, expected {np.dtype(dtype).name}; {fix}")
    if n != n_expected:
        problems.append(f"{idx_path}: {n} sequences, the manifest counts {n_expected}; {fix}")
    # One document per sequence: document_indices is exactly 0, 1, ..., n.
    if len(docs) != n + 1 or not np.array_equal(docs, np.arange(n + 1)):
        common = min(len(docs), n + 1)
        wrong = np.flatnonzero(docs[:common] != np.arange(common))
        k = int(wrong[0]) if wrong.size else common
        problems.append(
            f"{idx_path}: {len(docs) - 1} documents for {n} sequences, or not one document per sequence (first "
            f"wrong document index at entry {k}); {fix}"
        )
    expected_idx_size = 34 + 4 * n + 8 * n + 8 * len(docs)  # header + lengths + pointers + document indices
    if os.path.getsize(idx_path) != expected_idx_size:
        problems.append(
            f"{idx_path}: {os.path.getsize(idx_path)} bytes, its own counts need {expected_idx_size} (trailing or "
            f"missing bytes); {fix}"
        )
    neg = np.flatnonzero(lengths < 0)
    if neg.size:
        problems.append(f"{idx_path}: sequence {int(neg[0])}: negative length {int(lengths[neg[0]])} "
                        f"({neg.size} sequences); {fix}")
    if n:
        if pointers[0] != 0:
            problems.append(f"{idx_path}: sequence 0: pointer {int(pointers[0])}, expected 0; {fix}")
        expected_next = pointers[:-1] + lengths[:-1] * itemsize
        bad = np.flatnonzero(pointers[1:] != expected_next)
        if bad.size:
            i = int(bad[0]) + 1
            problems.append(
                f"{idx_path}: sequence {i}: pointer {int(pointers[i])} != pointer[{i - 1}] + length[{i - 1}] * "
                f"{itemsize} = {int(expected_next[i - 1])} ({bad.size} sequence(s) with a wrong pointer; the index "
                f"does not describe {bin_path}); {fix}"
            )
        back = np.flatnonzero(np.diff(pointers) < 0)
        if back.size:
            i = int(back[0]) + 1
            problems.append(f"{idx_path}: sequence {i}: pointer {int(pointers[i])} < pointer[{i - 1}] "
                            f"{int(pointers[i - 1])} (pointers not monotonic); {fix}")
    end = int(pointers[-1] + lengths[-1] * itemsize) if n else 0
    if os.path.exists(bin_path) and end != os.path.getsize(bin_path):
        problems.append(
            f"{idx_path}: the last sequence ends at byte {end}, but {bin_path} has {os.path.getsize(bin_path)} bytes "
            f"(truncated, appended to, or not the data of this index); {fix}"
        )
    if len(problems) != before:
        return None
    return _Index(got_dtype, lengths, pointers)


def _locate(index: _Index, element: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """(sequence, token) of flat element positions of a ``.bin`` described by ``index``."""
    byte = element.astype(np.int64) * index.dtype.itemsize
    seq = np.searchsorted(index.pointers, byte, side="right") - 1
    return seq, (byte - index.pointers[seq]) // index.dtype.itemsize


def _scan_bin(bin_path: str, dtype: np.dtype, bad_fn, chunk: int = 1 << 22) -> Tuple[int, np.ndarray]:
    """Count and the first positions (elements) where ``bad_fn(values)`` is True, streaming the file."""
    size = os.path.getsize(bin_path)
    total, first = 0, []
    if size == 0:
        return 0, np.zeros(0, np.int64)
    data = np.memmap(bin_path, dtype=dtype, mode="r")
    for start in range(0, len(data), chunk):
        bad = np.flatnonzero(bad_fn(np.asarray(data[start:start + chunk])))
        total += bad.size
        if bad.size and len(first) < _MAX_LISTED:
            first.extend((bad[: _MAX_LISTED - len(first)] + start).tolist())
    del data
    return total, np.asarray(first, dtype=np.int64)


def _seq_labels(prefix: str) -> Optional[Tuple[np.ndarray, np.ndarray]]:
    """(group_id, rollout_index) per sequence, to name a bad sequence the way the trainer's logs do."""
    try:
        import pyarrow.parquet as pq

        t = pq.read_table(seq_meta_path(prefix), columns=["group_id", "rollout_index"])
        return t.column("group_id").to_numpy(), t.column("rollout_index").to_numpy()
    except Exception:  # noqa: BLE001 - the metadata problem itself is reported elsewhere
        return None


def _describe(prefix: str, seqs: np.ndarray, toks: np.ndarray, values: List[Any], labels) -> str:
    parts = []
    for s, t, v in zip(seqs.tolist(), toks.tolist(), values):
        where = f"sequence {s}"
        if labels is not None and 0 <= s < len(labels[0]):
            where += f" (group {int(labels[0][s])}, rollout_index {int(labels[1][s])})"
        parts.append(f"{where} token {t} = {v}")
    return "; ".join(parts)


def check_dataset(prefix: str, full: bool = False, per_token_arrays: Optional[Sequence[str]] = None) -> VerifyReport:
    """All the checks of :func:`verify_dataset`, with the notes kept apart from the problems."""
    rep = VerifyReport()
    problems = rep.problems
    jpath = commit_journal_path(prefix)
    if os.path.exists(jpath):
        problems.append(
            f"{jpath}: a commit of {prefix} is in progress or was killed; wait for it, or load the dataset "
            "(TrajectoryDataset / load_manifest) or start the next build, which finish or roll it back"
        )
    try:
        manifest = read_manifest(prefix)
    except DatasetFormatError as e:
        problems.append(str(e))
        return rep
    mpath = manifest_path(prefix)
    files: Dict[str, Any] = manifest["files"]
    listed = list(manifest.get("per_token_arrays", {}) or {})
    names = listed if per_token_arrays is None else list(per_token_arrays)
    for name in names:
        if name not in listed:
            problems.append(f"{mpath}: per-token array {name!r} not in the manifest (has: {listed}); "
                            f"{recompute_hint(prefix, name)}")
    names = [n for n in names if n in listed]
    wanted = list(TOKEN_FILES) + [f".{n}{s}" for n in names for s in (".bin", ".idx")]
    if per_token_arrays is None:  # every recorded file, also ones this version does not know
        wanted += [s for s in files if s not in wanted]
    try:
        n_seq = int(manifest["counts"]["sequences"])
        n_groups = int(manifest["counts"]["groups"])
    except (KeyError, TypeError, ValueError):
        problems.append(f"{mpath}: counts.sequences / counts.groups missing; {REBUILD_HINT}")
        return rep

    # 1. every file: present, recorded size, recorded hash (the .bin hashes only with full=True). ``sound``: present
    # with the recorded size, so the later checks can read it (a hash mismatch alone does not stop them: their
    # messages say *where* the content is wrong).
    sound: Dict[str, bool] = {}
    for suffix in wanted:
        path, fix = _file_path(prefix, suffix), _fix(prefix, suffix)
        rec = files.get(suffix)
        sound[suffix] = False
        if not isinstance(rec, dict) or "bytes" not in rec:
            problems.append(f"{mpath}: no record of {path}; {fix}")
            continue
        if not os.path.exists(path):
            problems.append(f"{path}: listed in the manifest but missing; {fix}")
            continue
        size = os.path.getsize(path)
        if size != rec["bytes"]:
            problems.append(f"{path}: {size} bytes, the manifest says {rec['bytes']} (truncated, appended to, or a "
                            f"foreign file); {fix}")
            continue
        sound[suffix] = True
        is_bin = suffix.endswith(".bin")
        if is_bin and not full:
            continue
        if "sha256" not in rec:
            rep.notes.append(f"{path}: the manifest records no sha256 (written by an older version), so its content "
                             f"was checked only through its size and index; {REBUILD_HINT} to record it")
            continue
        got = sha256_file(path)
        if got != rec["sha256"]:
            problems.append(f"{path}: sha256 {got[:16]}... does not match the manifest's {str(rec['sha256'])[:16]}... "
                            f"(the file changed after it was written); {fix}")

    # 2. the indices, with Megatron-Core's reader; per-token arrays have exactly the token sequences' lengths.
    token_dtype = np.dtype(manifest["token_dtype"]) if manifest.get("token_dtype") else None
    tokens = _check_index(prefix, ".idx", token_dtype, n_seq, problems)
    arrays: Dict[str, _Index] = {}
    for name in names:
        idx = _check_index(prefix, f".{name}.idx", np.dtype(np.float32), n_seq, problems)
        if idx is None:
            continue
        arrays[name] = idx
        if tokens is not None and not np.array_equal(idx.lengths, tokens.lengths):
            i = int(np.argmax(idx.lengths != tokens.lengths)) if len(idx.lengths) == len(tokens.lengths) else 0
            problems.append(
                f"{prefix}.{name}.idx: sequence {i} has {int(idx.lengths[i])} values, the token sequence "
                f"{int(tokens.lengths[i])} tokens (a per-token array must match the token layout); "
                f"{recompute_hint(prefix, name)}"
            )
            del arrays[name]

    # 3. metadata rows (Parquet footers only).
    for suffix, expected, what in ((".meta.parquet", n_seq, "sequences"), (".meta.groups.parquet", n_groups, "groups")):
        if not sound.get(suffix):
            continue
        path = _file_path(prefix, suffix)
        try:
            import pyarrow.parquet as pq

            rows = pq.ParquetFile(path).metadata.num_rows
        except Exception as e:  # noqa: BLE001
            problems.append(f"{path}: not a readable Parquet file ({e}); {REBUILD_HINT}")
            continue
        if rows != expected:
            problems.append(f"{path}: {rows} rows, the manifest counts {expected} {what}; {REBUILD_HINT}")

    if not full:
        return rep
    # 4. full: every per-token value finite, every token id in the vocabulary.
    labels = _seq_labels(prefix)
    for name, idx in arrays.items():
        if not sound.get(f".{name}.bin"):
            continue
        bin_path = f"{prefix}.{name}.bin"
        count, first = _scan_bin(bin_path, np.dtype(np.float32), lambda v: ~np.isfinite(v))
        if count:
            values = np.memmap(bin_path, dtype=np.float32, mode="r")[first].tolist()
            seqs, toks = _locate(idx, first)
            problems.append(f"{bin_path}: {count} non-finite value(s): {_describe(prefix, seqs, toks, values, labels)}; "
                            f"{recompute_hint(prefix, name)}")
    vocab = (manifest.get("tokenizer") or {}).get("vocab_size")
    if tokens is not None and vocab and sound.get(".bin"):
        bin_path = prefix + ".bin"
        count, first = _scan_bin(bin_path, tokens.dtype, lambda v: (v < 0) | (v >= vocab))
        if count:
            values = np.memmap(bin_path, dtype=tokens.dtype, mode="r")[first].tolist()
            seqs, toks = _locate(tokens, first)
            problems.append(f"{bin_path}: {count} token id(s) outside the tokenizer's vocabulary [0, {vocab}): "
                            f"{_describe(prefix, seqs, toks, values, labels)}; {REBUILD_HINT}")
    return rep


def verify_dataset(prefix: str, full: bool = False, per_token_arrays: Optional[Sequence[str]] = None) -> List[str]:
    """Problems of the dataset at ``prefix`` (empty list: sound), each naming the file and the fix.

    Cheap checks (no ``.bin`` is read): a manifest of this format; no commit journal; every file the manifest
    lists exists with the recorded size; the sha256 of every non-``.bin`` file matches; the token index and each
    per-token array index, read with Megatron-Core's ``_IndexReader``, have the manifest's sequence count, one
    document per sequence, first pointer 0, ``pointer[i+1] == pointer[i] + length[i] * itemsize``, and end exactly
    at their ``.bin``'s size; each per-token array has the token sequences' lengths; the Parquet row counts match.
    ``full=True`` adds the ``.bin`` hashes, every per-token value finite, and every token id below the tokenizer's
    vocabulary size.

    ``per_token_arrays`` restricts the array checks to these names (``None``: every array the manifest lists).
    Notes (e.g. an old manifest without ``.bin`` hashes under ``full=True``) are logged, not returned.
    """
    rep = check_dataset(prefix, full, per_token_arrays)
    for note in rep.notes:
        logger.warning("note: %s", note)
    return rep.problems


def dataset_fingerprint(prefix: str, per_token_arrays: Optional[Sequence[str]] = None) -> str:
    """Content identity of the dataset at ``prefix``: sha256 over the manifest's format version, its counts, and
    its file records (suffix, size, sha256) -- not the path and not the creation time, so a dataset that was copied
    or moved keeps its fingerprint and a rebuild with other content gets another one.

    ``per_token_arrays`` restricts the records to the token / metadata files and these arrays (``None``: every
    file), so that attaching an array a run does not use does not change that run's fingerprint. Reads only the
    manifest (after recovering an interrupted commit); run :func:`verify_dataset` to know the files match it.
    """
    from megatron_offgrpo.data.atomic import recover_commit

    recover_commit(prefix)
    manifest = read_manifest(prefix)
    files = manifest["files"]
    if per_token_arrays is None:
        keys = sorted(files)
    else:
        keys = sorted(k for k in files if _array_of(k) is None or _array_of(k) in per_token_arrays)
    payload = {
        "format_version": manifest["format_version"],
        "counts": manifest["counts"],
        "files": {k: [files[k].get("bytes"), files[k].get("sha256")] for k in keys},
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, separators=(",", ":")).encode("utf-8")).hexdigest()
