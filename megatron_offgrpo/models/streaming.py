"""Streaming HF <-> Megatron conversion: a few tensors in memory at a time, never the model.

**Layout.** :class:`MegatronLayout` builds the TP=1 ``GPTModel`` on the *meta* device (no memory) and asks
Megatron for its ``sharded_state_dict``: for every parameter, the checkpoint key(s), global offsets and chunk
shapes under which saving a real model would store it (layer-stacked keys, the SwiGLU ``linear_fc1`` split in
two chunks, the Transformer-Engine names of the fused norms, one ``_extra_state`` object per linear layer).
Nothing about that layout is re-derived here, so it cannot drift from what ``dist_checkpointing`` itself writes
and reads.

**HF -> Megatron** (:func:`write_dist_checkpoint`): Megatron's own ``dist_checkpointing.save`` runs on the meta
sharded state dict (it applies the factories, validates the sharding, writes ``common.pt`` and
``metadata.json``) with a save strategy of this module in place of the default one. The strategy turns the
state dict into torch DCP's form with Megatron's own helpers, and saves it with DCP's ``FileSystemWriter``
through a planner whose ``resolve_data`` makes a chunk's data only when the writer asks for it: the parameter is
built from its recipe (:mod:`megatron_offgrpo.models.conversion`) over lazily read safetensors, sliced to the
chunk, written, and dropped. Chunks are written parameter by parameter in HF order, so the safetensors shards
are read front to back. The result is the checkpoint a TP=1 model's ``save_model_checkpoint`` writes: same
keys, global shapes, chunks, dtype and objects (tests/test_convert_streaming.py compares the two).

**Megatron -> HF** (:class:`DistCheckpointReader`): a parameter is read region by region (its layout pieces)
from the stored chunks that overlap them, located with DCP's ``.metadata`` (file and byte range of every
chunk) and deserialized with ``torch.load``, one chunk at a time: any TP/PP/EP the checkpoint was saved at
reads the same. A region that is exactly one stored chunk (the TP=1 case) is returned as loaded, without a
second copy.

Parallel: with ``workers > 1`` each direction runs in that many processes. HF -> Megatron uses one gloo world:
each rank keeps the main replica of the layers it owns (contiguous blocks; the embedding on rank 0, the output
layer on the last rank) and DCP merges their plans into one ``.metadata``. Megatron -> HF gives each worker
whole output shards (planned up front, so the files are those one process writes).
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import io
import os
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch

from megatron_offgrpo.models.architecture import ModelArchitecture
from megatron_offgrpo.models.conversion import MissingTensorError, ShapeMismatchError
from megatron_offgrpo.models.errors import CorruptCheckpointFileError, MissingCheckpointFileError

__all__ = [
    "ParamPiece",
    "MegatronLayout",
    "write_dist_checkpoint",
    "DistCheckpointReader",
    "layer_blocks",
    "owner_rank",
    "release_freed_memory",
]


@dataclass(frozen=True)
class ParamPiece:
    """One stored chunk of a parameter: checkpoint ``key`` at global ``offsets`` with ``sizes`` (prepended layer /
    expert axes included), and where its elements sit in the parameter (``as_strided`` geometry of the
    parameter's contiguous layout)."""

    key: str
    offsets: Tuple[int, ...]
    sizes: Tuple[int, ...]
    view_size: Tuple[int, ...]
    view_stride: Tuple[int, ...]
    view_offset: int
    global_shape: Tuple[int, ...]

    def of(self, param: torch.Tensor) -> torch.Tensor:
        """This piece of the (contiguous) ``param``, shaped as stored (with the prepended singleton axes)."""
        return param.as_strided(self.view_size, self.view_stride, self.view_offset).view(self.sizes)

    def covers(self, shape: Tuple[int, ...]) -> bool:
        """Whether this one piece is the whole parameter of ``shape``."""
        return self.view_offset == 0 and tuple(self.view_size) == tuple(shape)


class MegatronLayout:
    """The checkpoint layout of the TP=1 local-spec ``GPTModel`` of ``arch`` (built on the meta device).

    Needs Megatron's parallel state at TP = PP = EP = 1 (any data-parallel size). ``pieces[name]`` lists the
    stored chunks of the parameter ``name`` (a ``state_dict`` name); ``shapes[name]`` / ``dtypes[name]`` are its
    shape and dtype (``dtype`` for most; the local spec's torch norms keep float32 weights in a bf16 model, and
    the checkpoint stores them so).
    """

    def __init__(self, arch: ModelArchitecture, padded_vocab: int, dtype: torch.dtype) -> None:
        from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor, ShardedTensorFactory

        from megatron_offgrpo.models.provider import build_gpt_model, build_transformer_config

        config = build_transformer_config(arch, params_dtype=dtype, perform_initialization=False,
                                          use_cpu_initialization=True)  # fmt: skip
        with torch.device("meta"):
            self.model = build_gpt_model(arch, config, vocab_size=padded_vocab, backend="local")
        self.dtype = dtype
        self.pieces: Dict[str, List[ParamPiece]] = {}
        self.shapes: Dict[str, Tuple[int, ...]] = {}
        self.dtypes: Dict[str, torch.dtype] = {}
        for name, entry in self.model.sharded_state_dict().items():
            if isinstance(entry, ShardedObject):
                continue
            if isinstance(entry, ShardedTensorFactory):
                param, subs = entry.data, entry.build()
            elif isinstance(entry, ShardedTensor):
                param, subs = entry.data, [entry]
            else:  # a Megatron version that stores something else: refuse rather than write a partial checkpoint
                raise TypeError(f"unexpected sharded state dict entry for {name!r}: {type(entry).__name__}")
            if not param.is_contiguous():
                raise TypeError(f"parameter {name!r} is not contiguous: the piece geometry below assumes it")
            self.shapes[name] = tuple(param.shape)
            self.dtypes[name] = param.dtype
            self.pieces[name] = [_piece(name, param, s) for s in subs]

    def sharded_state_dict(self) -> Dict[str, Any]:
        """A fresh sharded state dict of the meta model (``dist_checkpointing.save`` consumes its argument)."""
        return self.model.sharded_state_dict()

    def check_names(self, names: Iterable[str]) -> None:
        """The conversion recipes must make exactly the model's parameters (else the mapping is out of date)."""
        names = set(names)
        extra, missing = sorted(names - set(self.shapes)), sorted(set(self.shapes) - names)
        if extra:
            raise KeyError(f"Megatron model has no parameter {extra[0]!r} (provider/mapping mismatch; "
                           f"{len(extra)} in all)")  # fmt: skip
        if missing:
            raise MissingTensorError(f"Megatron parameters not filled: {missing[:10]}")


def _piece(name: str, param: torch.Tensor, sub) -> ParamPiece:
    data = sub.data
    if data is not param and data._base is not param:  # e.g. the SwiGLU factory's torch.chunk views
        raise TypeError(f"a sharded piece of {name!r} is not a view of the parameter")
    sizes = (1,) * sub.prepend_axis_num + tuple(sub.local_shape)
    if data.numel() != torch.Size(sizes).numel():
        raise TypeError(f"a sharded piece of {name!r} has {data.numel()} elements for local shape {sizes}")
    return ParamPiece(key=sub.key, offsets=tuple(sub.global_offset), sizes=sizes, view_size=tuple(data.shape),
                      view_stride=tuple(data.stride()), view_offset=int(data.storage_offset()),
                      global_shape=tuple(sub.global_shape))  # fmt: skip


@functools.lru_cache(maxsize=1)
def _malloc_trim():
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc: nothing to do
        return None


def release_freed_memory() -> None:
    """Give the memory of freed tensors back to the system (glibc ``malloc_trim``; a no-op elsewhere).

    glibc raises its mmap threshold up to 32 MiB after freeing a large block, so the next tensors of a few MiB
    come from the heap, whose freed pages it keeps: over a conversion that grows the resident memory by tens of
    MiB that nothing uses. Trimming after each parameter keeps the peak at the tensors alive.
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def layer_blocks(num_layers: int, world: int) -> List[range]:
    """Contiguous, near-equal blocks of decoder layers, one per rank (rank r owns ``blocks[r]``)."""
    return [range(r * num_layers // world, (r + 1) * num_layers // world) for r in range(world)]


def owner_rank(name: str, num_layers: int, world: int) -> int:
    """Rank that writes parameter / object ``name``: its layer's block; embedding on 0, the rest on the last."""
    if world == 1:
        return 0
    if name.startswith("decoder.layers."):
        layer = int(name.split(".")[2])
        return next(r for r, block in enumerate(layer_blocks(num_layers, world)) if layer in block)
    return 0 if name.startswith("embedding.") else world - 1


# --------------------------------------------------------------------------------------------------------------
# HF -> Megatron


def write_dist_checkpoint(
    layout: MegatronLayout,
    make_param: Callable[[str], torch.Tensor],
    out_dir: str,
    *,
    order: Sequence[str],
    num_layers: int,
    on_param: Optional[Callable[[str], None]] = None,
) -> None:
    """Write the ``dist_checkpointing`` checkpoint of ``layout`` into ``out_dir``, one parameter at a time.

    ``make_param(name)`` returns the full TP=1 parameter ``name`` (shape ``layout.shapes[name]``, dtype
    ``layout.dtypes[name]``); it is called once per parameter this rank owns, in the order of ``order`` (HF order),
    and the tensor is dropped once its chunks are written. In a world of several ranks (all calling this
    collectively), rank r writes the parameters and objects of its layer block (:func:`layer_blocks`).
    ``on_param(name)`` is called after each parameter (progress).
    """
    from megatron.core import dist_checkpointing

    world = torch.distributed.get_world_size()
    rank = torch.distributed.get_rank()
    sharded = layout.sharded_state_dict()
    if world > 1:
        for name, entry in sharded.items():
            # replica_id != 0 marks a copy that another rank saves: Megatron validates that every chunk has
            # exactly one main replica, and the strategy below keeps only this rank's main replicas.
            entry.replica_id = 0 if owner_rank(name, num_layers, world) == rank else 1
    strategy = _StreamingSaveStrategy(layout, make_param, order, on_param)
    dist_checkpointing.save(sharded, out_dir, sharded_strategy=strategy)


def _save_strategy_base():
    from megatron.core.dist_checkpointing.strategies.base import SaveShardedStrategy

    return SaveShardedStrategy


class _StreamingSaveStrategy(_save_strategy_base()):
    """A ``torch_dist`` v1 save strategy whose tensor data is produced lazily, chunk by chunk, by DCP's writer."""

    def __init__(self, layout: MegatronLayout, make_param, order: Sequence[str], on_param) -> None:
        super().__init__("torch_dist", 1)  # the format the default strategy writes and every loader reads
        self.layout, self.make_param, self.order, self.on_param = layout, make_param, order, on_param

    @property
    def can_handle_sharded_objects(self) -> bool:
        return True

    def save(self, sharded_state_dict, checkpoint_dir) -> None:
        import torch.distributed.checkpoint as dcp
        from megatron.core.dist_checkpointing.mapping import ShardedTensor
        from megatron.core.dist_checkpointing.strategies.torch import (
            _replace_state_dict_keys_with_sharded_keys,
            mcore_to_pyt_state_dict,
        )

        # The same two steps as Megatron's TorchDistSaveShardedStrategy: group by checkpoint key keeping main
        # replicas only, then wrap as torch ShardedTensors (meta-device local shards: metadata, no data).
        flat, flat_mapping, rename_mapping = _replace_state_dict_keys_with_sharded_keys(
            sharded_state_dict, keep_only_main_replica=True
        )
        owner: Dict[Tuple[str, Tuple[int, ...]], Tuple[str, ParamPiece]] = {}
        for key, entries in flat.items():
            for entry, flat_key in zip(entries, rename_mapping[key]):
                if isinstance(entry, ShardedTensor):  # (the rest are the _extra_state objects)
                    name = str(flat_mapping[flat_key][0])  # the state-dict path starts with the parameter's name
                    piece = _find_piece(self.layout, name, key, tuple(entry.global_offset))
                    owner[(key, tuple(entry.global_offset))] = (name, piece)
        pyt_state_dict = mcore_to_pyt_state_dict(flat, False)
        planner = _LazySavePlanner(owner, self.layout, self.make_param, self.order, self.on_param)
        writer = dcp.FileSystemWriter(checkpoint_dir, thread_count=1, sync_files=True, overwrite=False)
        dcp.save(pyt_state_dict, storage_writer=writer, planner=planner)


def _find_piece(layout: MegatronLayout, name: str, key: str, offsets: Tuple[int, ...]) -> ParamPiece:
    for piece in layout.pieces.get(name, ()):
        if piece.key == key and piece.offsets == offsets:
            return piece
    raise KeyError(f"chunk {key!r} at {offsets} of {name!r} is not in the layout of the meta model")


def _mcore_save_planner_base():
    from megatron.core.dist_checkpointing.strategies.torch import MCoreSavePlanner

    return MCoreSavePlanner


class _LazySavePlanner(_mcore_save_planner_base()):
    """Megatron's save planner, with tensor data made on request and items ordered parameter by parameter."""

    def __init__(self, owner, layout: MegatronLayout, make_param, order: Sequence[str], on_param) -> None:
        super().__init__(dedup_replicated_tensors=False, flatten_state_dict=False)
        self.owner, self.layout, self.make_param, self.on_param = owner, layout, make_param, on_param
        self.rank_of_name = {name: i for i, name in enumerate(order)}
        self._current: Optional[Tuple[str, torch.Tensor, int]] = None  # (name, tensor, chunks still to write)
        self._handed_out: List[torch.Tensor] = []

    def create_local_plan(self):
        plan = super().create_local_plan()
        from torch.distributed.checkpoint.planner import WriteItemType

        def sort_key(item):
            if item.type == WriteItemType.BYTE_IO:
                return (-1, 0)
            name, piece = self.owner[(item.index.fqn, tuple(item.index.offset))]
            return (self.rank_of_name[name], self.layout.pieces[name].index(piece))

        # Parameter by parameter, in HF order: a parameter is made once for all its chunks, and the HF shards are
        # read front to back. (The order of items within a file changes nothing a loader sees.)
        items = sorted(plan.items, key=sort_key)
        self.remaining = {}
        for item in items:
            if item.type != WriteItemType.BYTE_IO:
                name = self.owner[(item.index.fqn, tuple(item.index.offset))][0]
                self.remaining[name] = self.remaining.get(name, 0) + 1
        self.plan = dataclasses.replace(plan, items=items)
        return self.plan

    def resolve_data(self, write_item):
        from torch.distributed.checkpoint.planner import WriteItemType

        if write_item.type == WriteItemType.BYTE_IO:
            return super().resolve_data(write_item)
        self._release_written()
        name, piece = self.owner[(write_item.index.fqn, tuple(write_item.index.offset))]
        if self._current is None or self._current[0] != name:
            tensor = self.make_param(name)
            shape, dtype = self.layout.shapes[name], self.layout.dtypes[name]
            if tuple(tensor.shape) != shape or tensor.dtype != dtype:  # the metadata describes these bytes
                raise ShapeMismatchError(f"parameter {name!r}: model {shape} {dtype} vs converted "
                                         f"{tuple(tensor.shape)} {tensor.dtype}")  # fmt: skip
            self._current = (name, tensor.contiguous(), self.remaining[name])
        name, tensor, left = self._current
        chunk = piece.of(tensor)
        if chunk.untyped_storage().nbytes() != chunk.nbytes:
            chunk = chunk.clone()  # its own storage, which _release_written can free (DCP would clone it anyway)
        self._handed_out.append(chunk)
        if left == 1:
            self._current = None  # last chunk: the writer's reference is the only one left after this
            if self.on_param is not None:
                self.on_param(name)
        else:
            self._current = (name, tensor, left - 1)
        return chunk

    def _release_written(self) -> None:
        """Free the storage of the chunks handed out so far: the writer has written them by now.

        DCP's file writer resolves, writes and only then asks for the next item, but keeps a reference to every
        tensor it wrote until the file is closed (it needs them for its safetensors format only): without this,
        a whole rank's share of the checkpoint would end up in memory. The reference it keeps becomes empty.
        """
        for chunk in self._handed_out:
            try:
                chunk.untyped_storage().resize_(0)
            except RuntimeError:  # storage not owned by torch (memory-mapped): freed with its last reference
                pass
        if self._handed_out:
            release_freed_memory()
        self._handed_out = []


# --------------------------------------------------------------------------------------------------------------
# Megatron -> HF


class _FileSlice(io.RawIOBase):
    """A read-only, seekable window ``[offset, offset + length)`` of an open binary file (``torch.load`` input)."""

    def __init__(self, f, offset: int, length: int) -> None:
        super().__init__()
        self._f, self._offset, self._length, self._pos = f, offset, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, pos: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._length}[whence]
        self._pos = max(0, base + pos)
        return self._pos

    def readinto(self, buffer) -> int:
        n = max(0, min(len(buffer), self._length - self._pos))
        if n == 0:
            return 0
        self._f.seek(self._offset + self._pos)
        got = self._f.readinto(memoryview(buffer)[:n])
        self._pos += got
        return got


class DistCheckpointReader:
    """Read parameters from a torch_dist checkpoint chunk by chunk (DCP ``.metadata`` + ``torch.load``).

    Construction reads only ``.metadata`` (errors name the file). Extra keys (optimizer state, other models'
    tensors) are ignored; a missing key or a global shape that differs from the layout raises.
    """

    def __init__(self, ckpt_dir: str) -> None:
        from megatron_offgrpo.models.checkpoint import _read_dcp_metadata

        self.ckpt_dir = ckpt_dir
        self.metadata = _read_dcp_metadata(ckpt_dir)

    def check_layout(self, layout: MegatronLayout) -> None:
        """Every key of ``layout`` exists with the same global shape (checked before anything is written)."""
        md = self.metadata.state_dict_metadata
        for name, pieces in layout.pieces.items():
            for piece in pieces:
                entry = md.get(piece.key)
                if entry is None or not hasattr(entry, "chunks"):
                    raise MissingTensorError(f"tensor {piece.key!r} (parameter {name!r}) not in the Megatron "
                                             f"checkpoint {self.ckpt_dir}")  # fmt: skip
                if tuple(entry.size) != piece.global_shape:
                    raise ShapeMismatchError(f"{self.ckpt_dir}: tensor {piece.key!r} has global shape "
                                             f"{tuple(entry.size)}, the model expects "
                                             f"{piece.global_shape}")  # fmt: skip

    def read_param(self, layout: MegatronLayout, name: str) -> torch.Tensor:
        """The full TP=1 parameter ``name`` (shape ``layout.shapes[name]``), in the checkpoint's dtype."""
        shape, pieces = layout.shapes[name], layout.pieces[name]
        if len(pieces) == 1 and pieces[0].covers(shape):
            return self.read_region(pieces[0].key, pieces[0].offsets, pieces[0].sizes).view(shape)
        out = torch.empty(shape, dtype=self._dtype(pieces[0].key))
        for piece in pieces:
            piece.of(out).copy_(self.read_region(piece.key, piece.offsets, piece.sizes))
        return out

    def _dtype(self, key: str) -> torch.dtype:
        return self.metadata.state_dict_metadata[key].properties.dtype

    def read_region(self, key: str, offsets: Sequence[int], sizes: Sequence[int]) -> torch.Tensor:
        """Elements ``[offsets, offsets + sizes)`` of the global tensor ``key``, read one stored chunk at a time."""
        chunks = self.metadata.state_dict_metadata[key].chunks
        offsets, sizes = tuple(offsets), tuple(sizes)
        exact = [c for c in chunks if tuple(c.offsets) == offsets and tuple(c.sizes) == sizes]
        if exact:
            return self._load_chunk(key, exact[0])
        out = torch.empty(sizes, dtype=self._dtype(key))
        filled = 0
        for c in chunks:
            lo = [max(a, b) for a, b in zip(offsets, c.offsets)]
            hi = [min(a + n, b + m) for a, n, b, m in zip(offsets, sizes, c.offsets, c.sizes)]
            if any(h <= low for low, h in zip(lo, hi)):
                continue
            stored = self._load_chunk(key, c)
            src, dst = stored, out
            for dim, (low, h) in enumerate(zip(lo, hi)):
                src = src.narrow(dim, low - c.offsets[dim], h - low)
                dst = dst.narrow(dim, low - offsets[dim], h - low)
            dst.copy_(src)
            filled += dst.numel()
            del stored, src
        if filled != out.numel():  # DCP chunks never overlap, so a shortfall means missing data
            raise CorruptCheckpointFileError(
                f"{self.ckpt_dir}: the stored chunks of {key!r} cover {filled} of the {out.numel()} elements at "
                f"{offsets} + {sizes}: the checkpoint is incomplete; copy or re-save it",
                path=os.path.join(self.ckpt_dir, ".metadata"), tensor=key,
            )  # fmt: skip
        return out

    def _load_chunk(self, key: str, chunk) -> torch.Tensor:
        from torch.distributed.checkpoint.metadata import MetadataIndex

        info = self.metadata.storage_data[MetadataIndex(key, torch.Size(chunk.offsets))]
        path = os.path.join(self.ckpt_dir, info.relative_path)
        if getattr(info, "transform_descriptors", None):
            raise CorruptCheckpointFileError(
                f"{path}: {key!r} was written through DCP stream transforms {info.transform_descriptors}, which the "
                "streaming reader does not apply; export with convert_mcore_to_hf(..., streaming=False)",
                path=path, tensor=key,
            )  # fmt: skip
        try:
            with open(path, "rb") as f:
                tensor = torch.load(_FileSlice(f, int(info.offset), int(info.length)), map_location="cpu",
                                    weights_only=True)  # fmt: skip
        except FileNotFoundError:
            raise MissingCheckpointFileError(f"{path} not found but {self.ckpt_dir}/.metadata stores {key!r} in it: "
                                             "copy the whole checkpoint directory again", path=path,
                                             tensor=key) from None  # fmt: skip
        except (RuntimeError, EOFError, ValueError, OSError) as e:
            raise CorruptCheckpointFileError(f"cannot read {key!r} from {path} ({e}): the file is damaged; copy the "
                                             "checkpoint directory again", path=path, tensor=key) from None  # fmt: skip
        if tuple(tensor.shape) != tuple(chunk.sizes):
            raise CorruptCheckpointFileError(f"{path}: {key!r} at {tuple(chunk.offsets)} holds shape "
                                             f"{tuple(tensor.shape)}, .metadata says {tuple(chunk.sizes)}", path=path,
                                             tensor=key)  # fmt: skip
        return tensor
