"""Lazy reading and sharded writing of Hugging Face safetensors checkpoints.

Reading keeps at most one shard memory-mapped at a time (HF writes shards in layer order and the converters
walk layers in order, so switching shards is rare) and hands out memory-mapped tensors, remapping after a byte
budget: peak memory is about the tensors in use plus the budget, never the model.

Writing plans the shards from the tensors' names, shapes and dtypes before any data exists
(:func:`plan_safetensors_shards`), then streams each tensor's bytes into its shard behind a header written
first (:class:`SafetensorsShardWriter`): no shard is ever held in memory. The exporter writes into a temporary
directory that it renames at the end, so an interrupted export never leaves a directory that ``transformers``
would load.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from safetensors import SafetensorError, safe_open

from megatron_offgrpo.models.conversion import MissingTensorError, ShapeMismatchError
from megatron_offgrpo.models.errors import (
    CorruptCheckpointFileError,
    MissingCheckpointFileError,
    TruncatedCheckpointFileError,
)

__all__ = [
    "SafetensorsReader",
    "SafetensorsShardWriter",
    "plan_safetensors_shards",
    "shard_file_name",
    "write_safetensors_index",
    "check_safetensors_file",
    "INDEX_NAME",
    "SINGLE_NAME",
]

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
    return list(_checked_header(path))


def _checked_header(path: str) -> Dict[str, Tuple[str, Tuple[int, ...]]]:
    """:func:`check_safetensors_file`, returning ``name -> (safetensors dtype, shape)`` in file order."""
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
        info = {k: (str(v["dtype"]), tuple(int(n) for n in v["shape"]))
                for k, v in header.items() if k != "__metadata__"}  # fmt: skip
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
    return info


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
    :class:`~megatron_offgrpo.models.errors.CheckpointFormatError` naming the file and the first tensor lost;
    :meth:`shape` then answers from the headers without reading data.

    Tensors are handed out as safetensors returns them: backed by the shard's memory map, so reading costs no
    copy, but every page read stays resident while the shard is mapped. The reader therefore drops its mapping
    after ``map_budget_bytes`` of tensors (and when it moves to another shard): resident file pages stay
    bounded by the budget plus the tensors the caller still holds.
    """

    def __init__(self, model_dir: str, map_budget_bytes: int = 256 * 1024**2) -> None:
        self.model_dir = model_dir
        self.map_budget_bytes = map_budget_bytes
        index = os.path.join(model_dir, INDEX_NAME)
        single = os.path.join(model_dir, SINGLE_NAME)
        self._info: Dict[str, Tuple[str, Tuple[int, ...]]] = {}
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
                self._info.update(_checked_header(path))
        elif os.path.exists(single):
            self._info = _checked_header(single)
            self.weight_map = {k: SINGLE_NAME for k in self._info}
        else:
            raise MissingCheckpointFileError(
                f"no {INDEX_NAME} or {SINGLE_NAME} in {model_dir}: pass a Hugging Face model directory with "
                "safetensors weights (convert *.bin weights with transformers' save_pretrained first)",
                path=model_dir,
            )
        self._open_name: Optional[str] = None
        self._open = None
        self._mapped_bytes = 0
        self.read: set = set()

    def keys(self) -> List[str]:
        """All tensor names in the checkpoint."""
        return list(self.weight_map)

    def shape(self, name: str) -> Tuple[int, ...]:
        """Shape of tensor ``name`` from its shard's header (no data read); :class:`MissingTensorError` if absent."""
        if name not in self.weight_map:
            raise MissingTensorError(f"tensor {name!r} not found in {self.model_dir}")
        if name not in self._info:  # the index names it but its shard does not hold it
            path = os.path.join(self.model_dir, self.weight_map[name])
            raise CorruptCheckpointFileError(f"{path} does not hold {name!r} although {INDEX_NAME} maps it there: "
                                             f"{_DAMAGED}", path=path, tensor=name)  # fmt: skip
        return self._info[name][1]

    def _handle(self, shard: str):
        if shard != self._open_name or self._mapped_bytes >= self.map_budget_bytes:
            self.close()  # unmap before mapping again: bounds the resident file pages
            self._open = safe_open(os.path.join(self.model_dir, shard), framework="pt")
            self._open_name = shard
        return self._open

    def _shard_of(self, name: str) -> str:
        shard = self.weight_map.get(name)
        if shard is None:
            raise MissingTensorError(f"tensor {name!r} not found in {self.model_dir}")
        self.read.add(name)
        return shard

    def _damaged(self, shard: str, name: str, e: Exception) -> CorruptCheckpointFileError:
        path = os.path.join(self.model_dir, shard)
        return CorruptCheckpointFileError(
            f"cannot read tensor {name!r} from {path} ({e}): the file is damaged; copy it again", path=path, tensor=name
        )

    def get(self, name: str) -> torch.Tensor:
        """Tensor ``name`` (memory-mapped, read-only use); :class:`MissingTensorError` if it does not exist.

        A shard that cannot be read (damaged after the reader checked it) raises
        :class:`~megatron_offgrpo.models.errors.CorruptCheckpointFileError` naming the file and the tensor.
        """
        shard = self._shard_of(name)
        try:
            tensor = self._handle(shard).get_tensor(name)
        except SafetensorError as e:
            raise self._damaged(shard, name, e) from None
        self._mapped_bytes += tensor.numel() * tensor.element_size()
        return tensor

    __call__ = get

    def copy_rows_into(self, name: str, out: torch.Tensor, block_bytes: int = 8 * 1024**2) -> None:
        """Copy tensor ``name`` into ``out`` (same shape; dtype converted) a block of rows at a time.

        For the largest tensors (embedding, output layer): each block is read through a fresh mapping that is
        dropped right after, so the resident memory is ``out`` plus one block, not ``out`` plus the whole tensor.
        """
        shard = self._shard_of(name)
        shape = self.shape(name)
        if tuple(out.shape) != shape:
            raise ShapeMismatchError(f"tensor {name!r} has shape {shape}, expected {tuple(out.shape)}")
        row_bytes = max(1, out[0].numel() * out.element_size()) if out.dim() and out.shape[0] else 1
        step = max(1, block_bytes // row_bytes)
        self.close()
        try:
            for start in range(0, shape[0], step):
                with safe_open(os.path.join(self.model_dir, shard), framework="pt") as f:
                    out[start : start + step].copy_(f.get_slice(name)[start : start + step])
        except SafetensorError as e:
            raise self._damaged(shard, name, e) from None

    def close(self) -> None:
        """Release the currently mapped shard."""
        if self._open is not None:
            exit_ = getattr(self._open, "__exit__", None)
            if exit_ is not None:
                exit_(None, None, None)
            self._open = None
            self._open_name = None
        self._mapped_bytes = 0

    def __enter__(self) -> "SafetensorsReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


#: torch dtype -> safetensors dtype name (the float types a checkpoint holds).
SAFETENSORS_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.float64: "F64"}


def plan_safetensors_shards(entries: Sequence[Tuple[str, Tuple[int, ...], torch.dtype]],
                            max_shard_bytes: int) -> List[List[Tuple[str, Tuple[int, ...], torch.dtype]]]:  # fmt: skip
    """Split ``(name, shape, dtype)`` entries, in order, into shards of at most ``max_shard_bytes``.

    A shard is closed when the next tensor would overflow it (a tensor larger than the limit gets a shard of
    its own), which is the rule ``transformers``' ``save_pretrained`` follows too.
    """
    shards: List[list] = [[]]
    size = 0
    for name, shape, dtype in entries:
        nbytes = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, tuple(shape), dtype))
        size += nbytes
    return shards if shards[-1] else []


def shard_file_name(i: int, n: int) -> str:
    """``model-0000i-of-0000n.safetensors`` (1-based), the names ``transformers`` writes."""
    return f"model-{i + 1:05d}-of-{n:05d}.safetensors"


class SafetensorsShardWriter:
    """Write one safetensors file whose tensors (names, shapes, dtypes, order) are known before their data.

    The header is written first, then each tensor's bytes straight from its memory as it is handed over, so a
    shard is never held in memory (``safetensors.torch.save_file`` needs the whole shard, and copies it once
    more while serialising). The format: 8-byte little-endian header length, the JSON header padded with spaces
    to a multiple of 8, then the tensors back to back in header order (tests read the files with ``safetensors``
    and ``transformers``).
    """

    def __init__(self, path: str, entries: Sequence[Tuple[str, Tuple[int, ...], torch.dtype]]) -> None:
        if sys.byteorder != "little":  # safetensors stores little-endian; the bytes below are written as in memory
            raise RuntimeError("SafetensorsShardWriter needs a little-endian host")
        self.path = path
        self.entries = list(entries)
        header: Dict[str, Any] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for name, shape, dtype in self.entries:
            if dtype not in SAFETENSORS_DTYPES:
                raise ValueError(f"tensor {name!r}: dtype {dtype} cannot be written (expected one of "
                                 f"{sorted(map(str, SAFETENSORS_DTYPES))})")  # fmt: skip
            nbytes = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
            header[name] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(shape),
                            "data_offsets": [offset, offset + nbytes]}  # fmt: skip
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
        raw += b" " * (-len(raw) % 8)
        self.total_size = offset
        self._f = open(path, "wb")
        self._f.write(len(raw).to_bytes(8, "little") + raw)
        self._next = 0

    @property
    def done(self) -> bool:
        """All tensors written."""
        return self._next == len(self.entries)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Append the next tensor; it must be the next planned entry (name, shape and dtype)."""
        if self.done:
            raise ValueError(f"{self.path}: tensor {name!r} written after the planned ones")
        want, shape, dtype = self.entries[self._next]
        if name != want or tuple(tensor.shape) != shape or tensor.dtype != dtype:
            raise ValueError(f"{self.path}: got {name!r} {tuple(tensor.shape)} {tensor.dtype}, planned {want!r} "
                             f"{shape} {dtype}")  # fmt: skip
        data = tensor.detach().to("cpu").contiguous()
        if data.numel():
            self._f.write(memoryview(data.reshape(-1).view(torch.uint8).numpy()))
        self._next += 1
        if self.done:
            self._f.flush()
            os.fsync(self._f.fileno())
            self._f.close()

    def close(self) -> None:
        """Close the file (complete or not)."""
        if not self._f.closed:
            self._f.close()


def write_safetensors_index(out_dir: str, weight_map: Dict[str, str], total_size: int) -> None:
    """``model.safetensors.index.json`` (``metadata.total_size`` in bytes and the tensor -> file map)."""
    index = {"metadata": {"total_size": total_size}, "weight_map": weight_map}
    with open(os.path.join(out_dir, INDEX_NAME), "w") as f:
        json.dump(index, f, indent=2, sort_keys=True)
