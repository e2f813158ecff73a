"""The training loop: offline GRPO / GRPO / SFT / OPD on Megatron-Core, any TP / PP / CP / DP layout."""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import torch
import torch.distributed as dist

from megatron_offgrpo.config.loader import required_arrays
from megatron_offgrpo.config.schema import TrainConfig
from megatron_offgrpo.training import checkpointing
from megatron_offgrpo.training.guard import APPLIED, NONFINITE, gather_names, guarded_optimizer_step, summarize
from megatron_offgrpo.training.logger import MetricsLogger
from megatron_offgrpo.training.setup import (
    build_training_objects,
    data_parallel_coordinates,
    initialize_distributed,
    job_start_time,
    model_parallel_sum,
    peak_memory_gib,
)
from megatron_offgrpo.training.signals import StopFlag, exit_when_parent_dies
from megatron_offgrpo.training.step import StepBatch, build_step_batch, make_forward_step, reduce_step_metrics
from megatron_offgrpo.utils.distributed import all_reduce_cpu

__all__ = ["TrainResult", "train", "run_step"]


@dataclass
class TrainResult:
    """What a finished (or stopped) run reports; ``history`` is filled on rank 0 only."""

    last_step: int
    stopped_by: str  # "completed" | "signal" | "time_limit" | "nonfinite" (the last is a failure)
    history: List[Dict[str, float]] = field(default_factory=list)
    checkpoint: Optional[str] = None
    curves_png: Optional[str] = None


def _any_rank(flag: bool) -> bool:
    """True on every rank if it is true on any (so that all ranks take the same branch)."""
    t = all_reduce_cpu(torch.tensor([1.0 if flag else 0.0]), op=dist.ReduceOp.MAX)
    return bool(t.item())


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
    outputs = get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=data_iterator,
        model=objs.model,
        num_microbatches=num_micro,
        seq_length=cfg.data.seq_length,
        micro_batch_size=cfg.data.micro_batch_size,
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
    return metrics


def _load_samples(dataset, indices) -> list:
    return [dataset[i] for i in indices]


def _check_teacher(cfg: TrainConfig, dataset) -> None:
    """OPD: the teacher that scored the rollouts must be the configured one (DESIGN 3, teacher consistency)."""
    if cfg.loss.kind != "opd":
        return
    producer = dataset.manifest.get("per_token_arrays", {}).get("teacher_logp", {}).get("producer", {})
    recorded = producer.get("model") or producer.get("name")
    if cfg.loss.teacher and recorded != cfg.loss.teacher and not cfg.loss.allow_teacher_mismatch:
        raise ValueError(
            f"loss.teacher={cfg.loss.teacher!r} but {cfg.data.train_prefix}.teacher_logp was produced by "
            f"{recorded!r}; score the rollouts with the teacher that wrote the SFT data, or set "
            "loss.allow_teacher_mismatch=true"
        )


def train(cfg: TrainConfig, stop: Optional[StopFlag] = None) -> TrainResult:
    """Run training as configured (call on every rank; sets up process groups itself).

    ``stop`` is a :class:`StopFlag` the caller installed as early as it could (the CLI does so before its heavy
    imports, so that a preemption signal during start-up is not fatal); by default one is installed here.
    """
    from megatron.core import parallel_state as ps

    from megatron_offgrpo.data import GroupBatchSampler, TrajectoryDataset

    started = job_start_time()
    if stop is None:
        stop = StopFlag()
        stop.install()
    if not cfg.checkpoint.save_on_signal:
        stop.uninstall()
    elif os.environ.get("TORCHELASTIC_RUN_ID"):  # torchrun does not forward SIGUSR1: its death must stop us
        exit_when_parent_dies()
    initialize_distributed(cfg)
    rank0 = dist.get_rank() == 0
    run_lock, lock_error = None, None
    if rank0 and cfg.checkpoint.dir:
        try:
            run_lock = checkpointing.lock_checkpoint_dir(cfg.checkpoint.dir)
        except checkpointing.CheckpointDirInUseError as e:
            lock_error = e
    if _any_rank(lock_error is not None):  # every rank stops, not only rank 0
        raise lock_error or checkpointing.CheckpointDirInUseError(f"{cfg.checkpoint.dir} is in use (see rank 0)")
    objs = build_training_objects(cfg)
    dp_rank, dp_size = data_parallel_coordinates()
    cp_size, cp_rank = ps.get_context_parallel_world_size(), ps.get_context_parallel_rank()

    dataset = TrajectoryDataset(cfg.data.train_prefix, per_token_arrays=required_arrays(cfg.loss))
    _check_teacher(cfg, dataset)
    start_step, consumed = 0, 0
    ck = cfg.checkpoint
    if ck.dir and ck.resume:
        path = checkpointing.latest_checkpoint(ck.dir)
        if path is not None:
            state = checkpointing.load_checkpoint(path, objs.model, objs.optimizer, objs.scheduler, cfg)
            start_step, consumed = state["step"], state["consumed_samples"]
            if rank0:
                print(f"resumed from {path}: step {start_step}, {consumed} samples consumed", flush=True)
    sampler = GroupBatchSampler(
        dataset.groups(), cfg.data.groups_per_batch, cfg.data.group_size, dp_rank=dp_rank, dp_size=dp_size,
        seed=cfg.data.seed, consumed_samples=consumed, num_epochs=cfg.data.num_epochs,
    )
    valid = (TrajectoryDataset(cfg.data.valid_prefix, per_token_arrays=required_arrays(cfg.loss))
             if cfg.data.valid_prefix and cfg.validation.interval else None)

    n_params = model_parallel_sum(sum(p.numel() for c in objs.model for p in c.parameters()))
    arch = objs.arch
    # Matmul parameters for the FLOP estimate: the input embedding is a lookup unless it is tied to the output.
    flop_params = n_params - (0 if arch.tie_word_embeddings else objs.padded_vocab_size * arch.hidden_size)
    logger = MetricsLogger(cfg, rank0, start_step)
    logger.info(
        f"{cfg.name}: {n_params / 1e6:.2f}M parameters, tp={cfg.parallel.tp} pp={cfg.parallel.pp} "
        f"cp={cfg.parallel.cp} dp={dp_size}, global batch {sampler.global_batch_size} sequences "
        f"({cfg.data.groups_per_batch} groups x G={cfg.data.group_size}), {len(dataset)} sequences in "
        f"{dataset.num_groups} groups, {sampler.batches_per_epoch} steps per epoch"
    )

    step = start_step
    if valid is not None and step == 0:  # the baseline the validation curve starts from
        logger.log_validation(0, validate(cfg, objs, valid, cp_size, cp_rank))
    stopped_by = "completed"
    last_ckpt = None
    nonfinite_streak: List[int] = []  # steps in a row whose update the non-finite guard refused
    while step < cfg.train_steps:
        batch_index = sampler.consumed_samples // sampler.global_batch_size
        if cfg.data.num_epochs is not None and batch_index >= sampler.batches_per_epoch * cfg.data.num_epochs:
            logger.info(f"data.num_epochs={cfg.data.num_epochs} exhausted after {step} steps")
            if ck.dir and step > start_step and (last_ckpt is None or not last_ckpt.endswith(f"iter_{step:07d}")):
                # The run's end: its final weights are saved, as at train_steps.
                last_ckpt = checkpointing.save_checkpoint(
                    ck.dir, step, objs.model, objs.optimizer, objs.scheduler, sampler.consumed_samples, cfg)
                logger.info(f"saved checkpoint {last_ckpt}")
            break
        tic = time.perf_counter()
        samples = _load_samples(dataset, sampler.rank_batch(batch_index))
        step_batch = build_step_batch(samples, cfg, cp_size, cp_rank)
        metrics = run_step(cfg, objs, step_batch)
        sampler.consumed_samples += sampler.global_batch_size
        step += 1
        seconds = time.perf_counter() - tic
        tokens = step_batch.stats["all_tokens"]
        # Dense-transformer estimate: 6 flops per parameter per token, plus causal attention (QK^T and AV).
        attn = 6 * arch.num_layers * arch.num_attention_heads * arch.head_dim * cfg.data.seq_length
        metrics.update(
            tokens_per_s=tokens / seconds,
            tflops=(6 * flop_params + attn) * tokens / seconds / 1e12,
            step_seconds=seconds,
            mem_gib=peak_memory_gib(),
            epoch=float(batch_index // max(sampler.batches_per_epoch, 1)),
        )
        logger.log_step(step, metrics)
        if metrics["nonfinite"]:
            nonfinite_streak.append(step)
            culprits = step_batch.nonfinite_sequences
            logger.warn(
                f"step {step}: non-finite {summarize(metrics)}: update skipped, weights unchanged"
                + (f"; non-finite inputs in {', '.join(culprits[:8])}{' ...' if len(culprits) > 8 else ''}"
                   if culprits else "")
            )
            opt = cfg.optimizer
            if opt.on_nonfinite == "stop" or len(nonfinite_streak) >= opt.max_consecutive_skips:
                stopped_by = "nonfinite"
                logger.warn(
                    f"stopping: {len(nonfinite_streak)} non-finite step(s) in a row (steps {nonfinite_streak[0]}-"
                    f"{nonfinite_streak[-1]}, optimizer.on_nonfinite={opt.on_nonfinite}, max_consecutive_skips="
                    f"{opt.max_consecutive_skips}); nothing saved since. Lower optimizer.lr, or fix the named data"
                    + (f"; the last checkpoint is {last_ckpt}" if last_ckpt else "")
                )
                break
        else:
            nonfinite_streak = []

        if valid is not None and step % cfg.validation.interval == 0:
            logger.log_validation(step, validate(cfg, objs, valid, cp_size, cp_rank))

        out_of_time = ck.exit_after_seconds is not None and time.time() - started >= ck.exit_after_seconds
        interrupted = _any_rank(stop.signal is not None or out_of_time)
        periodic = ck.save_interval > 0 and step % ck.save_interval == 0
        if ck.dir and (periodic or interrupted or step == cfg.train_steps):
            last_ckpt = checkpointing.save_checkpoint(
                ck.dir, step, objs.model, objs.optimizer, objs.scheduler, sampler.consumed_samples, cfg
            )
            logger.info(f"saved checkpoint {last_ckpt}")
        if interrupted and step < cfg.train_steps:  # finishing wins: nothing is left to resume
            stopped_by = "signal" if _any_rank(stop.signal is not None) else "time_limit"
            logger.info(f"stopping at step {step} ({stopped_by}); resume by re-running the same command")
            break
    curves = logger.close()
    if run_lock is not None:
        run_lock.close()
    return TrainResult(step, stopped_by, logger.history, last_ckpt, curves)


def validate(cfg: TrainConfig, objs, dataset, cp_size: int, cp_rank: int) -> Dict[str, float]:
    """Forward-only loss over the first ``validation.batches`` global batches of ``dataset`` (fixed order)."""
    from megatron_offgrpo.data import GroupBatchSampler

    dp_rank, dp_size = data_parallel_coordinates()
    sampler = GroupBatchSampler(
        dataset.groups(), cfg.data.groups_per_batch, cfg.data.group_size, dp_rank=dp_rank, dp_size=dp_size,
        seed=cfg.data.seed, num_epochs=1,
    )
    sums: Dict[str, List[float]] = {}
    n = min(cfg.validation.batches, sampler.batches_per_epoch)
    for b in range(n):
        step_batch = build_step_batch(_load_samples(dataset, sampler.rank_batch(b)), cfg, cp_size, cp_rank)
        with torch.no_grad():
            metrics = run_step(cfg, objs, step_batch, forward_only=True)
        for k in ("loss", "kl", "logprob_pos", "logprob_neg"):
            if k in metrics:  # absent = no data in that batch (e.g. no negatives): averaged over the others
                sums.setdefault(k, []).append(metrics[k])
    return {k: sum(v) / len(v) for k, v in sums.items()}
