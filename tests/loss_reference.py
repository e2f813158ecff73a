"""Float64 dense reference for the loss core, written independently of ``megatron_offgrpo.losses``.

Deliberately naive: full-vocabulary ``log_softmax`` in float64, explicit Python loops over sequences and tokens,
Python ``min``/``max`` for the clips, and the aggregation formulas spelled out from docs/design.md §3. Slow,
but obviously right; the tests keep shapes tiny.
"""

from __future__ import annotations

import math
from typing import List, Optional

import torch


def ref_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """float64 ``log p(target)`` over the full vocabulary."""
    x = logits.double()
    m = x.max(dim=-1, keepdim=True).values
    lse = m.squeeze(-1) + torch.log(torch.exp(x - m).sum(dim=-1))
    return x.gather(-1, targets[..., None]).squeeze(-1) - lse


def ref_group_advantages(rewards: List[float], group_ids: List[int], bias: float, std: str, eps: float = 1e-6):
    """Advantages from docs/design.md §2 with plain Python floats."""
    out = []
    for i, g in enumerate(group_ids):
        members = [rewards[j] for j, h in enumerate(group_ids) if h == g]
        n = len(members)
        mean = sum(members) / n
        if max(members) - min(members) <= 1e-6:
            a = 0.0
        elif std == "none":
            a = rewards[i] - mean
        else:
            var = sum((r - mean) ** 2 for r in members) / ((n - 1) if std == "sample" else n)
            a = (rewards[i] - mean) / (math.sqrt(var) + eps)
        if min(members) > 0:
            a += bias
        out.append(a)
    return out


def ref_policy_loss(
    logp: torch.Tensor,
    mask: torch.Tensor,
    adv: torch.Tensor,
    kind: str,
    ref: Optional[torch.Tensor] = None,
    old: Optional[torch.Tensor] = None,
    clip_eps: Optional[float] = 0.2,
    kl_coef: float = 0.1,
    agg: str = "seq-mean-token-mean",
    num_sequences: Optional[float] = None,
    num_tokens: Optional[float] = None,
    max_response_len: Optional[int] = None,
    shaping_gamma: Optional[float] = None,
) -> torch.Tensor:
    """float64 loss; ``logp`` is a float64 tensor that may require grad."""
    B, T = logp.shape
    seq_terms = []
    for b in range(B):
        if kind == "sft" and not adv[b] > 0:
            continue
        terms = []
        for t in range(T):
            if not mask[b, t]:
                continue
            lp = logp[b, t]
            if kind == "offline_grpo":
                p = torch.exp(lp)
                if shaping_gamma is not None:
                    p = p / (p + shaping_gamma)
                a = float(adv[b])
                s = p * a if clip_eps is None else min(p * a, max(p, torch.tensor(1.0 - clip_eps, dtype=p.dtype)) * a)
                loss = -s
            elif kind in ("grpo", "opd"):
                a = float(adv[b, t]) if kind == "opd" else float(adv[b])
                ratio = torch.exp(lp - float(old[b, t]))
                if clip_eps is None:
                    s = ratio * a
                else:
                    clipped = min(max(ratio, torch.tensor(1 - clip_eps, dtype=ratio.dtype)),
                                  torch.tensor(1 + clip_eps, dtype=ratio.dtype))
                    s = min(ratio * a, clipped * a)
                loss = -s
            elif kind == "sft":
                loss = -lp
            else:
                raise ValueError(kind)
            if ref is not None and kind != "opd":
                d = float(ref[b, t]) - lp
                loss = loss + kl_coef * (torch.exp(d) - d - 1)
            terms.append(loss)
        seq_terms.append(terms)

    n_seq = num_sequences if num_sequences is not None else len(seq_terms) if kind == "sft" else B
    zero = logp.sum() * 0.0
    if agg == "token-mean":
        n_tok = num_tokens if num_tokens is not None else sum(len(t) for t in seq_terms)
        return sum((sum(t, zero) for t in seq_terms), zero) / max(n_tok, 1)
    if n_seq == 0:
        return zero
    if agg == "seq-mean-token-mean":
        return sum((sum(t, zero) / max(len(t), 1) for t in seq_terms), zero) / n_seq
    if agg == "seq-mean-token-sum":
        return sum((sum(t, zero) for t in seq_terms), zero) / n_seq
    if agg == "seq-mean-token-sum-norm":
        return sum((sum(t, zero) / max_response_len for t in seq_terms), zero) / n_seq
    raise ValueError(agg)
