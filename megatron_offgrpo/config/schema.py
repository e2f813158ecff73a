"""The training configuration: typed sections, NeMo-style (one YAML, ``a.b=c`` overrides on the command line).

Every field has a default that works for the tiny CPU demo except the dataset path. Units are spelled out in
the field names (``*_steps``, ``*_interval``) or in the comment beside them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional


@dataclass
class ModelConfig:
    # Architecture source: "tiny" (the CPU demo model) or an HF model dir / config.json (Qwen2/2.5/3/3-MoE, Llama).
    architecture: str = "tiny"
    tiny_vocab_size: int = 261  # tiny only: the in-repo tokenizer's vocabulary
    tiny_num_layers: int = 2
    tiny_hidden_size: int = 64
    # Initial weights: a Megatron dist checkpoint written by tools/checkpoint/hf_to_mcore.py; null = random init.
    load: Optional[str] = None
    params_dtype: str = "fp32"  # fp32 | bf16 | fp16
    transformer_impl: str = "auto"  # auto (TE on GPU when importable, else local) | local | te
    # Core attention: auto (TE on GPU when importable, else torch) | te | torch (SDPA; packing + CP anywhere) | local
    attention_backend: str = "auto"
    fp8: Optional[str] = None  # TE only: e4m3 | hybrid
    fp8_recipe: Optional[str] = None  # TE only: delayed | tensorwise | mxfp8 | blockwise
    make_vocab_size_divisible_by: int = 128
    recompute_granularity: Optional[str] = None  # null | selective | full
    # MoE only: weight of the router's load-balancing (Switch) loss, per layer and microbatch, added to the loss
    # (logged as moe_aux_loss). null = the model's own config.json `router_aux_loss_coef` (Qwen3-MoE: 0.001);
    # 0 = no load balancing term.
    moe_aux_loss_coeff: Optional[float] = None


@dataclass
class ParallelConfig:
    tp: int = 1
    pp: int = 1
    cp: int = 1
    ep: int = 1
    vpp: Optional[int] = None  # virtual pipeline stages per rank (interleaved schedule)
    sequence_parallel: bool = False
    distributed_optimizer: bool = True
    overlap_grad_reduce: bool = False


@dataclass
class DataConfig:
    train_prefix: str = ""  # required: P of P.bin / P.idx / P.json (tools/preprocess/build_dataset.py)
    valid_prefix: Optional[str] = None
    groups_per_batch: int = 4  # groups per optimizer step (all DP ranks together)
    group_size: int = 8  # G: trajectories drawn per group
    micro_batch_size: int = 4  # sequences per microbatch per DP rank
    seq_length: int = 1024  # padded sequence length of a microbatch (longer sequences are rejected)
    # Pack each microbatch into one THD row (cu_seqlens) instead of padding every sequence to seq_length;
    # needs model.attention_backend torch / te / auto. Sequences are aligned to 2*cp inside the pack. With
    # parallel.pp > 1 every pack is filled to exactly seq_length tokens (a fixed shape for the pipeline), so
    # seq_length must hold micro_batch_size sequences.
    packing: bool = False
    pad_token_id: int = 0
    num_epochs: Optional[int] = None  # null = as many as train_steps needs
    seed: int = 1234
    # Batches are read and collated by DataLoader worker processes, `prefetch_factor` batches ahead of the step
    # per worker; 0 = on the training thread.
    num_workers: int = 1
    prefetch_factor: int = 2
    # Before anything starts, the dataset is checked against its manifest (sizes, index hashes, index sanity,
    # per-token array alignment). true also hashes the whole .bin files and scans the per-token arrays for NaN.
    verify_full: bool = False


@dataclass
class LossConfig:
    kind: str = "offline_grpo"  # offline_grpo | grpo | sft | opd
    clip_eps: Optional[float] = 0.2  # null = no clip (the blog's released code)
    kl_coef: float = 0.1  # beta; needs the dataset's ref_logp array when > 0 (or reference: live)
    reference: str = "precomputed"  # precomputed (dataset ref_logp) | none
    all_positive_bias: float = 0.5  # b, added to the advantage of all-positive groups
    std: str = "sample"  # sample | population | none
    eps: float = 1e-6
    agg: str = "seq-mean-token-mean"  # seq-mean-token-mean | token-mean | seq-mean-token-sum | seq-mean-token-sum-norm
    max_response_len: Optional[int] = None  # the fixed normalizer of seq-mean-token-sum-norm
    shaping_gamma: Optional[float] = None  # LUFFY policy shaping p / (p + gamma) (offline_grpo)
    logprob_chunk_size: Optional[int] = None  # tokens per chunk of the log-prob computation (null = auto)
    # auto | true | false: the loss applies the output weight to the final hidden states tile by tile, so the
    # [tokens, vocab/tp] logits never exist (losses/fused_output.py). auto = on (benchmarks/train_step.py).
    fused_output_layer: str = "auto"
    # With the fused output layer in training: "forward" computes the loss's gradients inside the forward pass
    # (three output-layer GEMMs, as Megatron's cross-entropy step; keeps the fp32 [vocab/tp, hidden] weight
    # gradient from forward to backward), "recompute" recomputes the logits in backward (four GEMMs, no such buffer).
    fused_output_gradients: str = "forward"
    teacher: Optional[str] = None  # opd: the teacher the dataset's teacher_logp must come from
    allow_teacher_mismatch: bool = False


@dataclass
class OptimizerConfig:
    lr: float = 1e-6
    min_lr: float = 0.0
    lr_schedule: str = "constant"  # constant | cosine | linear
    warmup_steps: int = 0
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    clip_grad: float = 1.0  # max global gradient norm; 0 = no clipping
    initial_loss_scale: float = 4096.0  # fp16 only (dynamic loss scaling)
    # A step whose loss or gradient norm is NaN / inf never updates the weights. skip: drop that update and go on
    # (the run stops after max_consecutive_skips such steps in a row); stop: stop at the first one. Nothing
    # non-finite is ever saved.
    on_nonfinite: str = "skip"  # skip | stop
    max_consecutive_skips: int = 5


@dataclass
class CheckpointConfig:
    dir: Optional[str] = None  # where training checkpoints go; null = no checkpoints
    save_interval: int = 0  # steps; 0 = only at the end and on signals
    keep_last: int = 2
    resume: bool = True  # continue from dir/latest when present
    save_on_signal: bool = True  # SIGTERM / SIGUSR1 (SLURM preemption): save, then exit
    exit_after_seconds: Optional[float] = None  # save and exit this long after the process started (SLURM time)


@dataclass
class LoggingConfig:
    dir: Optional[str] = None  # TensorBoard event files (and the curve PNG); null = no files
    log_interval: int = 1
    progress_bar: bool = True
    plot: bool = True  # write curves.png (loss, KL, mean log-prob of positive / negative trajectories)
    wandb_project: Optional[str] = None


@dataclass
class ValidationConfig:
    interval: int = 0  # steps between validation runs; 0 = never
    batches: int = 2


@dataclass
class TrainConfig:
    name: str = "offgrpo"
    train_steps: int = 100
    seed: int = 1234
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)


SECTIONS: List[str] = ["model", "parallel", "data", "loss", "optimizer", "checkpoint", "logging", "validation"]
