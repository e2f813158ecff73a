"""The trainer: offline GRPO / GRPO / SFT / OPD on Megatron-Core, any TP / PP / CP / EP / DP layout.

:class:`Trainer` builds everything in ``__init__`` (process groups, model and optimizer, the data, the resumed
state, the logger) and :meth:`Trainer.train` reads as the pipeline: next batch -> step -> log -> guard ->
validate -> checkpoint / stop. The concerns are components with one owner each:

- data: :class:`TrainData` (the dataset, the :class:`~megatron_offgrpo.data.sampler.GroupBatchSampler` whose
  state is the run's data position, and a ``DataLoader`` whose workers read and collate ahead of the step);
- the step: :func:`megatron_offgrpo.training.loop.run_step` (forward, backward, the non-finite guard, the update);
- checkpoints: :class:`~megatron_offgrpo.training.checkpointing.Checkpointer`;
- metrics: :class:`~megatron_offgrpo.training.logger.MetricsLogger`.
"""

from __future__ import annotations

import copy
import functools
import os
import time
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional

import torch
import torch.distributed as dist

from megatron_offgrpo.config.schema import TrainConfig
from megatron_offgrpo.losses.registry import get_loss, required_arrays
from megatron_offgrpo.training.checkpointing import Checkpointer
from megatron_offgrpo.training.flops import train_flops_per_token
from megatron_offgrpo.training.guard import summarize
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
from megatron_offgrpo.training.step import StepBatch, build_step_batch, reduce_step_batch
from megatron_offgrpo.utils.distributed import any_rank

__all__ = ["Trainer", "TrainData", "TrainResult", "train"]


@dataclass
class TrainResult:
    """What a finished (or stopped) run reports; ``history`` is filled on rank 0 only."""

    last_step: int
    stopped_by: str  # "completed" | "signal" | "time_limit" | "nonfinite" (the last is a failure)
    history: List[Dict[str, float]] = field(default_factory=list)
    checkpoint: Optional[str] = None
    curves_png: Optional[str] = None


class _CollateStep:
    """The DataLoader's ``collate_fn``: this rank's samples -> a :class:`StepBatch` (no collective: the DP sums of
    its statistics are taken on the training thread, :func:`reduce_step_batch`)."""

    def __init__(self, cfg: TrainConfig, cp_size: int, cp_rank: int):
        self.cfg, self.cp_size, self.cp_rank = cfg, cp_size, cp_rank

    def __call__(self, samples: List[dict]) -> StepBatch:
        return build_step_batch(samples, self.cfg, self.cp_size, self.cp_rank, reduce=False)


def _die_with_trainer(trainer_pid: int, worker_id: int) -> None:
    """DataLoader worker start: die with the rank that forked it. A rank killed outright (SIGKILL, the OOM killer)
    otherwise leaves its workers behind forever: a worker with a batch still in its queue's pipe blocks in its exit,
    waiting for a reader that no longer exists."""
    import signal

    # The launcher's preemption signal goes to the whole process group (torchrun, srun, Ctrl-C): the rank decides
    # what it means, a worker must not die of it (the DataLoader would turn that into an error in the rank).
    for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)
    exit_when_parent_dies(signal.SIGKILL)
    if os.getppid() != trainer_pid:  # the rank died before the request above took effect
        os._exit(0)


class TrainData:
    """The training data of this rank: dataset, sampler (the data position) and the batches of the coming steps.

    The sampler advances only when a step has consumed its batch (:meth:`advance`), so that its
    ``consumed_samples`` is what a checkpoint records even while the DataLoader's workers have read ahead (they
    iterate a copy of the sampler taken at :meth:`batches`).
    """

    def __init__(self, cfg: TrainConfig, consumed_samples: int):
        from megatron.core import parallel_state as ps

        from megatron_offgrpo.data import GroupBatchSampler, TrajectoryDataset

        self.cfg = cfg
        d = cfg.data
        self.dataset = TrajectoryDataset(d.train_prefix, per_token_arrays=required_arrays(cfg.loss))
        _check_teacher(cfg, self.dataset)
        self.dp_rank, self.dp_size = data_parallel_coordinates()
        self.cp_size, self.cp_rank = ps.get_context_parallel_world_size(), ps.get_context_parallel_rank()
        self.sampler = GroupBatchSampler(
            self.dataset.groups(), d.groups_per_batch, d.group_size, dp_rank=self.dp_rank, dp_size=self.dp_size,
            seed=d.seed, consumed_samples=consumed_samples, num_epochs=d.num_epochs,
        )
        self.valid = None
        if d.valid_prefix and cfg.validation.interval:
            self.valid = TrajectoryDataset(d.valid_prefix, per_token_arrays=required_arrays(cfg.loss))

    def batches(self) -> Iterator[StepBatch]:
        """The step batches from the sampler's position on, until the configured epochs are exhausted."""
        d = self.cfg.data
        loader = torch.utils.data.DataLoader(
            self.dataset,
            batch_sampler=copy.copy(self.sampler),  # read-ahead must not move the recorded position
            collate_fn=_CollateStep(self.cfg, self.cp_size, self.cp_rank),
            num_workers=d.num_workers,
            prefetch_factor=d.prefetch_factor if d.num_workers else None,
            # fork, as Megatron-LM's loaders get on Linux: a worker starts in milliseconds with the dataset already
            # open, where spawn (the default inside a spawned rank) would import torch and Megatron again.
            multiprocessing_context="fork" if d.num_workers else None,
            worker_init_fn=functools.partial(_die_with_trainer, os.getpid()),
            persistent_workers=False,
        )
        for step_batch in loader:
            yield reduce_step_batch(step_batch)

    def advance(self) -> None:
        """A step consumed the next global batch."""
        self.sampler.consumed_samples += self.sampler.global_batch_size

    @property
    def epoch(self) -> int:
        return self.sampler.epoch

    def validation_batches(self) -> Iterator[StepBatch]:
        """The first ``validation.batches`` global batches of the validation set, in a fixed order."""
        from megatron_offgrpo.data import GroupBatchSampler

        d = self.cfg.data
        sampler = GroupBatchSampler(
            self.valid.groups(), d.groups_per_batch, d.group_size, dp_rank=self.dp_rank, dp_size=self.dp_size,
            seed=d.seed, num_epochs=1,
        )
        for b in range(min(self.cfg.validation.batches, sampler.batches_per_epoch)):
            samples = [self.valid[i] for i in sampler.rank_batch(b)]
            yield build_step_batch(samples, self.cfg, self.cp_size, self.cp_rank)


def _check_teacher(cfg: TrainConfig, dataset) -> None:
    """A loss reading teacher log-probs (OPD): the teacher that scored the rollouts must be the configured one
    (docs/design.md, "Lightning OPD": the same teacher as the SFT data)."""
    if "teacher_logp" not in get_loss(cfg.loss.kind).arrays:
        return
    producer = dataset.manifest.get("per_token_arrays", {}).get("teacher_logp", {}).get("producer", {})
    recorded = producer.get("model") or producer.get("name")
    if cfg.loss.teacher and recorded != cfg.loss.teacher and not cfg.loss.allow_teacher_mismatch:
        raise ValueError(
            f"loss.teacher={cfg.loss.teacher!r} but {cfg.data.train_prefix}.teacher_logp was produced by "
            f"{recorded!r}; score the rollouts with the teacher that wrote the SFT data, or set "
            "loss.allow_teacher_mismatch=true"
        )


class Trainer:
    """One training run (construct and call :meth:`train` on every rank; it sets up the process groups itself).

    ``stop`` is a :class:`StopFlag` the caller installed as early as it could (the CLI does so before its heavy
    imports, so that a preemption signal during start-up is not fatal); by default one is installed here.
    """

    def __init__(self, cfg: TrainConfig, stop: Optional[StopFlag] = None):
        self.cfg = cfg
        self.started = job_start_time()
        self.stop = stop or StopFlag()
        if stop is None:
            self.stop.install()
        if not cfg.checkpoint.save_on_signal:
            self.stop.uninstall()
        elif os.environ.get("TORCHELASTIC_RUN_ID"):  # torchrun does not forward SIGUSR1: its death must stop us
            exit_when_parent_dies()
        initialize_distributed(cfg)
        self.rank0 = dist.get_rank() == 0
        self.checkpointer = Checkpointer(cfg)
        self.objs = build_training_objects(cfg)
        state = self.checkpointer.resume(self.objs)
        self.start_step = self.step = state["step"]
        self.data = TrainData(cfg, state["consumed_samples"])

        objs, arch = self.objs, self.objs.arch
        n_params = model_parallel_sum(sum(p.numel() for c in objs.model for p in c.parameters()))
        self.flops_per_token = train_flops_per_token(n_params, arch, objs.padded_vocab_size, cfg.data.seq_length)
        self.logger = MetricsLogger(cfg, self.rank0, self.start_step)
        sampler = self.data.sampler
        self.logger.info(
            f"{cfg.name}: {n_params / 1e6:.2f}M parameters, tp={cfg.parallel.tp} pp={cfg.parallel.pp} "
            f"cp={cfg.parallel.cp} dp={self.data.dp_size}, global batch {sampler.global_batch_size} sequences "
            f"({cfg.data.groups_per_batch} groups x G={cfg.data.group_size}), {len(self.data.dataset)} sequences in "
            f"{self.data.dataset.num_groups} groups, {sampler.batches_per_epoch} steps per epoch"
        )
        self._nonfinite_streak: List[int] = []  # steps in a row whose update the non-finite guard refused

    # ------------------------------------------------------------------------------------------ the pipeline
    def train(self) -> TrainResult:
        """Train until ``train_steps``, the end of ``data.num_epochs``, a signal, the time limit, or a run of
        non-finite steps; save where the config says. Returns how it ended."""
        if self.data.valid is not None and self.step == 0:  # the baseline the validation curve starts from
            self.logger.log_validation(0, self.validate())
        stopped_by = "completed"
        batches = self.data.batches()
        try:
            stopped_by = self._loop(batches)
        finally:
            batches.close()  # stops the DataLoader's workers now, not whenever the generator is collected
        return self.close(stopped_by)

    def _loop(self, batches: Iterator[StepBatch]) -> str:
        cfg, stopped_by = self.cfg, "completed"
        while self.step < cfg.train_steps:
            tic = time.perf_counter()
            step_batch = next(batches, None)
            if step_batch is None:
                self._end_of_epochs()
                break
            metrics = self.train_step(step_batch)
            self._log_step(metrics, step_batch, time.perf_counter() - tic)
            if metrics["nonfinite"] and self._nonfinite_stops(metrics, step_batch):
                stopped_by = "nonfinite"
                break
            self._nonfinite_streak = [] if not metrics["nonfinite"] else self._nonfinite_streak
            if self.data.valid is not None and self.step % cfg.validation.interval == 0:
                self.logger.log_validation(self.step, self.validate())
            interrupted = self._interrupted()
            self._maybe_save(interrupted)
            if interrupted and self.step < cfg.train_steps:  # finishing wins: nothing is left to resume
                stopped_by = "signal" if any_rank(self.stop.signal is not None) else "time_limit"
                self.logger.info(f"stopping at step {self.step} ({stopped_by}); resume by re-running the same command")
                break
        return stopped_by

    def train_step(self, step_batch: StepBatch) -> Dict[str, float]:
        """One optimizer step on one global batch; advances the step count and the data position."""
        from megatron_offgrpo.training.loop import run_step

        metrics = run_step(self.cfg, self.objs, step_batch)
        self.data.advance()
        self.step += 1
        return metrics

    def validate(self) -> Dict[str, float]:
        """Forward-only loss over the first ``validation.batches`` global batches of the validation set."""
        from megatron_offgrpo.training.loop import run_step

        sums: Dict[str, List[float]] = {}
        for step_batch in self.data.validation_batches():
            with torch.no_grad():
                metrics = run_step(self.cfg, self.objs, step_batch, forward_only=True)
            for k in ("loss", "kl", "logprob_pos", "logprob_neg"):
                if k in metrics:  # absent = no data in that batch (e.g. no negatives): averaged over the others
                    sums.setdefault(k, []).append(metrics[k])
        return {k: sum(v) / len(v) for k, v in sums.items()}

    def close(self, stopped_by: str) -> TrainResult:
        """Flush the metrics (the curves PNG), release the checkpoint directory; the run's result."""
        curves = self.logger.close()
        self.checkpointer.close()
        return TrainResult(self.step, stopped_by, self.logger.history, self.checkpointer.last, curves)

    # ------------------------------------------------------------------------------------------ the parts
    def _log_step(self, metrics: Dict[str, float], step_batch: StepBatch, seconds: float) -> None:
        tokens = step_batch.stats["all_tokens"]
        metrics.update(
            tokens_per_s=tokens / seconds,
            tflops=self.flops_per_token * tokens / seconds / 1e12,
            step_seconds=seconds,
            mem_gib=peak_memory_gib(),
            # The epoch of the batch just trained (the sampler has moved past it).
            epoch=float((self.data.sampler.batch_index - 1) // max(self.data.sampler.batches_per_epoch, 1)),
        )
        self.logger.log_step(self.step, metrics)

    def _nonfinite_stops(self, metrics: Dict[str, float], step_batch: StepBatch) -> bool:
        """Report a refused update; True when the run must stop (``optimizer.on_nonfinite`` and the streak)."""
        self._nonfinite_streak.append(self.step)
        culprits = step_batch.nonfinite_sequences
        self.logger.warn(
            f"step {self.step}: non-finite {summarize(metrics)}: update skipped, weights unchanged"
            + (f"; non-finite inputs in {', '.join(culprits[:8])}{' ...' if len(culprits) > 8 else ''}"
               if culprits else "")
        )
        opt, streak = self.cfg.optimizer, self._nonfinite_streak
        if opt.on_nonfinite != "stop" and len(streak) < opt.max_consecutive_skips:
            return False
        last = self.checkpointer.last
        self.logger.warn(
            f"stopping: {len(streak)} non-finite step(s) in a row (steps {streak[0]}-{streak[-1]}, "
            f"optimizer.on_nonfinite={opt.on_nonfinite}, max_consecutive_skips={opt.max_consecutive_skips}); nothing "
            "saved since. Lower optimizer.lr, or fix the named data" + (f"; the last checkpoint is {last}" if last else "")
        )
        return True

    def _interrupted(self) -> bool:
        """A signal arrived on any rank, or the job's time limit is reached (collective)."""
        limit = self.cfg.checkpoint.exit_after_seconds
        out_of_time = limit is not None and time.time() - self.started >= limit
        return any_rank(self.stop.signal is not None or out_of_time)

    def _maybe_save(self, interrupted: bool) -> None:
        ck = self.cfg.checkpoint
        periodic = ck.save_interval > 0 and self.step % ck.save_interval == 0
        if periodic or interrupted or self.step == self.cfg.train_steps:
            self._save()

    def _save(self) -> None:
        path = self.checkpointer.save(self.step, self.objs, self.data.sampler.consumed_samples)
        if path:
            self.logger.info(f"saved checkpoint {path}")

    def _end_of_epochs(self) -> None:
        self.logger.info(f"data.num_epochs={self.cfg.data.num_epochs} exhausted after {self.step} steps")
        if self.step > self.start_step and not self.checkpointer.has(self.step):
            self._save()  # the run's end: its final weights are saved, as at train_steps


def train(cfg: TrainConfig, stop: Optional[StopFlag] = None) -> TrainResult:
    """Run training as configured (call on every rank): ``Trainer(cfg, stop).train()``."""
    return Trainer(cfg, stop).train()
