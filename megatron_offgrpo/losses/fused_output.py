"""The output layer and the per-token log-probs fused: log-probs (and entropy) of the targets straight from the
final hidden states and the vocab-parallel output weight, so that the logits never exist.

Contract (DESIGN.md section 4, as :mod:`megatron_offgrpo.losses.logprobs`): each TP rank holds the contiguous rows
``[rank * V/tp, (rank + 1) * V/tp)`` of the output weight ``W`` (``[V/tp, H]``: Megatron's vocab-parallel
``ColumnParallelLinear``, or the ``VocabParallelEmbedding`` when the embeddings are tied) and the final hidden
state ``h`` (``[H]``) of every token. For every token, over the *global*, *real* vocabulary, in fp32:

    x = W h,    logp = x_target - logsumexp(x),    entropy = logsumexp(x) - sum_v softmax(x)_v x_v

Why: the unfused path materialises the logits ``[tokens, V/tp]``, GPTModel's transposed copy of them, and their
gradient; at 16k tokens x 152k vocabulary each is 5 GB in bf16, the largest buffers of a training step. Here the
logits exist one *tile* ``[token chunk, vocabulary block]`` at a time (about 128 MiB of fp32):

* forward: per tile, the output layer's own GEMM ``h[chunk] @ W[block]^T`` (in the inputs' dtype, fp32
  accumulation inside the GEMM: the very numbers the unfused output layer produces), then the tile's logsumexp,
  target logit and (for the entropy) softmax-weighted mean logit in fp32, merged online into ``[tokens]`` fp32
  running values. Nothing of size ``[tokens, V]`` survives the forward.
* backward: the tile's logits are recomputed (one extra GEMM per tile: the price of never storing them), turned
  into ``dx = g (onehot(target) - p) - g_H p (x - E_p[x])`` (``p`` from the saved global logsumexp) in the
  inputs' dtype, and fed to the output layer's two backward GEMMs: ``grad_h += dx W[block]`` into an fp32
  ``[tokens, H]`` accumulator, and ``grad_W[block] = dx^T h``. Vocabulary blocks are the outer loop, so each
  block's weight gradient is finished before the next starts: no fp32 copy of ``[V/tp, H]`` is ever needed.

Tensor parallelism: the tiles' statistics merge across ranks with two all-reduces of ``[tokens]`` fp32 vectors
(max of the local logsumexps; then the rescaled partition functions, the owned target logit and the entropy
moment), the combine of :mod:`logprobs`. The hidden states are an input every rank multiplies by its own
vocabulary rows, so their gradient is the sum of the ranks' partial gradients. As in Megatron's
``ColumnParallelLinear``, that reduction is Megatron's own region function around the input:
``copy_to_tensor_model_parallel_region`` (identity forward, all-reduce backward), or under sequence parallelism
``gather_from_sequence_parallel_region`` (hidden states arrive sequence-sharded: all-gather forward,
reduce-scatter the gradient backward; the gathered ``[tokens, H]`` states are what backward keeps, small next
to any logits). The weight's gradient is local to each rank's rows.

Real vocabulary: rows of ``W`` whose global id is ``>= vocab_size`` are Megatron's vocabulary padding. They are
never multiplied (the tiles cover the real rows only), so they are excluded from the softmax, and their gradient
is exactly 0; a rank holding only padding contributes ``logsumexp = -inf`` and zero gradients.

Tied embeddings: pass the embedding's weight (``model.shared_embedding_or_output_weight()``). Its gradient is an
ordinary autograd gradient of that parameter, summed with the embedding lookup's, so Megatron's DDP hooks and its
shared-embedding all-reduce between the first and last pipeline stages see it as they see the unfused one.

Context parallelism and packing: the function is per token. Only the row correspondence between ``hidden`` and
``targets`` matters; CP chunks and packed (THD) rows are tokens like any other. The flattened tokens need not be
contiguous in the sequence.

Backends: the GEMMs are torch (cuBLAS on CUDA) in both. On CUDA, when Triton is usable, fused kernels
(:mod:`triton_fused_output`) do each tile's statistics and its in-place gradient in one pass, in fp32 registers;
elsewhere torch operations do. ``backend=`` or ``MEGATRON_OFFGRPO_LOGPROBS_BACKEND`` (shared with
:func:`vocab_parallel_logprobs`) force one.
"""

from __future__ import annotations

import os
from typing import Callable, Optional, Tuple, Union

import torch
import torch.distributed as dist

from .logprobs import BACKEND_ENV, resolve_tp_group, vocab_parallel_logprobs

__all__ = [
    "fused_vocab_parallel_logprobs",
    "fused_output_loss",
    "loss_tile_tokens",
    "logprobs_from_model_output",
    "fused_output_layer_enabled",
    "tile_shape",
    "FUSED_OUTPUT_LAYER_CHOICES",
]

_BACKENDS = ("auto", "torch", "triton")
FUSED_OUTPUT_LAYER_CHOICES = ("auto", "true", "false")

# One tile of logits is about 2^25 fp32 elements (128 MiB), as one chunk of logprobs.py: large enough that the
# per-tile overheads (Python, kernel launches, re-reading h and W) vanish, small next to the model.
_TILE_ELEMENTS = 1 << 25
# Vocabulary blocks narrower than this make the GEMMs inefficient: past 32k tokens the tile chunks tokens instead.
_MIN_VOCAB_BLOCK = 1024


def tile_shape(num_tokens: int, vocab_real: int, chunk_size: Optional[int] = None) -> Tuple[int, int]:
    """``(tokens, vocabulary rows)`` of one logits tile: ``chunk_size`` tokens (``None``: all tokens, up to
    32k) by as many vocabulary rows as keep the tile near 2^25 elements."""
    tokens = chunk_size if chunk_size else _TILE_ELEMENTS // _MIN_VOCAB_BLOCK
    tokens = max(1, min(tokens, num_tokens))
    rows = max(1, min(vocab_real, _TILE_ELEMENTS // tokens))
    return tokens, rows


def fused_output_layer_enabled(setting: Union[str, bool]) -> bool:
    """Resolve ``loss.fused_output_layer`` (``auto`` | ``true`` | ``false``, any case: OmegaConf turns a YAML
    ``true`` into ``"True"`` in this string field) to on / off.

    ``auto`` is on: it frees the largest buffers of the step and, with the loss's gradients taken in the forward
    pass (:func:`fused_output_loss`, ``loss.fused_output_gradients: forward``), costs the three output-layer GEMMs
    of Megatron's cross-entropy step. ``benchmarks/train_step.py`` on CPU (2 x 1024 tokens, Qwen's 151,936
    vocabulary, a 4-layer toy whose output layer is ~60% of the step's FLOPs, quiet machine): the offline GRPO
    step takes 1.00x the cross-entropy step's time at 0.35-0.36x its peak extra memory (two runs); with the logits
    recomputed in backward (four GEMMs) 1.16-1.20x / 0.36x; unfused 1.56-2.36x / 2.44x. On GPU no timing yet (``--device cuda --seq
    16384`` gives it).
    """
    value = str(setting).lower()
    if value not in FUSED_OUTPUT_LAYER_CHOICES:
        raise ValueError(f"loss.fused_output_layer={setting!r} is not one of {list(FUSED_OUTPUT_LAYER_CHOICES)}")
    return value != "false"


def _chunks(n: int, size: int):
    for start in range(0, n, size):
        yield start, min(n, start + size)


def _use_triton(hidden: torch.Tensor, backend: Optional[str]) -> bool:
    backend = backend or os.environ.get(BACKEND_ENV) or "auto"
    if backend not in _BACKENDS:
        raise ValueError(f"logprobs backend must be one of {_BACKENDS}, got {backend!r}")
    if backend == "torch" or (backend == "auto" and not hidden.is_cuda):
        return False
    from . import triton_fused_output  # Triton itself is imported on the first kernel call

    available = hidden.is_cuda and triton_fused_output.is_available()
    if backend == "triton" and not available:
        raise RuntimeError("logprobs backend 'triton' needs CUDA tensors and an importable Triton")
    return available


def _tile_stats_torch(x: torch.Tensor, targets: torch.Tensor, col_start: int, with_entropy: bool):
    """The torch twin of :func:`triton_fused_output.tile_stats` (fp32 whatever ``x.dtype``). An fp32 ``x`` is the
    caller's scratch tile and is overwritten (in-place max / subtract / exp / sum runs ~2.5x faster on CPU than
    ``torch.logsumexp``, which allocates a temporary tile)."""
    cols = x.shape[1]
    local = targets - col_start
    here = (local >= 0) & (local < cols)
    picked = x.gather(-1, local.clamp(0, cols - 1)[:, None]).squeeze(-1).float()
    target_logit = torch.where(here, picked, torch.zeros_like(picked))
    xf = x.float()  # fp32 tiles: x itself
    row_max = xf.amax(dim=-1)
    mean = None
    if with_entropy:
        e = torch.exp(xf - row_max[:, None])  # x is still needed for the softmax-weighted mean: a second tile
        total = e.sum(dim=-1)
        mean = e.mul_(xf).sum(dim=-1) / total
    else:
        total = xf.sub_(row_max[:, None]).exp_().sum(dim=-1)
    return row_max + total.log(), target_logit, mean


def _tile_grad_torch(x, targets, col_start, lse, grad_logp, mean=None, grad_entropy=None) -> torch.Tensor:
    """The torch twin of :func:`triton_fused_output.tile_grad_`: ``d loss / d x`` in ``x.dtype`` (reuses the
    tile's memory for fp32 tiles)."""
    cols = x.shape[1]
    xf = x.float()  # fp32 tiles: the tile itself, overwritten below (the caller recomputed it for us)
    if grad_entropy is None:
        dx = xf.sub_(lse[:, None]).exp_().mul_(-grad_logp[:, None])  # -g p, in place: one tile of memory
    else:
        p = torch.exp(xf - lse[:, None])
        # d entropy / d x = -p (x - E[x]): computed into xf, which is not needed afterwards.
        entropy_term = xf.sub_(mean[:, None]).mul_(p).mul_(-grad_entropy[:, None])
        dx = p.mul_(-grad_logp[:, None]).add_(entropy_term)
    local = targets - col_start
    here = (local >= 0) & (local < cols)
    dx.scatter_add_(-1, local.clamp(0, cols - 1)[:, None], torch.where(here, grad_logp, 0.0)[:, None])
    return dx if dx.dtype == x.dtype else dx.to(x.dtype)


def _combine_over_tp(lse, target_logit, mean, tp_group):
    """The ranks' per-token statistics over their vocabulary shards -> the global ones (collective over TP).

    logsumexp over ranks = M + log(sum_r exp(lse_r - M)), M = max_r lse_r: stable for huge logits. A rank of
    padding only (lse_r = -inf) adds exp(-inf) = 0. The target logit is owned by one rank (0 elsewhere): a sum. The
    entropy moment ``mean`` (or ``None``) is a softmax-weighted mean, so it merges with the same weights.
    """
    global_max = lse.clone()
    dist.all_reduce(global_max, op=dist.ReduceOp.MAX, group=tp_group)
    weight_r = torch.exp(lse - global_max)
    partial = torch.stack([weight_r, target_logit] + ([weight_r * mean] if mean is not None else []))
    dist.all_reduce(partial, op=dist.ReduceOp.SUM, group=tp_group)
    lse = global_max + torch.log(partial[0])
    return lse, partial[1], (partial[2] / partial[0] if mean is not None else None)


class _Scratch:
    """One tile's worth of memory, reused by every tile of a pass: a fresh 128 MiB tensor per tile would pay its
    page faults (CPU) or allocator traffic every time (the logits GEMM runs ~20% faster into reused memory)."""

    def __init__(self, elements: int, like: torch.Tensor):
        self.buffer = torch.empty(elements, dtype=like.dtype, device=like.device)

    def mm(self, h: torch.Tensor, w_block: torch.Tensor) -> torch.Tensor:
        """``h @ w_block^T`` written into the scratch memory (valid until the next call)."""
        out = self.buffer[: h.shape[0] * w_block.shape[0]].view(h.shape[0], w_block.shape[0])
        return torch.mm(h, w_block.t(), out=out)


class _FusedOutputLogProbs(torch.autograd.Function):
    """Autograd function over flattened, TP-replicated ``[N, H]`` hidden states, the local ``[V_local, H]`` weight
    and ``[N]`` global target ids. Returns ``logp`` (and ``entropy`` when asked), fp32 ``[N]``. The gradient of the
    hidden states it returns is this rank's partial one: the caller's region function reduces it over TP."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, tp_group, chunk_size, vocab_size, use_triton, with_entropy):
        n = hidden.shape[0]
        v_local = weight.shape[0]
        rank = dist.get_rank(tp_group) if tp_group is not None else 0
        vocab_start = rank * v_local
        # Rows [v_real, v_local) of this shard are vocabulary padding: the tiles never cover them.
        v_real = min(v_local, max(0, vocab_size - vocab_start))
        tokens, rows = tile_shape(n, v_real, chunk_size)
        f32 = dict(dtype=torch.float32, device=hidden.device)
        lse = torch.full((n,), float("-inf"), **f32)
        target_logit = torch.zeros(n, **f32)
        mean = torch.zeros(n, **f32) if with_entropy else None
        if use_triton:
            from .triton_fused_output import tile_stats
        else:
            tile_stats = _tile_stats_torch
        local_targets = targets - vocab_start
        scratch = _Scratch(tokens * rows, hidden)
        for vs, ve in _chunks(v_real, rows):
            w_block = weight[vs:ve]
            for ts, te in _chunks(n, tokens):
                x = scratch.mm(hidden[ts:te], w_block)  # [tokens, rows]: the only logits that ever exist
                t_lse, t_target, t_mean = tile_stats(x, local_targets[ts:te], vs, with_entropy)
                # Online merge of this tile into the running per-token values (a logaddexp, rescaled moments).
                new_lse = torch.logaddexp(lse[ts:te], t_lse)
                if with_entropy:
                    mean[ts:te] = (mean[ts:te] * torch.exp(lse[ts:te] - new_lse)
                                   + t_mean * torch.exp(t_lse - new_lse))
                lse[ts:te] = new_lse
                target_logit[ts:te] += t_target  # 0 unless the target's row is in this tile

        if tp_group is not None:
            lse, target_logit, mean = _combine_over_tp(lse, target_logit, mean, tp_group)

        ctx.save_for_backward(hidden, weight, targets, lse, mean if with_entropy else lse)
        ctx.meta = (vocab_start, v_real, tokens, rows, use_triton, with_entropy)
        logp = target_logit - lse
        if with_entropy:
            return logp, lse - mean
        return logp

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy=None):
        hidden, weight, targets, lse, mean = ctx.saved_tensors
        vocab_start, v_real, tokens, rows, use_triton, with_entropy = ctx.meta
        need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        n, h = hidden.shape
        f32 = dict(dtype=torch.float32, device=hidden.device)
        # fp32 accumulator over vocabulary blocks ([N, H]: small next to any tile); fp32 inputs accumulate in place.
        grad_hidden = torch.zeros(n, h, **f32) if need_hidden else None
        # Padding rows keep exactly 0 (Adam never moves them).
        grad_weight = torch.zeros_like(weight) if need_weight else None
        if v_real == 0 or not (need_hidden or need_weight):
            return (None if grad_hidden is None else grad_hidden.to(hidden.dtype), grad_weight,
                    None, None, None, None, None, None)
        g = torch.zeros(n, **f32) if grad_logp is None else grad_logp.float().contiguous()
        g_entropy = grad_entropy.float().contiguous() if with_entropy and grad_entropy is not None else None
        if use_triton:
            from .triton_fused_output import tile_grad_ as tile_grad
        else:
            tile_grad = _tile_grad_torch
        local_targets = targets - vocab_start
        one_token_chunk = tokens >= n
        scratch = _Scratch(tokens * rows, hidden)
        for vs, ve in _chunks(v_real, rows):
            w_block = weight[vs:ve]
            # The block's weight gradient sums over token chunks: in fp32 unless a single GEMM makes it whole.
            if need_weight and not one_token_chunk and weight.dtype != torch.float32:
                grad_w_block = torch.zeros(ve - vs, h, **f32)
            else:
                grad_w_block = grad_weight[vs:ve] if need_weight else None
            for ts, te in _chunks(n, tokens):
                h_chunk = hidden[ts:te]
                x = scratch.mm(h_chunk, w_block)  # recomputed: the forward kept no logits
                dx = tile_grad(x, local_targets[ts:te], vs, lse[ts:te], g[ts:te],
                               mean[ts:te] if g_entropy is not None else None,
                               None if g_entropy is None else g_entropy[ts:te])
                if need_hidden:
                    if hidden.dtype == torch.float32:
                        grad_hidden[ts:te].addmm_(dx, w_block)
                    else:
                        grad_hidden[ts:te] += dx @ w_block
                if need_weight:
                    if grad_w_block.dtype == dx.dtype:
                        grad_w_block.addmm_(dx.t(), h_chunk)
                    else:
                        grad_w_block += (dx.t() @ h_chunk).float()
            if need_weight and grad_w_block.data_ptr() != grad_weight[vs:ve].data_ptr():
                grad_weight[vs:ve] = grad_w_block
        return (None if grad_hidden is None else grad_hidden.to(hidden.dtype), grad_weight,
                None, None, None, None, None, None)


def fused_vocab_parallel_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    tp_group: Optional[dist.ProcessGroup] = None,
    chunk_size: Optional[int] = None,
    backend: Optional[str] = None,
    vocab_size: Optional[int] = None,
    sequence_parallel: bool = False,
    return_entropy: bool = False,
) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
    """Log-probabilities of ``targets`` under the logits ``hidden @ weight^T``, in fp32, over the real vocabulary,
    without ever materialising those logits (see the module docstring for the algorithm).

    Args:
        hidden: final hidden states ``[..., H]`` (the output layer's input), the same on every TP rank. With
            ``sequence_parallel``, this rank's contiguous slice of the sequence dimension (the one before ``H``):
            ``[..., S / tp, H]``, e.g. GPTModel's ``[b, s/tp, H]``.
        weight: this rank's rows of the output weight, ``[V_local, H]``, same dtype as ``hidden`` (the output
            layer's weight, or the embedding's when tied).
        targets: ``[...]`` int64 *global* vocabulary ids, ``< vocab_size``, one per row of ``hidden`` (with
            ``sequence_parallel``: for the full sequence, ``[..., S]``).
        tp_group: the tensor-parallel group the vocabulary is sharded over; ``None`` uses Megatron's TP group when
            ``parallel_state`` is initialized, else treats ``weight`` as the whole vocabulary.
        chunk_size: tokens per tile (``None``: all of them, up to 32k); each tile spans as many vocabulary rows as
            keep it near 2^25 elements, so the logits memory is bounded whatever the vocabulary.
        backend: ``"auto"`` (Triton tile kernels on CUDA when usable, else torch), ``"torch"`` or ``"triton"``;
            ``None`` reads ``MEGATRON_OFFGRPO_LOGPROBS_BACKEND``.
        vocab_size: the real vocabulary; weight rows with a global id ``>= vocab_size`` are padding, excluded from
            the softmax with zero gradient. ``None`` treats every row as real.
        sequence_parallel: ``hidden`` is sequence-sharded over the TP group (Megatron's sequence parallelism).
        return_entropy: also return the per-token entropy of the (real-vocabulary) softmax, differentiable.

    Returns:
        fp32 ``logp`` shaped like ``targets`` (and fp32 ``entropy`` alike when ``return_entropy``),
        differentiable w.r.t. ``hidden`` and ``weight`` (gradients in their dtype).
    """
    hidden, targets, group, vocab_size, restore = _prepare(hidden, weight, targets, tp_group, chunk_size,
                                                           vocab_size, sequence_parallel)
    out = _FusedOutputLogProbs.apply(
        hidden.reshape(-1, hidden.shape[-1]), weight, targets.reshape(-1).long(), group, chunk_size,
        int(vocab_size), _use_triton(hidden, backend), bool(return_entropy),
    )
    if return_entropy:
        return restore(out[0]), restore(out[1])
    return restore(out)


def _prepare(hidden, weight, targets, tp_group, chunk_size, vocab_size, sequence_parallel):
    """Validate the inputs of the public functions and route the hidden states through Megatron's TP region
    function. Returns ``(hidden, targets, group, vocab_size, restore)``: the hidden states every rank multiplies
    (gathered under sequence parallelism), the targets in the same row order, the TP group (or ``None``), the real
    vocabulary, and ``restore`` mapping a flat per-token vector back to the caller's ``targets`` layout."""
    if not hidden.is_floating_point() or weight.dtype != hidden.dtype:
        raise TypeError(f"hidden ({hidden.dtype}) and weight ({weight.dtype}) must be float tensors of one dtype")
    if weight.dim() != 2 or hidden.dim() < 1 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"weight {tuple(weight.shape)} must be [V_local, H] with H = the hidden size {hidden.shape[-1]} of "
            f"hidden {tuple(hidden.shape)}; pass the final hidden states, not the logits"
        )
    group = resolve_tp_group(tp_group)
    world = dist.get_world_size(group) if group is not None else 1
    sharded = sequence_parallel and group is not None
    if sharded:
        expected = tuple(hidden.shape[:-2]) + (hidden.shape[-2] * world,) if hidden.dim() >= 2 else None
    else:
        expected = tuple(hidden.shape[:-1])
    if tuple(targets.shape) != expected:
        what = f"hidden's sequence dim x tp {world} " if sharded else ""
        raise ValueError(f"targets shape {tuple(targets.shape)} must equal hidden shape without H ({what}= "
                         f"{expected}) for hidden {tuple(hidden.shape)}")
    v_local = weight.shape[0]
    padded = v_local * world
    if vocab_size is None:
        vocab_size = padded
    if not 0 < vocab_size <= padded:
        raise ValueError(f"vocab_size={vocab_size} must lie in [1, {padded}] (local vocab {v_local} x tp {world})")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if targets.numel() and (targets.min() < 0 or targets.max() >= vocab_size):
        raise ValueError(
            f"target ids must lie in [0, {vocab_size}) (the real vocabulary; the weight covers {padded} = local "
            f"{v_local} x tp {world}); got [{int(targets.min())}, {int(targets.max())}]. Mask padding with a "
            "valid id such as 0."
        )
    if group is not None:
        from megatron.core.tensor_parallel import (
            copy_to_tensor_model_parallel_region,
            gather_from_sequence_parallel_region,
        )

        if sharded:
            # [..., S/tp, H] -> [S/tp, ..., H] -> all-gather dim 0 (reduce-scatter backward) -> [S, ..., H]; the
            # targets are laid out the same way instead of transposing the gathered states back.
            hidden = gather_from_sequence_parallel_region(hidden.movedim(-2, 0), group=group)
            targets = targets.movedim(-1, 0)
        else:
            hidden = copy_to_tensor_model_parallel_region(hidden, group=group)  # all-reduce the grad backward
    lead_shape = targets.shape

    def restore(flat: torch.Tensor) -> torch.Tensor:
        out = flat.reshape(lead_shape)
        return out.movedim(0, -1) if sharded else out

    return hidden, targets, group, vocab_size, restore


# ---------------------------------------------------------------------------------------------------------------
# Training: the loss's gradient computed during the forward pass (three output-layer GEMMs, as Megatron's own)
#
# Why: the function above never stores logits, so its backward must recompute them: four output-layer GEMMs
# (forward logits, recomputed logits, grad_h, grad_W) against the three of Megatron's cross-entropy step. A policy
# loss is *token-separable*: it is a sum over tokens of a per-token term whose weight (the aggregation's 1/|o_i|,
# 1/N_seq ...) does not depend on the log-probs, so d loss / d logp_t depends on logp_t alone and is known as soon
# as the token's logsumexp is. Tiles that span the rank's whole vocabulary for a chunk of tokens finish each
# token's logsumexp inside the tile, so the tile's gradient ``dx = g (onehot - p)`` and the two gradient GEMMs can
# run right there, before the tile is overwritten: the forward does all the work, the backward only scales the
# stored gradients by the incoming one. What it keeps from forward to backward is the weight's gradient (fp32
# ``[V/tp, H]``, which the unfused backward also allocates) and the hidden states' (``[tokens, H]``).


# Fewer tokens per tile make the weight-gradient GEMM (inner dimension = the tile's tokens) memory bound.
_MIN_LOSS_TILE_TOKENS = 256


def loss_tile_tokens(num_tokens: int, vocab_real: int, chunk_size: Optional[int] = None) -> int:
    """Tokens per tile of :func:`fused_output_loss` (each tile spans the rank's whole real vocabulary):
    ``chunk_size``, else as many as keep the tile near 2^25 elements, at least 256."""
    tokens = chunk_size if chunk_size else max(_MIN_LOSS_TILE_TOKENS, _TILE_ELEMENTS // max(1, vocab_real))
    return max(1, min(tokens, num_tokens))


def _tile_exp_stats_torch(x: torch.Tensor, targets: torch.Tensor):
    """Torch path of one full-vocabulary tile: ``(lse, target_logit, e, row_max)`` with ``e = exp(x - row_max)``
    (fp32; an fp32 ``x`` is overwritten with it), from which the gradient follows once the global logsumexp is
    known, without a second pass over the logits."""
    cols = x.shape[1]
    here = (targets >= 0) & (targets < cols)
    picked = x.gather(-1, targets.clamp(0, cols - 1)[:, None]).squeeze(-1).float()
    target_logit = torch.where(here, picked, torch.zeros_like(picked))
    xf = x.float()
    row_max = xf.amax(dim=-1)
    e = xf.sub_(row_max[:, None]).exp_()
    return row_max + e.sum(dim=-1).log(), target_logit, e, row_max


def _tile_grad_from_exp_torch(e, targets, row_max, lse, grad_logp, dtype) -> torch.Tensor:
    """``dx = g (onehot(target) - p)`` with ``p = e exp(row_max - lse)`` (``lse`` global), in place over ``e``."""
    cols = e.shape[1]
    dx = e.mul_((-grad_logp * torch.exp(row_max - lse))[:, None])
    here = (targets >= 0) & (targets < cols)
    dx.scatter_add_(-1, targets.clamp(0, cols - 1)[:, None], torch.where(here, grad_logp, 0.0)[:, None])
    return dx if dx.dtype == dtype else dx.to(dtype)


class _FusedOutputLoss(torch.autograd.Function):
    """``loss_fn(logp)`` of the log-probs of ``[N, H]`` TP-replicated hidden states under the local ``[V_local, H]``
    weight, with its gradients w.r.t. both computed in forward. Returns ``(loss, logp)``; ``logp`` (fp32 ``[N]``)
    is not differentiable. ``loss_fn`` must be token-separable (module notes above)."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, tp_group, chunk_tokens, vocab_size, use_triton, loss_fn):
        n, h = hidden.shape
        v_local = weight.shape[0]
        rank = dist.get_rank(tp_group) if tp_group is not None else 0
        vocab_start = rank * v_local
        v_real = min(v_local, max(0, vocab_size - vocab_start))
        need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        f32 = dict(dtype=torch.float32, device=hidden.device)
        logp = torch.zeros(n, **f32)
        grad_hidden = torch.zeros_like(hidden) if need_hidden else None
        # fp32 accumulation over token chunks (the weight's own memory when it is fp32 and one chunk covers all).
        grad_weight = torch.zeros(v_local, h, **f32) if need_weight else None
        w_real = weight[:v_real]
        local_targets = targets - vocab_start
        scratch = _Scratch(chunk_tokens * v_real, hidden)
        if use_triton:
            from .triton_fused_output import tile_grad_, tile_stats

        def token_gradient(ts: int, te: int) -> torch.Tensor:
            # Separable: d loss / d logp_t at the chunk's tokens does not depend on the other entries of `logp`
            # (zeros or earlier chunks' values), so one autograd pass over the whole vector answers for the chunk.
            # Cost: an elementwise pass over all N tokens per chunk (N / chunk passes in all), negligible next to
            # the chunk's GEMMs on CPU; on GPU these are small kernels (not measured yet).
            with torch.enable_grad():
                lp = logp.detach().clone().requires_grad_(True)
                (grad,) = torch.autograd.grad(loss_fn(lp), lp, allow_unused=True)
            return torch.zeros(te - ts, **f32) if grad is None else grad[ts:te].float()

        for ts, te in _chunks(n, chunk_tokens):
            h_chunk, t_chunk = hidden[ts:te], local_targets[ts:te]
            e = row_max = None
            if v_real:
                x = scratch.mm(h_chunk, w_real)  # [chunk, V_real]: this rank's logits of these tokens
                if use_triton:
                    lse, target_logit, _ = tile_stats(x, t_chunk, 0, False)
                else:
                    lse, target_logit, e, row_max = _tile_exp_stats_torch(x, t_chunk)
            else:  # a rank holding only vocabulary padding
                lse = torch.full((te - ts,), float("-inf"), **f32)
                target_logit = torch.zeros(te - ts, **f32)
            if tp_group is not None:
                lse, target_logit, _ = _combine_over_tp(lse, target_logit, None, tp_group)
            logp[ts:te] = target_logit - lse
            g = token_gradient(ts, te)
            if not v_real or not (need_hidden or need_weight):
                continue
            if use_triton:
                dx = tile_grad_(x, t_chunk, 0, lse, g)
            else:
                dx = _tile_grad_from_exp_torch(e, t_chunk, row_max, lse, g, hidden.dtype)
            if need_hidden:
                torch.mm(dx, w_real, out=grad_hidden[ts:te])
            if need_weight:
                if dx.dtype == torch.float32:
                    grad_weight[:v_real].addmm_(dx.t(), h_chunk)
                else:
                    grad_weight[:v_real] += (dx.t() @ h_chunk).float()
        with torch.no_grad():
            loss = loss_fn(logp.clone()).detach().float()
        ctx.grads = (grad_hidden, grad_weight, weight.dtype)
        ctx.mark_non_differentiable(logp)
        return loss, logp

    @staticmethod
    def backward(ctx, grad_loss, _grad_logp):
        grad_hidden, grad_weight, weight_dtype = ctx.grads
        ctx.grads = None  # one backward: the stored gradients are scaled in place and handed over
        scale = grad_loss.float()
        if grad_hidden is not None:
            grad_hidden = grad_hidden.mul_(scale.to(grad_hidden.dtype))
        if grad_weight is not None:
            grad_weight = grad_weight.mul_(scale).to(weight_dtype)
        return grad_hidden, grad_weight, None, None, None, None, None, None


def fused_output_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    loss_fn: Callable[[torch.Tensor], torch.Tensor],
    tp_group: Optional[dist.ProcessGroup] = None,
    chunk_size: Optional[int] = None,
    backend: Optional[str] = None,
    vocab_size: Optional[int] = None,
    sequence_parallel: bool = False,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """A token-separable loss of the log-probs of ``targets`` under ``hidden @ weight^T``, its gradients w.r.t.
    ``hidden`` and ``weight`` computed in the forward pass (three output-layer GEMMs, no recompute), the logits
    never materialised.

    Args: as :func:`fused_vocab_parallel_logprobs`, plus
        loss_fn: ``logp -> scalar`` on fp32 log-probs shaped like ``targets``; *token-separable*: ``d loss /
            d logp[t]`` depends on ``logp[t]`` only (every registered policy loss: a per-token term times weights
            that do not depend on the log-probs). It is called once per tile (with the other tokens' entries
            arbitrary) and once more for the value. A loss mixing tokens (a sequence-level ratio, say) must use
            :func:`fused_vocab_parallel_logprobs` instead.
        chunk_size: tokens per tile (``None``: :func:`loss_tile_tokens`); a tile spans the rank's whole real
            vocabulary.

    Returns:
        ``(loss, logp)``: the fp32 scalar ``loss_fn(logp)``, differentiable w.r.t. ``hidden`` and ``weight``
        (one backward), and the fp32 log-probs shaped like ``targets``, detached.
    """
    if not (torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)):
        # No backward will come (validation, scoring; autograd would still report the parameters as needing
        # gradients inside the function): one GEMM per tile, no gradients made.
        logp = fused_vocab_parallel_logprobs(hidden, weight, targets, tp_group, chunk_size, backend, vocab_size,
                                             sequence_parallel)
        return loss_fn(logp).float(), logp
    hidden, targets, group, vocab_size, restore = _prepare(hidden, weight, targets, tp_group, chunk_size,
                                                           vocab_size, sequence_parallel)
    v_local = weight.shape[0]
    flat_targets = targets.reshape(-1).long()
    # Every TP rank must use the same chunks (their statistics are all-reduced per chunk): size them by the rank-0
    # shard, which is all real.
    chunk_tokens = loss_tile_tokens(flat_targets.numel(), min(v_local, vocab_size), chunk_size)

    def flat_loss(flat_logp: torch.Tensor) -> torch.Tensor:
        return loss_fn(restore(flat_logp))

    loss, flat_logp = _FusedOutputLoss.apply(
        hidden.reshape(-1, hidden.shape[-1]), weight, flat_targets, group, chunk_tokens, int(vocab_size),
        _use_triton(hidden, backend), flat_loss,
    )
    return loss, restore(flat_logp)


def logprobs_from_model_output(
    output: torch.Tensor,
    targets: torch.Tensor,
    output_weight: Optional[torch.Tensor] = None,
    *,
    chunk_size: Optional[int] = None,
    vocab_size: Optional[int] = None,
    sequence_parallel: bool = False,
) -> torch.Tensor:
    """Per-token log-probs of ``targets`` from what the model returned: vocab-parallel logits when
    ``output_weight`` is ``None`` (:func:`vocab_parallel_logprobs`), else final hidden states to apply
    ``output_weight`` to (:func:`fused_vocab_parallel_logprobs`; ``loss.fused_output_layer``). Megatron's TP group,
    the real ``vocab_size`` and the chunking mean the same in both."""
    if output_weight is None:
        return vocab_parallel_logprobs(output, targets, chunk_size=chunk_size, vocab_size=vocab_size)
    return fused_vocab_parallel_logprobs(output, output_weight, targets, chunk_size=chunk_size,
                                         vocab_size=vocab_size, sequence_parallel=sequence_parallel)
