"""Fused Triton kernels for :func:`megatron_offgrpo.losses.vocab_parallel_logprobs` on CUDA.

Two kernels over one rank's shard of the logits, ``[N, V_local]`` rows with unit stride along the vocabulary:

* forward: per row, the *local* logsumexp (fp32) and the logit of the target if its global id falls in this
  rank's slice ``[vocab_start, vocab_start + V_local)``, else 0. The row is read once, in any float dtype, and
  accumulated in fp32 with an online max / sum-exp, so no fp32 copy of the shard ever exists.
* backward: ``grad[n, v] = g[n] * (onehot(target)[v] - exp(x[n, v] - lse[n]))`` with the *global* logsumexp
  ``lse`` (after the tensor-parallel combine, which stays in Python), written directly in the logits' dtype.

Triton is imported lazily, on the first kernel call: this module imports fine on machines where Triton is
missing or unusable, and callers check :func:`is_available` (and ``logits.is_cuda``) before using it.
"""

from __future__ import annotations

import functools
from types import SimpleNamespace
from typing import Optional, Tuple

import torch

__all__ = ["is_available", "local_logsumexp_and_target", "logits_grad"]

# Elements of a row handled per step and warps per program. Both kernels are memory bound; on an H100 at
# 16384 x 151936 (bf16 and fp32) this setting streams ~3.0 TB/s forward and ~2.85 TB/s backward, and every
# block of 1024-8192 with 4-16 warps was within ~5% of it except large blocks with few warps (forward slows
# down up to 3x there).
FWD_BLOCK_V, FWD_WARPS = 4096, 8
BWD_BLOCK_V, BWD_WARPS = 4096, 8


@functools.lru_cache(maxsize=None)
def is_available() -> bool:
    """True when Triton imports and a CUDA device is present."""
    try:
        import triton  # noqa: F401
    except Exception:  # not installed, or installed but broken on this machine: use the torch path
        return False
    return torch.cuda.is_available()


@functools.lru_cache(maxsize=None)
def _kernels() -> SimpleNamespace:
    """Import Triton and define the kernels (once)."""
    import triton
    import triton.language as tl

    @triton.jit
    def forward_kernel(
        x_ptr, targets_ptr, lse_ptr, target_logit_ptr,
        V, stride_row, vocab_start,
        BLOCK_V: tl.constexpr,
    ):
        # int64 row offset: N * V exceeds 2^31 elements at 16k tokens x 152k vocabulary.
        row = tl.program_id(0).to(tl.int64)
        x_row = x_ptr + row * stride_row
        cols = tl.arange(0, BLOCK_V)
        # Per-lane running max m and sum s of exp(x - m): no cross-lane reduction inside the loop. Starting m
        # at the most negative finite fp32 (not -inf) keeps x - m free of (-inf) - (-inf) = NaN on masked
        # lanes and on logits that are -inf; such lanes simply add exp(-inf) = 0.
        m = tl.full([BLOCK_V], -3.4028234663852886e38, tl.float32)
        s = tl.zeros([BLOCK_V], tl.float32)
        for start in range(0, V, BLOCK_V):
            idx = start + cols
            x = tl.load(x_row + idx, mask=idx < V, other=-float("inf")).to(tl.float32)
            # One exp per element: if x is the new max, rescale s by exp(m - x) and add exp(0) = 1; otherwise
            # add exp(x - m). Both are exp(-|x - m|). A NaN logit makes s NaN, as it should.
            d = x - m
            e = tl.exp(-tl.abs(d))
            bigger = d > 0
            s = tl.where(bigger, s * e + 1.0, s + e)
            m = tl.where(bigger, x, m)
        row_max = tl.max(m, axis=0)
        total = tl.sum(s * tl.exp(m - row_max), axis=0)
        tl.store(lse_ptr + row, row_max + tl.log(total))  # total == 0 (all -inf row) gives -inf, like torch

        t = tl.load(targets_ptr + row) - vocab_start  # local target index; outside [0, V) if another rank owns it
        owned = (t >= 0) & (t < V)
        t_logit = tl.load(x_row + tl.where(owned, t, 0), mask=owned, other=0.0).to(tl.float32)
        tl.store(target_logit_ptr + row, t_logit)

    @triton.jit
    def backward_kernel(
        x_ptr, grad_ptr, targets_ptr, lse_ptr, grad_out_ptr,
        V, stride_x_row, stride_grad_row, vocab_start,
        BLOCK_V: tl.constexpr,
    ):
        # Grid (rows, vocab blocks): rows on axis 0, whose size limit (2^31 - 1) fits any token count.
        row = tl.program_id(0).to(tl.int64)
        idx = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
        mask = idx < V
        g = tl.load(grad_out_ptr + row)
        lse = tl.load(lse_ptr + row)
        t = tl.load(targets_ptr + row) - vocab_start  # never equals an idx in [0, V) unless this rank owns it
        x = tl.load(x_ptr + row * stride_x_row + idx, mask=mask, other=0.0).to(tl.float32)
        onehot = (idx == t).to(tl.float32)
        grad = g * (onehot - tl.exp(x - lse))
        tl.store(grad_ptr + row * stride_grad_row + idx, grad.to(grad_ptr.dtype.element_ty), mask=mask)

    return SimpleNamespace(forward=forward_kernel, backward=backward_kernel)


def _unit_vocab_stride(logits: torch.Tensor) -> torch.Tensor:
    """The kernels index rows as ``row * stride_row + v``: rows may be strided (e.g. a column slice of a wider
    tensor), but the vocabulary must be contiguous. Copy only in the rare case it is not (transposed logits)."""
    return logits if logits.stride(-1) == 1 else logits.contiguous()


def local_logsumexp_and_target(
    logits: torch.Tensor, targets: torch.Tensor, vocab_start: int
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per row of ``logits`` ``[N, V_local]``: fp32 logsumexp over the local shard, and the fp32 logit of the
    *global* target id ``targets[n]`` if ``vocab_start <= targets[n] < vocab_start + V_local``, else 0."""
    logits = _unit_vocab_stride(logits)
    n, v_local = logits.shape
    lse = torch.empty(n, dtype=torch.float32, device=logits.device)
    target_logit = torch.empty(n, dtype=torch.float32, device=logits.device)
    if n == 0:
        return lse, target_logit
    _kernels().forward[(n,)](
        logits, targets.contiguous(), lse, target_logit,
        v_local, logits.stride(0), vocab_start,
        BLOCK_V=FWD_BLOCK_V, num_warps=FWD_WARPS,
    )
    return lse, target_logit


def logits_grad(
    logits: torch.Tensor,
    targets: torch.Tensor,
    vocab_start: int,
    lse: torch.Tensor,
    grad_output: torch.Tensor,
    out: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """``grad_output[n] * (onehot(targets[n] - vocab_start) - exp(logits - lse[n]))`` in ``logits.dtype``;
    ``lse`` is the global (all-reduced) fp32 logsumexp per row. Written into ``out`` when given (any row stride,
    unit vocabulary stride: e.g. the real-vocabulary columns of a wider gradient buffer), else a new tensor."""
    logits = _unit_vocab_stride(logits)
    n, v_local = logits.shape
    if out is None:
        grad = torch.empty((n, v_local), dtype=logits.dtype, device=logits.device)
    else:
        if out.shape != logits.shape or out.dtype != logits.dtype or out.stride(-1) != 1:
            raise ValueError(f"out must be {tuple(logits.shape)} {logits.dtype} with unit vocabulary stride")
        grad = out
    if n == 0:
        return grad
    grid = (n, -(-v_local // BWD_BLOCK_V))  # ceil division
    _kernels().backward[grid](
        logits, grad, targets.contiguous(), lse.float().contiguous(),
        # Contiguous fp32: autograd passes e.g. the stride-0 expansion of a sum's gradient.
        grad_output.float().contiguous(),
        v_local, logits.stride(0), grad.stride(0), vocab_start,
        BLOCK_V=BWD_BLOCK_V, num_warps=BWD_WARPS,
    )
    return grad
