"""The offline preprocessing pipeline: teacher rollouts -> final answers -> majority-vote rewards -> difficulty-aware
selection -> chat-templated tokens -> the indexed dataset of :mod:`megatron_offgrpo.data`, with a report.

Stages: :mod:`.readers` (input formats, rejects) and :mod:`.spill` (grouping by problem on disk, bounded memory)
-> :mod:`megatron_offgrpo.rewards` (labeling) -> :mod:`.selection` -> :mod:`.tokenize` -> :mod:`.build` (drives the
stages, with :mod:`.workers` in the process pool, and writes through :class:`~megatron_offgrpo.data.writer.
TrajectoryDatasetWriter`) -> :mod:`.report`. :mod:`.synthetic` and :mod:`.tiny_tokenizer` make the shipped sample.

Attributes are imported lazily (PEP 562) so that worker processes that only need a reader or the tokenizer do
not pay for importing Megatron-Core.
"""

from importlib import import_module
from typing import Any

_EXPORTS = {
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
        return getattr(import_module(f"megatron_offgrpo.preprocess.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'megatron_offgrpo.preprocess' has no attribute {name!r}")
