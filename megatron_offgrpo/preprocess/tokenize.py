"""Chat-template tokenization of (problem, response) pairs into one training sequence per trajectory.

Layout: ``prompt_ids = encode(chat_template([user: problem], add_generation_prompt=True))`` followed by
``response_ids = encode(response) + [eos]``. The prompt is exactly what the model sees at generation time, and the
response is tokenized on its own so that the prompt/response boundary never falls inside a merged token.
``eos`` is the tokenizer's EOS (``<|im_end|>`` for Qwen instruct / ChatML models, the end of the assistant turn).

Two halves, so that the build's worker processes never import ``transformers`` (seconds of CPU per process): the
build's main process renders each problem's prompt with the tokenizer's own chat template
(:meth:`ChatTokenizer.prompt_text`, once per problem), and :class:`GroupEncoder` -- the same tokenizer's Rust
backend (``tokenizers``), rebuilt in a worker from its serialized state -- encodes a prompt and all the responses of
a group in one batch. ``ChatTokenizer.tokenize_group`` is the two halves in one process.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

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


def _layout(prompt: List[int], bodies: Sequence[List[int]], eos_id: int, max_seq_len: int, overlong: str
            ) -> List[TokenizedTrajectory]:
    """Prompt + body + EOS per response under ``max_seq_len`` (reject or truncate the over-long ones)."""
    out: List[TokenizedTrajectory] = []
    for ids in bodies:
        body = list(ids) + [eos_id]
        n = len(prompt) + len(body)
        if n <= max_seq_len:
            out.append(TokenizedTrajectory(np.asarray(prompt + body, dtype=np.int64), len(prompt)))
        elif overlong == "truncate" and len(prompt) < max_seq_len:
            cut = prompt + body[: max_seq_len - len(prompt)]
            out.append(TokenizedTrajectory(np.asarray(cut, dtype=np.int64), len(prompt), truncated=True))
        else:
            reason = "prompt_too_long" if len(prompt) >= max_seq_len else "over_max_seq_len"
            out.append(TokenizedTrajectory(None, len(prompt), reject_reason=reason,
                                           detail=f"{n} tokens > max_seq_len {max_seq_len}"))
    return out


class GroupEncoder:
    """Worker-side tokenization of one group: a rendered prompt and its responses, encoded in one batch by the
    tokenizer's Rust backend, laid out as in the module docstring.

    Built from :meth:`ChatTokenizer.encoder_state` (picklable): the backend's serialized JSON, taken from the loaded
    ``transformers`` tokenizer so that added tokens and normalizers are exactly the ones ``transformers`` uses, and
    encoded as ``tokenizer(text, add_special_tokens=False)`` does (no truncation, no padding, the tokenizer's
    ``split_special_tokens`` setting).
    """

    def __init__(self, state: Dict[str, Any]) -> None:
        # One process per core: the backend's own thread pool would only oversubscribe the cores.
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        from tokenizers import Tokenizer

        self.backend = Tokenizer.from_str(state["backend"])
        self.backend.no_truncation()
        self.backend.no_padding()
        self.backend.encode_special_tokens = bool(state["split_special_tokens"])
        self.eos_id = int(state["eos_id"])
        self.max_seq_len = int(state["max_seq_len"])
        self.overlong = state["overlong"]

    def encode_batch(self, texts: Sequence[str]) -> List[List[int]]:
        """Token ids of each text (no special tokens added)."""
        return [e.ids for e in self.backend.encode_batch_fast(list(texts), add_special_tokens=False)]

    def tokenize_group(self, prompt_text: str, responses: Sequence[str]) -> Tuple[List[int], List[TokenizedTrajectory]]:
        """Prompt ids and one :class:`TokenizedTrajectory` per response."""
        ids = self.encode_batch([prompt_text, *responses])
        prompt = ids[0]
        return prompt, _layout(prompt, ids[1:], self.eos_id, self.max_seq_len, self.overlong)


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

    def prompt_text(self, problem: str) -> str:
        """The generation prompt of ``problem``: the chat template of one user turn plus the assistant header."""
        return self.tokenizer.apply_chat_template(
            [{"role": "user", "content": problem}], add_generation_prompt=True, tokenize=False
        )

    def prompt_ids(self, problem: str) -> List[int]:
        return self.encode(self.prompt_text(problem))

    def encoder_state(self) -> Dict[str, Any]:
        """What a :class:`GroupEncoder` in another process needs (picklable, no ``transformers`` objects)."""
        return {
            "backend": self.tokenizer.backend_tokenizer.to_str(),
            "split_special_tokens": bool(getattr(self.tokenizer, "split_special_tokens", False)),
            "eos_id": self.eos_id,
            "max_seq_len": self.max_seq_len,
            "overlong": self.overlong,
        }

    def tokenize_group(self, problem: str, responses: List[str]) -> Tuple[List[int], List[TokenizedTrajectory]]:
        """Prompt ids and one :class:`TokenizedTrajectory` per response (``transformers`` encoding, one process)."""
        prompt = self.prompt_ids(problem)
        return prompt, _layout(prompt, [self.encode(r) for r in responses], self.eos_id, self.max_seq_len,
                               self.overlong)
