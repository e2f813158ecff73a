"""Logit parity between a Megatron ``GPTModel`` and its Hugging Face original (``tools/checkpoint/check_parity``)."""

from __future__ import annotations

from typing import Dict

import torch

__all__ = ["megatron_logits", "hf_logits", "compare_logits"]


@torch.no_grad()
def megatron_logits(model, tokens: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Full-vocabulary fp32 logits ``[batch, seq, vocab_size]`` of a PP=1 Megatron model (any TP).

    The vocab-parallel shards are gathered over the TP group and the padded rows stripped: padding logits are
    an artefact of the layout and must never enter a comparison or a softmax.
    """
    from megatron.core import tensor_parallel

    model.eval()
    b, s = tokens.shape
    position_ids = torch.arange(s, dtype=torch.long).unsqueeze(0).expand(b, s)
    logits = model(tokens, position_ids, None)  # causal mask is implied by the layer spec
    logits = tensor_parallel.gather_from_tensor_model_parallel_region(logits)
    return logits[..., :vocab_size].float()


@torch.no_grad()
def hf_logits(hf_model, tokens: torch.Tensor) -> torch.Tensor:
    """fp32 logits of a ``transformers`` causal LM on ``tokens`` (no padding, so no attention mask needed)."""
    hf_model.eval()
    return hf_model(input_ids=tokens).logits.float()


def compare_logits(reference: torch.Tensor, other: torch.Tensor) -> Dict[str, float]:
    """Max / mean absolute difference and top-1 agreement of two logit tensors of the same shape."""
    if reference.shape != other.shape:
        raise ValueError(f"logit shapes differ: {tuple(reference.shape)} vs {tuple(other.shape)}")
    diff = (reference.float() - other.float()).abs()
    top1 = (reference.argmax(-1) == other.argmax(-1)).float().mean()
    return {"max_abs_diff": diff.max().item(), "mean_abs_diff": diff.mean().item(), "top1_agreement": top1.item()}
