"""Load a :class:`TrainConfig` from YAML + ``a.b=c`` overrides (OmegaConf), and validate it before any work.

Validation runs before any process group or allocation and reports *every* problem at once, each naming the
key and the fix, so a 64-node job does not die on the first of three typos after queueing for an hour.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
from typing import Any, Dict, List, Optional, Sequence, Tuple

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from megatron_offgrpo.config.schema import TrainConfig

__all__ = ["ConfigError", "required_arrays", "load_config", "load_and_validate_config", "validate_config", "config_to_yaml"]



def required_arrays(loss) -> List[str]:
    """The per-token arrays a run with this ``LossConfig`` reads from its dataset (from the loss registry)."""
    from megatron_offgrpo.losses.registry import required_arrays as from_registry

    return from_registry(loss)


class ConfigError(ValueError):
    """One or more invalid settings; the message lists each key with its problem and the fix."""

    def __init__(self, problems: Sequence[str]):
        self.problems = list(problems)
        super().__init__("invalid configuration:\n" + "\n".join(f"  - {p}" for p in self.problems))


def _read_user_config(path: Optional[str], overrides: Sequence[str]):
    """The YAML file merged with the overrides, untyped (nothing is checked yet)."""
    user = OmegaConf.create({})
    if path is not None:
        if not os.path.exists(path):
            raise ConfigError([f"config file {path!r} does not exist"])
        try:
            user = OmegaConf.merge(user, OmegaConf.load(path))
        except Exception as e:  # noqa: BLE001 - YAML syntax errors come in several types; all name the line
            raise ConfigError([f"{path}: not a valid YAML mapping ({e})"]) from None
    if overrides:
        bad = [o for o in overrides if "=" not in o]
        if bad:
            raise ConfigError([f"override {o!r} is not of the form key=value (e.g. optimizer.lr=1e-6)" for o in bad])
        user = OmegaConf.merge(user, OmegaConf.from_dotlist(list(overrides)))
    return user


def _check_against_schema(schema: Any, values: Dict[str, Any], prefix: str, problems: List[str]) -> Dict[str, Any]:
    """The entries of ``values`` that fit the dataclass ``schema``; one problem per unknown key or bad type.

    Each value is checked on its own (OmegaConf's own conversion rules: "1e-6" is a float, "true" a bool), so
    one typo does not hide the next.
    """
    fields = {f.name: f for f in dataclasses.fields(schema)}
    valid: Dict[str, Any] = {}
    for key, value in values.items():
        full = f"{prefix}{key}"
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f"; did you mean {prefix}{close[0]}?" if close else f"; known keys: {', '.join(fields)}"
            problems.append(f"{full}: unknown key{hint}")
            continue
        # Sections are the fields whose default factory is a dataclass (the schema's annotations are strings).
        section = fields[key].default_factory
        if section is not dataclasses.MISSING and dataclasses.is_dataclass(section):
            if not isinstance(value, dict):
                problems.append(f"{full}: must be a section (a mapping of keys), got {value!r}")
                continue
            valid[key] = _check_against_schema(section, value, full + ".", problems)
            continue
        try:
            OmegaConf.merge(OmegaConf.structured(schema), {key: value})
        except OmegaConfBaseException as e:
            expected = str(fields[key].type).replace("Optional[", "null or ").rstrip("]")
            reason = str(getattr(e, "msg", e)).splitlines()[0]
            problems.append(f"{full}={value!r}: wrong type, expected {expected} ({reason})")
            continue
        valid[key] = value
    return valid


def _load(path: Optional[str], overrides: Sequence[str]) -> Tuple[TrainConfig, List[str]]:
    """The config built from every valid setting, and the problems of the invalid ones (unknown key, type)."""
    user = _read_user_config(path, overrides)
    # Interpolations may point at defaults the user never wrote: resolve over defaults + user, untyped.
    everything = OmegaConf.merge(OmegaConf.create(OmegaConf.to_container(OmegaConf.structured(TrainConfig))), user)
    try:
        resolved = OmegaConf.to_container(everything, resolve=True)
    except OmegaConfBaseException as e:
        raise ConfigError([f"{getattr(e, 'full_key', None) or '?'}: cannot resolve interpolation ({e})"]) from None
    problems: List[str] = []
    valid = _check_against_schema(TrainConfig, resolved, "", problems)
    cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(TrainConfig), valid))
    return cfg, problems


def load_config(path: Optional[str], overrides: Sequence[str] = ()) -> TrainConfig:
    """YAML file (optional) merged over the schema defaults, then ``a.b=c`` overrides; interpolations resolved.

    Every unknown key and wrongly typed value is reported, all in one :class:`ConfigError`, each naming the key.
    """
    cfg, problems = _load(path, overrides)
    if problems:
        raise ConfigError(problems)
    return cfg


def load_and_validate_config(path: Optional[str], overrides: Sequence[str] = (),
                             world_size: Optional[int] = None) -> TrainConfig:
    """:func:`load_config` then :func:`validate_config`, with the problems of both reported together."""
    cfg, problems = _load(path, overrides)
    try:
        validate_config(cfg, world_size=world_size)
    except ConfigError as e:
        problems += e.problems
    if problems:
        raise ConfigError(problems)
    return cfg


def config_to_yaml(cfg: TrainConfig) -> str:
    """The resolved config as YAML (what ``--print-config`` shows and what each checkpoint records)."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def _check_choice(problems: List[str], key: str, value, choices) -> None:
    if value not in choices:
        problems.append(f"{key}={value!r} is not one of {list(choices)}")


def _number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


# Every numeric field and its valid range: (key, lower, lower inclusive, upper, upper inclusive, what to do).
# None values of Optional fields mean "off" and are not checked.
_RANGES = [
    ("train_steps", 1, True, None, False, "the number of optimizer steps"),
    ("seed", 0, True, None, False, "any non-negative integer"),
    ("model.tiny_vocab_size", 2, True, None, False, ""),
    ("model.tiny_num_layers", 1, True, None, False, ""),
    ("model.tiny_hidden_size", 1, True, None, False, ""),
    ("model.make_vocab_size_divisible_by", 1, True, None, False, "Megatron's default is 128"),
    ("model.moe_aux_loss_coeff", 0, True, None, False, "0 disables the load-balancing loss"),
    ("parallel.tp", 1, True, None, False, ""),
    ("parallel.pp", 1, True, None, False, ""),
    ("parallel.cp", 1, True, None, False, ""),
    ("parallel.ep", 1, True, None, False, ""),
    ("parallel.vpp", 2, True, None, False, "null disables the interleaved schedule"),
    ("data.groups_per_batch", 1, True, None, False, ""),
    ("data.group_size", 1, True, None, False, ""),
    ("data.micro_batch_size", 1, True, None, False, ""),
    ("data.seq_length", 2, True, None, False, ""),
    ("data.pad_token_id", 0, True, None, False, "a token id of the vocabulary"),
    ("data.num_epochs", 1, True, None, False, "null = as many as train_steps needs"),
    ("data.seed", 0, True, None, False, ""),
    ("data.num_workers", 0, True, None, False, "0 = read and collate on the training thread"),
    ("data.prefetch_factor", 1, True, None, False, "batches each worker prepares ahead"),
    ("loss.clip_eps", 0, False, 1, False, "the clip keeps max(p, 1 - eps); null disables it"),
    ("loss.kl_coef", 0, True, None, False, "0 disables the KL term"),
    ("loss.all_positive_bias", None, False, None, False, ""),
    ("loss.eps", 0, False, None, False, "e.g. 1e-6"),
    ("loss.max_response_len", 1, True, None, False, ""),
    ("loss.shaping_gamma", 0, False, None, False, "null disables the shaping"),
    ("loss.logprob_chunk_size", 1, True, None, False, "null picks it automatically"),
    ("optimizer.lr", 0, False, None, False, "e.g. 1e-6"),
    ("optimizer.min_lr", 0, True, None, False, ""),
    ("optimizer.warmup_steps", 0, True, None, False, "0 = no warmup"),
    ("optimizer.weight_decay", 0, True, None, False, ""),
    ("optimizer.adam_beta1", 0, True, 1, False, "e.g. 0.9"),
    ("optimizer.adam_beta2", 0, True, 1, False, "e.g. 0.999"),
    ("optimizer.adam_eps", 0, False, None, False, "e.g. 1e-8"),
    ("optimizer.clip_grad", 0, True, None, False, "0 disables clipping"),
    ("optimizer.initial_loss_scale", 0, False, None, False, ""),
    ("optimizer.max_consecutive_skips", 1, True, None, False, ""),
    ("checkpoint.save_interval", 0, True, None, False, "0 = only at the end and on signals"),
    ("checkpoint.keep_last", 1, True, None, False, ""),
    ("checkpoint.exit_after_seconds", 0, False, None, False, "null = no time limit"),
    ("logging.log_interval", 1, True, None, False, ""),
    ("validation.interval", 0, True, None, False, "0 = never"),
    ("validation.batches", 1, True, None, False, ""),
]


def _check_ranges(cfg: TrainConfig, problems: List[str]) -> None:
    for key, lo, lo_incl, hi, hi_incl, hint in _RANGES:
        value: Any = cfg
        for part in key.split("."):
            value = getattr(value, part)
        if value is None or not _number(value):
            continue
        ok = math.isfinite(value)
        if ok and lo is not None:
            ok = value >= lo if lo_incl else value > lo
        if ok and hi is not None:
            ok = value <= hi if hi_incl else value < hi
        if not ok:
            bounds = []
            if lo is not None:
                bounds.append(f"{'>=' if lo_incl else '>'} {lo}")
            if hi is not None:
                bounds.append(f"{'<=' if hi_incl else '<'} {hi}")
            rule = " and ".join(bounds) if bounds else "finite"
            problems.append(f"{key}={value!r} must be {rule}{' and finite' if bounds else ''}" + (f" ({hint})" if hint else ""))


def _dataset_arrays(prefix: str, problems: List[str], key: str, full: bool = False) -> Optional[List[str]]:
    """Per-token arrays listed in the dataset manifest, or None (with problems) when the dataset is missing or
    fails verification against its manifest (sizes, index hashes and sanity; ``full``: data hashes too)."""
    from megatron_offgrpo.data.verify import verify_dataset

    manifest = prefix + ".json"
    missing = [p for p in (manifest, prefix + ".bin", prefix + ".idx") if not os.path.exists(p)]
    if missing:
        problems.append(
            f"{key}={prefix!r}: {', '.join(missing)} not found; build it with tools/preprocess/build_dataset.py "
            f"--output-prefix {prefix}"
        )
        return None
    found = verify_dataset(prefix, full=full)
    if found:
        problems.extend(f"{key}={prefix!r}: {p}" for p in found)
        return None
    with open(manifest) as f:
        return list(json.load(f).get("per_token_arrays", {}))


def validate_config(cfg: TrainConfig, world_size: Optional[int] = None, check_files: bool = True) -> None:
    """Raise :class:`ConfigError` listing every problem of ``cfg`` for a job of ``world_size`` ranks."""
    from megatron_offgrpo.models import UnsupportedArchitectureError, model_config_from_hf, tiny_architecture

    problems: List[str] = []
    m, par, d, loss, opt, ck = cfg.model, cfg.parallel, cfg.data, cfg.loss, cfg.optimizer, cfg.checkpoint
    from megatron_offgrpo.losses.policy import LOSS_AGGREGATIONS
    from megatron_offgrpo.losses.registry import get_loss, loss_names

    _check_choice(problems, "loss.kind", loss.kind, loss_names())
    _check_choice(problems, "loss.agg", loss.agg, LOSS_AGGREGATIONS)
    _check_choice(problems, "loss.std", loss.std, ("sample", "population", "none"))
    _check_choice(problems, "loss.reference", loss.reference, ("precomputed", "none"))
    # A YAML / command-line true or false arrives as "True" / "False" in this string field: any case is fine.
    _check_choice(problems, "loss.fused_output_layer", str(loss.fused_output_layer).lower(), ("auto", "true", "false"))
    _check_choice(problems, "loss.fused_output_gradients", loss.fused_output_gradients, ("forward", "recompute"))
    _check_choice(problems, "optimizer.lr_schedule", opt.lr_schedule, ("constant", "cosine", "linear"))
    _check_choice(problems, "model.params_dtype", m.params_dtype, ("fp32", "bf16", "fp16"))
    _check_choice(problems, "model.transformer_impl", m.transformer_impl, ("auto", "local", "te"))
    _check_choice(problems, "optimizer.on_nonfinite", opt.on_nonfinite, ("skip", "stop"))
    if loss.agg == "seq-mean-token-sum-norm" and not loss.max_response_len:
        problems.append("loss.agg=seq-mean-token-sum-norm needs loss.max_response_len (the fixed normalizer)")
    _check_ranges(cfg, problems)
    if _number(opt.min_lr) and _number(opt.lr) and opt.min_lr > opt.lr > 0:
        problems.append(f"optimizer.min_lr={opt.min_lr} must be <= optimizer.lr={opt.lr}")
    has_kl = loss.kind in loss_names() and get_loss(loss.kind).kl
    if loss.reference == "none" and loss.kl_coef > 0 and has_kl:
        problems.append(f"loss.reference=none but loss.kl_coef={loss.kl_coef}: the KL term needs a reference; set "
                        "loss.kl_coef=0, or loss.reference=precomputed (the dataset's ref_logp array)")
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
        if not 0 <= d.pad_token_id < arch.vocab_size:
            problems.append(f"data.pad_token_id={d.pad_token_id} is not a token of the vocabulary (size "
                            f"{arch.vocab_size}); use the tokenizer's pad or EOS id")
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
        if par.ep > 1 and arch.is_moe and arch.num_experts % par.ep:
            problems.append(f"parallel.ep={par.ep} must divide the {arch.num_experts} experts")
        if arch.is_moe and par.tp > 1 and not par.sequence_parallel:
            problems.append(f"parallel.tp={par.tp} with a MoE model needs parallel.sequence_parallel=true (Megatron's "
                            "MoE layer refuses tensor parallelism without it in training); or set parallel.tp=1")
        if m.moe_aux_loss_coeff is not None and not arch.is_moe:
            problems.append(f"model.moe_aux_loss_coeff={m.moe_aux_loss_coeff} weighs the router loss of a MoE model; "
                            f"{arch.family} has no experts: remove the setting")
        expert_grid = par.tp * par.pp * par.ep  # Megatron: expert TP (= tp) x EP x PP must tile the world
        if par.ep > 1 and world_size is not None and expert_grid >= 1 and world_size % expert_grid:
            problems.append(f"world size {world_size} is not divisible by tp*pp*ep = {expert_grid} (the expert "
                            "layout); change parallel.ep or the number of ranks")
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
    if d.packing and par.sequence_parallel:
        problems.append("data.packing with parallel.sequence_parallel is not supported yet; set one of them off")
    if par.sequence_parallel and d.seq_length % (par.cp * par.tp):
        # Each CP rank holds seq_length / cp positions, which sequence parallelism splits over TP.
        unit = math.lcm(par.cp * par.tp, 2 * par.cp if par.cp > 1 else 1)
        problems.append(
            f"data.seq_length={d.seq_length} must be divisible by cp x tp={par.cp * par.tp} with sequence_parallel "
            f"(each CP rank's seq_length / cp positions split over TP); round it up to "
            f"{-(-d.seq_length // unit) * unit}"
        )
    if m.fp8 and m.transformer_impl == "local":
        problems.append("model.fp8 needs Transformer Engine: set model.transformer_impl=te (GPU only)")

    global_batch = d.groups_per_batch * d.group_size
    if d.groups_per_batch >= 1 and d.group_size >= 1 and d.micro_batch_size >= 1 and dp is not None:
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
        if not d.train_prefix:
            problems.append("data.train_prefix is required (the P of P.bin/P.idx/P.json)")
        for key, prefix in (("data.train_prefix", d.train_prefix), ("data.valid_prefix", d.valid_prefix)):
            arrays = _dataset_arrays(prefix, problems, key, full=d.verify_full) if prefix else None
            for name in required_arrays(loss) if arrays is not None and loss.kind in loss_names() else ():
                if name not in arrays:
                    problems.append(
                        f"loss.kind={loss.kind} (kl_coef={loss.kl_coef}) needs the per-token array {name!r}, "
                        f"which {key}={prefix} lacks (it has {arrays or 'none'}); precompute it, or set "
                        + ("loss.kl_coef=0 / loss.reference=none" if name == "ref_logp" else "another loss.kind")
                    )
        if ck.dir and ck.resume and os.path.isdir(ck.dir):
            from megatron_offgrpo.models.errors import CheckpointFormatError
            from megatron_offgrpo.training.checkpointing import verify_resume_checkpoint

            try:
                verify_resume_checkpoint(ck.dir)
            except CheckpointFormatError as e:
                problems.append(f"checkpoint.dir={ck.dir} (resume): {e}")
        if m.load and not os.path.isdir(m.load):
            problems.append(f"model.load={m.load!r} is not a directory (a checkpoint from tools/checkpoint/hf_to_mcore.py)")
        elif m.load:
            from megatron_offgrpo.models import checkpoint_vocab_size
            from megatron_offgrpo.models.checkpoint import verify_checkpoint_files
            from megatron_offgrpo.models.errors import CheckpointFormatError

            try:
                verify_checkpoint_files(m.load)
                if arch is not None and checkpoint_vocab_size(m.load) != arch.vocab_size:
                    problems.append(
                        f"model.load={m.load} was converted from a model with vocabulary "
                        f"{checkpoint_vocab_size(m.load)}, but model.architecture={m.architecture} has "
                        f"{arch.vocab_size}: point both at the same model")
            except CheckpointFormatError as e:
                problems.append(f"model.load={m.load}: {e}")
    if problems:
        raise ConfigError(problems)
