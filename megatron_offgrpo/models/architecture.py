"""Model architecture description shared by the checkpoint converters and the trainer.

:class:`ModelArchitecture` is the single, framework-neutral description of a decoder-only model that this
project can train: it is read from a Hugging Face ``config.json`` (:func:`model_config_from_hf`) and turned
into a Megatron-Core ``TransformerConfig`` / ``GPTModel`` by :mod:`megatron_offgrpo.models.provider`.

Only what Megatron's GPT model reproduces *exactly* is accepted. Anything else (sliding-window attention,
rope scaling, shared experts, dense layers inside an MoE stack, biases on the MLP, ...) raises
:class:`UnsupportedArchitectureError` naming the offending field, because a converter that silently drops a
detail trains a broken model without any error.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any, Dict, Mapping, Optional, Union

from megatron_offgrpo.models.errors import CorruptCheckpointFileError, MissingCheckpointFileError

__all__ = [
    "ModelArchitecture",
    "UnsupportedArchitectureError",
    "SUPPORTED_FAMILIES",
    "model_config_from_hf",
    "load_hf_config",
    "read_config_json",
    "padded_vocab_size",
    "tiny_architecture",
]

#: HF ``model_type`` -> project family name.
SUPPORTED_FAMILIES: Dict[str, str] = {
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "qwen3_moe": "qwen3_moe",
    "llama": "llama",
}


class UnsupportedArchitectureError(ValueError):
    """The HF config describes a model (or a feature of one) that Megatron's GPT model cannot reproduce."""


@dataclass(frozen=True)
class ModelArchitecture:
    """Everything needed to build the Megatron model and map weights to and from Hugging Face.

    Sizes are the *unpadded* HF values; the TP-dependent padded vocabulary is computed by
    :func:`padded_vocab_size` (and recorded in converted checkpoints).
    """

    family: str  # one of SUPPORTED_FAMILIES' values, or "tiny"
    num_layers: int
    hidden_size: int
    ffn_hidden_size: int  # dense MLP width (for MoE: HF ``intermediate_size``, unused by all-sparse stacks)
    num_attention_heads: int
    num_query_groups: int  # = num_key_value_heads
    head_dim: int  # Megatron ``kv_channels``; may differ from hidden_size / heads (Qwen3-30B-A3B)
    vocab_size: int  # rows of HF's embedding matrix (already >= tokenizer size)
    max_position_embeddings: int
    rope_theta: float
    norm_eps: float
    tie_word_embeddings: bool
    qkv_bias: bool
    qk_norm: bool
    num_experts: Optional[int] = None  # None = dense MLP
    moe_ffn_hidden_size: Optional[int] = None
    moe_router_topk: Optional[int] = None
    moe_norm_topk_prob: bool = True
    initializer_range: float = 0.02
    hf_architecture: Optional[str] = None  # e.g. "Qwen3ForCausalLM", for writing configs back
    extra: Dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def is_moe(self) -> bool:
        """True when every decoder layer has a routed MoE MLP."""
        return bool(self.num_experts)

    def padded_vocab_size(self, tp: int = 1, make_vocab_size_divisible_by: int = 128) -> int:
        """The embedding rows Megatron uses at tensor-parallel size ``tp`` (see :func:`padded_vocab_size`)."""
        return padded_vocab_size(self.vocab_size, tp, make_vocab_size_divisible_by)

    def to_dict(self) -> Dict[str, Any]:
        """JSON-serialisable form (recorded next to converted checkpoints)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ModelArchitecture":
        """Inverse of :meth:`to_dict`; unknown keys are an error (a newer writer, an older reader)."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown ModelArchitecture fields: {sorted(unknown)}")
        return cls(**dict(d))


def padded_vocab_size(vocab_size: int, tp: int = 1, make_vocab_size_divisible_by: int = 128) -> int:
    """Round ``vocab_size`` up to a multiple of ``make_vocab_size_divisible_by * tp`` (Megatron-LM's rule).

    Each TP rank then holds an equal, aligned slice of the embedding / output layer. The extra rows are zero
    in converted checkpoints and their logits must be stripped before any comparison or export.
    """
    if vocab_size <= 0 or tp <= 0 or make_vocab_size_divisible_by <= 0:
        raise ValueError(f"invalid vocab padding arguments: {vocab_size=}, {tp=}, {make_vocab_size_divisible_by=}")
    multiple = make_vocab_size_divisible_by * tp
    return ((vocab_size + multiple - 1) // multiple) * multiple


def read_config_json(source: Union[str, os.PathLike, Mapping[str, Any]]) -> Dict[str, Any]:
    """A ``config.json`` exactly as written, as a dict: from a dict, the file's path or a model directory.

    Raises :class:`~megatron_offgrpo.models.errors.MissingCheckpointFileError` (a ``FileNotFoundError``) when
    the directory or its ``config.json`` does not exist and
    :class:`~megatron_offgrpo.models.errors.CorruptCheckpointFileError` (a ``ValueError``) when the file is
    not a JSON object; both messages name the path.
    """
    if isinstance(source, Mapping):
        return dict(source)
    path = _config_path(source)
    try:
        with open(path) as f:
            cfg = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CorruptCheckpointFileError(
            f"{path} is not valid JSON ({e}): restore the model's config.json from its source", path=path
        ) from None
    if not isinstance(cfg, dict):
        raise CorruptCheckpointFileError(f"{path} is not a JSON object: restore the model's config.json", path=path)
    return cfg


def _config_path(source: Union[str, os.PathLike]) -> str:
    path = os.fspath(source)
    if os.path.isdir(path):
        path = os.path.join(path, "config.json")
    if not os.path.isfile(path):
        parent = os.path.dirname(path) or "."
        missing = path if os.path.isdir(parent) else f"directory {parent}"
        raise MissingCheckpointFileError(
            f"{missing} not found: pass the Hugging Face model directory that holds config.json "
            "(and the *.safetensors weights)",
            path=path,
        )
    return path


def load_hf_config(source: Union[str, os.PathLike, Mapping[str, Any]]) -> Dict[str, Any]:
    """A HF config as a plain dict with its family's defaults filled in, from a dict, a path or a directory.

    The file is read by :func:`read_config_json` (same errors, naming the path), then, for a supported
    ``model_type``, passed through ``transformers.AutoConfig`` so that every field the file leaves out takes
    the value ``transformers`` itself would build the model with (its ``to_dict()``). A config of another
    ``model_type`` is returned as read (:func:`model_config_from_hf` refuses it naming the type). Values that
    ``transformers`` rejects raise :class:`~megatron_offgrpo.models.errors.CorruptCheckpointFileError` naming
    the file.
    """
    raw = read_config_json(source)
    model_type = raw.get("model_type")
    if model_type not in SUPPORTED_FAMILIES:
        return raw
    from transformers import AutoConfig

    where = "the config" if isinstance(source, Mapping) else _config_path(source)
    try:
        config = AutoConfig.for_model(model_type, **{k: v for k, v in raw.items() if k != "model_type"})
    except _config_errors() as e:
        reason = " ".join(str(e).split())
        raise CorruptCheckpointFileError(
            f"{where}: transformers cannot build a {model_type} config from it ({reason}): fix the field it names",
            path=None if isinstance(source, Mapping) else where,
        ) from None
    return config.to_dict()


def _config_errors() -> tuple:
    """What ``AutoConfig`` raises for a bad field (recent versions validate fields through huggingface_hub)."""
    errors: tuple = (ValueError, TypeError, KeyError)
    try:
        from huggingface_hub.errors import StrictDataclassError
    except ImportError:  # older huggingface_hub: the built-in errors only
        return errors
    return errors + (StrictDataclassError,)


def _rope_theta(cfg: Mapping[str, Any]) -> float:
    """rope theta from either the classic ``rope_theta`` key or transformers-5 ``rope_parameters``."""
    params = cfg.get("rope_parameters")
    scaling = cfg.get("rope_scaling")
    for p in (params, scaling):
        if isinstance(p, Mapping):
            rope_type = p.get("rope_type", p.get("type", "default"))
            if rope_type not in (None, "default"):
                raise UnsupportedArchitectureError(
                    f"rope scaling type {rope_type!r} is not supported (only plain RoPE is reproduced exactly)"
                )
    if isinstance(params, Mapping) and "rope_theta" in params:
        return float(params["rope_theta"])
    if "rope_theta" in cfg:
        return float(cfg["rope_theta"])
    return 10000.0  # the transformers default for every supported family


def _require(cfg: Mapping[str, Any], key: str) -> Any:
    if key not in cfg or cfg[key] is None:
        raise UnsupportedArchitectureError(f"config.json lacks required field {key!r}")
    return cfg[key]


def model_config_from_hf(hf_config: Union[str, os.PathLike, Mapping[str, Any]]) -> ModelArchitecture:
    """Read a HF ``config.json`` (dict, file or directory) into a :class:`ModelArchitecture`.

    Raises :class:`UnsupportedArchitectureError` for a model type outside :data:`SUPPORTED_FAMILIES` or for a
    feature Megatron's GPT model would not reproduce.
    """
    cfg = load_hf_config(hf_config)
    model_type = cfg.get("model_type")
    if model_type not in SUPPORTED_FAMILIES:
        archs = cfg.get("architectures")
        raise UnsupportedArchitectureError(
            f"unsupported architecture: model_type={model_type!r} (architectures={archs}); "
            f"supported model types: {sorted(SUPPORTED_FAMILIES)}"
        )
    family = SUPPORTED_FAMILIES[model_type]

    act = cfg.get("hidden_act", "silu")
    if act != "silu":
        raise UnsupportedArchitectureError(f"hidden_act={act!r} is not supported (SwiGLU with silu only)")
    if cfg.get("use_sliding_window", False):
        raise UnsupportedArchitectureError("use_sliding_window=true is not supported (full causal attention only)")
    if cfg.get("mlp_bias", False):
        raise UnsupportedArchitectureError("mlp_bias=true is not supported")

    hidden = int(_require(cfg, "hidden_size"))
    heads = int(_require(cfg, "num_attention_heads"))
    kv_heads = int(cfg.get("num_key_value_heads") or heads)
    head_dim = int(cfg.get("head_dim") or hidden // heads)
    if heads % kv_heads:
        raise UnsupportedArchitectureError(f"num_attention_heads={heads} not divisible by num_key_value_heads={kv_heads}")

    # Bias on q/k/v only: Qwen2 always has it; Qwen3 / Llama through attention_bias, where Llama would also put
    # a bias on o_proj, which Megatron cannot express without biasing the MLP too.
    if family == "qwen2":
        qkv_bias = True
    else:
        qkv_bias = bool(cfg.get("attention_bias", False))
        if qkv_bias and family == "llama":
            raise UnsupportedArchitectureError("llama with attention_bias=true (o_proj bias) is not supported")
    qk_norm = family in ("qwen3", "qwen3_moe")

    num_experts = moe_ffn = topk = None
    norm_topk = True
    if family == "qwen3_moe":
        num_experts = int(cfg.get("num_experts") or cfg.get("num_local_experts") or 0)
        if num_experts <= 0:
            raise UnsupportedArchitectureError("qwen3_moe config lacks num_experts")
        moe_ffn = int(_require(cfg, "moe_intermediate_size"))
        topk = int(_require(cfg, "num_experts_per_tok"))
        norm_topk = bool(cfg.get("norm_topk_prob", False))
        if int(cfg.get("decoder_sparse_step", 1)) != 1 or cfg.get("mlp_only_layers"):
            raise UnsupportedArchitectureError(
                "qwen3_moe with dense layers (decoder_sparse_step != 1 or mlp_only_layers) is not supported"
            )
        if cfg.get("shared_expert_intermediate_size"):
            raise UnsupportedArchitectureError("MoE with a shared expert is not supported")

    return ModelArchitecture(
        family=family,
        num_layers=int(_require(cfg, "num_hidden_layers")),
        hidden_size=hidden,
        ffn_hidden_size=int(_require(cfg, "intermediate_size")),
        num_attention_heads=heads,
        num_query_groups=kv_heads,
        head_dim=head_dim,
        vocab_size=int(_require(cfg, "vocab_size")),
        max_position_embeddings=int(cfg.get("max_position_embeddings") or 4096),
        rope_theta=_rope_theta(cfg),
        norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        qkv_bias=qkv_bias,
        qk_norm=qk_norm,
        num_experts=num_experts,
        moe_ffn_hidden_size=moe_ffn,
        moe_router_topk=topk,
        moe_norm_topk_prob=norm_topk,
        initializer_range=float(cfg.get("initializer_range", 0.02)),
        hf_architecture=(cfg.get("architectures") or [None])[0],
    )


def tiny_architecture(vocab_size: int = 256, num_layers: int = 2, hidden_size: int = 64) -> ModelArchitecture:
    """A Qwen3-shaped toy model for the CPU demo and tests (q/k norm, GQA, untied embeddings)."""
    return ModelArchitecture(
        family="tiny",
        num_layers=num_layers,
        hidden_size=hidden_size,
        ffn_hidden_size=2 * hidden_size,
        num_attention_heads=4,
        num_query_groups=2,
        head_dim=hidden_size // 4,
        vocab_size=vocab_size,
        max_position_embeddings=2048,
        rope_theta=10000.0,
        norm_eps=1e-6,
        tie_word_embeddings=False,
        qkv_bias=False,
        qk_norm=True,
        hf_architecture="Qwen3ForCausalLM",
    )
