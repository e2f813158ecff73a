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
from safetensors import safe_open
from safetensors.torch import save_file

from megatron_offgrpo.models.conversion import MissingTensorError

__all__ = ["SafetensorsReader", "ShardedSafetensorsWriter", "INDEX_NAME", "SINGLE_NAME"]

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


class SafetensorsReader:
    """Read tensors by name from a HF model directory (single file or sharded with an index)."""

    def __init__(self, model_dir: str) -> None:
        self.model_dir = model_dir
        index = os.path.join(model_dir, INDEX_NAME)
        single = os.path.join(model_dir, SINGLE_NAME)
        if os.path.exists(index):
            with open(index) as f:
                self.weight_map: Dict[str, str] = dict(json.load(f)["weight_map"])
        elif os.path.exists(single):
            with safe_open(single, framework="pt") as f:
                self.weight_map = {k: SINGLE_NAME for k in f.keys()}
        else:
            raise FileNotFoundError(f"no {INDEX_NAME} or {SINGLE_NAME} in {model_dir}")
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
        """Copy tensor ``name`` into memory; :class:`MissingTensorError` if it does not exist."""
        shard = self.weight_map.get(name)
        if shard is None:
            raise MissingTensorError(f"tensor {name!r} not found in {self.model_dir}")
        self.read.add(name)
        return self._handle(shard).get_tensor(name)

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
