"""One optimizer step's data and loss: microbatches with global denominators, the forward step, metric sums.

Scaling contract with Megatron-Core's schedules (mcore 0.16, 2-tuple loss functions): the schedule multiplies a
microbatch's loss by ``cp`` and divides it by ``num_microbatches``; DDP then scales gradients by
``1 / (dp * cp)``. Our microbatch losses already carry the *global* denominators (DESIGN 3), so that the plain
sum of all microbatch losses over all DP / CP ranks is the step's loss; multiplying each by
``dp * num_microbatches`` makes Megatron's scalings cancel and the gradient is exactly that of the global loss.
An MoE router's load-balancing loss is attached and scaled by Megatron itself, outside this factor: it enters as
``coeff x`` its mean over the global batch's microbatches (see :func:`moe_aux_loss_metric`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence

import torch
import torch.distributed as dist

from megatron_offgrpo.config.schema import TrainConfig
from megatron_offgrpo.data.format import PER_TOKEN_ARRAYS
from megatron_offgrpo.utils.distributed import all_reduce_cpu
from megatron_offgrpo.losses import (
    group_advantages,
    get_loss,
    group_statistics,
    policy_loss,
    split_for_context_parallel,
    split_packed_for_context_parallel,
)
from megatron_offgrpo.losses.fused_output import (
    fused_output_layer_enabled,
    fused_output_loss,
    logprobs_from_model_output,
)

# Order of the per-step metric sums (one float64 vector, reduced once per step).
METRIC_SUMS = (
    "loss",  # sum of microbatch losses (global denominators) = the step's loss
    "kl_sum",
    "clip_count",
    "prob_sum",
    "tokens",  # response tokens that entered the loss
    "logprob_pos_sum",
    "tokens_pos",
    "logprob_neg_sum",
    "tokens_neg",
)
# Per-step batch statistics, from the batch metadata, reduced over DP before the forward passes.
BATCH_STATS = ("sequences", "positive_sequences", "response_tokens", "positive_response_tokens", "groups",
               "all_positive_groups", "all_negative_groups", "advantage_sum", "all_tokens")


@dataclass
class Microbatch:
    """One microbatch on this rank, already split for context parallelism."""

    tokens: torch.Tensor
    position_ids: torch.Tensor
    labels: torch.Tensor
    loss_mask: torch.Tensor
    advantages: torch.Tensor
    rewards: torch.Tensor
    sequence_token_counts: torch.Tensor
    arrays: Dict[str, torch.Tensor]
    names: List[str]  # one per row, for messages: "sequence 17 (group 3, rollout 2)"
    # Packing (data.packing): tokens / position_ids / labels are one THD row [1, t_local]; loss_mask and arrays are
    # unpacked to [B, n_max] (one row per sequence, so that the loss core's per-row normalisation stays per
    # sequence); `unpack_index` [B, n_max] maps those rows back into the flat local row.
    packed_seq: Optional[Dict[str, torch.Tensor]] = None
    unpack_index: Optional[torch.Tensor] = None
    # bool, shaped like `tokens` (this CP rank's part): True where the position is padding (a padded row's tail,
    # a packed sequence's alignment, the pipeline's filler). An MoE router leaves these out of its load-balancing
    # statistics (Megatron's padding_mask), so the loss does not depend on how much padding a layout adds.
    padding_mask: Optional[torch.Tensor] = None


@dataclass
class StepBatch:
    """What one optimizer step consumes on this rank, and the global denominators."""

    microbatches: List[Microbatch]
    num_sequences: Optional[float]  # N_seq of the global batch (positive ones for sft); None until reduced
    num_tokens: Optional[float]  # response tokens of the global batch (of positive sequences for sft)
    stats: Dict[str, float]  # BATCH_STATS of the global batch (of this rank only until reduced)
    loss_kind: str = ""
    # Filled by the trainer when the step's loss is non-finite: the sequences (on any rank) that caused it.
    nonfinite_sequences: List[str] = field(default_factory=list)


def _dp_group():
    from megatron.core import parallel_state

    return parallel_state.get_data_parallel_group()


def sequence_name(sample: Dict[str, Any]) -> str:
    """How messages name one trajectory: its dataset index, group and rollout."""
    return f"sequence {sample.get('index', '?')} (group {sample['group_id']}, rollout {sample['rollout_index']})"


def _packed_microbatch(samples: Sequence[Dict[str, Any]], advantages: torch.Tensor, rewards: torch.Tensor,
                       pad_token_id: int, cp_size: int, cp_rank: int, pack_length: Optional[int] = None) -> Microbatch:
    """One packed (THD) microbatch on this CP rank; see :class:`Microbatch` for the layout.

    Each sequence is aligned to ``2*cp`` inside the pack and split on its own (Megatron / TE's THD CP layout), so
    sequence ``i`` holds the local rows ``cu[i] // cp : cu[i+1] // cp`` on every CP rank. With ``pack_length``
    (pipeline parallelism: stages exchange activations of one fixed shape) the pack is filled up to exactly that
    many tokens by one more sequence of padding, which attends only to itself: the real sequences' attention is
    that of the unfilled pack, and the filler is in no sequence's loss. A pack longer than ``pack_length`` is an
    error naming the fix.
    """
    from megatron_offgrpo.data import collate_pack

    batch = collate_pack(samples, pad_token_id=pad_token_id, pad_to_multiple_of=2 * cp_size if cp_size > 1 else 1)
    cu, cu_real = batch["cu_seqlens"], batch["cu_seqlens_unpadded"]
    total = int(cu[-1])
    if pack_length is not None and total > pack_length:
        names = [sequence_name(s) for s in samples]
        raise ValueError(
            f"the packed microbatch of {', '.join(names[:4])}{' ...' if len(names) > 4 else ''} needs {total} tokens "
            f"> data.seq_length={pack_length}, the fixed length of every pack with data.packing and "
            f"parallel.pp>1: raise data.seq_length to at least {total} or lower "
            f"data.micro_batch_size={len(samples)}"
        )
    if pack_length is not None and total < pack_length:
        # Both ends are multiples of 2*cp (validation: seq_length % 2cp == 0), so the filler splits over CP too.
        filler = pack_length - total
        for key, value in list(batch.items()):
            if torch.is_tensor(value) and value.dim() == 2 and value.shape[1] == total:
                if key == "position_ids":
                    tail = torch.arange(filler, dtype=value.dtype)[None]
                else:
                    tail = torch.full((1, filler), pad_token_id if key in ("tokens", "labels") else 0,
                                      dtype=value.dtype)
                batch[key] = torch.cat([value, tail], dim=1)
        cu = torch.cat([cu, cu.new_tensor([pack_length])])
        cu_real = torch.cat([cu_real, cu_real.new_tensor([pack_length])])  # all of it "real": no empty softmax
        batch["max_seqlen"] = torch.tensor(max(int(batch["max_seqlen"]), filler), dtype=torch.int32)
    padding = torch.ones(1, int(cu[-1]), dtype=torch.bool)
    for start, length in zip(cu[:len(samples)].tolist(), (cu_real[1:] - cu_real[:-1])[:len(samples)].tolist()):
        padding[0, start : start + length] = False  # a sequence's own tokens; its alignment tail stays padding
    split = partial(split_packed_for_context_parallel, cu_seqlens_padded=cu, cp_size=cp_size, cp_rank=cp_rank)
    local_bounds = (cu // cp_size).tolist()[:len(samples) + 1]  # the samples' rows (not the filler's)
    lengths = [b - a for a, b in zip(local_bounds[:-1], local_bounds[1:])]
    n_max = max(lengths)
    index = torch.zeros(len(samples), n_max, dtype=torch.int64)
    valid = torch.zeros(len(samples), n_max, dtype=torch.bool)
    for i, (a, n) in enumerate(zip(local_bounds[:-1], lengths)):
        index[i, :n] = torch.arange(a, a + n)
        valid[i, :n] = True

    def unpack(x: torch.Tensor) -> torch.Tensor:
        # [1, t_local] -> [B, n_max], zeros outside each sequence (masked out of the loss anyway).
        return torch.where(valid, split(x)[0][index], torch.zeros((), dtype=x.dtype))

    return Microbatch(
        tokens=split(batch["tokens"]),
        position_ids=split(batch["position_ids"]),
        labels=split(batch["labels"]),
        loss_mask=unpack(batch["loss_mask"]),
        advantages=advantages,
        rewards=rewards,
        # Full per-sequence response counts, before the CP split (DESIGN 4: never the per-rank counts).
        sequence_token_counts=batch["num_response_tokens"].to(torch.float32),
        arrays={k: unpack(batch[k]) for k in PER_TOKEN_ARRAYS if k in batch},
        names=[sequence_name(s) for s in samples],
        packed_seq={"cu_seqlens": cu_real, "cu_seqlens_padded": cu,
                    "max_seqlen": int(batch["max_seqlen"])},
        unpack_index=index,
        padding_mask=split(padding),
    )


def padding_multiple(cfg: TrainConfig, cp_size: int) -> int:
    """What a padded (not packed, not PP) microbatch's length is rounded up to: 8 (CP=1), a multiple of ``2 cp``
    for the load-balanced CP split, and with sequence parallelism also of ``cp x tp``, so that the local length
    ``T / cp`` splits over TP (docs/design.md 4.2)."""
    multiple = 2 * cp_size if cp_size > 1 else 8
    if cfg.parallel.sequence_parallel and cfg.parallel.tp > 1:
        multiple = math.lcm(multiple, cp_size * cfg.parallel.tp)
    return multiple


def build_step_batch(samples: Sequence[Dict[str, Any]], cfg: TrainConfig, cp_size: int, cp_rank: int,
                     reduce: bool = True) -> StepBatch:
    """Collate this DP rank's whole groups into microbatches and compute advantages and global denominators.

    Advantages are computed over the rank's local batch: the sampler gives each DP rank whole groups, so the
    group statistics are exact locally. Denominators come from one all-reduce of the batch metadata over DP
    (:func:`reduce_step_batch`; with ``reduce=False`` the caller runs it, e.g. after a DataLoader worker collated).
    """
    from megatron_offgrpo.data import collate_pad

    d, loss = cfg.data, cfg.loss
    rewards = torch.tensor([float(s["reward"]) for s in samples])
    group_ids = torch.tensor([int(s["group_id"]) for s in samples])
    advantages = group_advantages(rewards, group_ids, all_positive_bias=loss.all_positive_bias, std=loss.std,
                                  eps=loss.eps)
    too_long = [i for i, s in enumerate(samples) if s["tokens"].numel() > d.seq_length]
    if too_long:
        s = samples[too_long[0]]
        raise ValueError(
            f"sequence of group {s['group_id']} rollout {s['rollout_index']} has {s['tokens'].numel()} tokens > "
            f"data.seq_length={d.seq_length}: rebuild the dataset with --max-seq-len {d.seq_length} or raise "
            f"data.seq_length"
        )

    # Pipeline stages exchange activations of a fixed shape, so PP pads every microbatch to data.seq_length
    # positions (a pack: data.seq_length tokens in all); without PP a microbatch is padded only to its longest
    # sequence (a multiple of 2*cp for the CP split) and a pack holds just its sequences.
    fixed_length = d.seq_length if cfg.parallel.pp > 1 else None
    multiple = 1 if fixed_length else padding_multiple(cfg, cp_size)
    microbatches: List[Microbatch] = []
    for start in range(0, len(samples), d.micro_batch_size):
        rows = slice(start, start + d.micro_batch_size)
        if d.packing:
            microbatches.append(_packed_microbatch(samples[rows], advantages[rows], rewards[rows], d.pad_token_id,
                                                   cp_size, cp_rank, pack_length=fixed_length))
            continue
        batch = collate_pad(samples[rows], pad_token_id=d.pad_token_id, max_len=fixed_length,
                            pad_to_multiple_of=multiple)
        # Full per-sequence response counts, before the CP split (DESIGN 4: never the per-rank counts).
        counts = batch["loss_mask"].sum(dim=-1)
        split = partial(split_for_context_parallel, cp_size=cp_size, cp_rank=cp_rank)
        arrays = {k: split(batch[k]) for k in PER_TOKEN_ARRAYS if k in batch}
        microbatches.append(
            Microbatch(
                tokens=split(batch["tokens"]),
                position_ids=split(batch["position_ids"]),
                labels=split(batch["labels"]),
                loss_mask=split(batch["loss_mask"]),
                advantages=advantages[rows],
                rewards=rewards[rows],
                sequence_token_counts=counts,
                arrays=arrays,
                names=[sequence_name(s) for s in samples[rows]],
                padding_mask=split(torch.arange(batch["tokens"].shape[1])[None] >= batch["seq_lens"][:, None]),
            )
        )

    response_tokens = torch.cat([mb.sequence_token_counts for mb in microbatches])
    stats_group = group_statistics(rewards, group_ids)
    all_pos = torch.zeros(stats_group.num_groups, dtype=torch.bool)
    all_neg = torch.zeros(stats_group.num_groups, dtype=torch.bool)
    all_pos[stats_group.group_index] = stats_group.all_positive
    all_neg[stats_group.group_index] = stats_group.all_negative
    positive = rewards > 0
    local = torch.tensor(
        [
            len(samples),
            float(positive.sum()),
            float(response_tokens.sum()),
            float(response_tokens[positive].sum()),
            stats_group.num_groups,
            float(all_pos.sum()),
            float(all_neg.sum()),
            float(advantages.sum()),
            float(sum(s["tokens"].numel() for s in samples)),
        ],
        dtype=torch.float64,
    )
    step = StepBatch(microbatches, None, None, dict(zip(BATCH_STATS, local.tolist())), loss.kind)
    return reduce_step_batch(step) if reduce else step


def reduce_step_batch(step: StepBatch) -> StepBatch:
    """Sum the batch statistics over DP and set the global denominators (collective over the DP group).

    Split from :func:`build_step_batch` so that collation can run in a DataLoader worker, ahead of the step,
    while the collective stays on the training thread.
    """
    local = torch.tensor([step.stats[k] for k in BATCH_STATS], dtype=torch.float64)
    if dist.is_initialized():
        all_reduce_cpu(local, group=_dp_group())
    step.stats = dict(zip(BATCH_STATS, local.tolist()))
    if get_loss(step.loss_kind).trains_on == "positive":
        step.num_sequences, step.num_tokens = step.stats["positive_sequences"], step.stats["positive_response_tokens"]
    else:
        step.num_sequences, step.num_tokens = step.stats["sequences"], step.stats["response_tokens"]
    return step


def microbatch_loss(
    mb: Microbatch,
    logits: torch.Tensor,
    cfg: TrainConfig,
    step: StepBatch,
    loss_scale: float,
    vocab_size: int,
    output_weight: Optional[torch.Tensor] = None,
):
    """Loss of one microbatch from its (vocab-parallel) logits; returns ``(scaled loss, metric sums)``.

    ``vocab_size`` is the real vocabulary: Megatron's padding columns are excluded from the softmax.
    """
    loss_cfg = cfg.loss
    labels = mb.labels.to(logits.device)
    mask = mb.loss_mask.to(logits.device)
    spec = get_loss(loss_cfg.kind)
    use_reference = spec.kl and loss_cfg.kl_coef > 0 and loss_cfg.reference == "precomputed"
    ref = mb.arrays["ref_logp"].to(logits.device) if use_reference else None

    def loss_of(logp: torch.Tensor):
        """The registered loss of this microbatch from its log-probs as the model's output lays them out."""
        logp = _per_sequence(mb, logp)
        advantages, old = spec.inputs(logp, mb.arrays, mb.advantages)
        loss, metrics = policy_loss(
            logp,
            mask,
            advantages,
            kind=loss_cfg.kind,
            rewards=mb.rewards.to(logp.device),
            ref_logprobs=ref,
            old_logprobs=old,
            clip_eps=loss_cfg.clip_eps,
            kl_coef=loss_cfg.kl_coef,
            agg=loss_cfg.agg,
            num_sequences=step.num_sequences,
            num_tokens=step.num_tokens,
            sequence_token_counts=mb.sequence_token_counts.to(logp.device),
            max_response_len=loss_cfg.max_response_len,
            shaping_gamma=loss_cfg.shaping_gamma,
        )
        return loss, metrics, logp, advantages, old

    # With output_weight (loss.fused_output_layer), `logits` are the final hidden states: see make_forward_step.
    if output_weight is not None and loss_cfg.fused_output_gradients == "forward":
        # Every registered loss is token-separable, so its gradient is taken inside the output layer's forward
        # (losses/fused_output.py: three output-layer GEMMs, no recompute); the metrics read the same log-probs.
        loss, flat_logp = fused_output_loss(
            logits, output_weight, labels, lambda lp: loss_of(lp)[0], chunk_size=loss_cfg.logprob_chunk_size,
            vocab_size=vocab_size, sequence_parallel=cfg.parallel.sequence_parallel)
        with torch.no_grad():
            _, metrics, logp, advantages, old = loss_of(flat_logp)
    else:
        flat_logp = logprobs_from_model_output(logits, labels, output_weight, chunk_size=loss_cfg.logprob_chunk_size,
                                               vocab_size=vocab_size, sequence_parallel=cfg.parallel.sequence_parallel)
        loss, metrics, logp, advantages, old = loss_of(flat_logp)
    with torch.no_grad():
        sel = mask.bool()
        pos = sel & (mb.rewards.to(sel.device) > 0)[:, None]
        neg = sel & ~pos
        lp = logp.detach().double()
        n_tok = metrics["num_tokens"].double()
        sums = torch.stack(
            [
                loss.detach().double(),
                metrics["kl_mean"].double() * n_tok,
                metrics["clip_frac"].double() * n_tok,
                metrics["prob_mean"].double() * n_tok,
                n_tok,
                lp[pos].sum(),
                pos.sum().double(),
                lp[neg].sum(),
                neg.sum().double(),
            ]
        ).cpu()
        out: Dict[str, Any] = {"sums": sums}
        if not torch.isfinite(sums[0]):  # name the culprits (rare path; the trainer reports them)
            from megatron_offgrpo.training.guard import nonfinite_sequences

            out["nonfinite"] = nonfinite_sequences(
                mask, [logp, ref, old, mb.arrays.get("teacher_logp"), advantages], mb.names)
    return loss * loss_scale, out


def _per_sequence(mb: Microbatch, logp: torch.Tensor) -> torch.Tensor:
    """Log-probs as the model's output lays them out -> one row per sequence ``[B, n]`` (packed rows unpacked)."""
    if mb.unpack_index is None:
        return logp
    # Packed THD row [1, t] -> one row per sequence [B, n_max] (padding slots are masked by loss_mask).
    return logp[0][mb.unpack_index.to(logp.device)]


def microbatch_logprobs(mb: Microbatch, output: torch.Tensor, cfg: TrainConfig, vocab_size: int,
                        output_weight: Optional[torch.Tensor] = None) -> torch.Tensor:
    """This rank's log-probs of a microbatch's labels, one row per sequence ``[B, n]`` (its CP part, packed rows
    unpacked), from what the model returned (logits, or hidden states with ``output_weight``); differentiable when
    the output is. What scoring (``inference/scoring.py``) collects."""
    logp = logprobs_from_model_output(output, mb.labels.to(output.device), output_weight,
                                      chunk_size=cfg.loss.logprob_chunk_size, vocab_size=vocab_size,
                                      sequence_parallel=cfg.parallel.sequence_parallel)
    return _per_sequence(mb, logp)


def _router_padding_mask(model, padding_mask: torch.Tensor, cfg: TrainConfig) -> Optional[torch.Tensor]:
    """The ``padding_mask`` to hand GPTModel: ``None`` for a dense model (nothing reads it). Megatron (0.16)
    shards it over TP for sequence parallelism on the first pipeline stage only; later stages receive their
    hidden states sequence-sharded too, so their mask is sharded here (GPU only: SP does not run on CPU)."""
    from megatron.core import parallel_state as ps
    from megatron.core.utils import unwrap_model

    gpt = unwrap_model(model)
    if not getattr(gpt.config, "num_moe_experts", None):
        return None
    tp = cfg.parallel.tp
    if cfg.parallel.sequence_parallel and tp > 1 and not gpt.pre_process:
        local = padding_mask.shape[1] // tp
        rank = ps.get_tensor_model_parallel_rank()
        padding_mask = padding_mask[:, rank * local : (rank + 1) * local]
    return padding_mask


def make_forward_step(cfg: TrainConfig, step: Optional[StepBatch], loss_scale: float, vocab_size: int,
                      collect: Optional[Callable[..., Any]] = None):
    """The ``forward_step_func`` for Megatron's ``get_forward_backward_func()``; ``vocab_size`` is the real one.

    With ``loss.fused_output_layer`` on, the model returns its final hidden states and the loss applies the output
    weight itself (:mod:`megatron_offgrpo.losses.fused_output`): the ``[tokens, V/tp]`` logits never exist.
    ``collect`` replaces the training loss (forward-only use, e.g. scoring): Megatron calls
    ``collect(mb, output, output_weight=...)``, which returns ``(scalar, dict)``.
    """
    import contextlib

    from megatron_offgrpo.models.provider import output_hidden_states

    fused = fused_output_layer_enabled(cfg.loss.fused_output_layer)

    def forward_step(data_iterator: Iterator[Microbatch], model):
        mb = next(data_iterator)
        device = next(model.parameters()).device
        extra = {}
        if mb.padding_mask is not None:
            mask = _router_padding_mask(model, mb.padding_mask, cfg)
            if mask is not None:
                extra["padding_mask"] = mask.to(device)
        # output_weight: the weight the loss applies (last pipeline stage, fused only), else None.
        with output_hidden_states(model) if fused else contextlib.nullcontext() as output_weight:
            if mb.packed_seq is None:
                output = model(mb.tokens.to(device), mb.position_ids.to(device), None, **extra)
            else:
                from megatron.core.packed_seq_params import PackedSeqParams

                # Global (pre-CP-split) boundaries, as Transformer Engine and our torch attention expect them; RoPE
                # restarts per sequence from cu_seqlens_q_padded.
                cu = mb.packed_seq["cu_seqlens"].to(device)
                cu_padded = mb.packed_seq["cu_seqlens_padded"].to(device)
                params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                                         cu_seqlens_q_padded=cu_padded, cu_seqlens_kv_padded=cu_padded,
                                         max_seqlen_q=mb.packed_seq["max_seqlen"],
                                         max_seqlen_kv=mb.packed_seq["max_seqlen"])
                output = model(mb.tokens.to(device), mb.position_ids.to(device), None, packed_seq_params=params,
                               **extra)
        if collect is not None:
            return output, partial(collect, mb, output_weight=output_weight)
        return output, partial(microbatch_loss, mb, cfg=cfg, step=step, loss_scale=loss_scale, vocab_size=vocab_size,
                               output_weight=output_weight)

    return forward_step


def reduce_step_metrics(outputs: List[Dict[str, torch.Tensor]], contributes: bool) -> Dict[str, float]:
    """Sum the microbatch metric vectors over microbatches and all ranks that ``contribute``.

    Call on every rank (it all-reduces over the world): the last pipeline stage's TP-rank-0 ranks contribute
    (every DP and CP rank holds a distinct part of the batch); every other rank adds zeros.
    """
    total = torch.zeros(len(METRIC_SUMS), dtype=torch.float64)
    if contributes:
        for out in outputs:
            total += out["sums"]
    all_reduce_cpu(total)
    return dict(zip(METRIC_SUMS, total.tolist()))


# Megatron's tracker name of the router's per-microbatch load-balancing loss (moe_router_load_balancing_type
# "aux_loss"), recorded per layer without its coefficient.
_MOE_AUX_LOSS_TRACKER = "load_balancing_loss"


def moe_aux_loss_metric(config, num_microbatches: int) -> Optional[float]:
    """The step's router load-balancing loss, per MoE layer and microbatch, without its coefficient; consumes
    Megatron's aux-loss tracker. ``None`` (the metric is absent, never 0) for a dense model or a zero coefficient.

    Call on every rank after a training forward-backward (collective over the world); ``config`` is the model's
    ``TransformerConfig`` and ``num_microbatches`` this rank's count. Each rank's tracker holds, for the layers of
    its pipeline stage, the sum over its microbatches of its TP/CP part of each microbatch's loss (the parts add
    up to the loss of the whole microbatch), so the world's sum over layers, divided by
    ``layers x dp x num_microbatches``, is the mean over layers and over the global batch's microbatches.

    Scale of the gradient (why the policy loss's ``dp x num_microbatches`` factor must not touch this term): the
    loss is attached by ``MoEAuxLossAutoScaler``, whose gradient Megatron's schedule sets to
    ``cp / num_microbatches`` per microbatch, and DDP divides by ``dp x cp``: the step minimizes
    ``loss + coeff x layers x moe_aux_loss`` with the logged ``loss`` and ``moe_aux_loss``.
    """
    coeff = getattr(config, "moe_aux_loss_coeff", 0.0) if getattr(config, "num_moe_experts", None) else 0.0
    if not coeff:
        return None
    from megatron.core import parallel_state as ps
    from megatron.core.transformer.moe.moe_utils import clear_aux_losses_tracker, get_moe_layer_wise_logging_tracker

    tracked = get_moe_layer_wise_logging_tracker().get(_MOE_AUX_LOSS_TRACKER)
    # One sum over the world rather than Megatron's reduce_aux_losses_tracker_across_ranks (per-group reductions,
    # same result): that one needs the tracker entry on every rank, or a rank that has none skips collectives.
    local = torch.zeros(1, dtype=torch.float64)
    if tracked is not None:
        local += tracked["values"].detach().double().sum().cpu()
    total = all_reduce_cpu(local)
    clear_aux_losses_tracker()
    dp = ps.get_data_parallel_world_size() if dist.is_initialized() else 1
    return float(total.item()) / (config.num_layers * dp * num_microbatches)
