"""Triton kernels for one logits tile of :func:`megatron_offgrpo.losses.fused_vocab_parallel_logprobs` on CUDA.

The fused output layer never holds more logits than one tile ``x = h[chunk] @ W[block]^T`` (``[rows, cols]``,
unit stride along the columns, in the inputs' dtype). The tile's GEMMs stay in cuBLAS, where they run fastest;
these kernels do everything else on the tile, reading it once and accumulating in fp32 registers, so the torch
path's fp32 copies and intermediate passes over the tile disappear:

* :func:`tile_stats` (forward), per row: the tile's logsumexp, the logit of the target when its id lies in the
  tile's columns (else 0) and, for the entropy, the tile's softmax-weighted mean logit ``E[x]``. The caller
  combines tiles (and tensor-parallel ranks) online, exactly as the torch path does.
* :func:`tile_grad_` (backward), per element: ``dx = g (onehot(target) - p) - g_H p (x - E[x])`` with
  ``p = exp(x - lse)`` from the *global* logsumexp and mean logit, written over the tile in place (its dtype):
  the operand of the two backward GEMMs (``grad_h = dx W``, ``grad_W = dx^T h``).

Triton is imported lazily, on the first kernel call: this module imports fine where Triton is missing or unusable,
and callers check :func:`is_available` and the tensors' device first.
"""

from __future__ import annotations

import functools
from types import SimpleNamespace
from typing import Optional, Tuple

import torch

from .triton_logprobs import is_available  # one availability check for every Triton kernel of the loss core

__all__ = ["is_available", "tile_stats", "tile_grad_"]

# Both kernels are memory bound (one read of the tile; the backward also writes it). Same setting as
# triton_logprobs, whose kernels stream the same rows at ~3 TB/s on an H100.
STATS_BLOCK_V, STATS_WARPS = 4096, 8
GRAD_BLOCK_V, GRAD_WARPS = 4096, 8


@functools.lru_cache(maxsize=None)
def _kernels() -> SimpleNamespace:
    """Import Triton and define the kernels (once)."""
    import triton
    import triton.language as tl

    @triton.jit
    def stats_kernel(
        x_ptr, targets_ptr, lse_ptr, target_logit_ptr, mean_ptr,
        V, stride_row, col_start,
        WITH_ENTROPY: tl.constexpr, BLOCK_V: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        x_row = x_ptr + row * stride_row
        cols = tl.arange(0, BLOCK_V)
        # Per-lane running max m, sum s of exp(x - m) and sum sx of exp(x - m) * x (entropy): no cross-lane
        # reduction inside the loop. m starts at the most negative finite fp32, not -inf, so that x - m is never
        # (-inf) - (-inf) = NaN on masked lanes; those add exp(-inf) = 0.
        m = tl.full([BLOCK_V], -3.4028234663852886e38, tl.float32)
        s = tl.zeros([BLOCK_V], tl.float32)
        sx = tl.zeros([BLOCK_V], tl.float32)
        for start in range(0, V, BLOCK_V):
            idx = start + cols
            valid = idx < V
            x = tl.load(x_row + idx, mask=valid, other=-float("inf")).to(tl.float32)
            # One exp per element: a new max rescales the sums by exp(m - x) and adds exp(0) = 1, otherwise
            # exp(x - m) is added; both are exp(-|x - m|).
            d = x - m
            e = tl.exp(-tl.abs(d))
            bigger = d > 0
            s = tl.where(bigger, s * e + 1.0, s + e)
            if WITH_ENTROPY:
                xv = tl.where(valid, x, 0.0)  # a masked lane adds e * 0 = 0, never 0 * (-inf)
                sx = tl.where(bigger, sx * e + xv, sx + e * xv)
            m = tl.where(bigger, x, m)
        row_max = tl.max(m, axis=0)
        scale = tl.exp(m - row_max)
        total = tl.sum(s * scale, axis=0)
        tl.store(lse_ptr + row, row_max + tl.log(total))
        if WITH_ENTROPY:
            tl.store(mean_ptr + row, tl.sum(sx * scale, axis=0) / total)
        t = tl.load(targets_ptr + row) - col_start  # the target's column in this tile; outside [0, V) if not here
        here = (t >= 0) & (t < V)
        t_logit = tl.load(x_row + tl.where(here, t, 0), mask=here, other=0.0).to(tl.float32)
        tl.store(target_logit_ptr + row, t_logit)

    @triton.jit
    def grad_kernel(
        x_ptr, targets_ptr, lse_ptr, mean_ptr, g_ptr, g_entropy_ptr,
        V, stride_row, col_start,
        WITH_ENTROPY: tl.constexpr, BLOCK_V: tl.constexpr,
    ):
        # Grid (rows, column blocks): rows on axis 0, whose size limit (2^31 - 1) fits any token count.
        row = tl.program_id(0).to(tl.int64)
        idx = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
        mask = idx < V
        ptr = x_ptr + row * stride_row + idx
        x = tl.load(ptr, mask=mask, other=0.0).to(tl.float32)
        p = tl.exp(x - tl.load(lse_ptr + row))
        t = tl.load(targets_ptr + row) - col_start
        dx = tl.load(g_ptr + row) * ((idx == t).to(tl.float32) - p)
        if WITH_ENTROPY:
            # d entropy / d x = -p (x - E[x])
            dx -= tl.load(g_entropy_ptr + row) * p * (x - tl.load(mean_ptr + row))
        # In place: every element is read above and written here by the same program.
        tl.store(ptr, dx.to(x_ptr.dtype.element_ty), mask=mask)

    return SimpleNamespace(stats=stats_kernel, grad=grad_kernel)


def _check_tile(x: torch.Tensor) -> None:
    if x.dim() != 2 or x.stride(-1) != 1:
        raise ValueError(f"a logits tile must be 2-d with unit column stride, got shape {tuple(x.shape)} "
                         f"strides {x.stride()}")


def tile_stats(
    x: torch.Tensor, targets: torch.Tensor, col_start: int, with_entropy: bool
) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """Per row of the tile ``x`` ``[rows, cols]``: fp32 logsumexp, the fp32 logit of column
    ``targets[r] - col_start`` when it lies in ``[0, cols)`` (else 0), and (``with_entropy``) the softmax-weighted
    mean logit ``sum_c softmax(x)_c x_c`` (else ``None``). ``targets``: ``[rows]`` int64 ids."""
    _check_tile(x)
    rows, cols = x.shape
    lse = torch.empty(rows, dtype=torch.float32, device=x.device)
    target_logit = torch.empty(rows, dtype=torch.float32, device=x.device)
    mean = torch.empty(rows, dtype=torch.float32, device=x.device) if with_entropy else lse  # unused pointer
    if rows:
        _kernels().stats[(rows,)](
            x, targets.contiguous(), lse, target_logit, mean,
            cols, x.stride(0), col_start,
            WITH_ENTROPY=with_entropy, BLOCK_V=STATS_BLOCK_V, num_warps=STATS_WARPS,
        )
    return lse, target_logit, (mean if with_entropy else None)


def tile_grad_(
    x: torch.Tensor,
    targets: torch.Tensor,
    col_start: int,
    lse: torch.Tensor,
    grad_logp: torch.Tensor,
    mean: Optional[torch.Tensor] = None,
    grad_entropy: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Overwrite the tile ``x`` with ``d loss / d x`` (in ``x.dtype``) and return it.

    ``grad_logp[r] * (onehot(targets[r] - col_start) - p) - grad_entropy[r] * p * (x - mean[r])`` with
    ``p = exp(x - lse[r])``; ``lse`` and ``mean`` are the *global* (all tiles, all ranks) fp32 logsumexp and mean
    logit. The entropy term is dropped when ``grad_entropy`` is ``None``.
    """
    _check_tile(x)
    rows, cols = x.shape
    with_entropy = grad_entropy is not None
    if with_entropy and mean is None:
        raise ValueError("the entropy gradient needs the mean logit of the forward pass")
    if rows and cols:
        g = grad_logp.float().contiguous()  # contiguous fp32: autograd may pass e.g. an expanded sum's gradient
        ge = grad_entropy.float().contiguous() if with_entropy else g
        grid = (rows, -(-cols // GRAD_BLOCK_V))
        _kernels().grad[grid](
            x, targets.contiguous(), lse.contiguous(), (mean if with_entropy else lse).contiguous(), g, ge,
            cols, x.stride(0), col_start,
            WITH_ENTROPY=with_entropy, BLOCK_V=GRAD_BLOCK_V, num_warps=GRAD_WARPS,
        )
    return x
