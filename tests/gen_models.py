"""Tiny Hugging Face models for the generation tests, written with ``transformers`` from a config and a seed.

Nothing is downloaded: the tokenizer is the in-repo byte-level one (``examples/tiny_tokenizer``, 261 ids, ChatML
template). ``head_dim`` is 32 because vLLM's CPU attention needs at least that.
"""

from __future__ import annotations

import os
from typing import Optional

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_TOKENIZER = os.path.join(REPO, "examples", "tiny_tokenizer")
TOKENIZER_VOCAB = 261


def write_tiny_hf_model(
    out_dir: str,
    *,
    family: str = "qwen3",
    seed: int = 0,
    vocab_size: int = TOKENIZER_VOCAB,
    hidden_size: int = 64,
    num_layers: int = 2,
    init_std: float = 0.1,
    boost_rows_from: Optional[int] = None,
    eos_scale: float = 1.0,
) -> str:
    """Write a random fp32 ``family`` (qwen3 | qwen2 | llama) model with the tiny tokenizer to ``out_dir``.

    ``init_std`` is larger than the usual 0.02 so that the random model's next-token distribution is peaked:
    greedy decoding then has no near-ties that float rounding could flip between two engines.
    ``boost_rows_from``: make every ``lm_head`` row at and after this id huge, so an unguarded engine would
    pick those ids (the padded-vocabulary guard test). ``eos_scale`` scales the EOS row of ``lm_head``: 3.0 makes
    greedy decoding of some prompts stop within a few dozen tokens and others not (both finish reasons occur).
    """
    import torch
    import transformers
    from transformers import AutoTokenizer

    heads, kv_heads, head_dim = 2, 1, 32
    common = dict(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
        max_position_embeddings=512, rms_norm_eps=1e-6, tie_word_embeddings=False, initializer_range=init_std,
        bos_token_id=None, eos_token_id=256, pad_token_id=257,  # the tiny tokenizer: <|im_end|>, <|endoftext|>
    )  # fmt: skip
    if family == "qwen3":
        config = transformers.Qwen3Config(head_dim=head_dim, **common)
        cls = transformers.Qwen3ForCausalLM
    elif family == "qwen2":
        config = transformers.Qwen2Config(**common)
        cls = transformers.Qwen2ForCausalLM
    elif family == "llama":
        config = transformers.LlamaConfig(head_dim=head_dim, **common)
        cls = transformers.LlamaForCausalLM
    else:
        raise ValueError(family)
    assert config.hidden_size // config.num_attention_heads == head_dim or family != "qwen2"
    torch.manual_seed(seed)
    model = cls(config).to(torch.float32).eval()
    with torch.no_grad():
        # Norm weights at 1 and zero biases carry no information; randomise them so that a converter that
        # drops them shows up.
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith(".bias"):
                p.add_(torch.randn_like(p) * 0.1)
        model.lm_head.weight[config.eos_token_id] *= eos_scale
        if boost_rows_from is not None:
            model.lm_head.weight[boost_rows_from:] = 5.0
    model.save_pretrained(out_dir, safe_serialization=True)
    tok = AutoTokenizer.from_pretrained(TINY_TOKENIZER, local_files_only=True)
    tok.save_pretrained(out_dir)
    return out_dir
