"""Megatron ``dist_checkpointing`` checkpoints of the project's GPT models: load, inspect, metadata.

A converted (or trained) checkpoint directory holds Megatron-Core's torch_dist files plus
``offgrpo_model.json`` with the :class:`ModelArchitecture`, the real vocabulary (``vocab_size``: the HF
embedding rows) and the padded one (``padded_vocab_size``: the stored embedding rows). The embedding shape is
fixed when a checkpoint is written, so a loader must build its model with the *recorded* padded vocabulary
(any TP dividing it works): :func:`checkpoint_padded_vocab_size`; the columns of the logits at and beyond the
real vocabulary (:func:`checkpoint_vocab_size`) are padding and never part of a softmax.

Damaged inputs fail early with a :class:`~megatron_offgrpo.models.errors.CheckpointFormatError` naming the
file: :func:`verify_checkpoint_files` compares every ``.distcp`` file with the byte ranges its ``.metadata``
records, before anything is loaded.
"""

from __future__ import annotations

import json
import os
import pickle
from typing import Any, Dict, List, Optional

import torch

from megatron_offgrpo.models.architecture import ModelArchitecture
from megatron_offgrpo.models.errors import (
    CorruptCheckpointFileError,
    MissingCheckpointFileError,
    TruncatedCheckpointFileError,
)

__all__ = [
    "CHECKPOINT_META_NAME",
    "write_checkpoint_metadata",
    "read_checkpoint_metadata",
    "checkpoint_padded_vocab_size",
    "checkpoint_vocab_size",
    "checkpoint_dtype",
    "verify_checkpoint_files",
    "zero_padded_vocab_rows",
    "save_model_checkpoint",
    "load_model_checkpoint",
    "ensure_single_process_parallel_state",
]

CHECKPOINT_META_NAME = "offgrpo_model.json"
_EMBEDDING_KEY = "embedding.word_embeddings.weight"
_DCP_METADATA_NAME = ".metadata"  # torch.distributed.checkpoint's global metadata file
_RECONVERT = (
    "re-create it with tools/checkpoint/hf_to_mcore.py, or call "
    "megatron_offgrpo.models.write_checkpoint_metadata(ckpt_dir, arch, padded_vocab_size)"
)


def write_checkpoint_metadata(ckpt_dir: str, arch: ModelArchitecture, padded_vocab_size: int, **extra: Any) -> None:
    """Record the architecture, the real and the padded vocabulary next to a checkpoint (rank 0 only writes).

    ``vocab_size`` is recorded explicitly (= ``arch.vocab_size``, the HF embedding rows) so that a reader never
    has to know that the architecture's field is the unpadded one. ``padded_vocab_size`` must be at least that.
    """
    if padded_vocab_size < arch.vocab_size:
        raise ValueError(f"padded_vocab_size={padded_vocab_size} < the real vocabulary {arch.vocab_size}")
    if torch.distributed.is_initialized() and torch.distributed.get_rank() != 0:
        return
    meta = {
        **extra,
        "format_version": 1,
        "architecture": arch.to_dict(),
        "vocab_size": arch.vocab_size,
        "padded_vocab_size": padded_vocab_size,
    }
    from megatron_offgrpo.data.atomic import atomic_write_json

    atomic_write_json(os.path.join(ckpt_dir, CHECKPOINT_META_NAME), meta)


def read_checkpoint_metadata(ckpt_dir: str) -> Optional[Dict[str, Any]]:
    """The ``offgrpo_model.json`` of a checkpoint as a dict (``architecture`` parsed), or None if absent.

    A file that exists but is not valid (JSON, architecture fields, vocabulary sizes) raises
    :class:`CorruptCheckpointFileError` naming it: a damaged description must never be mistaken for none.
    """
    path = os.path.join(ckpt_dir, CHECKPOINT_META_NAME)
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            meta = json.load(f)
        if not isinstance(meta, dict):
            raise TypeError("not a JSON object")
        if "architecture" in meta:
            meta["architecture"] = ModelArchitecture.from_dict(meta["architecture"])
    except (ValueError, TypeError, KeyError) as e:  # JSONDecodeError and from_dict's errors are among these
        raise CorruptCheckpointFileError(f"{path} is damaged ({e}): {_RECONVERT}", path=path) from None
    real, padded = meta.get("vocab_size"), meta.get("padded_vocab_size")
    arch = meta.get("architecture")
    if real is not None and (not isinstance(real, int) or real <= 0):
        raise CorruptCheckpointFileError(f"{path}: vocab_size={real!r} is not a positive integer: {_RECONVERT}",
                                         path=path)  # fmt: skip
    if real is not None and arch is not None and real != arch.vocab_size:
        raise CorruptCheckpointFileError(
            f"{path}: vocab_size={real} disagrees with architecture.vocab_size={arch.vocab_size}: {_RECONVERT}",
            path=path,
        )
    if isinstance(padded, int) and isinstance(real, int) and padded < real:
        raise CorruptCheckpointFileError(f"{path}: padded_vocab_size={padded} < vocab_size={real}: {_RECONVERT}",
                                         path=path)  # fmt: skip
    return meta


def checkpoint_vocab_size(ckpt_dir: str) -> int:
    """The *real* vocabulary of a checkpoint: the HF model's embedding rows, before Megatron's padding.

    Read from ``offgrpo_model.json``: its ``vocab_size``, or ``architecture.vocab_size`` for metadata written
    before that key existed. Logit columns at and beyond this index are padding. Raises
    :class:`MissingCheckpointFileError` when the file is absent and :class:`CorruptCheckpointFileError` when
    it is damaged or records neither, both naming the file.
    """
    path = os.path.join(ckpt_dir, CHECKPOINT_META_NAME)
    meta = read_checkpoint_metadata(ckpt_dir)
    if meta is None:
        raise MissingCheckpointFileError(
            f"{path} not found: the real vocabulary of {ckpt_dir} is unknown without it; {_RECONVERT}", path=path
        )
    if meta.get("vocab_size") is not None:
        return int(meta["vocab_size"])
    arch = meta.get("architecture")
    if arch is not None:
        return int(arch.vocab_size)
    raise CorruptCheckpointFileError(f"{path} records neither vocab_size nor architecture: {_RECONVERT}", path=path)


def _read_dcp_metadata(ckpt_dir: str):
    """The ``torch.distributed.checkpoint`` metadata of ``ckpt_dir`` (errors name the file and the fix)."""
    from torch.distributed.checkpoint import FileSystemReader

    path = os.path.join(ckpt_dir, _DCP_METADATA_NAME)
    if not os.path.isdir(ckpt_dir):
        raise MissingCheckpointFileError(
            f"checkpoint directory {ckpt_dir} does not exist: pass the directory holding .metadata and the *.distcp "
            "files",
            path=ckpt_dir,
        )
    if not os.path.isfile(path):
        raise MissingCheckpointFileError(
            f"{path} not found: {ckpt_dir} is not a complete Megatron torch_dist checkpoint (pass the directory "
            "holding .metadata and the *.distcp files; for a training run, its iter_NNNNNNN directory)",
            path=path,
        )
    try:
        return FileSystemReader(ckpt_dir).read_metadata()
    except (pickle.UnpicklingError, EOFError, AttributeError, ValueError, TypeError, IndexError) as e:
        raise CorruptCheckpointFileError(
            f"{path} is damaged ({type(e).__name__}: {e}): copy the checkpoint directory again", path=path
        ) from None


def verify_checkpoint_files(ckpt_dir: str) -> None:
    """Check that every data file of a torch_dist checkpoint exists and holds all the bytes it should.

    ``.metadata`` records, for every stored item, the file it lives in and its byte range; a ``.distcp`` file
    shorter than its last range was cut short (an interrupted save or copy, a full disk). This reads the
    metadata and stats the files, nothing else, and raises :class:`TruncatedCheckpointFileError` naming the
    file and an item (tensor) that lost bytes, or :class:`MissingCheckpointFileError`, instead of the
    unpickling error ``torch.load`` would raise midway through a load.
    """
    md = _read_dcp_metadata(ckpt_dir)
    # file -> (end offset, item) of its item that ends last
    last: Dict[str, tuple] = {}
    for index, info in (getattr(md, "storage_data", None) or {}).items():
        end = int(info.offset) + int(info.length)
        if end > last.get(info.relative_path, (-1, None))[0]:
            last[info.relative_path] = (end, getattr(index, "fqn", str(index)))
    for rel, (end, item) in sorted(last.items()):
        path = os.path.join(ckpt_dir, rel)
        if not os.path.isfile(path):
            raise MissingCheckpointFileError(
                f"{path} not found but {ckpt_dir}/{_DCP_METADATA_NAME} stores {item!r} in it: the checkpoint is "
                "incomplete; copy the whole directory again (or re-save / re-convert it)",
                path=path,
                tensor=item,
            )
        size = os.path.getsize(path)
        if size < end:
            lost = _first_item_past(md, rel, size)
            raise TruncatedCheckpointFileError(
                f"{path} is truncated: {size} bytes, but {ckpt_dir}/{_DCP_METADATA_NAME} records data up to byte "
                f"{end} (item {lost!r} is incomplete); the save or copy was interrupted: copy the checkpoint "
                "directory again, or re-save / re-convert it",
                path=path,
                tensor=lost,
            )


def _first_item_past(md, relative_path: str, size: int) -> str:
    """The item of ``relative_path`` with the lowest end offset beyond ``size`` (the first one damaged)."""
    ends = [
        (int(info.offset) + int(info.length), getattr(index, "fqn", str(index)))
        for index, info in md.storage_data.items()
        if info.relative_path == relative_path and int(info.offset) + int(info.length) > size
    ]
    return min(ends)[1]


def _embedding_metadata(ckpt_dir: str):
    """Global shape / dtype of the embedding from the torch_dist metadata (no tensor data is read)."""
    md = _read_dcp_metadata(ckpt_dir)
    entry = md.state_dict_metadata.get(_EMBEDDING_KEY)
    if entry is None:
        raise CorruptCheckpointFileError(
            f"{ckpt_dir} has no {_EMBEDDING_KEY!r}: not a GPT checkpoint of this project (a PP stage's or an "
            "optimizer-only checkpoint?)",
            path=os.path.join(ckpt_dir, _DCP_METADATA_NAME),
            tensor=_EMBEDDING_KEY,
        )
    return entry


def checkpoint_padded_vocab_size(ckpt_dir: str) -> int:
    """Rows of the embedding stored in the checkpoint (the padded vocabulary to build the model with)."""
    return int(_embedding_metadata(ckpt_dir).size[0])


def checkpoint_dtype(ckpt_dir: str) -> torch.dtype:
    """The dtype the checkpoint's weights were saved in."""
    return _embedding_metadata(ckpt_dir).properties.dtype


def ensure_single_process_parallel_state() -> None:
    """Make a one-process gloo group with Megatron TP=PP=EP=1 if nothing is initialized yet.

    The converters run in a single process: the checkpoint they write is resharded by ``dist_checkpointing``
    at load time, so they never need the target layout's ranks.
    """
    from megatron.core import parallel_state

    from megatron_offgrpo.utils.cpu_backend import initialize_cpu_model_parallel
    from megatron_offgrpo.utils.distributed import find_free_port

    if not torch.distributed.is_initialized():
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(find_free_port()))
        initialize_cpu_model_parallel()
        return
    if not parallel_state.model_parallel_is_initialized():
        initialize_cpu_model_parallel()
    if torch.distributed.get_world_size() != 1:
        raise RuntimeError("the checkpoint converters run in a single process (world size 1)")


def _vocab_parallel_weights(model) -> List[tuple]:
    """``(name, local weight, first global row, global rows)`` of the vocab-parallel weights this rank holds."""
    from megatron.core.utils import get_pg_rank

    # Unwrap DDP / Float16Module-style wrappers, which keep the GPTModel in ``.module``.
    while not hasattr(model, "embedding") and not hasattr(model, "output_layer") and hasattr(model, "module"):
        model = model.module
    found: List[tuple] = []
    emb = getattr(getattr(model, "embedding", None), "word_embeddings", None)  # first PP stage only
    if emb is not None:
        found.append((_EMBEDDING_KEY, emb.weight, int(emb.vocab_start_index), int(emb.num_embeddings)))
    out = getattr(model, "output_layer", None)  # last PP stage only
    weight = getattr(out, "weight", None)  # None when tied on a stage that also holds the embedding
    if weight is not None and not any(weight is w for _, w, _, _ in found):
        # ColumnParallelLinear splits its output rows like the embedding: rank r holds [r*V/tp, (r+1)*V/tp).
        start = get_pg_rank(getattr(out, "tp_group", None)) * weight.shape[0]
        found.append(("output_layer.weight", weight, start, int(out.output_size)))
    return found


def zero_padded_vocab_rows(model, vocab_size: int) -> None:
    """Zero, in place, the embedding / output-layer rows of padded vocabulary entries (global row >= ``vocab_size``).

    ``model`` is a Megatron ``GPTModel`` (or a wrapper holding one in ``.module``) under any TP / PP: each rank
    holds the vocab-parallel rows ``[rank * V / tp, (rank + 1) * V / tp)`` of ``embedding.word_embeddings.weight``
    (first PP stage) and of ``output_layer.weight`` (last stage; skipped when it is the tied embedding itself),
    and zeroes those at or past ``vocab_size``. Call it after random initialisation and before the optimizer
    copies the parameters: the padded rows then hold exactly what a converted checkpoint's hold (zeros). Needs
    no communication. ``vocab_size`` must lie in ``[1, V]``.
    """
    weights = _vocab_parallel_weights(model)
    with torch.no_grad():
        for name, weight, start, global_rows in weights:
            if not 0 < vocab_size <= global_rows:
                raise ValueError(f"vocab_size={vocab_size} must be in [1, {global_rows}] (the padded rows of {name})")
            first_padded_local = max(0, vocab_size - start)  # local row of this rank's first padded entry
            if first_padded_local < weight.shape[0]:
                weight[first_padded_local:].zero_()


def save_model_checkpoint(model, ckpt_dir: str) -> None:
    """Write ``model`` (a Megatron module, any TP/PP/EP) as a ``dist_checkpointing`` checkpoint in ``ckpt_dir``."""
    from megatron.core import dist_checkpointing

    if torch.distributed.get_rank() == 0:
        os.makedirs(ckpt_dir, exist_ok=True)
    torch.distributed.barrier()
    dist_checkpointing.save(model.sharded_state_dict(), ckpt_dir)


def load_model_checkpoint(model, ckpt_dir: str, strict: bool = True) -> None:
    """Load a ``dist_checkpointing`` checkpoint into ``model`` under the current parallel layout.

    The checkpoint's files are checked first (:func:`verify_checkpoint_files`): a missing or truncated file
    raises a :class:`~megatron_offgrpo.models.errors.CheckpointFormatError` naming it, before any tensor is read.
    """
    from megatron.core import dist_checkpointing

    verify_checkpoint_files(ckpt_dir)
    padded = checkpoint_padded_vocab_size(ckpt_dir)
    emb = getattr(getattr(model, "embedding", None), "word_embeddings", None)
    if emb is not None:
        # Fail with the reason rather than a resharding error deep inside torch.distributed.checkpoint.
        tp = model.config.tensor_model_parallel_size
        if emb.weight.shape[0] * tp != padded:
            raise ValueError(
                f"model built with padded vocab {emb.weight.shape[0] * tp} but {ckpt_dir} stores {padded}: "
                "build it with vocab_size=checkpoint_padded_vocab_size(ckpt_dir)"
            )
    state = dist_checkpointing.load(model.sharded_state_dict(), ckpt_dir)
    model.load_state_dict(state, strict=strict)
