"""Load a :class:`TrainConfig` from YAML + ``a.b=c`` overrides (OmegaConf), and validate it before any work.

Validation runs before any process group or allocation and reports *every* problem at once, each naming the
key and the fix, so a 64-node job does not die on the first of three typos after queueing for an hour.
"""

from __future__ import annotations

import json
import os
from typing import List, Optional, Sequence

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from megatron_offgrpo.config.schema import TrainConfig

__all__ = ["ConfigError", "load_config", "validate_config", "config_to_yaml"]

LOSS_KINDS = ("offline_grpo", "grpo", "sft", "opd")
LOSS_AGGS = ("seq-mean-token-mean", "token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")
# Per-token arrays (DESIGN 5) each loss kind reads from the dataset.
REQUIRED_ARRAYS = {"grpo": ["old_logp"], "opd": ["teacher_logp"]}


class ConfigError(ValueError):
    """One or more invalid settings; the message lists each key with its problem and the fix."""

    def __init__(self, problems: Sequence[str]):
        self.problems = list(problems)
        super().__init__("invalid configuration:\n" + "\n".join(f"  - {p}" for p in self.problems))


def load_config(path: Optional[str], overrides: Sequence[str] = ()) -> TrainConfig:
    """YAML file (optional) merged over the schema defaults, then ``a.b=c`` overrides; interpolations resolved.

    Unknown keys and wrongly typed values are errors that name the key (OmegaConf's structured-config checks).
    """
    try:
        merged = OmegaConf.structured(TrainConfig)
        if path is not None:
            if not os.path.exists(path):
                raise ConfigError([f"config file {path!r} does not exist"])
            merged = OmegaConf.merge(merged, OmegaConf.load(path))
        if overrides:
            bad = [o for o in overrides if "=" not in o]
            if bad:
                raise ConfigError([f"override {o!r} is not of the form key=value (e.g. optimizer.lr=1e-6)" for o in bad])
            merged = OmegaConf.merge(merged, OmegaConf.from_dotlist(list(overrides)))
        OmegaConf.resolve(merged)
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        raise ConfigError([f"{getattr(e, 'full_key', None) or '?'}: {e.msg if hasattr(e, 'msg') else e}"]) from e


def config_to_yaml(cfg: TrainConfig) -> str:
    """The resolved config as YAML (what ``--print-config`` shows and what each checkpoint records)."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def _check_choice(problems: List[str], key: str, value, choices) -> None:
    if value not in choices:
        problems.append(f"{key}={value!r} is not one of {list(choices)}")


def _dataset_arrays(prefix: str, problems: List[str], key: str) -> Optional[List[str]]:
    """Per-token arrays listed in the dataset manifest, or None (with a problem) when the dataset is missing."""
    manifest = prefix + ".json"
    missing = [p for p in (manifest, prefix + ".bin", prefix + ".idx") if not os.path.exists(p)]
    if missing:
        problems.append(
            f"{key}={prefix!r}: {', '.join(missing)} not found; build it with tools/preprocess/build_dataset.py "
            f"--output-prefix {prefix}"
        )
        return None
    with open(manifest) as f:
        return list(json.load(f).get("per_token_arrays", {}))


def validate_config(cfg: TrainConfig, world_size: Optional[int] = None, check_files: bool = True) -> None:
    """Raise :class:`ConfigError` listing every problem of ``cfg`` for a job of ``world_size`` ranks."""
    from megatron_offgrpo.models import UnsupportedArchitectureError, model_config_from_hf, tiny_architecture

    problems: List[str] = []
    m, par, d, loss, opt, ck = cfg.model, cfg.parallel, cfg.data, cfg.loss, cfg.optimizer, cfg.checkpoint
    _check_choice(problems, "loss.kind", loss.kind, LOSS_KINDS)
    _check_choice(problems, "loss.agg", loss.agg, LOSS_AGGS)
    _check_choice(problems, "loss.std", loss.std, ("sample", "population", "none"))
    _check_choice(problems, "loss.reference", loss.reference, ("precomputed", "none"))
    _check_choice(problems, "optimizer.lr_schedule", opt.lr_schedule, ("constant", "cosine", "linear"))
    _check_choice(problems, "model.params_dtype", m.params_dtype, ("fp32", "bf16", "fp16"))
    _check_choice(problems, "model.transformer_impl", m.transformer_impl, ("auto", "local", "te"))
    if loss.agg == "seq-mean-token-sum-norm" and not loss.max_response_len:
        problems.append("loss.agg=seq-mean-token-sum-norm needs loss.max_response_len (the fixed normalizer)")
    if cfg.train_steps < 1:
        problems.append(f"train_steps={cfg.train_steps} must be >= 1")

    for name in ("tp", "pp", "cp", "ep"):
        if getattr(par, name) < 1:
            problems.append(f"parallel.{name}={getattr(par, name)} must be >= 1")
    model_parallel = par.tp * par.pp * par.cp
    dp = None
    if world_size is not None and model_parallel >= 1:
        if world_size % model_parallel:
            problems.append(
                f"world size {world_size} is not divisible by tp*pp*cp = {model_parallel}; change the number of "
                f"ranks (nodes x gpus) or the parallel.* sizes"
            )
        else:
            dp = world_size // model_parallel

    # Architecture-dependent checks.
    arch = None
    try:
        if m.architecture == "tiny":
            arch = tiny_architecture(m.tiny_vocab_size, m.tiny_num_layers, m.tiny_hidden_size)
        else:
            arch = model_config_from_hf(m.architecture)
    except (UnsupportedArchitectureError, OSError, KeyError, ValueError) as e:
        problems.append(f"model.architecture={m.architecture!r}: {e}")
    if arch is not None:
        if par.tp >= 1 and (arch.num_attention_heads % par.tp or arch.num_query_groups % par.tp):
            problems.append(
                f"parallel.tp={par.tp} must divide the attention heads ({arch.num_attention_heads}) and the KV "
                f"groups ({arch.num_query_groups}); use a tp that divides {arch.num_query_groups}"
            )
        stages = par.pp * (par.vpp or 1)
        if par.pp >= 1 and arch.num_layers % stages:
            problems.append(
                f"parallel.pp={par.pp}{f' x vpp={par.vpp}' if par.vpp else ''} must divide num_layers="
                f"{arch.num_layers}"
            )
        if par.ep > 1 and not arch.is_moe:
            problems.append(f"parallel.ep={par.ep} needs a MoE model; {arch.family} has no experts: set parallel.ep=1")
    if par.vpp is not None and par.pp == 1:
        problems.append("parallel.vpp needs parallel.pp > 1 (the interleaved schedule splits pipeline stages)")

    if par.cp > 1 and d.seq_length % (2 * par.cp):
        problems.append(
            f"data.seq_length={d.seq_length} must be divisible by 2*cp={2 * par.cp} (Megatron's load-balanced "
            f"context-parallel split); round it up to {-(-d.seq_length // (2 * par.cp)) * 2 * par.cp}"
        )
    _check_choice(problems, "model.attention_backend", m.attention_backend, ("auto", "te", "torch", "local"))
    if (par.cp > 1 or d.packing) and m.attention_backend == "local":
        what = " and ".join(x for x, on in (("parallel.cp>1", par.cp > 1), ("data.packing", d.packing)) if on)
        problems.append(
            f"{what} with model.attention_backend=local: Megatron's local attention refuses context parallelism "
            f"and packed sequences; set model.attention_backend=torch (or auto / te on GPU)"
        )
    if d.packing and par.pp > 1:
        problems.append("data.packing with parallel.pp>1: pipeline stages exchange fixed-shape activations and a "
                        "pack's length varies; set data.packing=false or parallel.pp=1")
    if d.packing and par.sequence_parallel:
        problems.append("data.packing with parallel.sequence_parallel is not supported yet; set one of them off")
    if par.sequence_parallel and d.seq_length % par.tp:
        problems.append(f"data.seq_length={d.seq_length} must be divisible by tp={par.tp} with sequence_parallel")
    if m.fp8 and m.transformer_impl == "local":
        problems.append("model.fp8 needs Transformer Engine: set model.transformer_impl=te (GPU only)")

    global_batch = d.groups_per_batch * d.group_size
    if d.groups_per_batch < 1 or d.group_size < 1 or d.micro_batch_size < 1:
        problems.append("data.groups_per_batch, data.group_size and data.micro_batch_size must be >= 1")
    elif dp is not None:
        if d.groups_per_batch % dp:
            problems.append(
                f"data.groups_per_batch={d.groups_per_batch} must be divisible by the data-parallel size {dp} "
                f"(each DP rank trains on whole groups)"
            )
        if global_batch % (dp * d.micro_batch_size):
            problems.append(
                f"global batch = groups_per_batch x group_size = {global_batch} must be divisible by "
                f"dp x micro_batch_size = {dp} x {d.micro_batch_size}; change data.micro_batch_size"
            )

    if check_files:
        if d.train_prefix == "???":
            problems.append("data.train_prefix is required (the P of P.bin/P.idx/P.json)")
        else:
            arrays = _dataset_arrays(d.train_prefix, problems, "data.train_prefix")
            if arrays is not None:
                needed = list(REQUIRED_ARRAYS.get(loss.kind, []))
                if loss.kl_coef > 0 and loss.reference == "precomputed" and loss.kind not in ("opd",):
                    needed.append("ref_logp")
                for name in needed:
                    if name not in arrays:
                        problems.append(
                            f"loss.kind={loss.kind} (kl_coef={loss.kl_coef}) needs the per-token array {name!r}, "
                            f"which {d.train_prefix} lacks (it has {arrays or 'none'}); precompute it, or set "
                            + ("loss.kl_coef=0 / loss.reference=none" if name == "ref_logp" else "another loss.kind")
                        )
        if d.valid_prefix:
            _dataset_arrays(d.valid_prefix, problems, "data.valid_prefix")
        if m.load and not os.path.isdir(m.load):
            problems.append(f"model.load={m.load!r} is not a directory (a checkpoint from tools/checkpoint/hf_to_mcore.py)")
    if ck.keep_last < 1:
        problems.append(f"checkpoint.keep_last={ck.keep_last} must be >= 1")
    if problems:
        raise ConfigError(problems)
