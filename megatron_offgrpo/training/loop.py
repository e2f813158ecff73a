"""One optimizer step through Megatron-Core's pipeline schedules (the trainer is :mod:`.trainer`)."""

from __future__ import annotations

import math
from typing import Dict

from megatron_offgrpo.config.schema import TrainConfig
from megatron_offgrpo.training.guard import APPLIED, NONFINITE, gather_names, guarded_optimizer_step
from megatron_offgrpo.training.step import StepBatch, make_forward_step, moe_aux_loss_metric, reduce_step_metrics

__all__ = ["run_step"]


def run_step(cfg: TrainConfig, objs, step_batch: StepBatch, forward_only: bool = False) -> Dict[str, float]:
    """Forward (+ backward and optimizer step unless ``forward_only``) of one global batch; reduced metrics."""
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    dp = ps.get_data_parallel_world_size()
    num_micro = len(step_batch.microbatches)
    forward_step = make_forward_step(cfg, step_batch, loss_scale=float(dp * num_micro), vocab_size=objs.vocab_size)
    iterators = [iter(step_batch.microbatches) for _ in objs.model]
    data_iterator = iterators if len(objs.model) > 1 else iterators[0]
    if not forward_only:
        for chunk in objs.model:
            chunk.zero_grad_buffer()
        objs.optimizer.zero_grad()
        if getattr(objs.transformer_config, "num_moe_experts", None):
            # The router's tracker is process-global: whatever a forward pass outside this step recorded
            # (validation, another model in this process) must not enter this step's moe_aux_loss.
            from megatron.core.transformer.moe.moe_utils import clear_aux_losses_tracker

            clear_aux_losses_tracker()
    outputs = get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=data_iterator,
        model=objs.model,
        num_microbatches=num_micro,
        seq_length=cfg.data.seq_length,
        micro_batch_size=1 if cfg.data.packing else cfg.data.micro_batch_size,  # a pack is one [1, t] row
        forward_only=forward_only,
    )
    contributes = ps.is_pipeline_last_stage(ignore_virtual=True) and ps.get_tensor_model_parallel_rank() == 0
    sums = reduce_step_metrics(outputs, contributes)
    stats = step_batch.stats
    # A mean over nothing is absent, never 0: a step without negatives has no negative log-prob.
    means = {"kl": ("kl_sum", "tokens"), "clip_frac": ("clip_count", "tokens"), "prob_mean": ("prob_sum", "tokens"),
             "logprob_pos": ("logprob_pos_sum", "tokens_pos"), "logprob_neg": ("logprob_neg_sum", "tokens_neg")}
    metrics = {"loss": sums["loss"]}
    metrics.update({k: sums[num] / sums[den] for k, (num, den) in means.items() if sums[den] > 0})
    metrics["adv_mean"] = stats["advantage_sum"] / max(stats["sequences"], 1.0)
    metrics["all_positive_frac"] = stats["all_positive_groups"] / max(stats["groups"], 1.0)
    if not math.isfinite(metrics["loss"]):
        # Rare path: find the sequences whose loss inputs are non-finite, on whichever ranks hold them.
        local = [n for out in outputs for n in out.get("nonfinite", [])] if contributes else []
        step_batch.nonfinite_sequences = gather_names(local)
    if not forward_only:
        status, grad_norm = guarded_optimizer_step(objs.optimizer, metrics["loss"])
        if status == APPLIED:
            objs.scheduler.step(increment=1)
        metrics["grad_norm"] = grad_norm
        metrics["skipped"] = 0.0 if status == APPLIED else 1.0
        metrics["nonfinite"] = 1.0 if status == NONFINITE else 0.0
        metrics["lr"] = objs.optimizer.param_groups[0]["lr"]
        if (aux := moe_aux_loss_metric(objs.transformer_config, num_micro)) is not None:  # MoE: router balance
            metrics["moe_aux_loss"] = aux
    return metrics
