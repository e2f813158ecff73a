"""HF safetensors <-> Megatron ``dist_checkpointing`` conversion drivers (used by ``tools/checkpoint``).

Both directions run in one process with a TP=1 model: ``dist_checkpointing`` reshards at load time, so the
checkpoint written here loads under any TP/PP/EP, and any trained checkpoint loads here. The ``tp`` given to
:func:`convert_hf_to_mcore` only fixes the vocabulary padding (``make_vocab_size_divisible_by * tp``) and is
validated against the head counts.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any, Dict, Optional, Union

import torch
from tqdm import tqdm

from megatron_offgrpo.models.architecture import ModelArchitecture, load_hf_config, model_config_from_hf
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
    hf_to_mcore_tensors,
    mcore_to_hf_tensors,
)
from megatron_offgrpo.models.provider import build_gpt_model, build_transformer_config
from megatron_offgrpo.models.safetensors_io import INDEX_NAME, SafetensorsReader, ShardedSafetensorsWriter

__all__ = ["parse_dtype", "convert_hf_to_mcore", "convert_mcore_to_hf", "build_model_for_checkpoint"]

_DTYPES = {
    "fp32": torch.float32, "float32": torch.float32,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp16": torch.float16, "float16": torch.float16,
}  # fmt: skip
_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
# Files of a HF model directory that are weights (never copied from the template).
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".h5", ".msgpack", ".gguf")


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


def build_model_for_checkpoint(arch: ModelArchitecture, padded_vocab: int, dtype: torch.dtype):
    """A TP=1 local-spec model with uninitialised weights (they are about to be overwritten)."""
    config = build_transformer_config(arch, params_dtype=dtype, perform_initialization=False, use_cpu_initialization=True)
    return build_gpt_model(arch, config, vocab_size=padded_vocab, backend="local")


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
) -> Dict[str, Any]:
    """Convert a HF checkpoint directory into a Megatron ``dist_checkpointing`` checkpoint; returns its metadata.

    ``dtype`` defaults to the HF config's ``torch_dtype``/``dtype`` (float32 if absent). Every parameter of
    the Megatron model must be filled and every HF tensor consumed; otherwise the error names the tensors. A
    missing ``config.json`` or a missing / truncated shard raises
    :class:`~megatron_offgrpo.models.errors.CheckpointFormatError` naming the file, before the model is built.
    ``offgrpo_model.json`` records the real (``vocab_size``) and padded (``padded_vocab_size``) vocabulary.
    """
    hf_cfg = load_hf_config(hf_dir)
    arch = model_config_from_hf(hf_cfg)
    _validate_layout(arch, tp, pp, ep)
    dtype = parse_dtype(dtype) or parse_dtype(hf_cfg.get("torch_dtype") or hf_cfg.get("dtype") or "float32")
    padded = arch.padded_vocab_size(tp, make_vocab_size_divisible_by)
    if os.path.isdir(out_dir) and os.listdir(out_dir):
        raise FileExistsError(f"output directory {out_dir} is not empty")
    # Opening the reader checks every shard's header against its size: a truncated download fails here, naming
    # the file, before a (possibly 100 GB) model is built.
    reader = SafetensorsReader(hf_dir)

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
    meta = dict(source=os.path.abspath(hf_dir), source_format="hf", target_tp=tp, target_pp=pp, target_ep=ep,
                dtype=_DTYPE_NAMES[dtype], make_vocab_size_divisible_by=make_vocab_size_divisible_by)
    write_checkpoint_metadata(out_dir, arch, padded, **meta)
    return {"architecture": arch, "vocab_size": arch.vocab_size, "padded_vocab_size": padded, **meta}


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


def convert_mcore_to_hf(
    ckpt_dir: str,
    hf_template: str,
    out_dir: str,
    *,
    dtype: Union[str, torch.dtype, None] = None,
    max_shard_bytes: int = 5 * 1024**3,
    progress: bool = True,
) -> Dict[str, str]:
    """Export a Megatron checkpoint as a HF model directory loadable by ``transformers`` and vLLM.

    The architecture comes from ``hf_template``'s ``config.json`` (checked against the checkpoint's recorded
    one); vocabulary padding is stripped; weights are written as sharded safetensors with an index, in
    ``dtype`` (default: the checkpoint's); config, tokenizer and generation files are copied from the template.
    Returns the weight map. A missing or damaged file (the template's ``config.json``, a truncated ``.distcp``,
    a corrupt ``offgrpo_model.json``) raises :class:`~megatron_offgrpo.models.errors.CheckpointFormatError`
    naming it, before the model is built.
    """
    arch = model_config_from_hf(hf_template)
    # Every file of the checkpoint is checked before the model is built (stat + metadata only).
    verify_checkpoint_files(ckpt_dir)
    meta = read_checkpoint_metadata(ckpt_dir)  # optional (not every saver writes it); validated when present
    _check_template(arch, meta.get("architecture") if meta else None)
    padded = checkpoint_padded_vocab_size(ckpt_dir)
    if padded < arch.vocab_size:
        raise ShapeMismatchError(f"checkpoint embedding has {padded} rows < template vocab_size {arch.vocab_size}")
    src_dtype = checkpoint_dtype(ckpt_dir)
    out_dtype = parse_dtype(dtype) or src_dtype
    if os.path.isdir(out_dir) and os.listdir(out_dir):
        raise FileExistsError(f"output directory {out_dir} is not empty")

    ensure_single_process_parallel_state()
    model = build_model_for_checkpoint(arch, padded, src_dtype)
    load_model_checkpoint(model, ckpt_dir)
    state = {k: v for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}

    def get(name: str) -> torch.Tensor:
        if name not in state:
            raise MissingTensorError(f"tensor {name!r} not in the Megatron checkpoint {ckpt_dir}")
        return state[name]

    writer = ShardedSafetensorsWriter(out_dir, max_shard_bytes=max_shard_bytes)
    pairs = mcore_to_hf_tensors(arch, get, padded)
    total = len(expected_hf_shapes(arch))
    for name, tensor in tqdm(pairs, total=total, desc="mcore->hf", unit="tensor", disable=not progress):
        writer.add(name, tensor.to(out_dtype))
    weight_map = writer.finish()
    _copy_template_files(hf_template, out_dir, out_dtype)
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
    cfg = load_hf_config(hf_template)
    # transformers 4 reads torch_dtype, transformers 5 writes dtype: keep both consistent with the weights.
    for key in ("torch_dtype", "dtype"):
        if key in cfg or key == "torch_dtype":
            cfg[key] = _DTYPE_NAMES[dtype]
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
