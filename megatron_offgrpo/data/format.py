"""Dataset format version 1 (docs/design.md §5): file names and schema shared by the writer and the reader.

For an output prefix ``P``:

- ``P.bin`` / ``P.idx``: Megatron-Core ``IndexedDataset`` of token ids, one sequence per trajectory
  (chat-templated prompt + response + EOS), one document per sequence.
- ``P.meta.parquet``: one row per sequence (:data:`SEQ_COLUMNS`).
- ``P.meta.groups.parquet``: one row per group (:data:`GROUP_COLUMNS`): problem id, source, label, agreement,
  difficulty statistics.
- ``P.<name>.bin`` / ``P.<name>.idx`` for each per-token array (``ref_logp``, ``teacher_logp``, ``old_logp``):
  a float32 ``IndexedDataset`` with exactly the token layout of ``P``. Value ``j`` of a sequence is the log-prob of
  token ``j`` given tokens ``< j`` (value 0 is meaningless and stored as 0); the collate shifts it to the labels.
- ``P.json``: the manifest, written last; a dataset without it (or whose files do not match it) does not load.
  ``files`` maps each suffix above to ``{"bytes": size, "sha256": hex}``. Manifests written before the ``.bin``
  files were hashed have no ``sha256`` for them; they still load (``verify_dataset(P, full=True)`` notes it).
- ``P.commit.json``: present only while a commit is under way, or after one was killed (:mod:`.atomic`).

Fixes named in error messages: the token files, the metadata and the manifest come from
:data:`REBUILD_HINT`; a per-token array from :func:`recompute_hint`.
"""

from __future__ import annotations

import hashlib
import os
from typing import Dict

FORMAT_NAME = "megatron-offgrpo-trajectories"
FORMAT_VERSION = 1
PER_TOKEN_ARRAYS = ("ref_logp", "teacher_logp", "old_logp")

SEQ_COLUMNS = ("group_id", "rollout_index", "reward", "prompt_len", "response_len", "answer", "truncated")
GROUP_COLUMNS = (
    "group_id", "problem_id", "problem", "source", "domain", "label", "reference", "reference_match",
    "agreement", "num_distinct", "num_no_answer", "fraction_positive", "all_positive", "group_type",
    "k_input", "k", "student_pass_rate",
)

REBUILD_HINT = "rebuild with tools/preprocess/build_dataset.py"


def recompute_hint(prefix: str, name: str) -> str:
    """The fix for a damaged per-token array ``name`` of ``prefix``."""
    return (f"recompute the array with tools/preprocess/precompute_logprobs.py CONFIG.yaml --prefix {prefix} "
            f"--array {name} --producer NAME")


class DatasetFormatError(RuntimeError):
    """The files at a prefix are missing, incomplete or inconsistent with their manifest."""


def manifest_path(prefix: str) -> str:
    return prefix + ".json"


def seq_meta_path(prefix: str) -> str:
    return prefix + ".meta.parquet"


def group_meta_path(prefix: str) -> str:
    return prefix + ".meta.groups.parquet"


def array_prefix(prefix: str, name: str) -> str:
    """Prefix of the per-token array ``name`` (itself an IndexedDataset prefix)."""
    if name not in PER_TOKEN_ARRAYS:
        raise ValueError(f"unknown per-token array {name!r}; known: {PER_TOKEN_ARRAYS}")
    return f"{prefix}.{name}"


def commit_journal_path(prefix: str) -> str:
    return prefix + ".commit.json"


def file_record(path: str, with_hash: bool = True) -> Dict[str, object]:
    """Size and sha256 of a written file, stored in the manifest and checked by :mod:`.verify`."""
    rec: Dict[str, object] = {"bytes": os.path.getsize(path)}
    if with_hash:
        rec["sha256"] = sha256_file(path)
    return rec


def sha256_file(path: str, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, streamed in ``chunk``-byte blocks (a multi-GB ``.bin`` never sits in memory)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()
