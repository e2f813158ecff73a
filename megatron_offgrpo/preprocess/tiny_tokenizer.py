"""A tiny byte-level tokenizer with a ChatML (Qwen-style) chat template, built in-repo so that the CPU demo and
the tests never download anything.

Vocabulary: the 256 byte symbols of the GPT-2 byte-to-unicode map (so any UTF-8 text round-trips, no unknown
token), then the special tokens. No merges: one token per byte, which keeps the vocabulary tiny (261) at the cost of
long sequences -- fine for the synthetic arithmetic sample.
"""

from __future__ import annotations

import os
from typing import Optional

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>")

# ChatML as used by Qwen2/2.5 instruct models (no default system prompt): the prompt is the user turn plus the
# assistant header; the assistant turn ends with <|im_end|>, which is also the EOS the model generates.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

TINY_TOKENIZER_DIR = os.path.join(
    os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "examples", "tiny_tokenizer"
)


def _bytes_to_unicode() -> dict:
    """The reversible byte -> printable unicode map of byte-level BPE (printable bytes map to themselves)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def build_tiny_tokenizer():
    """Build the tiny tokenizer as a ``transformers.PreTrainedTokenizerFast`` (deterministic, offline)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    byte_map = _bytes_to_unicode()
    vocab = {byte_map[b]: b for b in range(256)}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=list(SPECIAL_TOKENS[1:2] + SPECIAL_TOKENS[3:]),
        model_max_length=1 << 20,
    )
    tok.chat_template = CHAT_TEMPLATE
    tok.name_or_path = "megatron-offgrpo/tiny-byte-tokenizer"
    return tok


def save_tiny_tokenizer(out_dir: str = TINY_TOKENIZER_DIR) -> str:
    """Write the tiny tokenizer's files (``save_pretrained``) to ``out_dir``; returns the directory."""
    build_tiny_tokenizer().save_pretrained(out_dir)
    return out_dir


def load_tiny_tokenizer(path: Optional[str] = None):
    """Load the shipped tiny tokenizer (``examples/tiny_tokenizer``), building it in memory if absent."""
    from transformers import AutoTokenizer

    path = path or TINY_TOKENIZER_DIR
    if os.path.exists(os.path.join(path, "tokenizer.json")):
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    return build_tiny_tokenizer()
