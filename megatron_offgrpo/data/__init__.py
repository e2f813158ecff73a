"""Trajectory-group data: input readers, difficulty-aware selection, the DESIGN 5 writer/reader, group sampler,
pad/pack collate, and the in-repo tiny tokenizer and synthetic sample.

Attributes are imported lazily (PEP 562) so that worker processes that only need a reader or the tokenizer do
not pay for importing Megatron-Core.
"""

from importlib import import_module
from typing import Any

_EXPORTS = {
    "TrajectoryDataset": "dataset",
    "DatasetFormatError": "dataset",
    "load_manifest": "dataset",
    "verify_dataset": "verify",
    "check_dataset": "verify",
    "dataset_fingerprint": "verify",
    "recover_commit": "atomic",
    "CommitInProgressError": "atomic",
    "TrajectoryDatasetWriter": "writer",
    "SequenceRecord": "writer",
    "add_per_token_array": "writer",
    "GroupBatchSampler": "sampler",
    "collate_pad": "collate",
    "collate_pack": "collate",
    "read_groups": "readers",
    "RawGroup": "records",
    "Reject": "records",
    "InputError": "records",
    "select_groups": "selection",
    "load_student_pass_rates": "selection",
    "build_tiny_tokenizer": "tiny_tokenizer",
    "load_tiny_tokenizer": "tiny_tokenizer",
    "ChatTokenizer": "tokenize",
    "BuildConfig": "build",
    "build_dataset": "build",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(f"megatron_offgrpo.data.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'megatron_offgrpo.data' has no attribute {name!r}")
