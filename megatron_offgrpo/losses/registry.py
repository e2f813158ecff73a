"""The loss registry: every policy loss by name, with what it reads and how it is normalised.

A loss is one pure per-token function plus a :class:`LossSpec` saying what the trainer must hand it; the trainer,
the config validation and the checkpoint's run identity read the spec and never branch on the name. Adding a loss
is one decorated function (and its float64 reference test)::

    @register_loss("my_loss", advantage="group", arrays=(), kl=True, trains_on="all")
    def my_loss(logp, adv, old_logp, *, clip_eps, shaping_gamma) -> TokenLoss:
        ...

The math of each registered loss is in docs/design.md, "Losses".
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, NamedTuple, Optional, Tuple

import torch

__all__ = ["TokenLoss", "LossSpec", "LossInputs", "register_loss", "get_loss", "loss_names", "required_arrays"]


class TokenLoss(NamedTuple):
    """A per-token loss ``[B, T]`` before the KL term and aggregation, with its diagnostics."""

    loss: torch.Tensor
    clipped: torch.Tensor  # bool [B, T]: the clip is active there (the token gets no gradient from the surrogate)
    ratio: torch.Tensor  # [B, T]: p_t for offline GRPO / SFT, pi / pi_old for GRPO / OPD (the prob_mean metric)


class LossInputs(NamedTuple):
    """What a microbatch hands the loss, derived from the spec (see :meth:`LossSpec.inputs`)."""

    advantages: Optional[torch.Tensor]  # [B] (advantage="group") or [B, T] (advantage="token"); None for "none"
    old_logprobs: Optional[torch.Tensor]  # [B, T] behaviour-policy log-probs, or None


@dataclass(frozen=True)
class LossSpec:
    """One registered loss.

    Attributes:
        name: the ``loss.kind`` value.
        per_token: ``(logp, advantages, old_logprobs, *, clip_eps, shaping_gamma) -> TokenLoss`` on masked-neutral
            fp32 inputs (masked positions hold 0, so garbage there cannot produce inf / NaN).
        advantage: ``"group"`` (one advantage per trajectory, from :func:`group_advantages`), ``"token"``
            (per token, from the policy and a per-token array: OPD), or ``"none"`` (SFT).
        old_logprobs: where pi_old comes from: ``None`` (not used), ``"array"`` (the dataset's ``old_logp``) or
            ``"policy"`` (the detached current log-probs: one optimizer step per batch makes them pi_old).
        arrays: per-token dataset arrays the loss always reads (``ref_logp`` for the KL is added by
            :func:`required_arrays` when the KL is on).
        kl: whether the k3 KL to the reference may be added (``loss.kl_coef``).
        trains_on: ``"all"`` trajectories, or only ``"positive"`` ones (reward > 0); the global ``N_seq`` /
            ``N_tok`` denominators count the same set.
    """

    name: str
    per_token: Callable[..., TokenLoss]
    advantage: str
    old_logprobs: Optional[str]
    arrays: Tuple[str, ...]
    kl: bool
    trains_on: str

    def inputs(self, logprobs: torch.Tensor, arrays: Dict[str, torch.Tensor],
               group_advantages: torch.Tensor) -> LossInputs:
        """The advantages and pi_old of one microbatch, from its log-probs, per-token arrays and group advantages."""
        old = None
        if self.old_logprobs == "array":
            old = arrays["old_logp"].to(logprobs.device)
        elif self.old_logprobs == "policy":
            # One optimizer step per batch: the policy at the start of the step is the one computing `logprobs`,
            # so its detached value *is* pi_old (docs/design.md, "Lightning OPD"), recomputed rather than stored.
            old = logprobs.detach()
        if self.advantage == "group":
            return LossInputs(group_advantages.to(logprobs.device), old)
        if self.advantage == "token":
            # The only token-advantage loss so far is OPD: A_t = teacher_t - old_t.
            return LossInputs(arrays["teacher_logp"].to(logprobs.device).float() - old.float(), old)
        return LossInputs(None, old)


_REGISTRY: Dict[str, LossSpec] = {}
_ADVANTAGES = ("group", "token", "none")
_OLD = (None, "array", "policy")
_TRAINS_ON = ("all", "positive")


def register_loss(name: str, *, advantage: str, arrays: Tuple[str, ...] = (), old_logprobs: Optional[str] = None,
                  kl: bool = True, trains_on: str = "all") -> Callable[[Callable[..., TokenLoss]], Callable]:
    """Decorator registering a per-token loss function under ``name`` (see :class:`LossSpec` for the fields)."""
    if advantage not in _ADVANTAGES or old_logprobs not in _OLD or trains_on not in _TRAINS_ON:
        raise ValueError(f"register_loss({name!r}): advantage in {_ADVANTAGES}, old_logprobs in {_OLD}, "
                         f"trains_on in {_TRAINS_ON}")

    def decorate(fn: Callable[..., TokenLoss]) -> Callable[..., TokenLoss]:
        if name in _REGISTRY:
            raise ValueError(f"loss {name!r} is already registered (by {_REGISTRY[name].per_token.__qualname__})")
        _REGISTRY[name] = LossSpec(name, fn, advantage, old_logprobs, tuple(arrays), kl, trains_on)
        return fn

    return decorate


def loss_names() -> Tuple[str, ...]:
    """The registered ``loss.kind`` values, in registration order."""
    _load_builtin_losses()
    return tuple(_REGISTRY)


def get_loss(name: str) -> LossSpec:
    """The spec of loss ``name``; a ``ValueError`` listing the registered names if there is none."""
    _load_builtin_losses()
    if name not in _REGISTRY:
        raise ValueError(f"unknown loss kind {name!r}; expected one of {tuple(_REGISTRY)}")
    return _REGISTRY[name]


def required_arrays(loss_cfg) -> list:
    """The per-token dataset arrays a run with this ``LossConfig`` reads (docs/design.md, "Data format")."""
    spec = get_loss(loss_cfg.kind)
    needed = list(spec.arrays)
    if spec.kl and loss_cfg.kl_coef > 0 and loss_cfg.reference == "precomputed":
        needed.append("ref_logp")
    return needed


def _load_builtin_losses() -> None:
    # The built-in losses register themselves when their module is imported.
    from megatron_offgrpo.losses import policy  # noqa: F401
