"""Chat-template tokenization of (problem, response) pairs into one training sequence per trajectory.

Layout: ``prompt_ids = encode(chat_template([user: problem], add_generation_prompt=True))`` followed by
``response_ids = encode(response) + [eos]``. The prompt is exactly what the model sees at generation time, and the
response is tokenized on its own so that the prompt/response boundary never falls inside a merged token.
``eos`` is the tokenizer's EOS (``<|im_end|>`` for Qwen instruct / ChatML models, the end of the assistant turn).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

OVERLONG_MODES = ("reject", "truncate")


def load_tokenizer(name_or_path: str):
    """``AutoTokenizer`` from a local path or an already-cached hub name (never downloads at run time)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(name_or_path, local_files_only=True)


def tokenizer_fingerprint(tokenizer: Any) -> Dict[str, Any]:
    """Identity of a tokenizer for the manifest: name, size, special ids, and a hash of vocab + chat template."""
    vocab = tokenizer.get_vocab()
    h = hashlib.sha256()
    h.update(json.dumps(sorted(vocab.items(), key=lambda kv: kv[1]), ensure_ascii=False).encode("utf-8"))
    h.update((tokenizer.chat_template or "").encode("utf-8"))
    return {
        "name_or_path": getattr(tokenizer, "name_or_path", None),
        "vocab_size": len(tokenizer),
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "sha256": h.hexdigest(),
    }


@dataclass
class TokenizedTrajectory:
    """Token ids of one trajectory, or the reason it was dropped."""

    tokens: Optional[np.ndarray]
    prompt_len: int
    truncated: bool = False
    reject_reason: Optional[str] = None
    detail: str = ""


class ChatTokenizer:
    """Turns a problem and its responses into sequences under ``max_seq_len``.

    Args:
        tokenizer: a ``transformers`` tokenizer with a chat template and an EOS token.
        max_seq_len: maximum tokens per sequence (prompt + response + EOS).
        overlong: ``reject`` drops an over-long trajectory (counted); ``truncate`` cuts its response to fit
            (no EOS then, and the sequence is flagged ``truncated``).
    """

    def __init__(self, tokenizer: Any, max_seq_len: int, overlong: str = "reject") -> None:
        if overlong not in OVERLONG_MODES:
            raise ValueError(f"overlong must be one of {OVERLONG_MODES}, got {overlong!r}")
        if tokenizer.chat_template is None:
            raise ValueError(f"tokenizer {getattr(tokenizer, 'name_or_path', '?')} has no chat template")
        if tokenizer.eos_token_id is None:
            raise ValueError(f"tokenizer {getattr(tokenizer, 'name_or_path', '?')} has no EOS token")
        self.tokenizer = tokenizer
        self.max_seq_len = int(max_seq_len)
        self.overlong = overlong
        self.eos_id = int(tokenizer.eos_token_id)

    def encode(self, text: str) -> List[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def prompt_ids(self, problem: str) -> List[int]:
        text = self.tokenizer.apply_chat_template(
            [{"role": "user", "content": problem}], add_generation_prompt=True, tokenize=False
        )
        return self.encode(text)

    def tokenize_group(self, problem: str, responses: List[str]) -> Tuple[List[int], List[TokenizedTrajectory]]:
        """Prompt ids and one :class:`TokenizedTrajectory` per response."""
        prompt = self.prompt_ids(problem)
        out: List[TokenizedTrajectory] = []
        for resp in responses:
            body = self.encode(resp) + [self.eos_id]
            n = len(prompt) + len(body)
            if n <= self.max_seq_len:
                out.append(TokenizedTrajectory(np.asarray(prompt + body, dtype=np.int64), len(prompt)))
            elif self.overlong == "truncate" and len(prompt) < self.max_seq_len:
                cut = prompt + body[: self.max_seq_len - len(prompt)]
                out.append(TokenizedTrajectory(np.asarray(cut, dtype=np.int64), len(prompt), truncated=True))
            else:
                reason = "prompt_too_long" if len(prompt) >= self.max_seq_len else "over_max_seq_len"
                out.append(TokenizedTrajectory(None, len(prompt), reject_reason=reason,
                                               detail=f"{n} tokens > max_seq_len {self.max_seq_len}"))
        return prompt, out
