"""Torch-native core attention: ``scaled_dot_product_attention`` with packed THD and context parallelism.

Megatron-Core's local ``DotProductAttention`` refuses packed sequences and CP > 1 (both need Transformer Engine),
which leaves the two layouts most likely to be subtly wrong untestable without a GPU. This module takes its place
in the layer spec (same constructor and ``forward`` contract) and runs on any device: the flash / memory-efficient
kernels on GPU, the math path on CPU.

Layouts it receives from ``SelfAttention`` (RoPE already applied):

* padded ``sbhd``: ``query [s, b, h, d]``, ``key/value [s, b, g, d]``; every batch row is one sequence;
* packed ``thd`` (``packed_seq_params.qkv_format == "thd"``): ``query [t, h, d]``, ``key/value [t, g, d]`` with
  the *global* boundaries in ``cu_seqlens_q`` (real lengths) and ``cu_seqlens_q_padded`` (aligned lengths), as
  Transformer Engine takes them.

Context parallelism: each sequence is split into ``2*cp`` chunks and rank ``r`` holds chunks ``r`` and
``2cp-1-r`` (for THD each packed sequence on its own, :func:`megatron_offgrpo.losses.packed_cp_indices`). Keys
and values are all-gathered over the CP group (backward: their gradients are reduce-scattered back), put back in
global order, and the causal mask is built from the queries' *global* positions. That costs ``cp`` times the K/V
memory of a ring, but every step is simple enough to check by reading.

RoPE positions: Megatron's ``GPTModel`` computes the rotary table from ``arange`` (never from ``position_ids``)
and slices it for this CP rank itself (``get_pos_emb_on_this_cp_rank`` for padded batches, per packed sequence
from ``cu_seqlens_q_padded`` for THD), with the same ``2*cp`` chunk layout as here. So the positions are global
as long as the batch is split with the helpers of ``losses.context_parallel`` and ``PackedSeqParams`` carries the
*global* (pre-split) boundaries.
"""

from __future__ import annotations

import math
from typing import List, Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from megatron_offgrpo.losses.context_parallel import cp_chunk_indices, packed_cp_indices

__all__ = ["TorchDotProductAttention", "gather_along_first_dim_cp", "sdpa"]


class _AllGatherFirstDim(torch.autograd.Function):
    """All-gather along dim 0 over a group; backward sums the gradients over the group and keeps this rank's rows."""

    @staticmethod
    def forward(ctx, x: Tensor, group: dist.ProcessGroup) -> Tensor:  # type: ignore[override]
        ctx.group = group
        world = dist.get_world_size(group)
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        group = ctx.group
        world = dist.get_world_size(group)
        rank = dist.get_rank(group)
        grad = grad.contiguous()
        if dist.get_backend(group) == "gloo":
            # gloo has no reduce-scatter: all-reduce, then keep this rank's rows (same result, CPU tests only).
            total = grad.clone()
            dist.all_reduce(total, group=group)
            return total.chunk(world, dim=0)[rank].contiguous(), None
        out = torch.empty((grad.shape[0] // world, *grad.shape[1:]), dtype=grad.dtype, device=grad.device)
        dist.reduce_scatter_tensor(out, grad, group=group)
        return out, None


def gather_along_first_dim_cp(x: Tensor, group: Optional[dist.ProcessGroup]) -> Tensor:
    """``cat`` of every CP rank's ``x`` along dim 0 (differentiable; identity for a group of one)."""
    if group is None or dist.get_world_size(group) == 1:
        return x
    return _AllGatherFirstDim.apply(x, group)


def sdpa(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], causal: bool, scale: float) -> Tensor:
    """``scaled_dot_product_attention`` on ``[b, h, s, d]`` with grouped K/V ``[b, g, s, d]``.

    ``enable_gqa`` lets the kernel broadcast the K/V groups without materialising the repeat; older torch
    versions (or kernels that refuse it) fall back to an explicit ``repeat_interleave``.
    """
    heads, groups = q.shape[1], k.shape[1]
    if heads != groups:
        try:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale,
                                                  enable_gqa=True)
        except (TypeError, RuntimeError):
            k = k.repeat_interleave(heads // groups, dim=1)
            v = v.repeat_interleave(heads // groups, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale)


def _to_natural_order(gathered: Tensor, rank_indices: List[Tensor]) -> Tensor:
    """Reorder the CP-gathered rows (rank 0's local rows, rank 1's, ...) into global sequence order."""
    order = torch.argsort(torch.cat(rank_indices))
    return gathered.index_select(0, order.to(gathered.device))


def _megatron_module():
    from megatron.core.transformer.module import MegatronModule

    return MegatronModule


class TorchDotProductAttention(_megatron_module()):
    """Core attention on ``torch.nn.functional.scaled_dot_product_attention`` (causal, GQA, THD, CP).

    Drop-in for Megatron's ``DotProductAttention`` in ``SelfAttentionSubmodules.core_attention``. Has no
    parameters (so checkpoints are identical to those of the other backends).
    """

    def __init__(
        self,
        config,
        layer_number: int,
        attn_mask_type,
        attention_type: str,
        attention_dropout: Optional[float] = None,
        softmax_scale: Optional[float] = None,
        cp_comm_type: Optional[str] = None,
        pg_collection=None,
    ) -> None:
        super().__init__(config=config)
        from megatron.core.transformer.enums import AttnMaskType

        self.config = config
        self.layer_number = max(1, layer_number)
        if attn_mask_type not in (AttnMaskType.causal, AttnMaskType.padding_causal):
            raise ValueError(f"TorchDotProductAttention is causal-only; got attn_mask_type={attn_mask_type}")
        dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        if dropout:
            # Dropout inside SDPA would draw from a different RNG stream than the TE / local backends, and
            # post-training runs without it; refuse rather than silently differ.
            raise ValueError("TorchDotProductAttention does not support attention dropout; set attention_dropout=0")
        if getattr(config, "softmax_type", "vanilla") != "vanilla":
            raise ValueError("TorchDotProductAttention supports only softmax_type='vanilla'")
        if getattr(config, "window_size", None) is not None:
            raise ValueError("TorchDotProductAttention does not support sliding-window attention")
        head_dim = config.kv_channels
        self.softmax_scale = 1.0 / math.sqrt(head_dim) if softmax_scale is None else softmax_scale
        # (apply_query_key_layer_scaling divides the scale by the layer number and multiplies it back inside
        # Megatron's fp32 softmax: the net scale is unchanged, which is what SDPA computes directly.)

        if pg_collection is not None and hasattr(pg_collection, "cp"):
            self.cp_group = pg_collection.cp
        else:
            from megatron.core import parallel_state

            self.cp_group = parallel_state.get_context_parallel_group(check_initialized=False)
        self.cp_size = config.context_parallel_size
        if self.cp_size > 1 and self.cp_group is None:
            raise RuntimeError("context_parallel_size > 1 but no context-parallel process group is initialized")

    # ---------------------------------------------------------------------------------------------------------
    def _cp_rank(self) -> int:
        return dist.get_rank(self.cp_group) if self.cp_size > 1 else 0

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        attention_mask: Optional[Tensor],
        attn_mask_type=None,
        attention_bias: Optional[Tensor] = None,
        packed_seq_params=None,
    ) -> Tensor:
        """``[s, b, h*d]`` for ``sbhd`` inputs, ``[t, h*d]`` for packed ``thd`` inputs."""
        if attention_bias is not None:
            raise ValueError("TorchDotProductAttention does not support attention_bias")
        if packed_seq_params is not None and packed_seq_params.qkv_format == "thd":
            return self._forward_thd(query, key, value, packed_seq_params)
        if packed_seq_params is not None and packed_seq_params.qkv_format not in (None, "sbhd"):
            raise ValueError(f"unsupported qkv_format {packed_seq_params.qkv_format!r}")
        if attention_mask is not None:
            # The padded layout is right-padded and causal, so no real token can see a pad; an explicit padding
            # mask would only change the (unused) outputs at pad positions. Refuse arbitrary masks instead of
            # silently ignoring them.
            raise ValueError("TorchDotProductAttention takes no attention_mask (causal; use THD for packing)")
        return self._forward_sbhd(query, key, value)

    def _forward_sbhd(self, query: Tensor, key: Tensor, value: Tensor) -> Tensor:
        s, b, h, d = query.shape
        q = query.permute(1, 2, 0, 3)  # [b, h, s, d]
        if self.cp_size == 1:
            k, v = key.permute(1, 2, 0, 3), value.permute(1, 2, 0, 3)
            out = sdpa(q, k, v, None, True, self.softmax_scale)
        else:
            cp, rank = self.cp_size, self._cp_rank()
            full = s * cp
            ranks = [cp_chunk_indices(full, cp, j) for j in range(cp)]
            k = _to_natural_order(gather_along_first_dim_cp(key, self.cp_group), ranks)
            v = _to_natural_order(gather_along_first_dim_cp(value, self.cp_group), ranks)
            q_pos = ranks[rank].to(query.device)
            k_pos = torch.arange(full, device=query.device)
            mask = k_pos[None, :] <= q_pos[:, None]  # [s_local, full], True = attend
            out = sdpa(q, k.permute(1, 2, 0, 3), v.permute(1, 2, 0, 3), mask, False, self.softmax_scale)
        return out.permute(2, 0, 1, 3).reshape(s, b, h * d)

    def _forward_thd(self, query: Tensor, key: Tensor, value: Tensor, params) -> Tensor:
        t, h, d = query.shape
        cu_padded = params.cu_seqlens_q_padded if params.cu_seqlens_q_padded is not None else params.cu_seqlens_q
        cu_real = params.cu_seqlens_q
        if params.cu_seqlens_kv is not None and not torch.equal(params.cu_seqlens_kv.cpu(), cu_real.cpu()):
            raise ValueError("self-attention expects cu_seqlens_kv == cu_seqlens_q")
        bounds = [int(x) for x in cu_padded.tolist()]
        real = [int(b - a) for a, b in zip(cu_real.tolist()[:-1], cu_real.tolist()[1:])]
        cp, rank = self.cp_size, self._cp_rank()
        if bounds[-1] != t * cp:
            raise ValueError(f"packed row has {t} tokens on this rank but cu_seqlens end at {bounds[-1]} "
                             f"(expected {t} x cp={cp}): pass the global, padded boundaries")
        if cp > 1:
            ranks = [packed_cp_indices(cu_padded, cp, j) for j in range(cp)]
            key = _to_natural_order(gather_along_first_dim_cp(key, self.cp_group), ranks)
            value = _to_natural_order(gather_along_first_dim_cp(value, self.cp_group), ranks)

        outs = []
        for i, (start, end) in enumerate(zip(bounds[:-1], bounds[1:])):
            length = end - start
            if length == 0:
                continue
            lo, hi = start // cp, end // cp  # this sequence's rows in the local packed row
            q = query[lo:hi].permute(1, 0, 2).unsqueeze(0)  # [1, h, n_local, d]
            k = key[start:end].permute(1, 0, 2).unsqueeze(0)  # [1, g, length, d] (global order)
            v = value[start:end].permute(1, 0, 2).unsqueeze(0)
            if cp == 1 and real[i] == length:
                out = sdpa(q, k, v, None, True, self.softmax_scale)
            else:
                q_pos = cp_chunk_indices(length, cp, rank, device=query.device)
                k_pos = torch.arange(length, device=query.device)
                # Causal by global position, and the alignment pads after the real tokens are never keys.
                mask = (k_pos[None, :] <= q_pos[:, None]) & (k_pos[None, :] < real[i])
                out = sdpa(q, k, v, mask, False, self.softmax_scale)
            outs.append(out.squeeze(0).permute(1, 0, 2))  # [n_local, h, d]
        return torch.cat(outs, dim=0).reshape(t, h * d)
