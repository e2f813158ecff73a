"""Per-token log-probabilities of given targets from vocab-parallel (tensor-parallel sharded) logits.

Contract (docs/design.md §4): each TP rank holds logits ``[..., V/tp]`` for the contiguous vocabulary slice
``[rank * V/tp, (rank + 1) * V/tp)``. For every token

    logp = x_target - logsumexp(x)                                   (over the *global* vocabulary)

computed in fp32 whatever the logits' dtype. No rank ever holds ``[tokens, V]`` and no step materialises an
fp32 copy of the local ``[tokens, V/tp]`` shard: the work runs over chunks of ``chunk_size`` tokens, so the peak
extra memory is ``O(chunk_size * V/tp)`` plus the logits' gradient itself (in the logits' dtype), never
``O(tokens * V)`` in fp32 as ``log_softmax(x.float()).gather(...)`` needs (about 10 GB at 16k tokens x 152k vocab).

Communication: two all-reduces of ``[tokens]``-sized fp32 vectors per call (max of the local logsumexps, then
the sum of rescaled partition functions together with the owned target logit), independent of the chunking.

Backward: ``d logp / d x = onehot(target) - softmax(x)`` on the local shard, recomputed chunk by chunk from the
saved logits and the saved global logsumexp, written straight into the gradient buffer in the logits' dtype.

Real vocabulary: Megatron pads the output layer to a multiple of ``make_vocab_size_divisible_by x TP`` rows. Those
columns are not tokens: with ``vocab_size`` given, every column whose global id is ``>= vocab_size`` is excluded
from the softmax (as if its logit were ``-inf``) on the rank that owns it, and its gradient is exactly 0, so the
padded output rows never move. The exclusion costs nothing: the kernels simply read the real columns only (a
narrower view of the same memory); the padded columns of the gradient are zero-filled.

Backends: on CUDA (when Triton is usable) the local logsumexp / target logit and the gradient come from fused
Triton kernels (``triton_logprobs``) that accumulate in fp32 registers while reading the logits once per pass,
so ``chunk_size`` is unused and the only temporaries are ``[tokens]`` vectors; elsewhere the chunked torch code
above runs. The tensor-parallel
combine is the same Python code for both. ``backend=`` or the ``MEGATRON_OFFGRPO_LOGPROBS_BACKEND`` environment
variable (``auto`` | ``torch`` | ``triton``) forces one, e.g. to compare them.
"""

from __future__ import annotations

import os
import sys
from typing import Optional, Tuple

import torch
import torch.distributed as dist

__all__ = ["vocab_parallel_logprobs", "default_chunk_size", "resolve_tp_group", "BACKEND_ENV"]

BACKEND_ENV = "MEGATRON_OFFGRPO_LOGPROBS_BACKEND"
_BACKENDS = ("auto", "torch", "triton")

# Auto chunking targets ~2^25 fp32 elements (128 MiB) of temporaries per chunk: large enough that the per-chunk
# overhead is negligible at Qwen's 152k vocabulary, small enough to be a rounding error next to the model.
_CHUNK_ELEMENTS = 1 << 25


def default_chunk_size(vocab_local: int) -> int:
    """Tokens per chunk so that one fp32 chunk of the local vocabulary shard is about 128 MiB."""
    return max(1, _CHUNK_ELEMENTS // max(1, vocab_local))


def resolve_tp_group(tp_group: Optional[dist.ProcessGroup]) -> Optional[dist.ProcessGroup]:
    """The group to reduce over: the given one, else Megatron's TP group if initialized, else None (no TP).

    A group of size 1 is returned as ``None`` so that single-rank work skips communication entirely.
    """
    if tp_group is None:
        # If Megatron's parallel_state was never imported it cannot be initialized: don't pay for the import.
        parallel_state = sys.modules.get("megatron.core.parallel_state")
        if parallel_state is not None and parallel_state.model_parallel_is_initialized():
            tp_group = parallel_state.get_tensor_model_parallel_group()
    if tp_group is None or dist.get_world_size(tp_group) == 1:
        return None
    return tp_group


def _chunks(n: int, chunk_size: int):
    for start in range(0, n, chunk_size):
        yield start, min(n, start + chunk_size)


def _use_triton(logits: torch.Tensor, backend: Optional[str]) -> bool:
    """Whether the Triton kernels run: ``backend`` (else the environment variable, else ``auto``) decides."""
    backend = backend or os.environ.get(BACKEND_ENV) or "auto"
    if backend not in _BACKENDS:
        raise ValueError(f"logprobs backend must be one of {_BACKENDS}, got {backend!r}")
    if backend == "torch" or (backend == "auto" and not logits.is_cuda):
        return False
    from . import triton_logprobs  # only now: Triton itself is imported on the first kernel call

    available = logits.is_cuda and triton_logprobs.is_available()
    if backend == "triton" and not available:
        raise RuntimeError("logprobs backend 'triton' needs CUDA logits and an importable Triton")
    return available


def _local_targets(targets: torch.Tensor, vocab_start: int, v_local: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Target ids relative to this rank's slice, clamped in bounds, and whether this rank owns each one."""
    local_targets = targets - vocab_start
    owned = (local_targets >= 0) & (local_targets < v_local)
    # Clamp so that gathers / scatters are always in bounds; non-owned positions are zeroed by the callers.
    return local_targets.clamp(0, v_local - 1), owned


class _VocabParallelLogProbs(torch.autograd.Function):
    """Autograd function over flattened ``[N, V_local]`` logits and ``[N]`` global target ids."""

    @staticmethod
    def forward(
        ctx,
        logits: torch.Tensor,
        targets: torch.Tensor,
        tp_group: Optional[dist.ProcessGroup],
        chunk_size: int,
        use_triton: bool,
        vocab_size: int,
    ) -> torch.Tensor:
        n, v_local = logits.shape
        rank = dist.get_rank(tp_group) if tp_group is not None else 0
        vocab_start = rank * v_local
        # Columns [v_real, v_local) of this shard are Megatron's vocabulary padding: every read below goes through
        # the narrowed view `real`, so they never enter the partition function. A shard of padding only (v_real 0)
        # contributes logsumexp -inf, which the cross-rank combine turns into exp(-inf) = 0.
        v_real = min(v_local, max(0, vocab_size - vocab_start))
        real = logits[:, :v_real]

        if use_triton:
            from . import triton_logprobs

            # The kernels need unit stride along the vocabulary (rows may be strided). Copy only if it is not,
            # here rather than in each kernel call, so that backward reuses the saved copy.
            if logits.stride(-1) != 1:
                logits = logits.contiguous()
                real = logits[:, :v_real]
            # Already 0 where another rank owns the target.
            local_lse, target_logit = triton_logprobs.local_logsumexp_and_target(real, targets, vocab_start)
        else:
            local_lse = torch.full((n,), float("-inf"), dtype=torch.float32, device=logits.device)
            target_logit = torch.zeros(n, dtype=torch.float32, device=logits.device)
            if v_real > 0:
                local_targets, owned = _local_targets(targets, vocab_start, v_real)
                for s, e in _chunks(n, chunk_size):
                    chunk = real[s:e].float()  # fp32 copy of one chunk only
                    local_lse[s:e] = torch.logsumexp(chunk, dim=-1)
                    target_logit[s:e] = chunk.gather(-1, local_targets[s:e, None]).squeeze(-1)
                target_logit = torch.where(owned, target_logit, torch.zeros_like(target_logit))

        if tp_group is None:
            lse = local_lse
        else:
            # logsumexp over shards = M + log(sum_r exp(lse_r - M)), M = max_r lse_r: stable for huge logits.
            global_max = local_lse.clone()
            dist.all_reduce(global_max, op=dist.ReduceOp.MAX, group=tp_group)
            partial = torch.stack([torch.exp(local_lse - global_max), target_logit])
            dist.all_reduce(partial, op=dist.ReduceOp.SUM, group=tp_group)
            lse = global_max + torch.log(partial[0])
            target_logit = partial[1]

        ctx.save_for_backward(logits, targets, lse)
        ctx.vocab_start = vocab_start
        ctx.v_real = v_real
        ctx.chunk_size = chunk_size
        ctx.use_triton = use_triton
        return target_logit - lse

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor) -> Tuple[Optional[torch.Tensor], ...]:
        logits, targets, lse = ctx.saved_tensors
        n, v_local = logits.shape
        v_real = ctx.v_real
        grad_logits = torch.empty_like(logits, memory_format=torch.contiguous_format)
        # The padded columns take no part in the loss: their gradient is exactly zero (so Adam never moves them).
        grad_logits[:, v_real:].zero_()
        if v_real == 0:
            return grad_logits, None, None, None, None, None
        if ctx.use_triton:
            from . import triton_logprobs

            triton_logprobs.logits_grad(logits[:, :v_real], targets, ctx.vocab_start, lse, grad_output,
                                        out=grad_logits[:, :v_real])
            return grad_logits, None, None, None, None, None

        local_targets, owned = _local_targets(targets, ctx.vocab_start, v_real)
        grad_output = grad_output.float()
        owned_grad = torch.where(owned, grad_output, torch.zeros_like(grad_output))
        for s, e in _chunks(n, ctx.chunk_size):
            # -g * softmax(x), computed in place on an fp32 *copy* of the chunk to keep one temporary per chunk
            # (copy=True: for fp32 logits .float() would alias the saved logits and corrupt them).
            chunk = logits[s:e, :v_real].to(torch.float32, copy=True)
            chunk.sub_(lse[s:e, None]).exp_().mul_(-grad_output[s:e, None])
            # + g * onehot(target), only on the rank that owns the target id.
            chunk.scatter_add_(-1, local_targets[s:e, None], owned_grad[s:e, None])
            grad_logits[s:e, :v_real].copy_(chunk)
        return grad_logits, None, None, None, None, None


def vocab_parallel_logprobs(
    logits: torch.Tensor,
    targets: torch.Tensor,
    tp_group: Optional[dist.ProcessGroup] = None,
    chunk_size: Optional[int] = None,
    backend: Optional[str] = None,
    vocab_size: Optional[int] = None,
) -> torch.Tensor:
    """Log-probabilities of ``targets`` under vocab-parallel ``logits``, in fp32, over the real vocabulary.

    Args:
        logits: ``[..., V_local]`` in any float dtype; this rank's contiguous slice of the (padded) vocabulary.
        targets: ``[...]`` int64 *global* vocabulary ids (same leading shape as ``logits``), ``< vocab_size``.
        tp_group: the tensor-parallel group the vocabulary is sharded over. ``None`` uses Megatron's TP group
            when ``parallel_state`` is initialized, else treats ``logits`` as the full vocabulary.
        chunk_size: tokens processed at once (bounds the extra memory); ``None`` picks about 128 MiB of fp32
            temporaries per chunk. Only the torch backend chunks; the Triton kernels need no temporaries.
        backend: ``"auto"`` (Triton kernels for CUDA logits when Triton is usable, else torch), ``"torch"`` or
            ``"triton"``; ``None`` reads ``MEGATRON_OFFGRPO_LOGPROBS_BACKEND`` and defaults to ``"auto"``.
        vocab_size: the *real* vocabulary (the HF model's embedding rows); columns with a global id
            ``>= vocab_size`` are Megatron's padding and are excluded from the softmax, with zero gradient.
            ``None`` treats every column as real. Models built by this project must always pass it (the trainer,
            scoring and parity checks do): padding inside the softmax biases every log-prob by a
            layout-dependent amount.

    Returns:
        fp32 ``[...]`` log-probabilities, differentiable w.r.t. ``logits`` (the gradient has ``logits.dtype``).
    """
    if targets.shape != logits.shape[:-1]:
        raise ValueError(
            f"targets shape {tuple(targets.shape)} must equal logits shape without the vocab dim "
            f"{tuple(logits.shape[:-1])}"
        )
    if not logits.is_floating_point():
        raise TypeError(f"logits must be a float tensor, got {logits.dtype}")
    group = resolve_tp_group(tp_group)
    v_local = logits.shape[-1]
    if chunk_size is None:
        chunk_size = default_chunk_size(v_local)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    lead_shape = targets.shape
    flat_logits = logits.reshape(-1, v_local)
    flat_targets = targets.reshape(-1).long()
    world = dist.get_world_size(group) if group is not None else 1
    padded = v_local * world
    if vocab_size is None:
        vocab_size = padded
    if not 0 < vocab_size <= padded:
        raise ValueError(f"vocab_size={vocab_size} must lie in [1, {padded}] (local vocab {v_local} x tp {world})")
    if flat_targets.numel() and (flat_targets.min() < 0 or flat_targets.max() >= vocab_size):
        raise ValueError(
            f"target ids must lie in [0, {vocab_size}) (the real vocabulary; logits cover {padded} = local "
            f"{v_local} x tp {world}); got [{int(flat_targets.min())}, {int(flat_targets.max())}]. Mask padding "
            "with a valid id such as 0."
        )
    use_triton = _use_triton(flat_logits, backend)
    out = _VocabParallelLogProbs.apply(flat_logits, flat_targets, group, int(chunk_size), use_triton, int(vocab_size))
    return out.reshape(lead_shape)
