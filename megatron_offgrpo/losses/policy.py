"""Policy losses on per-token log-probs: offline GRPO, on-policy GRPO, SFT on positives, Lightning OPD.

All formulas are DESIGN.md section 3. Shapes: ``logprobs``, ``loss_mask``, ``ref_logprobs``, ``old_logprobs``
are ``[B, T]`` (one row per trajectory, already aligned so that column t is the log-prob of the token the model
predicts at t); ``advantages`` is ``[B]`` (``[B, T]`` for ``opd``; for ``sft`` it carries the rewards).

Global denominators: the default ``seq-mean-token-mean`` divides by ``N_seq``, the number of trajectories in
the **global** batch (all DP ranks and microbatches). Pass it as ``num_sequences`` (and the global token total
as ``num_tokens`` for ``token-mean``) so that the losses of the microbatches of one optimizer step *sum* to the
loss of the whole batch; averaging per-microbatch means instead is a bug peer frameworks shipped (DESIGN 7).
Under context parallelism pass ``sequence_token_counts`` (see :mod:`.context_parallel`) so that each CP rank
normalizes its part of a sequence by the sequence's full length; the CP ranks' losses then sum to the total.
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch

from .advantages import group_statistics

__all__ = ["LOSS_KINDS", "LOSS_AGGREGATIONS", "per_token_policy_loss", "aggregate_token_loss", "policy_loss"]

LOSS_KINDS = ("offline_grpo", "grpo", "sft", "opd")
LOSS_AGGREGATIONS = ("seq-mean-token-mean", "token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")

# Log-ratios are clamped before exp() so that a far-off token cannot overflow to inf (verl does the same);
# e^20 is already a ratio no clip or KL penalty would leave unclipped.
_LOG_RATIO_CLAMP = 20.0


def _k3_kl(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """GRPO's k3 estimator ``exp(ref - logp) - (ref - logp) - 1`` (non-negative, unbiased for KL(pi||ref))."""
    delta = (ref_logprobs - logprobs).clamp(-_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP)
    return torch.exp(delta) - delta - 1.0


def per_token_policy_loss(
    logprobs: torch.Tensor,
    token_mask: torch.Tensor,
    token_advantages: torch.Tensor,
    *,
    kind: str,
    ref_logprobs: Optional[torch.Tensor] = None,
    old_logprobs: Optional[torch.Tensor] = None,
    clip_eps: Optional[float] = 0.2,
    kl_coef: float = 0.1,
    shaping_gamma: Optional[float] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token loss ``[B, T]`` before aggregation, with the clip-active flags, the k3 KL and p_t (or ratio).

    Masked positions (``token_mask == 0``) are computed on a neutral value so that garbage log-probs there
    (padding, prompt) can never produce inf/NaN in the loss or its gradient.
    """
    mask = token_mask.bool()
    logp = torch.where(mask, logprobs.float(), torch.zeros_like(logprobs, dtype=torch.float32))
    adv = token_advantages.float()
    zeros = torch.zeros_like(logp)

    if kind == "offline_grpo":
        # Teacher probability taken as 1: ratio = p_t, and the PPO clip reduces to max(p_t, 1 - eps).
        prob = torch.exp(logp)
        if shaping_gamma is not None:
            prob = prob / (prob + shaping_gamma)  # LUFFY policy shaping f(p) = p / (p + gamma)
        if clip_eps is None:
            surrogate = prob * adv
            clipped = torch.zeros_like(mask)
        else:
            floor = torch.clamp(prob, min=1.0 - clip_eps)
            surrogate = torch.minimum(prob * adv, floor * adv)
            # Clip active (zero gradient): a negative-advantage token already below 1 - eps.
            clipped = (adv < 0) & (prob < 1.0 - clip_eps)
        ratio = prob
        loss = -surrogate
    elif kind in ("grpo", "opd"):
        if old_logprobs is None:
            raise ValueError(f"kind={kind!r} needs old_logprobs (the behaviour policy's per-token log-probs)")
        old = torch.where(mask, old_logprobs.float(), zeros)
        ratio = torch.exp((logp - old).clamp(-_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP))
        if clip_eps is None:
            surrogate = ratio * adv
            clipped = torch.zeros_like(mask)
        else:
            clipped_ratio = ratio.clamp(1.0 - clip_eps, 1.0 + clip_eps)
            surrogate = torch.minimum(ratio * adv, clipped_ratio * adv)
            clipped = ((adv > 0) & (ratio > 1.0 + clip_eps)) | ((adv < 0) & (ratio < 1.0 - clip_eps))
        loss = -surrogate
    elif kind == "sft":
        ratio = torch.exp(logp)
        loss = -logp
        clipped = torch.zeros_like(mask)
    else:
        raise ValueError(f"unknown loss kind {kind!r}; expected one of {LOSS_KINDS}")

    if ref_logprobs is not None and kind != "opd":
        ref = torch.where(mask, ref_logprobs.float(), zeros)
        kl = _k3_kl(logp, ref)
        if kl_coef:
            loss = loss + kl_coef * kl
    else:
        kl = zeros
    return loss, clipped & mask, kl, ratio


def aggregate_token_loss(
    token_loss: torch.Tensor,
    token_mask: torch.Tensor,
    agg: str = "seq-mean-token-mean",
    *,
    num_sequences: Optional[float] = None,
    num_tokens: Optional[float] = None,
    sequence_token_counts: Optional[torch.Tensor] = None,
    max_response_len: Optional[int] = None,
) -> torch.Tensor:
    """Reduce a ``[B, T]`` per-token loss to a scalar (DESIGN 3 "Aggregation").

    * ``seq-mean-token-mean``: ``(1/N_seq) sum_i (1/|o_i|) sum_t loss_t``
    * ``token-mean``: ``sum_{i,t} loss_t / N_tok``
    * ``seq-mean-token-sum``: ``(1/N_seq) sum_i sum_t loss_t``
    * ``seq-mean-token-sum-norm``: ``(1/N_seq) sum_i sum_t loss_t / max_response_len`` (Dr. GRPO)

    ``N_seq`` defaults to ``B`` and ``N_tok`` to the mask's sum (this batch alone); ``|o_i|`` defaults to the
    row's mask sum and is overridden by ``sequence_token_counts`` under context parallelism. A sequence with no
    response token contributes 0 (it still counts in ``N_seq``: it is a trajectory of the batch).
    """
    mask = token_mask.to(token_loss.dtype)
    seq_sums = (token_loss * mask).sum(dim=-1)
    n_seq = float(token_loss.shape[0]) if num_sequences is None else float(num_sequences)
    if agg == "token-mean":
        n_tok = mask.sum() if num_tokens is None else torch.as_tensor(float(num_tokens))
        return seq_sums.sum() / torch.clamp(n_tok, min=1.0)
    if n_seq <= 0:
        return seq_sums.sum() * 0.0  # nothing to train on; keeps the graph (and a zero gradient)
    if agg == "seq-mean-token-mean":
        counts = mask.sum(dim=-1) if sequence_token_counts is None else sequence_token_counts.to(mask.dtype)
        return (seq_sums / counts.clamp(min=1.0)).sum() / n_seq
    if agg == "seq-mean-token-sum":
        return seq_sums.sum() / n_seq
    if agg == "seq-mean-token-sum-norm":
        if not max_response_len or max_response_len <= 0:
            raise ValueError("agg='seq-mean-token-sum-norm' needs max_response_len > 0 (the fixed normalizer)")
        return seq_sums.sum() / (max_response_len * n_seq)
    raise ValueError(f"unknown loss aggregation {agg!r}; expected one of {LOSS_AGGREGATIONS}")


def policy_loss(
    logprobs: torch.Tensor,
    loss_mask: torch.Tensor,
    advantages: torch.Tensor,
    *,
    kind: str,
    ref_logprobs: Optional[torch.Tensor] = None,
    old_logprobs: Optional[torch.Tensor] = None,
    clip_eps: Optional[float] = 0.2,
    kl_coef: float = 0.1,
    agg: str = "seq-mean-token-mean",
    num_sequences: Optional[float] = None,
    num_tokens: Optional[float] = None,
    sequence_token_counts: Optional[torch.Tensor] = None,
    max_response_len: Optional[int] = None,
    shaping_gamma: Optional[float] = None,
    rewards: Optional[torch.Tensor] = None,
    group_ids: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """The training loss of one (micro)batch and its metrics.

    Args:
        logprobs: ``[B, T]`` fp32 log-probs of the trajectory's own tokens (from :func:`vocab_parallel_logprobs`).
        loss_mask: ``[B, T]``, 1 on response tokens, 0 on prompt and padding.
        advantages: ``[B]`` group advantages (:func:`group_advantages`); ``[B, T]`` for ``opd``
            (:func:`opd_advantages`); for ``sft`` the rewards: trajectories with reward > 0 are trained on and
            the sequence mean is over them (``num_sequences`` then counts positive trajectories).
        kind: ``offline_grpo`` | ``grpo`` | ``sft`` | ``opd``.
        ref_logprobs: ``[B, T]`` reference log-probs; adds ``kl_coef * k3`` (not for ``opd``, which has no KL).
        old_logprobs: ``[B, T]`` behaviour-policy log-probs, required by ``grpo`` and ``opd``.
        clip_eps: PPO clip epsilon; ``None`` disables clipping (the blog's released code).
        kl_coef: ``beta``.
        agg: aggregation, see :func:`aggregate_token_loss`.
        num_sequences: global ``N_seq`` (all DP ranks and microbatches); default this batch's.
        num_tokens: global response-token total for ``token-mean``; default this batch's.
        sequence_token_counts: ``[B]`` full per-sequence token counts under context parallelism.
        max_response_len: the fixed normalizer of ``seq-mean-token-sum-norm``.
        shaping_gamma: LUFFY policy shaping for ``offline_grpo``: ``p / (p + gamma)`` in place of ``p``.
        rewards, group_ids: ``[B]``; when both are given, the metrics include the all-positive group fraction.

    Returns:
        ``(loss, metrics)``: the scalar loss, and detached fp32 scalars: ``loss``, ``kl_mean``, ``clip_frac``,
        ``adv_mean``, ``prob_mean`` (p_t, or the ratio for ``grpo``/``opd``), ``logprob_mean``, ``num_tokens``
        and ``num_sequences`` (what this batch contributed), and ``all_positive_frac`` when known.
    """
    if kind not in LOSS_KINDS:
        raise ValueError(f"unknown loss kind {kind!r}; expected one of {LOSS_KINDS}")
    if logprobs.dim() != 2 or loss_mask.shape != logprobs.shape:
        raise ValueError(
            f"logprobs and loss_mask must both be [B, T]; got {tuple(logprobs.shape)} and {tuple(loss_mask.shape)}"
        )
    batch = logprobs.shape[0]
    expected_adv = tuple(logprobs.shape) if kind == "opd" else (batch,)
    if tuple(advantages.shape) != expected_adv:
        raise ValueError(f"kind={kind!r} expects advantages of shape {expected_adv}, got {tuple(advantages.shape)}")
    if kind == "opd" and ref_logprobs is not None:
        raise ValueError("kind='opd' has no KL term: the teacher enters through the advantages; drop ref_logprobs")

    token_mask = loss_mask.bool()
    if kind == "sft":
        selected = advantages.detach() > 0  # the rewards: train on positive trajectories only
        token_mask = token_mask & selected[:, None]
        token_adv = torch.zeros_like(logprobs, dtype=torch.float32)
        seq_count = selected.sum()
    else:
        token_adv = advantages if kind == "opd" else advantages[:, None].expand_as(logprobs)
        seq_count = torch.tensor(batch)
    token_loss, clipped, kl, ratio = per_token_policy_loss(
        logprobs,
        token_mask,
        token_adv.detach(),
        kind=kind,
        ref_logprobs=ref_logprobs,
        old_logprobs=old_logprobs,
        clip_eps=clip_eps,
        kl_coef=kl_coef,
        shaping_gamma=shaping_gamma,
    )
    n_seq = num_sequences
    if n_seq is None and kind == "sft":
        n_seq = float(seq_count)
    loss = aggregate_token_loss(
        token_loss,
        token_mask,
        agg,
        num_sequences=n_seq,
        num_tokens=num_tokens,
        sequence_token_counts=sequence_token_counts,
        max_response_len=max_response_len,
    )

    with torch.no_grad():
        fmask = token_mask.float()
        n_tok = fmask.sum()
        denom = n_tok.clamp(min=1.0)
        if kind == "opd":
            adv_mean = (advantages.float() * fmask).sum() / denom
        else:
            adv_mean = advantages.float().mean() if batch else torch.tensor(0.0)
        metrics: Dict[str, torch.Tensor] = {
            "loss": loss.detach().float(),
            "kl_mean": (kl * fmask).sum() / denom,
            "clip_frac": clipped.float().sum() / denom,
            "adv_mean": adv_mean,
            "prob_mean": (ratio * fmask).sum() / denom,
            "logprob_mean": torch.where(token_mask, logprobs.detach().float(), 0.0).sum() / denom,
            "num_tokens": n_tok,
            "num_sequences": seq_count.float(),
        }
        if rewards is not None and group_ids is not None and batch:
            stats = group_statistics(rewards, group_ids)
            group_all_positive = torch.zeros(stats.num_groups, dtype=torch.bool, device=rewards.device)
            group_all_positive[stats.group_index] = stats.all_positive
            metrics["all_positive_frac"] = group_all_positive.float().mean()
    return loss, metrics
