"""Megatron ``dist_checkpointing`` checkpoints of the project's GPT models: load, inspect, metadata.

A converted (or trained) checkpoint directory holds Megatron-Core's torch_dist files plus
``offgrpo_model.json`` with the :class:`ModelArchitecture` and the padded vocabulary size. The embedding
shape is fixed when a checkpoint is written, so a loader must build its model with the *recorded* padded
vocabulary (any TP dividing it works): :func:`checkpoint_padded_vocab_size`.
"""

from __future__ import annotations

import json
import os
from typing import Any, Dict, Optional

import torch

from megatron_offgrpo.models.architecture import ModelArchitecture

__all__ = [
    "CHECKPOINT_META_NAME",
    "write_checkpoint_metadata",
    "read_checkpoint_metadata",
    "checkpoint_padded_vocab_size",
    "checkpoint_dtype",
    "save_model_checkpoint",
    "load_model_checkpoint",
    "ensure_single_process_parallel_state",
]

CHECKPOINT_META_NAME = "offgrpo_model.json"
_EMBEDDING_KEY = "embedding.word_embeddings.weight"


def write_checkpoint_metadata(ckpt_dir: str, arch: ModelArchitecture, padded_vocab_size: int, **extra: Any) -> None:
    """Record the architecture and padded vocabulary next to a checkpoint (rank 0 only writes)."""
    if torch.distributed.is_initialized() and torch.distributed.get_rank() != 0:
        return
    meta = {"format_version": 1, "architecture": arch.to_dict(), "padded_vocab_size": padded_vocab_size, **extra}
    tmp = os.path.join(ckpt_dir, CHECKPOINT_META_NAME + ".tmp")
    with open(tmp, "w") as f:
        json.dump(meta, f, indent=2, sort_keys=True)
    os.replace(tmp, os.path.join(ckpt_dir, CHECKPOINT_META_NAME))


def read_checkpoint_metadata(ckpt_dir: str) -> Optional[Dict[str, Any]]:
    """The ``offgrpo_model.json`` of a checkpoint as a dict (``architecture`` parsed), or None if absent."""
    path = os.path.join(ckpt_dir, CHECKPOINT_META_NAME)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        meta = json.load(f)
    meta["architecture"] = ModelArchitecture.from_dict(meta["architecture"])
    return meta


def _embedding_metadata(ckpt_dir: str):
    """Global shape / dtype of the embedding from the torch_dist metadata (no tensor data is read)."""
    from torch.distributed.checkpoint import FileSystemReader

    md = FileSystemReader(ckpt_dir).read_metadata()
    entry = md.state_dict_metadata.get(_EMBEDDING_KEY)
    if entry is None:
        raise ValueError(f"{ckpt_dir} has no {_EMBEDDING_KEY!r}: not a GPT checkpoint of this project")
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


def save_model_checkpoint(model, ckpt_dir: str) -> None:
    """Write ``model`` (a Megatron module, any TP/PP/EP) as a ``dist_checkpointing`` checkpoint in ``ckpt_dir``."""
    from megatron.core import dist_checkpointing

    if torch.distributed.get_rank() == 0:
        os.makedirs(ckpt_dir, exist_ok=True)
    torch.distributed.barrier()
    dist_checkpointing.save(model.sharded_state_dict(), ckpt_dir)


def load_model_checkpoint(model, ckpt_dir: str, strict: bool = True) -> None:
    """Load a ``dist_checkpointing`` checkpoint into ``model`` under the current parallel layout."""
    from megatron.core import dist_checkpointing

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
