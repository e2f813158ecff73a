"""A tiny Megatron-Core GPTModel for the multi-rank tests, built straight from Megatron (not via our providers)."""

from __future__ import annotations

import re
from typing import Dict

import torch

VOCAB = 64
SEQ = 16
LAYERS = 4


def build_tiny_gpt(seed: int = 7, layers: int = LAYERS):
    """Qwen-like tiny model (RMSNorm, SwiGLU, GQA, RoPE, untied output) for the current parallel state.

    ``use_cpu_initialization`` draws each full weight from the default generator and then splits it, so the
    same seed gives the same weights under every TP size.
    """
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer import TransformerConfig

    config = TransformerConfig(
        num_layers=layers,
        hidden_size=32,
        num_attention_heads=4,
        num_query_groups=2,
        ffn_hidden_size=64,
        use_cpu_initialization=True,
        params_dtype=torch.float32,
        pipeline_dtype=torch.float32,
        tensor_model_parallel_size=ps.get_tensor_model_parallel_world_size(),
        pipeline_model_parallel_size=ps.get_pipeline_model_parallel_world_size(),
        hidden_dropout=0.0,
        attention_dropout=0.0,
        normalization="RMSNorm",
        gated_linear_unit=True,
        activation_func=torch.nn.functional.silu,
        add_bias_linear=False,
    )
    torch.manual_seed(seed)
    return GPTModel(
        config=config,
        transformer_layer_spec=get_gpt_layer_local_spec(normalization="RMSNorm"),
        vocab_size=VOCAB,
        max_sequence_length=SEQ,
        pre_process=ps.is_pipeline_first_stage(),
        post_process=ps.is_pipeline_last_stage(),
        share_embeddings_and_output_weights=False,
        position_embedding_type="rope",
    )


def pipeline_stage_state_dict(full: Dict[str, torch.Tensor], stage: int, num_stages: int,
                              layers: int = LAYERS) -> Dict[str, torch.Tensor]:
    """The entries of a TP=1 / PP=1 state dict that pipeline stage ``stage`` holds, with local layer numbers."""
    per_stage = layers // num_stages
    out = {}
    for key, value in full.items():
        m = re.match(r"decoder\.layers\.(\d+)\.(.*)", key)
        if m:
            layer = int(m.group(1))
            if stage * per_stage <= layer < (stage + 1) * per_stage:
                out[f"decoder.layers.{layer - stage * per_stage}.{m.group(2)}"] = value
        elif key.startswith("embedding.") and stage == 0:
            out[key] = value
        elif (key.startswith("decoder.final_layernorm") or key.startswith("output_layer")) and stage == num_stages - 1:
            out[key] = value
    return out


def global_layer_key(key: str, stage: int, num_stages: int, layers: int = LAYERS) -> str:
    """Inverse of the renumbering in :func:`pipeline_stage_state_dict`."""
    per_stage = layers // num_stages
    return re.sub(r"decoder\.layers\.(\d+)\.", lambda m: f"decoder.layers.{int(m.group(1)) + stage * per_stage}.", key)
