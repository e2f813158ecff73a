"""Build what a run needs from its config: process groups, model chunks, DDP, optimizer, LR scheduler."""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, List

import torch
import torch.distributed as dist

from megatron_offgrpo.config.schema import TrainConfig

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def params_dtype(cfg: TrainConfig) -> torch.dtype:
    return _DTYPES[cfg.model.params_dtype]


def initialize_distributed(cfg: TrainConfig) -> None:
    """torch.distributed (NCCL on GPU, gloo + the CPU backend on CPU) and Megatron's parallel state.

    Reads the env:// variables torchrun / srun set; a plain ``python`` run is a world of one.
    """
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    from megatron_offgrpo.utils.cpu_backend import initialize_cpu_model_parallel
    from megatron_offgrpo.utils.distributed import bootstrap_env

    bootstrap_env()  # torchrun, srun (one task per rank, its rank from SLURM_PROCID), or a world of one
    par = cfg.parallel
    sizes = dict(
        tensor_model_parallel_size=par.tp,
        pipeline_model_parallel_size=par.pp,
        context_parallel_size=par.cp,
        expert_model_parallel_size=par.ep,
        virtual_pipeline_model_parallel_size=par.vpp,
    )
    if not torch.cuda.is_available():
        initialize_cpu_model_parallel(seed=cfg.seed, **sizes)
        return
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        dist.init_process_group("nccl", timeout=timedelta(minutes=30))
    parallel_state.initialize_model_parallel(**sizes)
    torch.manual_seed(cfg.seed)
    model_parallel_cuda_manual_seed(cfg.seed)


def build_architecture(cfg: TrainConfig):
    from megatron_offgrpo.models import model_config_from_hf, tiny_architecture

    m = cfg.model
    if m.architecture == "tiny":
        return tiny_architecture(m.tiny_vocab_size, m.tiny_num_layers, m.tiny_hidden_size)
    return model_config_from_hf(m.architecture)


def moe_aux_loss_coeff(cfg: TrainConfig, arch) -> float:
    """Weight of the router's load-balancing loss: ``model.moe_aux_loss_coeff``, else the HF config's own
    ``router_aux_loss_coef`` (0 when it has none); always 0 for a dense model (validation refuses a coefficient
    set for one)."""
    if not arch.is_moe:
        return 0.0
    if cfg.model.moe_aux_loss_coeff is not None:
        return float(cfg.model.moe_aux_loss_coeff)
    from megatron_offgrpo.models import load_hf_config

    return float(load_hf_config(cfg.model.architecture).get("router_aux_loss_coef") or 0.0)


@dataclass
class TrainingObjects:
    arch: Any
    transformer_config: Any
    model: List[Any]  # DDP-wrapped model chunks (several with the interleaved schedule)
    optimizer: Any
    scheduler: Any
    padded_vocab_size: int  # rows of the embedding / output layer (Megatron's padding included)
    vocab_size: int  # the real vocabulary: columns >= it are padding, excluded from every softmax


def build_training_objects(cfg: TrainConfig) -> TrainingObjects:
    """Model chunks (initial weights from ``model.load`` or seeded random init), DDP, optimizer, scheduler."""
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    from megatron_offgrpo.models import (
        build_gpt_model,
        build_transformer_config,
        checkpoint_padded_vocab_size,
        checkpoint_vocab_size,
        load_model_checkpoint,
        zero_padded_vocab_rows,
    )

    m, par, opt = cfg.model, cfg.parallel, cfg.optimizer
    arch = build_architecture(cfg)
    dtype = params_dtype(cfg)
    overrides = dict(pipeline_dtype=dtype, hidden_dropout=0.0, attention_dropout=0.0)
    if par.vpp:
        overrides["virtual_pipeline_model_parallel_size"] = par.vpp
    if m.recompute_granularity:
        overrides["recompute_granularity"] = m.recompute_granularity
        if m.recompute_granularity == "full":
            overrides.update(recompute_method="uniform", recompute_num_layers=1)
    tconfig = build_transformer_config(
        arch, tp=par.tp, pp=par.pp, ep=par.ep, cp=par.cp, params_dtype=dtype,
        sequence_parallel=par.sequence_parallel, fp8=m.fp8, fp8_recipe=m.fp8_recipe,
        moe_aux_loss_coeff=moe_aux_loss_coeff(cfg, arch), **overrides,
    )
    vocab = checkpoint_padded_vocab_size(m.load) if m.load else arch.padded_vocab_size(par.tp, m.make_vocab_size_divisible_by)
    if m.load and checkpoint_vocab_size(m.load) != arch.vocab_size:
        raise ValueError(
            f"model.load={m.load} was converted from a model with vocabulary {checkpoint_vocab_size(m.load)}, but "
            f"model.architecture={m.architecture} has {arch.vocab_size}: point both at the same model"
        )
    backend = {"auto": "auto", "local": "local", "te": "te"}[m.transformer_impl]

    chunks = []
    for vp in range(par.vpp or 1):
        vp_stage = vp if par.vpp else None
        torch.manual_seed(cfg.seed)  # same init for every layout (the CPU init draws full weights, then splits)
        chunk = build_gpt_model(
            arch, tconfig,
            pre_process=ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage),
            post_process=ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage),
            vocab_size=vocab, backend=backend, attention_backend=m.attention_backend, vp_stage=vp_stage,
        )
        if m.load:
            load_model_checkpoint(chunk, m.load)
        else:
            # Random init: make the padding rows what a converted checkpoint has (zeros); they never train.
            zero_padded_vocab_rows(chunk, arch.vocab_size)
        if torch.cuda.is_available():
            chunk.cuda(torch.cuda.current_device())
        chunks.append(chunk)

    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=par.overlap_grad_reduce,
        use_distributed_optimizer=par.distributed_optimizer,
    )
    model = [
        DistributedDataParallel(config=tconfig, ddp_config=ddp_config, module=chunk, disable_bucketing=i > 0)
        for i, chunk in enumerate(chunks)
    ]
    optimizer = get_megatron_optimizer(
        OptimizerConfig(
            optimizer="adam", lr=opt.lr, min_lr=opt.min_lr, weight_decay=opt.weight_decay,
            adam_beta1=opt.adam_beta1, adam_beta2=opt.adam_beta2, adam_eps=opt.adam_eps, clip_grad=opt.clip_grad,
            bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16, params_dtype=dtype,
            initial_loss_scale=opt.initial_loss_scale if dtype == torch.float16 else None,
            use_distributed_optimizer=par.distributed_optimizer,
        ),
        model,
    )
    scheduler = OptimizerParamScheduler(
        optimizer,
        init_lr=0.0 if opt.warmup_steps else opt.lr,
        max_lr=opt.lr,
        min_lr=opt.min_lr,
        lr_warmup_steps=opt.warmup_steps,
        lr_decay_steps=max(cfg.train_steps, opt.warmup_steps + 1),
        lr_decay_style=opt.lr_schedule,
        start_wd=opt.weight_decay,
        end_wd=opt.weight_decay,
        wd_incr_steps=cfg.train_steps,
        wd_incr_style="constant",
    )
    # Hooks Megatron's schedules call: grad reduction over DP (and embedding/PP sync), fp16 loss scaling,
    # and no-sync while accumulating microbatches.
    tconfig.finalize_model_grads_func = finalize_model_grads
    tconfig.grad_scale_func = optimizer.scale_loss
    tconfig.no_sync_func = [c.no_sync for c in model] if len(model) > 1 else model[0].no_sync
    return TrainingObjects(arch, tconfig, model, optimizer, scheduler, vocab, arch.vocab_size)


def data_parallel_coordinates() -> tuple:
    from megatron.core import parallel_state as ps

    return ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()


def job_start_time() -> float:
    """When the job started, in unix seconds: the allocation's start under SLURM, else this process's start.

    The SLURM time limit counts from the allocation, not from after our (possibly long) setup; measuring from
    the latter is a bug peer frameworks shipped (docs/design.md §7). In order: ``OFFGRPO_JOB_START_TIME`` (exported by
    ``launch/slurm/train.sbatch``), ``SLURM_JOB_START_TIME`` (SLURM >= 23.02), the ``StartTime`` of
    ``scontrol show job $SLURM_JOB_ID`` (older SLURM), the process's creation time.
    """
    for name in ("OFFGRPO_JOB_START_TIME", "SLURM_JOB_START_TIME"):
        value = os.environ.get(name, "")
        if value.replace(".", "", 1).isdigit():
            return float(value)
    job = os.environ.get("SLURM_JOB_ID")
    if job:
        start = _scontrol_start_time(job)
        if start is not None:
            return start
    import psutil

    return psutil.Process().create_time()


def _scontrol_start_time(job_id: str):
    """``StartTime`` of a SLURM job (local time, as scontrol prints it) in unix seconds, or None."""
    import subprocess
    from datetime import datetime

    try:
        out = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    for field in out.split():
        if field.startswith("StartTime="):
            try:
                return datetime.strptime(field.split("=", 1)[1], "%Y-%m-%dT%H:%M:%S").timestamp()
            except ValueError:
                return None
    return None


def model_parallel_sum(value: float) -> float:
    """Sum of a per-rank number over the TP x PP (model-parallel) group: e.g. the parameter count."""
    from megatron.core import parallel_state as ps

    from megatron_offgrpo.utils.distributed import all_reduce_cpu

    group = ps.get_model_parallel_group() if dist.is_initialized() else None
    return float(all_reduce_cpu(torch.tensor([value], dtype=torch.float64), group=group).item())


def peak_memory_gib() -> float:
    """Peak GPU memory allocated by torch, or peak RSS on CPU, in GiB."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB (peak RSS on CPU)
