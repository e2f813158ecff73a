"""Lazy reading and sharded writing of Hugging Face safetensors checkpoints.

Reading keeps at most one shard memory-mapped at a time (HF writes shards in layer order and the converters
walk layers in order, so switching shards is rare) and copies out one tensor per request: peak memory is
about one tensor plus the mapped pages of one shard, never the model.

Writing buffers tensors up to ``max_shard_bytes``, flushes each shard to a temporary name and renames them
to ``model-0000i-of-0000N.safetensors`` with a ``model.safetensors.index.json`` at the end, so an interrupted
export never leaves a directory that ``transformers`` would load.
"""

from __future__ import annotations

import json
import os
from typing import Dict, Iterable, List, Optional, Tuple

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from megatron_offgrpo.models.conversion import MissingTensorError
from megatron_offgrpo.models.errors import (
    CorruptCheckpointFileError,
    MissingCheckpointFileError,
    TruncatedCheckpointFileError,
)

__all__ = ["SafetensorsReader", "ShardedSafetensorsWriter", "check_safetensors_file", "INDEX_NAME", "SINGLE_NAME"]

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
# A safetensors header larger than this is not a header (the format's own limit is 100 MB).
_MAX_HEADER_BYTES = 100 * 1024 * 1024
_REFETCH = "download or copy the file again (an interrupted download or copy, or a full disk, leaves it short)"
_DAMAGED = "download or copy the file again"


def check_safetensors_file(path: str) -> List[str]:
    """Check that a safetensors file holds every byte its header declares; return its tensor names.

    Reads only the header (8-byte little-endian length + JSON): the data must end exactly where the last
    tensor's ``data_offsets`` end. A short file raises :class:`TruncatedCheckpointFileError` naming the file
    and the first tensor (in file order) whose bytes are missing; an unparsable header or trailing bytes raise
    :class:`CorruptCheckpointFileError`.
    """
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise TruncatedCheckpointFileError(
                f"{path} is {size} bytes, too short for a safetensors header: {_REFETCH}", path=path
            )
        n = int.from_bytes(head, "little")
        if n > _MAX_HEADER_BYTES:
            raise CorruptCheckpointFileError(
                f"{path} is not a safetensors file (header length {n}): {_DAMAGED}", path=path
            )
        raw = f.read(n)
    if len(raw) < n:
        raise TruncatedCheckpointFileError(
            f"{path} is {size} bytes but its safetensors header alone declares {8 + n}: {_REFETCH}", path=path
        )
    try:
        header = json.loads(raw)
        entries = [(k, v["data_offsets"]) for k, v in header.items() if k != "__metadata__"]
        ends = [(int(off[1]), k) for k, off in entries]
    except (ValueError, TypeError, KeyError, IndexError, AttributeError) as e:
        raise CorruptCheckpointFileError(
            f"{path} has a damaged safetensors header ({e}): {_DAMAGED}", path=path
        ) from None
    expected = 8 + n + max((end for end, _ in ends), default=0)
    if size < expected:
        available = size - 8 - n
        lost = min((e for e in ends if e[0] > available), default=(0, "?"))[1]  # the first tensor cut
        raise TruncatedCheckpointFileError(
            f"{path} is truncated: {size} bytes of the {expected} its header declares, so tensor {lost!r} "
            f"(and any after it) is incomplete: {_REFETCH}",
            path=path,
            tensor=lost,
        )
    if size > expected:
        raise CorruptCheckpointFileError(
            f"{path} has {size - expected} bytes after its last tensor, not a valid safetensors file: {_DAMAGED}",
            path=path,
        )
    return [k for k, _ in entries]


def _read_index(index: str) -> Dict[str, str]:
    """The ``weight_map`` of a ``model.safetensors.index.json`` (error naming the file if unreadable)."""
    try:
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        if not isinstance(weight_map, dict):
            raise TypeError("weight_map is not an object")
        return dict(weight_map)
    except (ValueError, TypeError, KeyError) as e:
        raise CorruptCheckpointFileError(f"{index} is not a valid safetensors index ({e!r}): {_DAMAGED}",
                                         path=index) from None  # fmt: skip


class SafetensorsReader:
    """Read tensors by name from a HF model directory (single file or sharded with an index).

    Every shard is checked when the reader is created (:func:`check_safetensors_file`: its header only, never
    the tensor data), so a missing or truncated shard fails before any conversion work, with
    :class:`~megatron_offgrpo.models.errors.CheckpointFormatError` naming the file and the first tensor lost.
    """

    def __init__(self, model_dir: str) -> None:
        self.model_dir = model_dir
        index = os.path.join(model_dir, INDEX_NAME)
        single = os.path.join(model_dir, SINGLE_NAME)
        if os.path.exists(index):
            self.weight_map: Dict[str, str] = _read_index(index)
            for shard in sorted(set(self.weight_map.values())):
                path = os.path.join(model_dir, shard)
                if not os.path.isfile(path):
                    raise MissingCheckpointFileError(
                        f"{path} not found but {index} maps tensors to it (e.g. "
                        f"{next(k for k, v in self.weight_map.items() if v == shard)!r}): copy the complete model "
                        "directory again",
                        path=path,
                    )
                check_safetensors_file(path)
        elif os.path.exists(single):
            self.weight_map = {k: SINGLE_NAME for k in check_safetensors_file(single)}
        else:
            raise MissingCheckpointFileError(
                f"no {INDEX_NAME} or {SINGLE_NAME} in {model_dir}: pass a Hugging Face model directory with "
                "safetensors weights (convert *.bin weights with transformers' save_pretrained first)",
                path=model_dir,
            )
        self._open_name: Optional[str] = None
        self._open = None
        self.read: set = set()

    def keys(self) -> List[str]:
        """All tensor names in the checkpoint."""
        return list(self.weight_map)

    def shard_files(self) -> List[str]:
        """The distinct shard file paths."""
        return [os.path.join(self.model_dir, f) for f in sorted(set(self.weight_map.values()))]

    def _handle(self, shard: str):
        if shard != self._open_name:
            self.close()  # unmap the previous shard before mapping the next: bounds resident file pages
            self._open = safe_open(os.path.join(self.model_dir, shard), framework="pt")
            self._open_name = shard
        return self._open

    def get(self, name: str) -> torch.Tensor:
        """Copy tensor ``name`` into memory; :class:`MissingTensorError` if it does not exist.

        A shard that cannot be read (damaged after the reader checked it) raises
        :class:`~megatron_offgrpo.models.errors.CorruptCheckpointFileError` naming the file and the tensor.
        """
        shard = self.weight_map.get(name)
        if shard is None:
            raise MissingTensorError(f"tensor {name!r} not found in {self.model_dir}")
        self.read.add(name)
        try:
            return self._handle(shard).get_tensor(name)
        except SafetensorError as e:
            path = os.path.join(self.model_dir, shard)
            raise CorruptCheckpointFileError(
                f"cannot read tensor {name!r} from {path} ({e}): the file is damaged; copy it again",
                path=path,
                tensor=name,
            ) from None

    __call__ = get

    def close(self) -> None:
        """Release the currently mapped shard."""
        if self._open is not None:
            exit_ = getattr(self._open, "__exit__", None)
            if exit_ is not None:
                exit_(None, None, None)
            self._open = None
            self._open_name = None

    def __enter__(self) -> "SafetensorsReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class ShardedSafetensorsWriter:
    """Accumulate ``(name, tensor)`` pairs into safetensors shards of at most ``max_shard_bytes``."""

    def __init__(self, out_dir: str, max_shard_bytes: int = 5 * 1024**3) -> None:
        self.out_dir = out_dir
        self.max_shard_bytes = max_shard_bytes
        os.makedirs(out_dir, exist_ok=True)
        self._buffer: Dict[str, torch.Tensor] = {}
        self._buffer_bytes = 0
        self._tmp_files: List[Tuple[str, List[str]]] = []
        self.total_size = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Queue one tensor (copied to a contiguous private buffer: safetensors refuses shared storage)."""
        if name in self._buffer or any(name in names for _, names in self._tmp_files):
            raise ValueError(f"tensor {name!r} written twice")
        nbytes = tensor.numel() * tensor.element_size()
        if self._buffer and self._buffer_bytes + nbytes > self.max_shard_bytes:
            self._flush()
        self._buffer[name] = tensor.detach().to("cpu").contiguous().clone()
        self._buffer_bytes += nbytes
        self.total_size += nbytes

    def add_all(self, pairs: Iterable[Tuple[str, torch.Tensor]]) -> None:
        """Queue every pair of an iterator (consumed lazily)."""
        for name, tensor in pairs:
            self.add(name, tensor)

    def _flush(self) -> None:
        if not self._buffer:
            return
        tmp = os.path.join(self.out_dir, f".shard-{len(self._tmp_files):05d}.safetensors.tmp")
        save_file(self._buffer, tmp, metadata={"format": "pt"})
        self._tmp_files.append((tmp, list(self._buffer)))
        self._buffer = {}
        self._buffer_bytes = 0

    def finish(self) -> Dict[str, str]:
        """Write the last shard, rename all shards to their final names and write the index. Returns the map."""
        self._flush()
        n = len(self._tmp_files)
        weight_map: Dict[str, str] = {}
        for i, (tmp, names) in enumerate(self._tmp_files):
            final = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            os.replace(tmp, os.path.join(self.out_dir, final))
            weight_map.update({name: final for name in names})
        index = {"metadata": {"total_size": self.total_size}, "weight_map": weight_map}
        tmp_index = os.path.join(self.out_dir, INDEX_NAME + ".tmp")
        with open(tmp_index, "w") as f:
            json.dump(index, f, indent=2, sort_keys=True)
        os.replace(tmp_index, os.path.join(self.out_dir, INDEX_NAME))
        return weight_map
