"""The trajectory-group dataset as training reads it: the on-disk format (docs/design.md, "Data format"), its
writer and reader, verification, the group sampler and pad/pack collate. The offline pipeline that produces it
(read, label, select, tokenize, build) is :mod:`megatron_offgrpo.preprocess`.

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
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(f"megatron_offgrpo.data.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'megatron_offgrpo.data' has no attribute {name!r}")
