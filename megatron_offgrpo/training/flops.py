"""The one FLOP estimate of a training step (the trainer's TFLOP/s metric and the benchmarks' MFU)."""

from __future__ import annotations


def matmul_parameters(num_parameters: float, arch, padded_vocab_size: int) -> float:
    """Parameters that take part in a matmul: all of them, except an untied input embedding (a lookup)."""
    return num_parameters - (0 if arch.tie_word_embeddings else padded_vocab_size * arch.hidden_size)


def train_flops_per_token(num_parameters: float, arch, padded_vocab_size: int, seq_length: int) -> float:
    """Forward + backward FLOPs per token of a dense transformer: ``6 N`` for the matmul parameters ``N``, plus
    causal self-attention's ``QK^T`` and ``AV`` (``6 * layers * heads * head_dim * seq_length``).

    ``num_parameters`` is the whole model's count (all TP / PP ranks together; for MoE, count the parameters a
    token actually uses). ``seq_length`` is the padded sequence length the attention runs over.
    """
    attention = 6 * arch.num_layers * arch.num_attention_heads * arch.head_dim * seq_length
    return 6 * matmul_parameters(num_parameters, arch, padded_vocab_size) + attention
