"""Parity between a Megatron ``GPTModel`` and its Hugging Face original (``tools/checkpoint/check_parity``).

Two comparisons, both needed:

* logits over the real vocabulary (padded columns stripped): the weights were mapped right;
* next-token log-probs over the real vocabulary, the Megatron side computed the way the trainer computes them
  (:func:`megatron_offgrpo.losses.vocab_parallel_logprobs` on the vocab-parallel logits, with the real
  ``vocab_size``): the padded columns stay out of the softmax. Stripping the padding before comparing logits
  cannot see that: zero-weight padding rows give logit 0, which silently enters an unrestricted softmax.
"""

from __future__ import annotations

from typing import Dict

import torch

__all__ = [
    "megatron_vocab_parallel_logits",
    "gather_real_vocab_logits",
    "megatron_logits",
    "megatron_next_token_logprobs",
    "hf_logits",
    "reference_next_token_logprobs",
    "compare_logits",
    "compare_logprobs",
]


@torch.no_grad()
def megatron_vocab_parallel_logits(model, tokens: torch.Tensor) -> torch.Tensor:
    """This rank's vocab-parallel logits ``[batch, seq, V_padded / tp]`` of a PP=1 Megatron model (any TP)."""
    model.eval()
    b, s = tokens.shape
    position_ids = torch.arange(s, dtype=torch.long).unsqueeze(0).expand(b, s)
    return model(tokens, position_ids, None)  # causal mask is implied by the layer spec


@torch.no_grad()
def gather_real_vocab_logits(local_logits: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Full fp32 logits ``[..., vocab_size]`` from vocab-parallel shards: gathered over TP, padding stripped."""
    from megatron.core import tensor_parallel

    logits = tensor_parallel.gather_from_tensor_model_parallel_region(local_logits)
    return logits[..., :vocab_size].float()


@torch.no_grad()
def megatron_logits(model, tokens: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Full-vocabulary fp32 logits ``[batch, seq, vocab_size]`` of a PP=1 Megatron model (any TP).

    The vocab-parallel shards are gathered over the TP group and the padded rows stripped: padding logits are
    an artefact of the layout and must never enter a comparison or a softmax.
    """
    return gather_real_vocab_logits(megatron_vocab_parallel_logits(model, tokens), vocab_size)


@torch.no_grad()
def megatron_next_token_logprobs(local_logits: torch.Tensor, tokens: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """fp32 ``[batch, seq - 1]``: log p(tokens[:, t + 1] | tokens[:, :t + 1]) from vocab-parallel logits.

    Computed by the trainer's own :func:`~megatron_offgrpo.losses.vocab_parallel_logprobs` with the real
    ``vocab_size``, so the padded columns are excluded from the softmax exactly as in training.
    """
    from megatron_offgrpo.losses import vocab_parallel_logprobs

    return vocab_parallel_logprobs(local_logits[:, :-1], tokens[:, 1:], vocab_size=vocab_size)


@torch.no_grad()
def hf_logits(hf_model, tokens: torch.Tensor) -> torch.Tensor:
    """fp32 logits of a ``transformers`` causal LM on ``tokens`` (no padding, so no attention mask needed)."""
    hf_model.eval()
    return hf_model(input_ids=tokens).logits.float()


def reference_next_token_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """float64 ``[batch, seq - 1]`` next-token log-probs from full real-vocabulary logits (the HF reference).

    float64 so that the reference's own rounding is negligible next to the tolerance being checked.
    """
    logp = torch.log_softmax(logits[:, :-1].double(), dim=-1)
    return logp.gather(-1, tokens[:, 1:, None].long()).squeeze(-1)


def compare_logits(reference: torch.Tensor, other: torch.Tensor) -> Dict[str, float]:
    """Max / mean absolute difference and top-1 agreement of two logit tensors of the same shape."""
    if reference.shape != other.shape:
        raise ValueError(f"logit shapes differ: {tuple(reference.shape)} vs {tuple(other.shape)}")
    diff = (reference.float() - other.float()).abs()
    top1 = (reference.argmax(-1) == other.argmax(-1)).float().mean()
    return {"max_abs_diff": diff.max().item(), "mean_abs_diff": diff.mean().item(), "top1_agreement": top1.item()}


def compare_logprobs(reference: torch.Tensor, other: torch.Tensor) -> Dict[str, float]:
    """Max / mean absolute difference (in float64) of two next-token log-prob tensors of the same shape."""
    if reference.shape != other.shape:
        raise ValueError(f"log-prob shapes differ: {tuple(reference.shape)} vs {tuple(other.shape)}")
    diff = (reference.double() - other.double()).abs()
    return {"max_abs_logprob_diff": diff.max().item(), "mean_abs_logprob_diff": diff.mean().item()}
