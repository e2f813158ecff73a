"""Collate trajectories into a padded ``[B, T]`` batch or a packed THD ``[1, sum T]`` batch.

**Alignment convention** (both modes): ``labels[t] = tokens[t + 1]``; the log-prob of the label at position ``t``
comes from the logits at position ``t``. ``loss_mask[t] = 1`` exactly when ``labels[t]`` is a response token
(``prompt_len - 1 <= t < len - 1``): 0 on the prompt, on the last position of each sequence (it has no next token)
and on padding. Per-token arrays stored with the tokens (``ref_logp[j]`` = log-prob of token ``j``) are shifted
the same way, so ``batch["ref_logp"][t]`` belongs to ``labels[t]``.

**Packing**: sequences are concatenated, each padded with ``pad_token_id`` to a multiple of
``pad_to_multiple_of`` (e.g. ``2 * cp`` (times ``tp`` with sequence parallelism) for context parallelism);
``cu_seqlens`` (int32) are the *padded* boundaries, ``cu_seqlens_unpadded`` the real ones. ``position_ids``
restart at 0 for every sequence. Labels never cross a sequence boundary. The pads sit after each sequence's real
tokens, so under causal attention no real token attends to them.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence

import torch

META_KEYS = ("index", "tokens", "prompt_len", "reward", "group_id", "rollout_index")


def _round_up(n: int, m: int) -> int:
    return ((n + m - 1) // m) * m


def _per_token_keys(samples: Sequence[Dict[str, Any]]) -> List[str]:
    keys = [k for k, v in samples[0].items() if k not in META_KEYS and isinstance(v, torch.Tensor)]
    for s in samples:
        if sorted(k for k, v in s.items() if k not in META_KEYS and isinstance(v, torch.Tensor)) != sorted(keys):
            raise ValueError("all samples of a batch must carry the same per-token arrays")
    return keys


def sequence_fields(sample: Dict[str, Any], pad_token_id: int, per_token_keys: Sequence[str]) -> Dict[str, torch.Tensor]:
    """tokens / labels / loss_mask / position_ids / shifted per-token arrays of one sequence (unpadded)."""
    tokens = sample["tokens"].to(torch.int64)
    n = tokens.numel()
    p = int(sample["prompt_len"])
    if not 0 < p < n:
        raise ValueError(f"prompt_len {p} must be in (0, {n})")
    labels = torch.full((n,), pad_token_id, dtype=torch.int64)
    labels[:-1] = tokens[1:]
    loss_mask = torch.zeros(n, dtype=torch.float32)
    loss_mask[p - 1:n - 1] = 1.0
    out = {"tokens": tokens, "labels": labels, "loss_mask": loss_mask, "position_ids": torch.arange(n)}
    for k in per_token_keys:
        arr = sample[k].to(torch.float32)
        if arr.numel() != n:
            raise ValueError(f"per-token array {k} has {arr.numel()} values for {n} tokens")
        shifted = torch.zeros(n, dtype=torch.float32)
        shifted[:-1] = arr[1:]
        out[k] = shifted
    return out


def _sequence_meta(samples: Sequence[Dict[str, Any]]) -> Dict[str, torch.Tensor]:
    return {
        "rewards": torch.tensor([float(s["reward"]) for s in samples], dtype=torch.float32),
        "group_ids": torch.tensor([int(s["group_id"]) for s in samples], dtype=torch.int64),
        "rollout_indices": torch.tensor([int(s["rollout_index"]) for s in samples], dtype=torch.int64),
        "prompt_lens": torch.tensor([int(s["prompt_len"]) for s in samples], dtype=torch.int64),
        "seq_lens": torch.tensor([int(s["tokens"].numel()) for s in samples], dtype=torch.int64),
    }


def collate_pad(
    samples: Sequence[Dict[str, Any]], pad_token_id: int = 0, pad_to_multiple_of: int = 1,
    max_len: Optional[int] = None,
) -> Dict[str, torch.Tensor]:
    """Right-pad to ``[B, T]`` (``T`` = longest, rounded up to ``pad_to_multiple_of``, or ``max_len``).

    Returns ``tokens``, ``labels``, ``loss_mask`` (float), ``position_ids``, ``attention_mask`` (bool, True on real
    tokens), per-token arrays, and per-sequence ``rewards``, ``group_ids``, ``rollout_indices``, ``prompt_lens``,
    ``seq_lens``, ``num_response_tokens``.
    """
    keys = _per_token_keys(samples)
    fields = [sequence_fields(s, pad_token_id, keys) for s in samples]
    t = _round_up(max(f["tokens"].numel() for f in fields), pad_to_multiple_of)
    if max_len is not None:
        if t > max_len:
            raise ValueError(f"a sequence of the batch needs {t} positions > max_len {max_len}")
        t = max_len
    b = len(samples)
    out: Dict[str, torch.Tensor] = {
        "tokens": torch.full((b, t), pad_token_id, dtype=torch.int64),
        "labels": torch.full((b, t), pad_token_id, dtype=torch.int64),
        "loss_mask": torch.zeros((b, t), dtype=torch.float32),
        "position_ids": torch.arange(t).repeat(b, 1),
        "attention_mask": torch.zeros((b, t), dtype=torch.bool),
    }
    for k in keys:
        out[k] = torch.zeros((b, t), dtype=torch.float32)
    for i, f in enumerate(fields):
        n = f["tokens"].numel()
        for k in ("tokens", "labels", "loss_mask", *keys):
            out[k][i, :n] = f[k]
        out["attention_mask"][i, :n] = True
    out.update(_sequence_meta(samples))
    out["num_response_tokens"] = out["loss_mask"].sum(dim=1).to(torch.int64)
    return out


def collate_pack(
    samples: Sequence[Dict[str, Any]], pad_token_id: int = 0, pad_to_multiple_of: int = 1
) -> Dict[str, torch.Tensor]:
    """Pack into THD ``[1, S]`` with ``cu_seqlens``; see the module docstring for the layout.

    Returns the keys of :func:`collate_pad` (as ``[1, S]``, without ``attention_mask``) plus ``cu_seqlens``,
    ``cu_seqlens_unpadded`` (int32, ``[B + 1]``) and ``max_seqlen`` (padded).
    """
    keys = _per_token_keys(samples)
    fields = [sequence_fields(s, pad_token_id, keys) for s in samples]
    padded = [_round_up(f["tokens"].numel(), pad_to_multiple_of) for f in fields]
    total = sum(padded)
    out: Dict[str, torch.Tensor] = {
        "tokens": torch.full((1, total), pad_token_id, dtype=torch.int64),
        "labels": torch.full((1, total), pad_token_id, dtype=torch.int64),
        "loss_mask": torch.zeros((1, total), dtype=torch.float32),
        "position_ids": torch.zeros((1, total), dtype=torch.int64),
    }
    for k in keys:
        out[k] = torch.zeros((1, total), dtype=torch.float32)
    start = 0
    for f, plen in zip(fields, padded):
        n = f["tokens"].numel()
        for k in ("tokens", "labels", "loss_mask", *keys):
            out[k][0, start:start + n] = f[k]
        # Positions keep counting through the alignment pads (masked anyway) and restart at the next sequence.
        out["position_ids"][0, start:start + plen] = torch.arange(plen)
        start += plen
    out["cu_seqlens"] = torch.tensor([0] + padded, dtype=torch.int64).cumsum(0).to(torch.int32)
    out["cu_seqlens_unpadded"] = torch.tensor([0] + [f["tokens"].numel() for f in fields]).cumsum(0).to(torch.int32)
    out["max_seqlen"] = torch.tensor(max(padded), dtype=torch.int32)
    out.update(_sequence_meta(samples))
    seg = torch.repeat_interleave(torch.arange(len(samples)), torch.tensor(padded))
    out["num_response_tokens"] = torch.zeros(len(samples), dtype=torch.int64).index_add_(
        0, seg, out["loss_mask"][0].to(torch.int64))
    return out
