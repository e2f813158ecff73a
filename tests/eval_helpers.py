"""Helpers for the evaluation tests: tiny HF models whose generations are known in advance.

:func:`save_chain_model` writes a random-free Qwen2 (fp32, head_dim 32) over the tiny tokenizer whose greedy *and*
sampled (temperature 0.6) continuation of any chat prompt is a planted text, e.g. ``\\boxed{7}`` then
``<|im_end|>``: every attention output and MLP projection is zero, so the last hidden state is the current token's
embedding alone (a bigram model); embeddings are one-hot on a few dimensions and the output layer maps each chain
token to its successor with a logit margin of 40 (other tokens' probability < 1e-25 at temperature 0.6). Every
prompt ends with the chat template's ``assistant\\n``, so the chain starts at ``\\n``. The planted text's
characters must be distinct (one successor per token).
"""

from __future__ import annotations

import os
import shutil
from fractions import Fraction
from typing import Optional

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_TOKENIZER = os.path.join(REPO, "examples", "tiny_tokenizer")
SYNTHETIC = os.path.join(REPO, "examples", "benchmarks", "synthetic_arith.jsonl")


def save_chain_model(path: str, text: str, hidden: int = 64, layers: int = 2) -> None:
    """Save at ``path`` an HF Qwen2 model + the tiny tokenizer that answers every prompt with ``text`` + EOS."""
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(TINY_TOKENIZER)
    ids = tok.encode(text, add_special_tokens=False)
    start = tok.encode("\n", add_special_tokens=False)
    chain = start + ids + [tok.eos_token_id]
    if len(set(chain[:-1])) != len(chain) - 1 or len(chain) - 1 > hidden:
        raise ValueError(f"the planted text must have distinct characters (and not start with a newline): {text!r}")
    config = transformers.Qwen2Config(
        vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=hidden // 32, num_key_value_heads=hidden // 32, head_dim=32, max_position_embeddings=1024,
        tie_word_embeddings=False, rms_norm_eps=1e-6, rope_parameters={"rope_type": "default", "rope_theta": 1e6},
        eos_token_id=tok.eos_token_id, bos_token_id=None, pad_token_id=tok.pad_token_id, torch_dtype="float32")
    model = transformers.Qwen2ForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
            else:
                p.zero_()
        emb, head = model.model.embed_tokens.weight, model.lm_head.weight
        for dim, (cur, nxt) in enumerate(zip(chain[:-1], chain[1:])):
            emb[cur, dim] = 1.0
            # RMSNorm of a one-hot vector is sqrt(hidden) times it: logit = 5 * sqrt(64) = 40.
            head[nxt, dim] = 5.0
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(path)
    tok.save_pretrained(path)
    for name in ("chat_template.jinja",):
        src = os.path.join(TINY_TOKENIZER, name)
        if os.path.exists(src) and not os.path.exists(os.path.join(path, name)):
            shutil.copy(src, os.path.join(path, name))


def parse_exact(answer: str) -> Optional[Fraction]:
    """An exact value for the synthetic benchmark's answers (``7``, ``-3``, ``\\frac{22}{5}``); None otherwise.
    Independent of the project's grader: the oracle of the end-to-end tests."""
    import re

    a = answer.strip()
    if re.fullmatch(r"-?\d+", a):
        return Fraction(int(a))
    m = re.fullmatch(r"(-?)\\frac\{(\d+)\}\{(\d+)\}", a)
    if m:
        v = Fraction(int(m.group(2)), int(m.group(3)))
        return -v if m.group(1) else v
    return None
