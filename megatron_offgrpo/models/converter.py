"""HF safetensors <-> Megatron ``dist_checkpointing`` conversion drivers (used by ``tools/checkpoint``).

Both directions stream (:mod:`megatron_offgrpo.models.streaming`): tensors are read one at a time (memory-mapped
safetensors on one side, one stored ``.distcp`` chunk on the other), mapped by the recipes of
:mod:`megatron_offgrpo.models.conversion`, and written straight into the output, so the peak memory is a few
tensors, not the model; ``workers > 1`` spreads the tensors over that many processes. The Megatron checkpoint
is the one a TP=1 model would save (``dist_checkpointing`` reshards at load time, so it loads under any
TP/PP/EP), and any checkpoint a trainer saved (any TP/PP/EP) exports. The ``tp`` given to
:func:`convert_hf_to_mcore` only fixes the vocabulary padding (``make_vocab_size_divisible_by * tp``) and is
validated against the head counts.

Outputs are written into ``<out_dir>.tmp<pid>`` and renamed to ``out_dir`` once complete: a killed conversion
leaves no directory that looks like a checkpoint (the next run removes the leftovers of dead processes).
``streaming=False`` runs the previous implementation (the whole model built at TP=1 and saved / loaded by
Megatron), which the tests and ``benchmarks/convert.py`` use as the reference.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
from tqdm import tqdm

from megatron_offgrpo.data.atomic import kill_point
from megatron_offgrpo.models.architecture import (
    ModelArchitecture,
    load_hf_config,
    model_config_from_hf,
    read_config_json,
)
from megatron_offgrpo.models.checkpoint import (
    checkpoint_dtype,
    checkpoint_padded_vocab_size,
    ensure_single_process_parallel_state,
    load_model_checkpoint,
    read_checkpoint_metadata,
    save_model_checkpoint,
    verify_checkpoint_files,
    write_checkpoint_metadata,
)
from megatron_offgrpo.models.conversion import (
    MissingTensorError,
    ShapeMismatchError,
    expected_hf_shapes,
    hf_to_mcore_recipes,
    hf_to_mcore_tensors,
    mcore_to_hf_recipes,
    mcore_to_hf_tensors,
)
from megatron_offgrpo.models.errors import CheckpointFormatError
from megatron_offgrpo.models.provider import build_gpt_model, build_transformer_config
from megatron_offgrpo.models.safetensors_io import (
    INDEX_NAME,
    SafetensorsReader,
    SafetensorsShardWriter,
    plan_safetensors_shards,
    shard_file_name,
    write_safetensors_index,
)

__all__ = ["parse_dtype", "convert_hf_to_mcore", "convert_mcore_to_hf", "build_model_for_checkpoint"]

_DTYPES = {
    "fp32": torch.float32, "float32": torch.float32,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp16": torch.float16, "float16": torch.float16,
}  # fmt: skip
_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
# Files of a HF model directory that are weights (never copied from the template).
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".h5", ".msgpack", ".gguf")
# Errors a worker process hands back to the parent as themselves (bad input, not a converter bug).
_USER_ERRORS = (CheckpointFormatError, ShapeMismatchError, MissingTensorError, FileExistsError, ValueError)


def parse_dtype(dtype: Union[str, torch.dtype, None]) -> Optional[torch.dtype]:
    """``"bf16"`` / ``"float32"`` / a torch dtype / None -> torch dtype (None passes through)."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _DTYPES[dtype.lower()]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; expected one of {sorted(_DTYPES)}") from None


def _validate_layout(arch: ModelArchitecture, tp: int, pp: int, ep: int) -> None:
    if arch.num_attention_heads % tp or arch.num_query_groups % tp:
        raise ValueError(f"--tp {tp} must divide the {arch.num_attention_heads} heads and {arch.num_query_groups} groups")
    if arch.num_layers % pp:
        raise ValueError(f"--pp {pp} must divide num_layers={arch.num_layers}")
    if ep > 1 and (not arch.is_moe or arch.num_experts % ep):
        raise ValueError(f"--ep {ep} needs an MoE model whose expert count ({arch.num_experts}) it divides")


# ----------------------------------------------------------------------------------------------------------------
# Output directories: written under a temporary name, renamed when complete


def _temporary_output(out_dir: str) -> str:
    """Refuse a non-empty ``out_dir``; return a fresh, empty ``<out_dir>.tmp<pid>`` next to it.

    Leftovers ``<out_dir>.tmp<PID>`` of processes that no longer run (a killed conversion) are removed first.
    """
    from megatron_offgrpo.data.atomic import pid_alive

    out_dir = os.path.abspath(out_dir)
    if os.path.isdir(out_dir) and os.listdir(out_dir):
        raise FileExistsError(f"output directory {out_dir} is not empty")
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise FileExistsError(f"output path {out_dir} exists and is not a directory")
    for stale in glob.glob(glob.escape(out_dir) + ".tmp*"):
        suffix = stale[len(out_dir) + 4 :]
        if suffix.isdigit() and int(suffix) != os.getpid() and not pid_alive(int(suffix)):
            shutil.rmtree(stale, ignore_errors=True)
    tmp = f"{out_dir}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    return tmp


def _publish(tmp: str, out_dir: str) -> None:
    """Move the complete ``tmp`` to ``out_dir`` in one rename (``out_dir`` absent or empty), durably."""
    from megatron_offgrpo.data.atomic import fsync_dir

    kill_point("convert:before_publish")  # tests: everything written, not yet renamed
    out_dir = os.path.abspath(out_dir)
    fsync_dir(tmp)
    if os.path.isdir(out_dir):
        os.rmdir(out_dir)  # empty (checked at the start); rename(2) would also replace it, but not portably
    os.rename(tmp, out_dir)
    fsync_dir(os.path.dirname(out_dir))


def _run_workers(fn, workers: int, *args: Any) -> List[Any]:
    """Run ``fn(rank, world, *args)`` on ``workers`` spawned processes; re-raise a worker's user error as itself."""
    from megatron_offgrpo.utils.distributed import run_on_ranks

    results = run_on_ranks(fn, workers, *args, timeout_s=7 * 24 * 3600)
    for r in results:
        if isinstance(r, BaseException):
            raise r
    return results


def _in_worker(fn, *args: Any) -> Any:
    """Call ``fn(*args)`` and return a user error instead of raising it (so it crosses the process boundary)."""
    try:
        return fn(*args)
    except _USER_ERRORS as e:
        return e


# ----------------------------------------------------------------------------------------------------------------
# HF -> Megatron


def _hf_tensors_checked(reader: SafetensorsReader, arch: ModelArchitecture, recipes) -> None:
    """Every HF tensor the recipes read exists with its shape, and none is left over (headers only, no data)."""
    for recipe in recipes.values():
        for name, shape in zip(recipe.sources, recipe.source_shapes):
            if reader.shape(name) != tuple(shape):
                raise ShapeMismatchError(f"tensor {name!r} has shape {reader.shape(name)}, expected {tuple(shape)}")
    unused = set(reader.keys()) - set(expected_hf_shapes(arch))
    # A tied model may still carry an lm_head copy on disk (some exporters write it); it is redundant.
    if arch.tie_word_embeddings:
        unused.discard("lm_head.weight")
    unused = {n for n in unused if not n.endswith("rotary_emb.inv_freq")}
    if unused:
        raise ShapeMismatchError(f"HF tensors not used by the {arch.family} mapping: {sorted(unused)[:10]}")


def _param_maker(reader: SafetensorsReader, recipes, dtypes: Dict[str, torch.dtype]):
    """``name -> tensor`` of one Megatron parameter in ``dtypes[name]``, made from its recipe over ``reader``."""

    def make(name: str) -> torch.Tensor:
        recipe, dtype = recipes[name], dtypes[name]
        if recipe.pad_rows:
            # The largest tensors: filled block by block into the padded output, never held twice, and with the
            # pages the reader still maps from the previous tensors released first.
            reader.close()
            out = torch.zeros(recipe.shape, dtype=dtype)
            reader.copy_rows_into(recipe.sources[0], out[: recipe.source_shapes[0][0]])
            return out
        tensor = recipe.combine(*(reader.get(s) for s in recipe.sources))
        # A single-source recipe returns the memory-mapped source itself: copy it, so that the mapping (and the
        # file pages it keeps resident) goes when the reader moves on, whoever still holds the tensor.
        return tensor.to(dtype, copy=len(recipe.sources) == 1)

    return make


def _write_mcore(hf_dir: str, tmp: str, arch: ModelArchitecture, padded: int, dtype: torch.dtype,
                 progress: bool) -> None:  # fmt: skip
    """Stream the HF model into the dist checkpoint ``tmp`` (this process's part of it when in a world of ranks)."""
    from megatron_offgrpo.models.streaming import MegatronLayout, owner_rank, write_dist_checkpoint

    recipes = hf_to_mcore_recipes(arch, padded)
    layout = MegatronLayout(arch, padded, dtype)
    layout.check_names(recipes)
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    mine = sum(owner_rank(name, arch.num_layers, world) == rank for name in recipes)
    with SafetensorsReader(hf_dir) as reader, tqdm(total=mine, desc="hf->mcore", unit="tensor",
                                                   disable=not progress or rank != 0) as bar:  # fmt: skip

        def on_param(name: str) -> None:
            bar.update()
            kill_point("convert:tensor_written")  # tests: a conversion killed midway

        write_dist_checkpoint(layout, _param_maker(reader, recipes, layout.dtypes), tmp, order=list(recipes),
                              num_layers=arch.num_layers, on_param=on_param)  # fmt: skip


def _hf_to_mcore_worker(rank: int, world: int, hf_dir: str, tmp: str, arch: Dict[str, Any], padded: int,
                        dtype: str, progress: bool) -> None:  # fmt: skip
    from megatron_offgrpo.utils.cpu_backend import initialize_cpu_model_parallel

    initialize_cpu_model_parallel()  # TP = PP = EP = 1, data-parallel = world: every rank holds the meta layout
    _write_mcore(hf_dir, tmp, ModelArchitecture.from_dict(arch), padded, parse_dtype(dtype), progress)


def convert_hf_to_mcore(
    hf_dir: str,
    out_dir: str,
    *,
    tp: int = 1,
    pp: int = 1,
    ep: int = 1,
    dtype: Union[str, torch.dtype, None] = None,
    make_vocab_size_divisible_by: int = 128,
    progress: bool = True,
    workers: int = 1,
    streaming: bool = True,
) -> Dict[str, Any]:
    """Convert a HF checkpoint directory into a Megatron ``dist_checkpointing`` checkpoint; returns its metadata.

    ``dtype`` defaults to the HF config's ``torch_dtype``/``dtype`` (float32 if absent). Every parameter of
    the Megatron model must be filled and every HF tensor consumed; otherwise the error names the tensors. A
    missing ``config.json``, a missing / truncated shard or a tensor of the wrong shape raises (a
    :class:`~megatron_offgrpo.models.errors.CheckpointFormatError` or :class:`ShapeMismatchError` naming the file
    or tensor) before anything is written. ``offgrpo_model.json`` records the real (``vocab_size``) and padded
    (``padded_vocab_size``) vocabulary. ``workers > 1`` writes the layers from that many processes (one gloo
    world; the checkpoint is the same). ``streaming=False``: the previous in-memory implementation.
    """
    hf_cfg = load_hf_config(hf_dir)
    arch = model_config_from_hf(hf_cfg)
    _validate_layout(arch, tp, pp, ep)
    dtype = parse_dtype(dtype) or parse_dtype(hf_cfg.get("torch_dtype") or hf_cfg.get("dtype") or "float32")
    padded = arch.padded_vocab_size(tp, make_vocab_size_divisible_by)
    if workers < 1:
        raise ValueError(f"workers={workers} must be >= 1")
    # Opening the reader checks every shard's header against its size: a truncated download fails here, naming
    # the file, before anything is written.
    reader = SafetensorsReader(hf_dir)
    if streaming:
        _hf_tensors_checked(reader, arch, hf_to_mcore_recipes(arch, padded))
    tmp = _temporary_output(out_dir)
    try:
        if not streaming:
            _hf_to_mcore_in_memory(reader, tmp, arch, padded, dtype, progress)
        elif workers == 1:
            ensure_single_process_parallel_state()
            _write_mcore(hf_dir, tmp, arch, padded, dtype, progress)
        else:
            _run_workers(_hf_to_mcore_worker, workers, hf_dir, tmp, arch.to_dict(), padded, _DTYPE_NAMES[dtype],
                         progress)  # fmt: skip
        meta = dict(source=os.path.abspath(hf_dir), source_format="hf", target_tp=tp, target_pp=pp, target_ep=ep,
                    dtype=_DTYPE_NAMES[dtype], make_vocab_size_divisible_by=make_vocab_size_divisible_by)  # fmt: skip
        write_checkpoint_metadata(tmp, arch, padded, **meta)
        _publish(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"architecture": arch, "vocab_size": arch.vocab_size, "padded_vocab_size": padded, **meta}


def build_model_for_checkpoint(arch: ModelArchitecture, padded_vocab: int, dtype: torch.dtype):
    """A TP=1 local-spec model with uninitialised weights (they are about to be overwritten)."""
    config = build_transformer_config(arch, params_dtype=dtype, perform_initialization=False, use_cpu_initialization=True)
    return build_gpt_model(arch, config, vocab_size=padded_vocab, backend="local")


def _hf_to_mcore_in_memory(reader: SafetensorsReader, out_dir: str, arch: ModelArchitecture, padded: int,
                           dtype: torch.dtype, progress: bool) -> None:  # fmt: skip
    """The previous implementation: fill a whole TP=1 model, then ``save_model_checkpoint`` it (reference path)."""
    ensure_single_process_parallel_state()
    model = build_model_for_checkpoint(arch, padded, dtype)
    params = dict(model.named_parameters())
    filled = set()
    with reader:
        pairs = hf_to_mcore_tensors(arch, reader.get, padded)
        for name, tensor in tqdm(pairs, total=len(params), desc="hf->mcore", unit="tensor", disable=not progress):
            target = params.get(name)
            if target is None:
                raise KeyError(f"Megatron model has no parameter {name!r} (provider/mapping mismatch)")
            if tuple(target.shape) != tuple(tensor.shape):
                raise ShapeMismatchError(f"parameter {name!r}: model {tuple(target.shape)} vs converted {tuple(tensor.shape)}")
            with torch.no_grad():
                target.copy_(tensor)
            filled.add(name)
            del tensor
        unused = set(reader.keys()) - reader.read
    # A tied model may still carry an lm_head copy on disk (some exporters write it); it is redundant.
    if arch.tie_word_embeddings:
        unused.discard("lm_head.weight")
    unused = {n for n in unused if not n.endswith("rotary_emb.inv_freq")}
    if unused:
        raise ShapeMismatchError(f"HF tensors not used by the {arch.family} mapping: {sorted(unused)[:10]}")
    missing = set(params) - filled
    if missing:
        raise MissingTensorError(f"Megatron parameters not filled: {sorted(missing)[:10]}")
    save_model_checkpoint(model, out_dir)


_ARCH_FIELDS_TO_MATCH = (
    "family", "num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups",
    "head_dim", "vocab_size", "tie_word_embeddings", "qkv_bias", "qk_norm", "num_experts", "moe_ffn_hidden_size",
)  # fmt: skip


def _check_template(template: ModelArchitecture, recorded: Optional[ModelArchitecture]) -> None:
    if recorded is None:
        return
    for f in _ARCH_FIELDS_TO_MATCH:
        a, b = getattr(template, f), getattr(recorded, f)
        if a != b:
            raise ShapeMismatchError(f"HF template {f}={a!r} but the checkpoint was written for {f}={b!r}")


def _export_shards(ckpt_dir: str, out_dir: str, arch: ModelArchitecture, padded: int, src_dtype: torch.dtype,
                   out_dtype: torch.dtype, shards: Sequence[Sequence[Tuple[str, Tuple[int, ...], torch.dtype]]],
                   owned: Sequence[int], progress: bool) -> None:  # fmt: skip
    """Write the planned safetensors shards ``owned`` of ``out_dir``, reading the checkpoint tensor by tensor."""
    from megatron_offgrpo.models.streaming import DistCheckpointReader, MegatronLayout, release_freed_memory

    recipes = mcore_to_hf_recipes(arch, padded)
    layout = MegatronLayout(arch, padded, src_dtype)
    layout.check_names({s for r in recipes.values() for s in r.sources})
    reader = DistCheckpointReader(ckpt_dir)
    reader.check_layout(layout)  # every key and global shape, before a byte is written
    cache: Dict[str, torch.Tensor] = {}  # the Megatron tensor(s) of the current recipe (q/k/v share linear_qkv)
    total = sum(len(shards[i]) for i in owned)
    with tqdm(total=total, desc="mcore->hf", unit="tensor", disable=not progress) as bar:
        for i in owned:
            writer = SafetensorsShardWriter(os.path.join(out_dir, shard_file_name(i, len(shards))), shards[i])
            try:
                for name, _, _ in shards[i]:
                    recipe = recipes[name]
                    if any(s not in cache for s in recipe.sources):
                        cache = {}  # drop the previous Megatron tensor before reading the next one
                        release_freed_memory()
                    cache = {s: cache[s] if s in cache else reader.read_param(layout, s) for s in recipe.sources}
                    writer.write(name, recipe.combine(*(cache[s] for s in recipe.sources)).to(out_dtype))
                    bar.update()
                    kill_point("convert:tensor_written")  # tests: an export killed midway
            finally:
                writer.close()


def _export_worker(rank: int, world: int, ckpt_dir: str, out_dir: str, arch: Dict[str, Any], padded: int,
                   src_dtype: str, out_dtype: str, shards, progress: bool):  # fmt: skip
    from megatron_offgrpo.utils.cpu_backend import initialize_cpu_model_parallel

    initialize_cpu_model_parallel()
    owned = list(range(rank, len(shards), world))  # whole shards: the files are those one process writes
    return _in_worker(_export_shards, ckpt_dir, out_dir, ModelArchitecture.from_dict(arch), padded,
                      parse_dtype(src_dtype), parse_dtype(out_dtype), shards, owned,
                      progress and rank == 0)  # fmt: skip


def _mcore_to_hf_in_memory(ckpt_dir: str, out_dir: str, arch: ModelArchitecture, padded: int, src_dtype: torch.dtype,
                           out_dtype: torch.dtype, shards, progress: bool) -> None:  # fmt: skip
    """The previous implementation: load a whole TP=1 model with Megatron, then map its state dict (reference)."""
    ensure_single_process_parallel_state()
    model = build_model_for_checkpoint(arch, padded, src_dtype)
    load_model_checkpoint(model, ckpt_dir)
    state = {k: v for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}

    def get(name: str) -> torch.Tensor:
        if name not in state:
            raise MissingTensorError(f"tensor {name!r} not in the Megatron checkpoint {ckpt_dir}")
        return state[name]

    pairs = mcore_to_hf_tensors(arch, get, padded)
    writers = iter([SafetensorsShardWriter(os.path.join(out_dir, shard_file_name(i, len(shards))), shard)
                    for i, shard in enumerate(shards)])  # fmt: skip
    writer = next(writers)
    for name, tensor in tqdm(pairs, total=sum(map(len, shards)), desc="mcore->hf", unit="tensor", disable=not progress):
        if writer.done:
            writer = next(writers)
        writer.write(name, tensor.to(out_dtype))


def convert_mcore_to_hf(
    ckpt_dir: str,
    hf_template: str,
    out_dir: str,
    *,
    dtype: Union[str, torch.dtype, None] = None,
    max_shard_bytes: int = 5 * 1024**3,
    progress: bool = True,
    workers: int = 1,
    streaming: bool = True,
) -> Dict[str, str]:
    """Export a Megatron checkpoint as a HF model directory loadable by ``transformers`` and vLLM.

    The architecture comes from ``hf_template``'s ``config.json`` (checked against the checkpoint's recorded
    one); vocabulary padding is stripped; weights are written as sharded safetensors with an index, in
    ``dtype`` (default: the checkpoint's); config, tokenizer and generation files are copied from the template.
    Returns the weight map. A missing or damaged file (the template's ``config.json``, a truncated ``.distcp``,
    a corrupt ``offgrpo_model.json``) raises :class:`~megatron_offgrpo.models.errors.CheckpointFormatError`
    naming it, and a missing tensor or a wrong global shape :class:`MissingTensorError` /
    :class:`ShapeMismatchError`, before anything is written. Runs in a process without a parallel state or
    with a world of one; ``workers > 1`` writes the shards from that many spawned processes.
    ``streaming=False``: the previous in-memory implementation.
    """
    arch = model_config_from_hf(hf_template)
    # Every file of the checkpoint is checked before anything is read (stat + metadata only).
    verify_checkpoint_files(ckpt_dir)
    meta = read_checkpoint_metadata(ckpt_dir)  # optional (not every saver writes it); validated when present
    _check_template(arch, meta.get("architecture") if meta else None)
    padded = checkpoint_padded_vocab_size(ckpt_dir)
    if padded < arch.vocab_size:
        raise ShapeMismatchError(f"checkpoint embedding has {padded} rows < template vocab_size {arch.vocab_size}")
    src_dtype = checkpoint_dtype(ckpt_dir)
    out_dtype = parse_dtype(dtype) or src_dtype
    if workers < 1:
        raise ValueError(f"workers={workers} must be >= 1")
    recipes = mcore_to_hf_recipes(arch, padded)
    shards = plan_safetensors_shards([(n, r.shape, out_dtype) for n, r in recipes.items()], max_shard_bytes)
    tmp = _temporary_output(out_dir)
    try:
        if not streaming:
            _mcore_to_hf_in_memory(ckpt_dir, tmp, arch, padded, src_dtype, out_dtype, shards, progress)
        elif workers == 1:
            ensure_single_process_parallel_state()
            _export_shards(ckpt_dir, tmp, arch, padded, src_dtype, out_dtype, shards, range(len(shards)), progress)
        else:
            _run_workers(_export_worker, workers, ckpt_dir, tmp, arch.to_dict(), padded, _DTYPE_NAMES[src_dtype],
                         _DTYPE_NAMES[out_dtype], shards, progress)  # fmt: skip
        weight_map = {name: shard_file_name(i, len(shards)) for i, shard in enumerate(shards) for name, _, _ in shard}
        total = sum(torch.Size(shape).numel() * out_dtype.itemsize for shard in shards for _, shape, _ in shard)
        write_safetensors_index(tmp, weight_map, total)
        _copy_template_files(hf_template, tmp, out_dtype)
        _publish(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return weight_map


def _copy_template_files(hf_template: str, out_dir: str, dtype: torch.dtype) -> None:
    """config.json (dtype updated), tokenizer, generation config, chat template...: everything but weights."""
    for entry in sorted(os.listdir(hf_template)):
        src = os.path.join(hf_template, entry)
        if not os.path.isfile(src) or entry.endswith(_WEIGHT_SUFFIXES) or entry in (INDEX_NAME, "config.json"):
            continue
        if entry.endswith(".index.json"):
            continue
        shutil.copy2(src, os.path.join(out_dir, entry))
    cfg = read_config_json(hf_template)  # the template's own file, only the dtype changed
    # transformers 4 reads torch_dtype, transformers 5 writes dtype: keep both consistent with the weights.
    for key in ("torch_dtype", "dtype"):
        if key in cfg or key == "torch_dtype":
            cfg[key] = _DTYPE_NAMES[dtype]
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
