"""Policy losses on per-token log-probs: offline GRPO, on-policy GRPO, SFT on positives, Lightning OPD.

All formulas are docs/design.md §3. Shapes: ``logprobs``, ``loss_mask``, ``ref_logprobs``, ``old_logprobs``
are ``[B, T]`` (one row per trajectory, already aligned so that column t is the log-prob of the token the model
predicts at t); ``advantages`` is ``[B]`` (``[B, T]`` for ``opd``; ``sft`` takes ``rewards`` instead).
Each loss is a registered per-token function (:mod:`.registry`): its spec says what it reads.

Global denominators: the default ``seq-mean-token-mean`` divides by ``N_seq``, the number of trajectories in
the **global** batch (all DP ranks and microbatches). Pass it as ``num_sequences`` (and the global token total
as ``num_tokens`` for ``token-mean``) so that the losses of the microbatches of one optimizer step *sum* to the
loss of the whole batch; averaging per-microbatch means instead is a bug peer frameworks shipped (docs/design.md §7).
Under context parallelism pass ``sequence_token_counts`` (see :mod:`.context_parallel`) so that each CP rank
normalizes its part of a sequence by the sequence's full length; the CP ranks' losses then sum to the total.
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch

from .advantages import group_statistics
from .registry import TokenLoss, get_loss, loss_names, register_loss

__all__ = ["LOSS_KINDS", "LOSS_AGGREGATIONS", "per_token_policy_loss", "aggregate_token_loss", "policy_loss"]

LOSS_AGGREGATIONS = ("seq-mean-token-mean", "token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")

# Log-ratios are clamped before exp() so that a far-off token cannot overflow to inf (verl does the same);
# e^20 is already a ratio no clip or KL penalty would leave unclipped.
_LOG_RATIO_CLAMP = 20.0


def _k3_kl(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """GRPO's k3 estimator ``exp(ref - logp) - (ref - logp) - 1`` (non-negative, unbiased for KL(pi||ref))."""
    delta = (ref_logprobs - logprobs).clamp(-_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP)
    return torch.exp(delta) - delta - 1.0


# ------------------------------------------------------------------------------------------ registered losses
# Each takes masked-neutral fp32 inputs: logp [B, T], adv [B, T] (or None), old [B, T] (or None).


@register_loss("offline_grpo", advantage="group", kl=True)
def offline_grpo_loss(logp, adv, old, *, clip_eps: Optional[float], shaping_gamma: Optional[float]) -> TokenLoss:
    """Offline GRPO: the teacher's probability is taken as 1, so ratio = p_t and the PPO clip is max(p_t, 1 - eps)."""
    prob = torch.exp(logp)
    if shaping_gamma is not None:
        prob = prob / (prob + shaping_gamma)  # LUFFY policy shaping f(p) = p / (p + gamma)
    if clip_eps is None:
        return TokenLoss(-(prob * adv), torch.zeros_like(logp, dtype=torch.bool), prob)
    floor = torch.clamp(prob, min=1.0 - clip_eps)
    surrogate = torch.minimum(prob * adv, floor * adv)
    # Clip active (zero gradient): a negative-advantage token already below 1 - eps.
    return TokenLoss(-surrogate, (adv < 0) & (prob < 1.0 - clip_eps), prob)


def _ppo_clip_loss(logp, adv, old, clip_eps: Optional[float]) -> TokenLoss:
    ratio = torch.exp((logp - old).clamp(-_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP))
    if clip_eps is None:
        return TokenLoss(-(ratio * adv), torch.zeros_like(logp, dtype=torch.bool), ratio)
    clipped_ratio = ratio.clamp(1.0 - clip_eps, 1.0 + clip_eps)
    surrogate = torch.minimum(ratio * adv, clipped_ratio * adv)
    clipped = ((adv > 0) & (ratio > 1.0 + clip_eps)) | ((adv < 0) & (ratio < 1.0 - clip_eps))
    return TokenLoss(-surrogate, clipped, ratio)


@register_loss("grpo", advantage="group", arrays=("old_logp",), old_logprobs="array", kl=True)
def grpo_loss(logp, adv, old, *, clip_eps: Optional[float], shaping_gamma: Optional[float]) -> TokenLoss:
    """GRPO's PPO-clip surrogate with pi_old from the dataset's ``old_logp`` (the behaviour policy)."""
    return _ppo_clip_loss(logp, adv, old, clip_eps)


@register_loss("sft", advantage="none", kl=True, trains_on="positive")
def sft_loss(logp, adv, old, *, clip_eps: Optional[float], shaping_gamma: Optional[float]) -> TokenLoss:
    """Negative log-likelihood of the positive trajectories (the selection is by ``trains_on="positive"``)."""
    return TokenLoss(-logp, torch.zeros_like(logp, dtype=torch.bool), torch.exp(logp))


@register_loss("opd", advantage="token", arrays=("teacher_logp",), old_logprobs="policy", kl=False)
def opd_loss(logp, adv, old, *, clip_eps: Optional[float], shaping_gamma: Optional[float]) -> TokenLoss:
    """Lightning OPD: PPO-clip with the per-token advantage teacher_t - old_t; the teacher replaces the KL."""
    return _ppo_clip_loss(logp, adv, old, clip_eps)


LOSS_KINDS = loss_names()


def per_token_policy_loss(
    logprobs: torch.Tensor,
    token_mask: torch.Tensor,
    token_advantages: Optional[torch.Tensor],
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
    spec = get_loss(kind)
    if spec.old_logprobs is not None and old_logprobs is None:
        raise ValueError(f"kind={kind!r} needs old_logprobs (the behaviour policy's per-token log-probs)")
    mask = token_mask.bool()
    zeros = torch.zeros_like(logprobs, dtype=torch.float32)
    logp = torch.where(mask, logprobs.float(), zeros)
    adv = zeros if token_advantages is None else token_advantages.float().expand_as(logp)
    old = None if old_logprobs is None else torch.where(mask, old_logprobs.float(), zeros)
    loss, clipped, ratio = spec.per_token(logp, adv, old, clip_eps=clip_eps, shaping_gamma=shaping_gamma)
    if ref_logprobs is not None and spec.kl:
        kl = _k3_kl(logp, torch.where(mask, ref_logprobs.float(), zeros))
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
    """Reduce a ``[B, T]`` per-token loss to a scalar (docs/design.md §3.6).

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
    advantages: Optional[torch.Tensor] = None,
    *,
    kind: str,
    rewards: Optional[torch.Tensor] = None,
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
    group_ids: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """The training loss of one (micro)batch and its metrics, for any registered loss ``kind``.

    Args:
        logprobs: ``[B, T]`` fp32 log-probs of the trajectory's own tokens (from :func:`vocab_parallel_logprobs`).
        loss_mask: ``[B, T]``, 1 on response tokens, 0 on prompt and padding.
        advantages: what the loss's spec takes: ``[B]`` group advantages (:func:`group_advantages`) for
            ``advantage="group"`` losses, ``[B, T]`` for ``"token"`` ones (:func:`opd_advantages`), ``None`` for
            ``"none"`` (``sft``).
        kind: a registered loss name (:func:`~megatron_offgrpo.losses.registry.loss_names`).
        rewards: ``[B]`` rewards; required by losses that train on positive trajectories only (``sft``: the
            sequence mean is then over them, and ``num_sequences`` counts them). With ``group_ids`` the metrics
            include the all-positive group fraction.
        ref_logprobs: ``[B, T]`` reference log-probs; adds ``kl_coef * k3`` (only for losses with ``kl=True``).
        old_logprobs: ``[B, T]`` behaviour-policy log-probs, for losses with ``old_logprobs`` set.
        clip_eps: PPO clip epsilon; ``None`` disables clipping (the blog's released code).
        kl_coef: ``beta``.
        agg: aggregation, see :func:`aggregate_token_loss`.
        num_sequences: global ``N_seq`` (all DP ranks and microbatches); default this batch's.
        num_tokens: global response-token total for ``token-mean``; default this batch's.
        sequence_token_counts: ``[B]`` full per-sequence token counts under context parallelism.
        max_response_len: the fixed normalizer of ``seq-mean-token-sum-norm``.
        shaping_gamma: LUFFY policy shaping for ``offline_grpo``: ``p / (p + gamma)`` in place of ``p``.
        group_ids: ``[B]``, for the all-positive group fraction metric.

    Returns:
        ``(loss, metrics)``: the scalar loss, and detached fp32 scalars: ``loss``, ``kl_mean``, ``clip_frac``,
        ``prob_mean`` (p_t, or the ratio for ``grpo``/``opd``), ``logprob_mean``, ``num_tokens`` and
        ``num_sequences`` (what this batch contributed), ``adv_mean`` when the loss takes advantages, and
        ``all_positive_frac`` when known.
    """
    spec = get_loss(kind)
    if logprobs.dim() != 2 or loss_mask.shape != logprobs.shape:
        raise ValueError(
            f"logprobs and loss_mask must both be [B, T]; got {tuple(logprobs.shape)} and {tuple(loss_mask.shape)}"
        )
    batch = logprobs.shape[0]
    if spec.advantage == "none":
        if advantages is not None:
            raise ValueError(f"kind={kind!r} takes no advantages (pass the rewards as rewards=)")
    else:
        expected_adv = tuple(logprobs.shape) if spec.advantage == "token" else (batch,)
        if advantages is None or tuple(advantages.shape) != expected_adv:
            got = None if advantages is None else tuple(advantages.shape)
            raise ValueError(f"kind={kind!r} expects advantages of shape {expected_adv}, got {got}")
    if not spec.kl and ref_logprobs is not None:
        raise ValueError(f"kind={kind!r} has no KL term: the teacher enters through the advantages; drop ref_logprobs")
    if spec.trains_on == "positive" and (rewards is None or tuple(rewards.shape) != (batch,)):
        raise ValueError(f"kind={kind!r} trains on positive trajectories only: pass rewards= of shape ({batch},)")

    token_mask = loss_mask.bool()
    if spec.trains_on == "positive":
        selected = rewards.detach() > 0
        token_mask = token_mask & selected[:, None]
        seq_count = selected.sum()
    else:
        seq_count = torch.tensor(batch)
    token_adv = None
    if advantages is not None:
        token_adv = advantages if spec.advantage == "token" else advantages[:, None].expand_as(logprobs)
        token_adv = token_adv.detach()
    token_loss, clipped, kl, ratio = per_token_policy_loss(
        logprobs,
        token_mask,
        token_adv,
        kind=kind,
        ref_logprobs=ref_logprobs,
        old_logprobs=old_logprobs,
        clip_eps=clip_eps,
        kl_coef=kl_coef,
        shaping_gamma=shaping_gamma,
    )
    n_seq = num_sequences
    if n_seq is None and spec.trains_on == "positive":
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
        metrics: Dict[str, torch.Tensor] = {
            "loss": loss.detach().float(),
            "kl_mean": (kl * fmask).sum() / denom,
            "clip_frac": clipped.float().sum() / denom,
            "prob_mean": (ratio * fmask).sum() / denom,
            "logprob_mean": torch.where(token_mask, logprobs.detach().float(), 0.0).sum() / denom,
            "num_tokens": n_tok,
            "num_sequences": seq_count.float(),
        }
        if spec.advantage == "token":
            metrics["adv_mean"] = (advantages.float() * fmask).sum() / denom
        elif spec.advantage == "group" and batch:
            metrics["adv_mean"] = advantages.float().mean()
        if rewards is not None and group_ids is not None and batch:
            stats = group_statistics(rewards, group_ids)
            group_all_positive = torch.zeros(stats.num_groups, dtype=torch.bool, device=rewards.device)
            group_all_positive[stats.group_index] = stats.all_positive
            metrics["all_positive_frac"] = group_all_positive.float().mean()
    return loss, metrics
