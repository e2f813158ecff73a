"""Build Megatron-Core ``TransformerConfig`` and ``GPTModel`` objects from a :class:`ModelArchitecture`.

These are the functions the trainer and the checkpoint converters share, so that a converted checkpoint and
the model that trains on it can never disagree on a layout detail. Parity settings that matter (checked
against ``transformers`` in tests/test_convert*.py):

* RoPE: HF Qwen/Llama rotate halves (non-interleaved) -> ``rotary_interleaved=False``; base = ``rope_theta``.
* softmax scale 1/sqrt(head_dim) (Megatron's default from ``kv_channels``), no query-key layer scaling.
* RMSNorm with the HF epsilon; q/k RMSNorm over ``head_dim`` for Qwen3.
* SwiGLU: ``linear_fc1`` = [gate; up].
* MoE (Qwen3-MoE): softmax over all experts then top-k, renormalised when ``norm_topk_prob``. Renormalised
  top-k of a softmax equals a softmax over the top-k logits, which is Megatron's ``moe_router_pre_softmax=False``;
  without renormalisation it is ``moe_router_pre_softmax=True``. No aux loss unless the trainer asks for it.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Optional

import torch

from megatron_offgrpo.models.architecture import ModelArchitecture
from megatron_offgrpo.models.specs import build_layer_spec, resolve_backend

__all__ = ["build_transformer_config", "build_gpt_model", "apply_mcore_compat_patches", "output_hidden_states"]


def apply_mcore_compat_patches() -> None:
    """Work around two Megatron-Core 0.16 MoE bugs, hit without Transformer Engine and on the CPU backend.

    * ``moe_utils`` only defines ``te_general_gemm`` when its TE import succeeds, but the MoE router's gating
      linear tests ``te_general_gemm is not None`` unconditionally -> ``NameError`` on any MoE forward without TE.
      Defining it as ``None`` selects the plain ``torch.mm`` path that the code already has.
    * Without CUDA, the all-to-all token dispatcher's ``maybe_move_tensor_to_cpu(..., as_numpy=True)`` leaves its
      split sizes as tensors (it converts only CUDA tensors), and ``all_to_all_single`` refuses them ("TypeError:
      all_to_all_single(): incompatible function arguments"). The dispatcher's own conversion is applied to CPU
      tensors too.
    """
    from megatron.core.transformer.moe import moe_utils, token_dispatcher

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None
    original = token_dispatcher.maybe_move_tensor_to_cpu
    if not torch.cuda.is_available() and not getattr(original, "offgrpo_cpu_splits", False):

        def move_to_cpu(tensor, as_numpy: bool = False, record_stream: bool = False):
            if as_numpy and torch.is_tensor(tensor) and not tensor.is_cuda:
                return tensor.numpy()
            return original(tensor, as_numpy=as_numpy, record_stream=record_stream)

        move_to_cpu.offgrpo_cpu_splits = True
        token_dispatcher.maybe_move_tensor_to_cpu = move_to_cpu


def build_transformer_config(
    arch: ModelArchitecture,
    *,
    tp: int = 1,
    pp: int = 1,
    ep: int = 1,
    cp: int = 1,
    params_dtype: torch.dtype = torch.float32,
    sequence_parallel: bool = False,
    use_cpu_initialization: Optional[bool] = None,
    perform_initialization: bool = True,
    fp8: Optional[str] = None,
    fp8_recipe: Optional[str] = None,
    moe_token_dispatcher_type: Optional[str] = None,
    moe_aux_loss_coeff: float = 0.0,
    **overrides: Any,
):
    """A ``TransformerConfig`` reproducing ``arch`` at the given parallel layout.

    ``params_dtype`` sets bf16/fp16 mixed precision flags accordingly. ``fp8`` / ``fp8_recipe`` pass through
    to Megatron (Transformer Engine backend only). ``overrides`` are forwarded to ``TransformerConfig``
    verbatim (recompute, overlap settings, ...) and win over everything set here.
    """
    from megatron.core.transformer import TransformerConfig

    on_cpu = not torch.cuda.is_available()
    if use_cpu_initialization is None:
        use_cpu_initialization = on_cpu
    if arch.num_attention_heads % tp or arch.num_query_groups % tp:
        raise ValueError(
            f"tp={tp} must divide num_attention_heads={arch.num_attention_heads} "
            f"and num_query_groups={arch.num_query_groups}"
        )

    kwargs: dict = dict(
        num_layers=arch.num_layers,
        hidden_size=arch.hidden_size,
        ffn_hidden_size=arch.ffn_hidden_size,
        num_attention_heads=arch.num_attention_heads,
        num_query_groups=arch.num_query_groups,
        kv_channels=arch.head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=arch.norm_eps,
        gated_linear_unit=True,
        activation_func=torch.nn.functional.silu,
        add_bias_linear=False,
        add_qkv_bias=arch.qkv_bias,
        qk_layernorm=arch.qk_norm,
        rotary_interleaved=False,
        apply_query_key_layer_scaling=False,
        attention_softmax_in_fp32=True,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=arch.initializer_range,
        # Fusions need CUDA kernels; the unfused paths are numerically the reference ones.
        bias_activation_fusion=not on_cpu,
        masked_softmax_fusion=not on_cpu,
        bias_dropout_fusion=not on_cpu,
        apply_rope_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        expert_model_parallel_size=ep,
        context_parallel_size=cp,
        sequence_parallel=sequence_parallel,
        params_dtype=params_dtype,
        pipeline_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        fp16=params_dtype == torch.float16,
        use_cpu_initialization=use_cpu_initialization,
        perform_initialization=perform_initialization,
    )
    if fp8 is not None:
        kwargs["fp8"] = fp8
        if fp8_recipe is not None:
            kwargs["fp8_recipe"] = fp8_recipe
    if arch.is_moe:
        apply_mcore_compat_patches()
        if moe_token_dispatcher_type is None:
            # All-to-all on CPU too (the CPU backend stubs its CUDA streams and events; see
            # apply_mcore_compat_patches): it takes a different token count from each EP rank, which the
            # all-gather dispatcher cannot (microbatches of different lengths on the EP ranks fail in its gather).
            moe_token_dispatcher_type = "alltoall"
        kwargs.update(
            num_moe_experts=arch.num_experts,
            moe_ffn_hidden_size=arch.moe_ffn_hidden_size,
            moe_router_topk=arch.moe_router_topk,
            moe_router_pre_softmax=not arch.moe_norm_topk_prob,
            moe_router_score_function="softmax",
            moe_router_dtype="fp32",  # HF computes the routing softmax in fp32
            moe_router_load_balancing_type="aux_loss" if moe_aux_loss_coeff > 0 else "none",
            moe_aux_loss_coeff=moe_aux_loss_coeff,
            moe_token_dispatcher_type=moe_token_dispatcher_type,
            moe_grouped_gemm=False,
            moe_permute_fusion=False,
        )
    kwargs.update(overrides)
    return TransformerConfig(**kwargs)


def build_gpt_model(
    arch: ModelArchitecture,
    transformer_config,
    pre_process: bool = True,
    post_process: bool = True,
    *,
    vocab_size: Optional[int] = None,
    make_vocab_size_divisible_by: int = 128,
    backend: str = "auto",
    attention_backend: str = "default",
    parallel_output: bool = True,
    vp_stage: Optional[int] = None,
):
    """The Megatron-Core ``GPTModel`` for ``arch``.

    ``vocab_size`` is the *padded* embedding size. Leave it ``None`` to pad for the config's TP; pass the
    value recorded in a checkpoint (:func:`megatron_offgrpo.models.checkpoint_padded_vocab_size`) when loading
    one, since a checkpoint's embedding shape is fixed when it is written.
    """
    from megatron.core.models.gpt import GPTModel

    if arch.is_moe:
        apply_mcore_compat_patches()
    tp = transformer_config.tensor_model_parallel_size
    if vocab_size is None:
        vocab_size = arch.padded_vocab_size(tp, make_vocab_size_divisible_by)
    if vocab_size < arch.vocab_size or vocab_size % tp:
        raise ValueError(f"padded vocab_size={vocab_size} must be >= {arch.vocab_size} and divisible by tp={tp}")
    backend = resolve_backend(backend)
    spec = build_layer_spec(arch, backend=backend, attention_backend=attention_backend)
    kwargs = {}
    if vp_stage is not None:
        kwargs["vp_stage"] = vp_stage
    return GPTModel(
        config=transformer_config,
        transformer_layer_spec=spec,
        vocab_size=vocab_size,
        max_sequence_length=arch.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        parallel_output=parallel_output,
        share_embeddings_and_output_weights=arch.tie_word_embeddings,
        position_embedding_type="rope",
        rotary_percent=1.0,
        rotary_base=arch.rope_theta,
        **kwargs,
    )


def _hand_hidden_states_through(input_, weight=None, runtime_gather_output=None):
    """``ColumnParallelLinear.forward``'s signature and ``(output, bias)`` result, without the matmul."""
    return input_, None


@contextlib.contextmanager
def output_hidden_states(model) -> Iterator[Optional[torch.Tensor]]:
    """Within the block, the GPTModel ``model`` (DDP-wrapped or not) returns its final hidden states instead of
    its logits, and the block receives the output weight the logits would have used; ``None`` off the last
    pipeline stage (which returns hidden states anyway).

    For ``loss.fused_output_layer`` (:mod:`megatron_offgrpo.losses.fused_output`): the loss applies the weight
    itself, tile by tile, so the ``[tokens, V/tp]`` logits never exist. The output layer is left exactly as it is
    (parameters, checkpoint keys, the tied-embedding and DDP hooks); only its ``forward`` hands its input
    through, for this block's calls only. The hidden states come out of GPTModel as the logits would: ``[b, s, H]``
    (``[b, s/tp, H]``, sequence-sharded, under sequence parallelism: the gather the output layer would do is the
    loss's now). The weight is the embedding's when the embeddings are tied, as GPTModel's own postprocess picks it.
    """
    from megatron.core.utils import unwrap_model

    gpt = unwrap_model(model)
    if not getattr(gpt, "post_process", False):
        yield None
        return
    if getattr(gpt.config, "mtp_num_layers", None):
        raise NotImplementedError("output_hidden_states: multi-token prediction applies the output layer itself")
    layer = gpt.output_layer
    weight = gpt.shared_embedding_or_output_weight() if gpt.share_embeddings_and_output_weights else layer.weight
    layer.forward = _hand_hidden_states_through  # an instance attribute: shadows the class's forward
    try:
        yield weight
    finally:
        del layer.forward
