"""Model providers (HF config -> Megatron-Core GPTModel) and HF <-> Megatron checkpoint conversion.

Trainer-facing API::

    arch = model_config_from_hf("/path/to/hf_model")          # or a dict, or tiny_architecture()
    cfg = build_transformer_config(arch, tp=2, pp=1, params_dtype=torch.bfloat16)
    model = build_gpt_model(arch, cfg, pre_process, post_process,
                            vocab_size=checkpoint_padded_vocab_size(ckpt_dir))
    load_model_checkpoint(model, ckpt_dir)     # or, from scratch: zero_padded_vocab_rows(model, arch.vocab_size)
    real_vocab = checkpoint_vocab_size(ckpt_dir)   # logit columns >= real_vocab are padding

A missing or damaged checkpoint file raises a :class:`CheckpointFormatError` naming it.

Heavy modules (Megatron, safetensors) are imported by the functions that need them, so importing this
package is cheap.
"""

from megatron_offgrpo.models.architecture import (
    SUPPORTED_FAMILIES,
    ModelArchitecture,
    UnsupportedArchitectureError,
    load_hf_config,
    model_config_from_hf,
    padded_vocab_size,
    tiny_architecture,
)
from megatron_offgrpo.models.checkpoint import (
    checkpoint_padded_vocab_size,
    checkpoint_vocab_size,
    load_model_checkpoint,
    read_checkpoint_metadata,
    save_model_checkpoint,
    verify_checkpoint_files,
    write_checkpoint_metadata,
    zero_padded_vocab_rows,
)
from megatron_offgrpo.models.conversion import MissingTensorError, ShapeMismatchError
from megatron_offgrpo.models.errors import (
    CheckpointFormatError,
    CorruptCheckpointFileError,
    MissingCheckpointFileError,
    TruncatedCheckpointFileError,
)
from megatron_offgrpo.models.provider import build_gpt_model, build_transformer_config
from megatron_offgrpo.models.specs import build_layer_spec, register_attention_backend, te_available

__all__ = [
    "SUPPORTED_FAMILIES",
    "ModelArchitecture",
    "UnsupportedArchitectureError",
    "ShapeMismatchError",
    "MissingTensorError",
    "CheckpointFormatError",
    "MissingCheckpointFileError",
    "CorruptCheckpointFileError",
    "TruncatedCheckpointFileError",
    "load_hf_config",
    "model_config_from_hf",
    "padded_vocab_size",
    "tiny_architecture",
    "build_transformer_config",
    "build_gpt_model",
    "build_layer_spec",
    "register_attention_backend",
    "te_available",
    "checkpoint_padded_vocab_size",
    "checkpoint_vocab_size",
    "zero_padded_vocab_rows",
    "verify_checkpoint_files",
    "load_model_checkpoint",
    "save_model_checkpoint",
    "read_checkpoint_metadata",
    "write_checkpoint_metadata",
]
