"""Per-GPU memory planner: what one training rank holds for a config and a world size, before anything runs.

``python -m megatron_offgrpo.train CONFIG [a.b=c ...] --estimate [--world-size N] [--device-memory-gib 80]``
prints the table of :func:`format_estimate` and, when the layout does not fit, the overrides of
:func:`suggest_layout`. Nothing here needs the dataset, a process group or a GPU.

What is counted, per rank, for the heaviest pipeline stage (the first holds the embedding and ``pp``
microbatches in flight; the last holds the final norm, the output layer and the loss buffers; with ``pp = 1`` one
stage has all of it):

* **weights**: the parameters of the rank's model chunks in ``model.params_dtype``. Attention and dense-MLP
  matrices are split over TP, norms and the MoE router are replicated, experts are split over EP (and over the
  expert-TP group, which Megatron sets to TP). The embedding and the output layer have
  ``padded_vocab_size(tp)`` rows split over TP; with tied embeddings and ``pp = 1`` the output layer has no
  weight of its own, with ``pp > 1`` the last stage keeps a copy. With the distributed optimizer Megatron's DDP
  packs the parameters into one contiguous buffer, each parameter aligned to 64 elements and the buffer padded to
  a multiple of ``lcm(dp, 128)``; the planner reproduces that padding.
* **gradients**: Megatron's DDP grad buffer, fp32 (``grad_reduce_in_fp32=True`` in training/setup.py), one
  element per parameter (same padding), kept whole on every rank (the distributed optimizer is ZeRO-1: it
  shards the optimizer state, not the grad buffer).
* **optimizer state**: Adam's ``exp_avg`` and ``exp_avg_sq`` (fp32) plus, for bf16 / fp16 parameters, the fp32
  main copy of the parameters: 12 bytes per parameter (8 for fp32 parameters, whose main copy *is* the
  parameter), divided by the data-parallel size with the distributed optimizer: ``dp x cp`` for dense
  parameters, the expert-data-parallel size ``world / (pp x ep x tp)`` for experts.
* **activations**: bytes saved for backward per transformer layer and per token of a microbatch
  (``micro_batch_size x data.seq_length / cp`` tokens on the rank: the worst case of a padded or a packed
  microbatch), times the layers of the stage, times the microbatches in flight (1F1B: ``min(pp, M)`` on the
  first stage, 1 on the last; interleaved: ``2 (pp - 1) + (vpp - 1) pp + 1`` model-chunk microbatches on the
  first stage). ``recompute_granularity: full`` (uniform, one layer per checkpoint) keeps only each layer's
  input; the layer being recomputed in backward is added once as working set. ``selective`` recomputes the core
  attention only, which with flash attention (TE, torch SDPA) saves little more than the softmax statistics; with
  Megatron's unfused ``local`` attention it drops the ``b x heads x s^2`` score and probability tensors. The
  backward working set of a layer (the gradients of its widest tensors, plus the recomputed layer) is added when it
  exceeds the loss buffers' peak: the two are never alive together.
* **loss buffers** (last stage), with ``loss.fused_output_layer`` (the default) and its gradients taken in the
  forward pass (``loss.fused_output_gradients: forward``, the default): one logits tile ``[token chunk, the
  rank's real vocabulary]`` with its temporaries, the fp32 output-weight gradient and the hidden states' gradient,
  both kept until the loss's backward. With ``recompute``: one tile ``[token chunk, vocabulary block]`` with its
  fp32 temporaries, the fp32 ``[tokens, hidden]`` gradient accumulator of the hidden states and the output
  weight's gradient. The ``[tokens, vocab]`` logits never exist in either.
  Unfused: the logits ``[tokens, padded_vocab / tp]`` in the params dtype, the transposed
  copy GPTModel makes when it returns logits (``labels=None``; none for a single row, i.e. packing or
  ``micro_batch_size = 1``), their gradient, the contiguous copy of that gradient Megatron's linear makes for the
  weight gradient, the output layer's weight-gradient temporary (``gradient_accumulation_fusion`` is off), and the
  fp32 chunk temporaries of :func:`megatron_offgrpo.losses.logprobs.vocab_parallel_logprobs` (chunks of
  :func:`~megatron_offgrpo.losses.logprobs.default_chunk_size` tokens; counted on GPU too, where the Triton
  kernels need none). These are never all alive at once: the planner takes the largest of the forward, log-prob
  backward and output-layer backward phases.
* **overhead** (GPU only): a fixed allowance for the CUDA context, NCCL and cuBLAS workspaces and allocator
  fragmentation (:data:`GPU_OVERHEAD_BYTES`).

Which terms are exact and which are approximations:

* exact (bytes of real tensors, checked against the model and optimizer that training/setup.py builds in
  tests/test_memory_plan.py, dense and MoE, TP / DP / EP): weights, gradients, optimizer state;
* from the saved tensors of the CPU run, checked against its peak RSS (the ``device="cpu"`` profile: Megatron's
  local spec; torch's RMSNorm saves an fp32 copy of its input and the fp32 normalized value besides the next
  linear's input; unfused SwiGLU: 5 ``[T, f]`` tensors; the torch SDPA attention): activations and loss buffers of
  dense models without CP, fp32 and bf16, padded and packed, with and without full recompute (within a few percent
  in tests/test_memory_plan.py);
* derived from the modules' saved tensors, not measured here (the default ``device="gpu"`` profile): Transformer
  Engine's fused norm + linear (the input and the normalized value in the params dtype), the fused SwiGLU (3
  ``[T, f]`` tensors) and TE's flash attention (Q, K, V, output, fp32 softmax statistics); the fixed overhead;
* approximations: MoE activations assume perfectly balanced routing (every EP rank receives ``T x top_k`` tokens;
  real routing is uneven, so the busiest rank holds more) and count the router's fp32 input copy, its fp32
  logits / probabilities and the permuted expert inputs and outputs of the all-to-all dispatcher; context
  parallelism counts the local ``T / cp`` tokens only (TE's ring attention keeps its in-flight K/V blocks outside
  the count; on the CPU profile the torch attention's gathered K/V are added); sequence parallelism divides every
  ``[T, h]`` term by TP; Megatron's unfused ``local`` attention is counted as ``(4 + 2 x dtype bytes)`` per score
  element; the per-rank optimizer shard is the average one (ranks differ by the alignment padding).
"""

from __future__ import annotations

import copy
import math
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

from megatron_offgrpo.config.schema import TrainConfig

__all__ = [
    "MemoryEstimate",
    "estimate_memory",
    "format_estimate",
    "suggest_layout",
    "default_world_size",
    "GPU_OVERHEAD_BYTES",
]

GIB = 1 << 30
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
#: Fixed GPU allowance: CUDA context (~0.5 GiB), NCCL communicators and cuBLAS workspaces, allocator fragmentation.
GPU_OVERHEAD_BYTES = 3 * GIB
_RECOMPUTE_LEVEL = {None: 0, "selective": 1, "full": 2}


@dataclass
class MemoryEstimate:
    """Bytes one rank of the heaviest pipeline stage holds; ``total`` is their sum."""

    world_size: int
    layout: Dict[str, Any]  # tp, pp, cp, ep, dp, expert_dp, vpp, sequence_parallel, recompute, distributed_optimizer
    device: str  # "gpu" (TE profile) or "cpu" (local spec profile)
    stage: str  # "only" (pp = 1), "first" or "last": which stage is the heaviest
    params: int  # parameters on this rank
    weights: int
    gradients: int
    optimizer: int
    activations: int  # saved activations of all microbatches in flight (+ recompute / backward working set)
    loss_buffers: int  # peak of the logits / log-prob buffers (last stage; 0 elsewhere)
    overhead: int
    total: int
    tokens_per_microbatch: int  # tokens of one microbatch on this rank (after the CP split)
    microbatches: int  # microbatches per step on this rank
    microbatches_in_flight: int  # (model-chunk) microbatches whose activations the stage holds at once
    activations_per_microbatch: int  # saved bytes of one microbatch over the stage's layers
    details: Dict[str, str] = field(default_factory=dict)  # how each item was computed
    stage_totals: Dict[str, int] = field(default_factory=dict)  # total per stage ("first" / "last" / "only")

    @property
    def static(self) -> int:
        """Weights + gradients + optimizer state: what stays allocated between steps."""
        return self.weights + self.gradients + self.optimizer

    def fits(self, device_memory_bytes: int) -> bool:
        return self.total <= device_memory_bytes


# --------------------------------------------------------------------------------------------------------------
# Parameters


def _architecture(cfg: TrainConfig):
    from megatron_offgrpo.models import model_config_from_hf, tiny_architecture

    m = cfg.model
    if m.architecture == "tiny":
        return tiny_architecture(m.tiny_vocab_size, m.tiny_num_layers, m.tiny_hidden_size)
    return model_config_from_hf(m.architecture)


def _layer_param_tensors(arch, tp: int, ep: int) -> Tuple[List[int], List[int]]:
    """Element counts of one decoder layer's parameter tensors on a rank: (dense ones, expert ones)."""
    h, d = arch.hidden_size, arch.head_dim
    a, g = arch.num_attention_heads, arch.num_query_groups
    qkv = (a + 2 * g) * d // tp
    dense = [h, qkv * h]  # input norm, linear_qkv
    if arch.qkv_bias:
        dense.append(qkv)
    if arch.qk_norm:
        dense += [d, d]
    dense += [h * a * d // tp, h]  # linear_proj, pre-MLP norm
    experts: List[int] = []
    if arch.is_moe:
        e, fm = arch.num_experts, arch.moe_ffn_hidden_size
        etp = tp  # Megatron's expert_tensor_parallel_size defaults to the TP size
        dense.append(e * h)  # router (replicated)
        for _ in range(e // ep):
            experts += [2 * fm // etp * h, h * fm // etp]
    else:
        f = arch.ffn_hidden_size
        dense += [2 * f // tp * h, h * f // tp]
    return dense, experts


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def _buffer_numel(tensors: List[int], dp: int, distributed_optimizer: bool) -> int:
    """Elements of Megatron DDP's contiguous buffer for these parameters (alignment padding included)."""
    if not tensors:
        return 0
    if not distributed_optimizer:
        return sum(tensors)
    end = 0
    for n in tensors:  # each parameter starts at a multiple of 64 elements
        end = _round_up(end, 64) + n
    return _round_up(end, math.lcm(dp, 128))


@dataclass
class _StaticMemory:
    params: int
    weights: int
    gradients: int
    optimizer: int
    detail: Dict[str, str]


def _static_memory(arch, cfg: TrainConfig, lay: Dict[str, Any], first: bool, last: bool) -> _StaticMemory:
    tp, pp, ep, vpp = lay["tp"], lay["pp"], lay["ep"], lay["vpp"] or 1
    dtype = DTYPE_BYTES[cfg.model.params_dtype]
    dist_opt = lay["distributed_optimizer"]
    dense_dp, expert_dp = lay["dp"] * lay["cp"], lay["expert_dp"]
    v_pad = arch.padded_vocab_size(tp, cfg.model.make_vocab_size_divisible_by)
    layer_dense, layer_experts = _layer_param_tensors(arch, tp, ep)
    layers_per_chunk = arch.num_layers // (pp * vpp)
    params = weights = grads = opt = 0
    numel_dense = numel_expert = 0
    for chunk in range(vpp):  # one DDP (and buffer) per model chunk
        dense = layer_dense * layers_per_chunk
        experts = layer_experts * layers_per_chunk
        if first and chunk == 0:
            dense = [v_pad // tp * arch.hidden_size] + dense  # word embeddings
        if last and chunk == vpp - 1:
            dense = dense + [arch.hidden_size]  # final norm
            if not arch.tie_word_embeddings or pp > 1:
                dense = dense + [v_pad // tp * arch.hidden_size]  # output layer (a copy of the tied one if pp > 1)
        for tensors, dp in ((dense, dense_dp), (experts, expert_dp)):
            n = sum(tensors)
            padded = _buffer_numel(tensors, dp, dist_opt)
            params += n
            weights += (padded if dist_opt else n) * dtype
            grads += padded * 4
            per_param = (0 if cfg.model.params_dtype == "fp32" else 4) + 8
            opt += (-(-n // dp) if dist_opt else n) * per_param
        numel_dense += sum(dense)
        numel_expert += sum(experts)
    shard = "unsharded"
    if dist_opt:
        shard = f"/ dp {dense_dp}" + (f", experts / expert-dp {expert_dp}" if numel_expert else "")
    main = "" if cfg.model.params_dtype == "fp32" else "fp32 main + "
    detail = {
        "weights": f"{params / 1e9:.3f} B params x {dtype} B ({cfg.model.params_dtype})"
                   + (f"; experts {numel_expert / 1e9:.3f} B" if numel_expert else ""),
        "gradients": "fp32 DDP grad buffer, 4 B / param (not sharded)",
        "optimizer": f"{main}Adam m, v: {8 if not main else 12} B / param {shard}",
    }
    return _StaticMemory(params, weights, grads, opt, detail)


# --------------------------------------------------------------------------------------------------------------
# Activations


def _profile(cfg: TrainConfig, device: str) -> Dict[str, Any]:
    """Per-implementation coefficients of the saved tensors (see the module docstring)."""
    te = device == "gpu" and cfg.model.transformer_impl in ("te", "auto")
    return {
        "te": te,  # TE's fused norm + linear and TE norms; else torch's RMSNorm (saves fp32 input + normalized)
        "mlp": 3 if device == "gpu" else 5,  # [T, f] tensors: fused SwiGLU on GPU, unfused on CPU
        "local_attention": cfg.model.attention_backend == "local",
        "device": device,
    }


def _norm_bytes(prof: Dict[str, Any], width: float, dtype: int) -> float:
    """Bytes per token one RMSNorm (and the linear it feeds) saves for a ``width``-wide input.

    TE: the input and the normalized output, in the params dtype. torch's RMSNorm (Megatron's local spec without
    Apex): an fp32 copy of the input (the input itself when fp32) and the fp32 normalized value, plus the linear's
    input in the params dtype.
    """
    return 2 * width * dtype if prof["te"] else width * (8 + dtype)


def _layer_activation_bytes(arch, prof: Dict[str, Any], tokens: int, seqs: int, seq_len: int, lay: Dict[str, Any],
                            dtype: int) -> Tuple[int, int, int]:
    """(saved bytes of one layer as configured, saved bytes without recompute, backward working set) for a
    microbatch of ``tokens`` tokens on this rank (``seqs`` sequences of ``seq_len`` for the unfused attention)."""
    tp, cp = lay["tp"], lay["cp"]
    h, d = arch.hidden_size, arch.head_dim
    a, g = arch.num_attention_heads / tp, arch.num_query_groups / tp  # heads and KV groups on this rank
    hs = h / tp if lay["sequence_parallel"] else h  # [T, h] tensors are sequence-sharded under SP
    # Attention: the QKV output (V is a view of it), the rotated Q and K, the attention output (= linear_proj input).
    attn = ((a + 2 * g) * d + (a + g) * d + a * d) * dtype
    fp32 = 2 + a  # per token: two norms' rstd, the softmax logsumexp
    if arch.qk_norm:
        if prof["te"]:
            attn += a * d * dtype  # the Q copy (Megatron's reshape) the TE q-norm saves; K is a view of QKV
        else:  # torch norm: fp32 Q (the copy or its upcast) and normalized Q, K; K's own upcast if not fp32
            attn += ((2 * a + g) * d + (g * d if dtype != 4 else 0)) * 4
        fp32 += a + g
    if prof["device"] == "cpu" and cp > 1:
        attn += 2 * g * d * (cp - 1) * dtype  # the torch attention saves the CP-gathered K and V
    norms = 2 * _norm_bytes(prof, hs, dtype)
    if arch.is_moe:
        k, fm, e = arch.moe_router_topk, arch.moe_ffn_hidden_size, arch.num_experts
        # permuted expert inputs and outputs, fc1 output + activation (SwiGLU), per routed copy of a token
        mlp = k * (2 * h + prof["mlp"] * fm / tp) * dtype
        fp32 += h + 3 * e + k  # router: fp32 input copy, logits / probs / scores; routing probs
        widest = k * 2 * fm / tp + h
    else:
        mlp = prof["mlp"] * arch.ffn_hidden_size / tp * dtype
        widest = 2 * arch.ffn_hidden_size / tp + h
    per_token = norms + attn + mlp + fp32 * 4
    scores = 0.0
    if prof["local_attention"]:  # Megatron's unfused attention: scores, fp32 softmax, probabilities
        scores = seqs * a * seq_len * seq_len * (4 + 2 * dtype)
    full = int(per_token * tokens + scores)
    if lay["recompute"] == "full":
        saved = int(hs * tokens * dtype)  # the checkpointed layer input
    elif lay["recompute"] == "selective":
        saved = int((per_token - a * 4) * tokens)  # core attention recomputed: scores and softmax stats go
    else:
        saved = full
    working = int(widest * tokens * dtype)
    return saved, full, working


def _loss_buffer_bytes(arch, cfg: TrainConfig, lay: Dict[str, Any], tokens: int, rows: int, dtype: int
                       ) -> Tuple[int, str]:
    """Peak bytes of the logits, their copies / gradients and the log-prob temporaries on the last stage."""
    tp = lay["tp"]
    v_pad = arch.padded_vocab_size(tp, cfg.model.make_vocab_size_divisible_by)
    v_local = v_pad // tp
    v_real_local = min(v_local, arch.vocab_size)  # rank 0's shard: all of it real
    wgrad = v_local * arch.hidden_size * dtype  # the output layer's weight gradient before it joins main_grad
    vectors = tokens * 24 * 4  # per-token fp32 vectors of the loss (log-probs, logsumexp, masks, KL, ...)
    from megatron_offgrpo.losses.fused_output import fused_output_layer_enabled, loss_tile_tokens, tile_shape

    fused = fused_output_layer_enabled(cfg.loss.fused_output_layer)
    if fused and cfg.loss.fused_output_gradients == "forward":
        # Tiles [token chunk x the rank's real vocabulary]; the loss's gradients are made in the forward pass and
        # kept for the backward: the fp32 weight gradient and the hidden states' gradient (losses/fused_output.py).
        tile_tokens = loss_tile_tokens(tokens, v_real_local, cfg.loss.logprob_chunk_size)
        tile = tile_tokens * v_real_local
        wgrad32 = v_local * arch.hidden_size * 4
        grad_hidden = tokens * arch.hidden_size * dtype
        # The tile; unless fp32 (computed in place), its fp32 exp, dx in the params dtype and the chunk's
        # weight-gradient product before it joins the fp32 accumulator.
        fwd = wgrad32 + grad_hidden + tile * dtype + (
            tile * (4 + dtype) + v_real_local * arch.hidden_size * dtype if dtype != 4 else 0)
        bwd = wgrad32 + grad_hidden + (wgrad if dtype != 4 else 0)  # the scaled gradient cast to the params dtype
        detail = (f"fused output layer, gradients in forward: tiles [{tile_tokens} x {v_real_local}] "
                  f"({tile * dtype / GIB:.2f} GiB), fp32 weight gradient {wgrad32 / GIB:.2f} GiB, hidden gradient "
                  f"{grad_hidden / GIB:.2f} GiB; no [tokens x vocab] logits")
        return int(max(fwd, bwd) + vectors), detail
    if fused:
        # The logits exist one [token chunk x vocabulary block] tile at a time (losses/fused_output.py).
        tile_tokens, tile_rows = tile_shape(tokens, v_real_local, cfg.loss.logprob_chunk_size)
        tile = tile_tokens * tile_rows
        fwd = tile * (dtype + 4 * (1 if dtype == 4 else 2))  # the tile, its fp32 copy, logsumexp's temporary
        block_acc = tile_rows * arch.hidden_size * 4 if dtype != 4 and tile_tokens < tokens else 0
        bwd = (wgrad + tokens * arch.hidden_size * 4 + block_acc  # weight grad, fp32 hidden-grad accumulator
               + tile * (dtype + (4 + 4 + dtype if dtype != 4 else 0)))  # recomputed tile (+ fp32 copy, dx)
        detail = (f"fused output layer: tiles [{tile_tokens} x {tile_rows}] ({tile * 4 / GIB:.2f} GiB fp32), "
                  f"fp32 hidden-grad accumulator {tokens * arch.hidden_size * 4 / GIB:.2f} GiB, wgrad "
                  f"{wgrad / GIB:.2f} GiB; no [tokens x vocab] logits")
        return int(max(fwd, bwd) + vectors), detail
    logits = tokens * v_local * dtype
    if cfg.loss.logprob_chunk_size:
        chunk_tokens = cfg.loss.logprob_chunk_size
    else:
        from megatron_offgrpo.losses.logprobs import default_chunk_size

        chunk_tokens = default_chunk_size(v_local)
    chunk = min(tokens, chunk_tokens) * v_real_local * 4
    fwd_chunks = chunk * (1 if dtype == 4 else 2)  # fp32 copy of a chunk (not for fp32 logits) + exp temporary
    if rows > 1:  # GPTModel's transpose(0, 1).contiguous() copies, and the weight gradient wants it back
        phases = [2 * logits, logits + fwd_chunks, 2 * logits + chunk, 2 * logits + wgrad]
        how = "2 x logits (+ transposed copy / gradient)"
    else:  # one row ([1, T, V] or [T, 1, V]): the transpose is a view, no copies
        phases = [logits + fwd_chunks, 2 * logits + chunk, logits + wgrad]
        how = "logits + gradient (one row: no transposed copy)"
    peak = max(phases) + vectors
    detail = (f"{how}: logits [{tokens} x {v_local}] {cfg.model.params_dtype} = {logits / GIB:.2f} GiB each; "
              f"fp32 chunk {chunk / GIB:.2f} GiB, wgrad temp {wgrad / GIB:.2f} GiB")
    return int(peak), detail


# --------------------------------------------------------------------------------------------------------------
# The estimate


def _layout(cfg: TrainConfig, world_size: int) -> Dict[str, Any]:
    par = cfg.parallel
    mp = par.tp * par.pp * par.cp
    if world_size % mp:
        raise ValueError(f"world size {world_size} is not divisible by tp*pp*cp = {mp}")
    expert_mp = par.tp * par.pp * par.ep
    if world_size % expert_mp:
        raise ValueError(f"world size {world_size} is not divisible by tp*pp*ep = {expert_mp} (Megatron's expert "
                         "layout: world = pp x expert-tp x ep x expert-dp, expert-tp = tp)")
    return {
        "tp": par.tp, "pp": par.pp, "cp": par.cp, "ep": par.ep, "vpp": par.vpp,
        "dp": world_size // mp,
        "expert_dp": max(1, world_size // expert_mp),
        "sequence_parallel": par.sequence_parallel,
        "recompute": cfg.model.recompute_granularity,
        "distributed_optimizer": par.distributed_optimizer,
    }


def estimate_memory(cfg: TrainConfig, world_size: int, device: str = "gpu") -> MemoryEstimate:
    """Per-rank memory of training ``cfg`` on ``world_size`` ranks, for the heaviest pipeline stage.

    ``device="gpu"`` (default) models the GPU run (Transformer Engine when ``model.transformer_impl`` is ``te`` or
    ``auto``, fused SwiGLU, fixed overhead); ``device="cpu"`` the CPU backend (local spec, no overhead), which is
    what the tests measure. See the module docstring for each term and its accuracy.
    """
    if device not in ("gpu", "cpu"):
        raise ValueError(f"device must be 'gpu' or 'cpu', got {device!r}")
    arch = _architecture(cfg)
    lay = _layout(cfg, world_size)
    d = cfg.data
    dtype = DTYPE_BYTES[cfg.model.params_dtype]
    prof = _profile(cfg, device)
    tp, pp, cp, vpp = lay["tp"], lay["pp"], lay["cp"], lay["vpp"] or 1
    tokens = d.micro_batch_size * d.seq_length // cp
    rows = 1 if d.packing else d.micro_batch_size
    per_rank_sequences = d.groups_per_batch * d.group_size // lay["dp"]
    microbatches = max(1, per_rank_sequences // d.micro_batch_size)
    layer_saved, layer_full, working = _layer_activation_bytes(
        arch, prof, tokens, d.micro_batch_size, d.seq_length, lay, dtype)
    layers_per_chunk = arch.num_layers // (pp * vpp)
    hs = arch.hidden_size // tp if lay["sequence_parallel"] else arch.hidden_size
    # The recomputed layer (full recompute) is live again in its backward, plus the gradients' working set.
    layer_ws = working + (layer_full if lay["recompute"] == "full" else 0)

    stages = ["only"] if pp == 1 else ["first", "last"]
    results = []
    for stage in stages:
        first, last = stage in ("only", "first"), stage in ("only", "last")
        static = _static_memory(arch, cfg, lay, first, last)
        if vpp == 1:
            in_flight = min(pp, microbatches) if first else 1
        else:
            in_flight = min((2 * (pp - 1) + (vpp - 1) * pp + 1) if first else ((vpp - 1) * pp + 1),
                            microbatches * vpp)
        per_mb = layer_saved * layers_per_chunk  # one (model-chunk) microbatch over the chunk's layers
        acts = per_mb * in_flight
        extra = 0
        if not last:  # the stage's output tensor, kept by the schedule until its backward
            extra += int(hs * tokens * dtype) * in_flight
        loss, loss_detail = 0, ""
        if last:
            extra += int(_norm_bytes(prof, hs, dtype) * tokens)  # final norm + output layer input
            loss, loss_detail = _loss_buffer_bytes(arch, cfg, lay, tokens, rows, dtype)
        # Peak: all saved activations, plus the larger of the loss phases and a layer's backward working set.
        transient = max(loss, layer_ws)
        activations = acts + extra + (transient - loss)
        overhead = GPU_OVERHEAD_BYTES if device == "gpu" else 0
        total = static.weights + static.gradients + static.optimizer + activations + loss + overhead
        details = dict(static.detail)
        rec = lay["recompute"] or "none"
        details["activations"] = (
            f"{layers_per_chunk} layers x {tokens} tokens, recompute {rec}: "
            f"{per_mb / GIB:.2f} GiB / microbatch x {in_flight} in flight"
            + (f" + {layer_ws / GIB:.2f} GiB backward working set" if transient > loss else "")
        )
        details["loss_buffers"] = loss_detail or "-- (not the last stage)"
        details["overhead"] = "CUDA context, NCCL, cuBLAS, fragmentation (fixed)" if overhead else "-- (CPU)"
        results.append(MemoryEstimate(
            world_size=world_size, layout=dict(lay), device=device, stage=stage, params=static.params,
            weights=static.weights, gradients=static.gradients, optimizer=static.optimizer,
            activations=int(activations), loss_buffers=int(loss), overhead=overhead, total=int(total),
            tokens_per_microbatch=tokens, microbatches=microbatches, microbatches_in_flight=in_flight,
            activations_per_microbatch=int(per_mb), details=details,
        ))
    heaviest = max(results, key=lambda e: e.total)
    heaviest.stage_totals = {e.stage: e.total for e in results}
    return heaviest


# --------------------------------------------------------------------------------------------------------------
# Output


def format_estimate(est: MemoryEstimate, device_memory_bytes: int, width: int = 120) -> str:
    """The estimate as a rich table (rendered to text), with the total against ``device_memory_bytes``."""
    import io

    from rich.console import Console
    from rich.table import Table

    lay = est.layout
    title = (f"memory per GPU ({est.device} profile), world {est.world_size}: tp {lay['tp']} pp {lay['pp']} "
             f"cp {lay['cp']} ep {lay['ep']} dp {lay['dp']}"
             + (f" vpp {lay['vpp']}" if lay["vpp"] else "")
             + f", recompute {lay['recompute'] or 'none'}, heaviest stage: {est.stage}")
    table = Table(title=title, title_justify="left")
    table.add_column("item")
    table.add_column("GiB", justify="right")
    table.add_column("how")
    for name, key in (("weights", "weights"), ("gradients", "gradients"), ("optimizer state", "optimizer"),
                      ("activations", "activations"), ("loss buffers", "loss_buffers"), ("overhead", "overhead")):
        table.add_row(name, f"{getattr(est, key) / GIB:.2f}", est.details.get(key, ""))
    fits = est.total <= device_memory_bytes
    table.add_row("total", f"{est.total / GIB:.2f}",
                  f"of {device_memory_bytes / GIB:.1f} GiB: " + ("fits" if fits else "DOES NOT FIT"),
                  style="bold" if fits else "bold red")
    out = io.StringIO()
    console = Console(file=out, width=width, force_terminal=False, color_system=None)
    console.print(table)
    if len(est.stage_totals) > 1:
        console.print("per stage: " + ", ".join(f"{k} {v / GIB:.2f} GiB" for k, v in est.stage_totals.items()))
    console.print(f"{est.microbatches} microbatches of {est.tokens_per_microbatch} tokens per step on each rank")
    return out.getvalue()


# --------------------------------------------------------------------------------------------------------------
# Layout search


def _with_layout(cfg: TrainConfig, tp: int, pp: int, cp: int, ep: int, recompute: Optional[str]) -> TrainConfig:
    new = copy.deepcopy(cfg)
    new.parallel.tp, new.parallel.pp, new.parallel.cp, new.parallel.ep = tp, pp, cp, ep
    new.model.recompute_granularity = recompute
    if pp == 1:
        new.parallel.vpp = None
    return new


def _log2_distance(a: int, b: int) -> float:
    return abs(math.log2(a) - math.log2(b))


def suggest_layout(cfg: TrainConfig, world_size: int, device_memory_bytes: int, device: str = "gpu"
                   ) -> Optional[Dict[str, Any]]:
    """The overrides (``{"parallel.tp": 4, "model.recompute_granularity": "full"}``) of the smallest change of
    tp / pp / cp / recompute (and ep for MoE) that fits ``device_memory_bytes`` at the same world size and passes
    :func:`~megatron_offgrpo.config.validate_config`; ``{}`` if the config already fits, ``None`` if nothing does.

    "Smallest" is the fewest keys changed, then the smallest change (factors of 2 in tp / pp / cp / ep, steps of
    none -> selective -> full), then the least recompute and the lowest estimated memory.
    """
    from megatron_offgrpo.config import ConfigError, validate_config

    if estimate_memory(cfg, world_size, device).total <= device_memory_bytes:
        return {}
    arch = _architecture(cfg)
    par = cfg.parallel
    powers = [1, 2, 4, 8, 16, 32, 64]
    tps = [t for t in powers if t <= min(8, world_size)]  # TP stays inside a node of 8 GPUs
    pps = [p for p in range(1, min(arch.num_layers, world_size) + 1) if arch.num_layers % p == 0]
    cps = [c for c in powers if c <= world_size]
    eps = [e for e in powers if arch.is_moe and e <= world_size and arch.num_experts % e == 0] or [par.ep]
    candidates = []
    for tp in tps:
        for pp in pps:
            if world_size % (tp * pp):
                continue
            for cp in cps:
                if world_size % (tp * pp * cp):
                    continue
                for ep in eps:
                    for rec in (None, "selective", "full"):
                        changes = {}
                        for key, old, new in (("parallel.tp", par.tp, tp), ("parallel.pp", par.pp, pp),
                                              ("parallel.cp", par.cp, cp), ("parallel.ep", par.ep, ep),
                                              ("model.recompute_granularity", cfg.model.recompute_granularity, rec)):
                            if old != new:
                                changes[key] = new
                        if not changes:
                            continue
                        distance = (_log2_distance(tp, par.tp) + _log2_distance(pp, par.pp)
                                    + _log2_distance(cp, par.cp) + _log2_distance(ep, par.ep)
                                    + abs(_RECOMPUTE_LEVEL[rec] - _RECOMPUTE_LEVEL[cfg.model.recompute_granularity]))
                        candidates.append((len(changes), distance, _RECOMPUTE_LEVEL[rec], changes,
                                           (tp, pp, cp, ep, rec)))
    candidates.sort(key=lambda c: c[:3])
    best = None
    for n_changes, distance, level, changes, (tp, pp, cp, ep, rec) in candidates:
        if best is not None and (n_changes, distance, level) > best[0]:
            break
        new = _with_layout(cfg, tp, pp, cp, ep, rec)
        if par.vpp and pp == 1 and "parallel.pp" in changes:
            changes["parallel.vpp"] = None
        try:
            validate_config(new, world_size=world_size, check_files=False)
        except ConfigError:
            continue
        if arch.is_moe and (world_size // (pp * tp)) % ep:
            continue  # Megatron: world = pp x expert-tp x ep x expert-dp
        total = estimate_memory(new, world_size, device).total
        if total > device_memory_bytes:
            continue
        if best is None or total < best[1]:
            best = ((n_changes, distance, level), total, changes)
    return None if best is None else best[2]


def format_overrides(overrides: Dict[str, Any]) -> str:
    """``a.b=c`` words for the command line (``null`` for None)."""
    return " ".join(f"{k}={'null' if v is None else v}" for k, v in overrides.items())


def default_world_size(explicit: Optional[int] = None, gpus_per_node: int = 8) -> Tuple[int, str]:
    """The world size to plan for and where it came from: ``--world-size``, ``$WORLD_SIZE``, SLURM's task count,
    ``gpus_per_node x`` SLURM's node count, else one node of ``gpus_per_node``."""
    if explicit:
        return int(explicit), "--world-size"
    env = os.environ
    for name in ("WORLD_SIZE", "SLURM_NTASKS"):
        if env.get(name, "").isdigit() and int(env[name]) > 0:
            return int(env[name]), f"${name}"
    for name in ("SLURM_JOB_NUM_NODES", "SLURM_NNODES"):
        if env.get(name, "").isdigit() and int(env[name]) > 0:
            return gpus_per_node * int(env[name]), f"{gpus_per_node} x ${name}"
    return gpus_per_node, f"one node of {gpus_per_node} GPUs (default)"
