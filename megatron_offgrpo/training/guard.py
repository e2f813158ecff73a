"""The non-finite guard: a NaN / inf loss or gradient never reaches the weights, and a broken model is never saved.

Megatron-Core skips a step on overflow only under fp16 loss scaling. In fp32 / bf16 a single non-finite gradient
goes through the gradient clip (a NaN norm makes the clip factor NaN) into every weight, and from then on every
loss is NaN while the run happily saves and prunes its good checkpoints. So the step here is Megatron's
``ChainedOptimizer.step`` with one decision inserted between the global gradient norm and the clip:

    prepare grads -> global grad norm -> (loss and norm finite?) -> clip by that norm -> Adam step

All ranks take the same decision without extra communication: the step's loss is already all-reduced over the
world, and the gradient norm is Megatron's global norm. What happens on a non-finite step is
``optimizer.on_nonfinite``: ``skip`` (weights, Adam moments and the LR schedule untouched; the run stops after
``optimizer.max_consecutive_skips`` skipped steps in a row) or ``stop`` (at once). Either way the message names
the step and, when the cause is visible in the batch, the offending sequences.
"""

from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from megatron_offgrpo.utils.distributed import all_reduce_cpu

__all__ = ["NonFiniteError", "APPLIED", "OVERFLOW", "NONFINITE", "guarded_optimizer_step", "nonfinite_sequences", "gather_names",
           "assert_finite_model"]


class NonFiniteError(RuntimeError):
    """Training produced a non-finite loss, gradient or weight and the configured policy is to stop."""


APPLIED, OVERFLOW, NONFINITE = "applied", "fp16_overflow", "nonfinite"


def guarded_optimizer_step(optimizer: Any, loss: float) -> Tuple[str, float]:
    """Clip and apply the gradients only if ``loss`` and the global gradient norm are finite.

    Collective (call on every rank). Returns ``(status, grad_norm)`` with status :data:`APPLIED`,
    :data:`OVERFLOW` (fp16 loss scaling found inf / NaN and lowered the scale: Megatron's normal skip, not an
    error; ``grad_norm`` is NaN) or :data:`NONFINITE` (nothing was changed).
    """
    from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32

    if optimizer.prepare_grads():
        return OVERFLOW, float("nan")
    grad_norm = float(optimizer.get_grad_norm())
    if not (math.isfinite(loss) and math.isfinite(grad_norm)):
        return NONFINITE, grad_norm
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        if getattr(opt, "is_stub_optimizer", False) or opt.config.clip_grad <= 0.0:
            continue
        params = opt.get_parameters()
        if params:
            clip_grad_by_total_norm_fp32(
                params, max_norm=opt.config.clip_grad, total_norm=grad_norm,
                use_decoupled_grad=opt.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8,
            )
    return (APPLIED if optimizer.step_with_ready_grads() else OVERFLOW), grad_norm


def nonfinite_sequences(mask: torch.Tensor, tensors: Sequence[Optional[torch.Tensor]], names: Sequence[str]) -> List[str]:
    """Names of the rows whose loss inputs are non-finite: on response tokens (``mask``) for ``[B, T]`` tensors
    (the policy's log-probs, reference / teacher / old log-probs, OPD advantages), anywhere for ``[B]`` tensors
    (sequence advantages). ``None`` entries are ignored. Run only for a step whose loss is already non-finite.
    """
    sel = mask.bool()
    bad = torch.zeros(mask.shape[0], dtype=torch.bool, device=mask.device)
    for t in tensors:
        if t is None:
            continue
        t = t.to(mask.device)
        bad |= (~torch.isfinite(t) & sel).any(dim=-1) if t.dim() == 2 else ~torch.isfinite(t)
    return [names[i] for i in torch.nonzero(bad).flatten().tolist()]


def gather_names(local: List[str]) -> List[str]:
    """Every rank's list of names, concatenated and de-duplicated in order (collective; rare path only)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return list(dict.fromkeys(local))
    parts: List[List[str]] = [None] * dist.get_world_size()  # type: ignore[list-item]
    dist.all_gather_object(parts, local)
    return list(dict.fromkeys(n for part in parts for n in part))


def assert_finite_model(model_chunks: Sequence[Any]) -> None:
    """Raise :class:`NonFiniteError` naming the tensors if any weight on any rank is NaN / inf (collective).

    One reduction per parameter on the device, one flag all-reduced: run before every save, so that ``latest``
    can never point at a broken model.
    """
    bad: List[str] = []
    for i, chunk in enumerate(model_chunks):
        module = getattr(chunk, "module", chunk)
        for name, p in module.named_parameters():
            if not torch.isfinite(p.detach()).all():
                bad.append(f"{name}" + (f" (model chunk {i})" if len(model_chunks) > 1 else ""))
    flag = all_reduce_cpu(torch.tensor([float(bool(bad))]), op=dist.ReduceOp.MAX if dist.is_initialized() else None)
    if flag.item() == 0:
        return
    names = gather_names([f"rank {dist.get_rank() if dist.is_initialized() else 0}: {n}" for n in bad])
    raise NonFiniteError(
        f"refusing to save a model with non-finite weights ({len(names)} tensors: {', '.join(names[:8])}"
        f"{' ...' if len(names) > 8 else ''}); the last good checkpoint stays 'latest'"
    )


def summarize(metrics: Dict[str, float]) -> str:
    """``loss X, grad norm Y`` for messages."""
    return f"loss {metrics.get('loss', float('nan')):.6g}, grad norm {metrics.get('grad_norm', float('nan')):.6g}"
