"""Training checkpoints: Megatron ``dist_checkpointing`` (model + distributed optimizer), atomic, keep-last-K.

Layout of ``checkpoint.dir``::

    latest                  text file naming the last *complete* checkpoint, replaced atomically
    iter_0000040/           dist_checkpointing dir (model, optimizer), loadable under another TP / PP / DP
        train_state.json    step, consumed samples, scheduler, the run's identity, the resolved config
        rng/rank_00003.pt   each rank's RNG states (restored when the world size is unchanged)

A save writes ``iter_N.tmp`` and renames it only once every rank has finished, then updates ``latest``: a job
killed mid-save leaves the previous checkpoint as ``latest`` and a ``.tmp`` directory that is never loaded (and is
removed by the next save). Resuming refuses a checkpoint whose run identity (model, loss, data, batch geometry)
differs from the config, naming the fields, since resuming a mismatched run silently is a bug peer frameworks
shipped (docs/design.md §7).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from typing import Any, Dict, List, Optional

import torch
import torch.distributed as dist

from megatron_offgrpo.config.loader import config_to_yaml
from megatron_offgrpo.config.schema import TrainConfig
from megatron_offgrpo.data.atomic import atomic_write_bytes
from megatron_offgrpo.models.errors import (
    CheckpointFormatError,
    CorruptCheckpointFileError,
    MissingCheckpointFileError,
)

__all__ = ["CheckpointMismatchError", "CheckpointFormatError", "CheckpointDirInUseError", "lock_checkpoint_dir", "read_train_state", "verify_resume_checkpoint",
           "run_identity", "save_checkpoint", "load_checkpoint", "latest_checkpoint"]

_ITER_RE = re.compile(r"^iter_(\d{7})$")
# Distributed-optimizer state in a layout-independent form, so a checkpoint can be loaded under another TP/PP.
_OPTIMIZER_METADATA = {"distrib_optim_sharding_type": "fully_reshardable"}


class CheckpointMismatchError(RuntimeError):
    """The checkpoint belongs to a different run (model, loss, data or batch geometry)."""


def run_identity(cfg: TrainConfig) -> Dict[str, Any]:
    """The settings a resumed run must share with the run that wrote the checkpoint (parallel layout excluded).

    The dataset is identified by its content (sizes and hashes of its files, from the manifest), not its path:
    a dataset copied to another file system resumes, a rebuilt one with other content is refused.
    """
    from megatron_offgrpo.config.loader import required_arrays
    from megatron_offgrpo.data.verify import dataset_fingerprint

    m, d, loss = cfg.model, cfg.data, cfg.loss
    return {
        "model.architecture": m.architecture,
        "model.tiny": [m.tiny_vocab_size, m.tiny_num_layers, m.tiny_hidden_size] if m.architecture == "tiny" else None,
        "loss.kind": loss.kind,
        "loss.agg": loss.agg,
        # The arrays the run reads are part of its data; attaching another one later does not change identity.
        "data.content": dataset_fingerprint(d.train_prefix, per_token_arrays=required_arrays(loss)),
        "data.groups_per_batch": d.groups_per_batch,
        "data.group_size": d.group_size,
        "data.seed": d.seed,
    }


class CheckpointDirInUseError(RuntimeError):
    """Another live run writes into the same checkpoint directory."""


def lock_checkpoint_dir(ckpt_dir: str):
    """Hold ``ckpt_dir/.lock`` (an exclusive ``flock``) for the life of the returned file object (rank 0 only).

    Two runs writing one checkpoint directory overwrite each other's ``latest``; the classic way to get there is a
    plain ``srun python -m megatron_offgrpo.train`` where every task believed it was rank 0 of its own world.
    The lock names the holder (host and pid) in the error. It is released when the process exits, even by
    SIGKILL, so a killed run never blocks its resume.
    """
    import fcntl
    import socket

    os.makedirs(ckpt_dir, exist_ok=True)
    path = os.path.join(ckpt_dir, ".lock")
    f = open(path, "a+")
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        raise CheckpointDirInUseError(
            f"{ckpt_dir} is in use by {holder}: two runs must not write one checkpoint directory (under srun, every "
            "task must be one rank of the same world: launch with launch/slurm/train.sbatch); stop the other run "
            "or set checkpoint.dir elsewhere"
        ) from None
    f.seek(0)
    f.truncate()
    f.write(f"host {socket.gethostname()} pid {os.getpid()}\n")
    f.flush()
    return f


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _model_sharded_state_dict(model_chunks: List[Any]) -> Dict[str, Any]:
    if len(model_chunks) == 1:
        return {"model": model_chunks[0].module.sharded_state_dict()}
    return {f"model{i}": chunk.module.sharded_state_dict() for i, chunk in enumerate(model_chunks)}


def _rng_state() -> Dict[str, Any]:
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    state = {"torch": torch.get_rng_state(), "tracker": get_cuda_rng_tracker().get_states()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: Dict[str, Any]) -> None:
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    torch.set_rng_state(state["torch"])
    get_cuda_rng_tracker().set_states(state["tracker"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def latest_checkpoint(ckpt_dir: str) -> Optional[str]:
    """Path of the last complete checkpoint in ``ckpt_dir``, or None."""
    tracker = os.path.join(ckpt_dir, "latest")
    if not os.path.exists(tracker):
        return None
    with open(tracker) as f:
        name = f.read().strip()
    path = os.path.join(ckpt_dir, name)
    if not _ITER_RE.match(name) or not os.path.isdir(path):
        raise CorruptCheckpointFileError(
            f"{tracker} names {name!r}, which is not a checkpoint directory in {ckpt_dir}; write the name of a "
            f"complete iter_NNNNNNN directory into it, or set checkpoint.resume=false", path=tracker)
    return path


def verify_resume_checkpoint(ckpt_dir: str) -> Optional[str]:
    """Check the checkpoint a run would resume from, cheaply (its ``train_state.json``, and every ``.distcp`` file
    against the sizes its metadata records); return its path, or None if there is none. Raises a
    :class:`CheckpointFormatError` naming the file and the fix."""
    from megatron_offgrpo.models.checkpoint import verify_checkpoint_files

    path = latest_checkpoint(ckpt_dir)
    if path is not None:
        read_train_state(path)
        verify_checkpoint_files(path)
    return path


def save_checkpoint(
    ckpt_dir: str,
    step: int,
    model_chunks: List[Any],
    optimizer,
    scheduler,
    consumed_samples: int,
    cfg: TrainConfig,
    extra: Optional[Dict[str, Any]] = None,
) -> str:
    """Save on every rank (collective); returns the final checkpoint path.

    Refuses (:class:`~megatron_offgrpo.training.guard.NonFiniteError`) a model with a NaN / inf weight, before
    anything is written. SIGTERM / SIGUSR1 are deferred for the duration (see :mod:`.signals`): a preemption
    signal arriving mid-save, even one sent to the whole process group, cannot break it.
    """
    from megatron_offgrpo.training.guard import assert_finite_model
    from megatron_offgrpo.training.signals import signals_deferred

    assert_finite_model(model_chunks)
    with signals_deferred():
        return _save_checkpoint(ckpt_dir, step, model_chunks, optimizer, scheduler, consumed_samples, cfg, extra)


def _save_checkpoint(ckpt_dir, step, model_chunks, optimizer, scheduler, consumed_samples, cfg, extra) -> str:
    from megatron.core import dist_checkpointing

    name = f"iter_{step:07d}"
    final = os.path.join(ckpt_dir, name)
    tmp = final + ".tmp"
    if _rank() == 0:
        os.makedirs(ckpt_dir, exist_ok=True)
        for stale in os.listdir(ckpt_dir):  # leftovers of killed saves
            if stale.endswith(".tmp") and os.path.isdir(os.path.join(ckpt_dir, stale)):
                shutil.rmtree(os.path.join(ckpt_dir, stale))
        os.makedirs(tmp)
    _barrier()

    sharded = _model_sharded_state_dict(model_chunks)
    model_sd = sharded if len(model_chunks) > 1 else sharded["model"]
    sharded["optimizer"] = optimizer.sharded_state_dict(model_sd, metadata=_OPTIMIZER_METADATA)
    dist_checkpointing.save(sharded, tmp)

    os.makedirs(os.path.join(tmp, "rng"), exist_ok=True)
    torch.save(_rng_state(), os.path.join(tmp, "rng", f"rank_{_rank():05d}.pt"))
    world = dist.get_world_size() if dist.is_initialized() else 1
    _barrier()
    if _rank() == 0:
        state = {
            "step": step,
            "consumed_samples": consumed_samples,
            "scheduler": scheduler.state_dict(),
            "identity": run_identity(cfg),
            "world_size": world,
            "config_yaml": config_to_yaml(cfg),
            **(extra or {}),
        }
        atomic_write_bytes(os.path.join(tmp, "train_state.json"), json.dumps(state, indent=1).encode())
        if os.path.isdir(final):
            shutil.rmtree(final)
        os.rename(tmp, final)
        atomic_write_bytes(os.path.join(ckpt_dir, "latest"), (name + "\n").encode())
        _prune(ckpt_dir, cfg.checkpoint.keep_last)
    _barrier()
    return final


def read_train_state(path: str) -> Dict[str, Any]:
    """``path/train_state.json``, or a :class:`CheckpointFormatError` naming the file and what to do."""
    file = os.path.join(path, "train_state.json")
    hint = (f"the checkpoint is incomplete or damaged: resume from an older one by writing its name (e.g. "
            f"{_older_name(path)}) into {os.path.join(os.path.dirname(path), 'latest')}, or remove {path}")
    try:
        with open(file) as f:
            state = json.load(f)
    except FileNotFoundError:
        raise MissingCheckpointFileError(f"{file}: missing; {hint}", path=file) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CorruptCheckpointFileError(f"{file}: not valid JSON ({e}); {hint}", path=file) from None
    missing = [k for k in ("step", "consumed_samples", "scheduler", "identity") if k not in state]
    if missing:
        raise CorruptCheckpointFileError(f"{file}: missing field(s) {missing}; {hint}", path=file)
    return state


def _older_name(path: str) -> str:
    ckpt_dir, name = os.path.split(os.path.normpath(path))
    older = sorted(n for n in os.listdir(ckpt_dir) if _ITER_RE.match(n) and n < name) if os.path.isdir(ckpt_dir) else []
    return older[-1] if older else "iter_NNNNNNN"


def _prune(ckpt_dir: str, keep_last: int) -> None:
    iters = sorted(n for n in os.listdir(ckpt_dir) if _ITER_RE.match(n))
    for old in iters[:-keep_last]:
        shutil.rmtree(os.path.join(ckpt_dir, old))


def _patch_torch_adam_step_on_load() -> None:
    """Let mcore 0.16's DistributedOptimizer load its layout-independent state into *torch's* Adam.

    Without TE / Apex (the CPU path), torch's Adam keeps a per-parameter ``step`` tensor next to ``exp_avg`` and
    ``exp_avg_sq``. The layout-independent checkpoint format stores only param / exp_avg / exp_avg_sq (``step``
    travels in the param groups and is restored from there), but ``_set_main_param_and_optimizer_states`` copies
    every key of the live state and fails with ``KeyError: 'step'``. Keep the live (already restored) step, one
    tensor per parameter.
    Idempotent; a no-op where TE or Apex provides the optimizer.
    """
    from megatron.core.optimizer import distrib_optimizer as mod

    cls = mod.DistributedOptimizer
    if getattr(mod, "HAVE_APEX_OR_TE", True) or getattr(cls, "_offgrpo_step_patch", False):
        return
    original = cls._set_main_param_and_optimizer_states

    def set_states(self, model_param, tensors):
        if "step" not in tensors:
            group_index, group_order = self.model_param_group_index_map[model_param]
            main_param = self.optimizer.param_groups[group_index]["params"][group_order]
            state = self.optimizer.state[main_param]
            if "step" in state:
                # load_state_dict() hands every parameter the *same* step tensor, and torch's Adam increments
                # it in place once per parameter: give each its own copy, or the bias correction runs away.
                state["step"] = state["step"].clone()
                tensors = {**tensors, "step": state["step"]}
        return original(self, model_param, tensors)

    cls._set_main_param_and_optimizer_states = set_states
    cls._offgrpo_step_patch = True


def _materialize_optimizer_state(optimizer) -> None:
    """Give a fresh distributed optimizer its Adam state before it describes the layout it loads into.

    torch's Adam (used when neither TE nor Apex is installed: CPU) creates its state, including the ``step`` that
    Megatron's ``DistributedOptimizer.state_dict()`` asserts on, lazily at the first step. Megatron's own helper
    runs one zero-gradient step; the parameters it could touch are overwritten by the load that follows.
    """
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(opt, "optimizer", None)
        if hasattr(opt, "_init_optimizer_states_with_dummy_values") and inner is not None and not inner.state:
            opt._init_optimizer_states_with_dummy_values()


def load_checkpoint(
    path: str,
    model_chunks: List[Any],
    optimizer,
    scheduler,
    cfg: TrainConfig,
    allow_mismatch: bool = False,
) -> Dict[str, Any]:
    """Restore model, optimizer, scheduler and (same world size) RNG from ``path``; return its train state."""
    from megatron.core import dist_checkpointing

    from megatron_offgrpo.models.checkpoint import verify_checkpoint_files

    state = read_train_state(path)
    verify_checkpoint_files(path)  # a truncated / missing .distcp is named here, not deep inside the load
    expected = run_identity(cfg)
    # Keys a checkpoint of an older version did not record are not compared (e.g. data.content).
    diff = {k: (state["identity"][k], v) for k, v in expected.items()
            if k in state["identity"] and state["identity"][k] != v}
    if diff and not allow_mismatch:
        lines = ", ".join(f"{k}: checkpoint {a!r} vs config {b!r}" for k, (a, b) in diff.items())
        raise CheckpointMismatchError(
            f"{path} was written by a different run ({lines}); point checkpoint.dir elsewhere, or set "
            "checkpoint.resume=false to start fresh"
        )
    _patch_torch_adam_step_on_load()
    _materialize_optimizer_state(optimizer)
    sharded = _model_sharded_state_dict(model_chunks)
    model_sd = sharded if len(model_chunks) > 1 else sharded["model"]
    sharded["optimizer"] = optimizer.sharded_state_dict(model_sd, is_loading=True, metadata=_OPTIMIZER_METADATA)
    loaded = dist_checkpointing.load(sharded, path)
    if len(model_chunks) == 1:
        model_chunks[0].module.load_state_dict(loaded["model"])
    else:
        for i, chunk in enumerate(model_chunks):
            chunk.module.load_state_dict(loaded[f"model{i}"])
    optimizer.load_state_dict(loaded["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    world = dist.get_world_size() if dist.is_initialized() else 1
    rng_file = os.path.join(path, "rng", f"rank_{_rank():05d}.pt")
    if state.get("world_size") == world and os.path.exists(rng_file):
        _set_rng_state(torch.load(rng_file, weights_only=False))
    elif _rank() == 0:
        print(f"note: {path} was saved with {state.get('world_size')} ranks, now {world}: RNG states not restored")
    return state


class Checkpointer:
    """The trainer's checkpoint component: one run per directory, resume, periodic / final / signal saves.

    Call every method on every rank (they are collective). ``checkpoint.dir`` unset makes it inert: nothing is
    locked, resumed or saved.
    """

    def __init__(self, cfg: TrainConfig):
        from megatron_offgrpo.utils.distributed import any_rank

        self.cfg = cfg
        self.dir = cfg.checkpoint.dir
        self.last: Optional[str] = None  # the newest checkpoint this run wrote
        self._lock = None
        error = None
        if self.dir and _rank() == 0:
            try:
                self._lock = lock_checkpoint_dir(self.dir)
            except CheckpointDirInUseError as e:
                error = e
        if any_rank(error is not None):  # every rank stops, not only rank 0
            raise error or CheckpointDirInUseError(f"{self.dir} is in use (see rank 0)")

    def resume(self, objs) -> Dict[str, Any]:
        """Load the latest checkpoint into ``objs`` if resuming is on and there is one; its train state, or the
        state of a fresh run (``{"step": 0, "consumed_samples": 0}``)."""
        ck = self.cfg.checkpoint
        path = latest_checkpoint(self.dir) if self.dir and ck.resume else None
        if path is None:
            return {"step": 0, "consumed_samples": 0}
        state = load_checkpoint(path, objs.model, objs.optimizer, objs.scheduler, self.cfg)
        if _rank() == 0:
            print(f"resumed from {path}: step {state['step']}, {state['consumed_samples']} samples consumed",
                  flush=True)
        return state

    def save(self, step: int, objs, consumed_samples: int) -> Optional[str]:
        """Save ``step`` (collective); returns its path, or None without a checkpoint dir."""
        if not self.dir:
            return None
        self.last = save_checkpoint(self.dir, step, objs.model, objs.optimizer, objs.scheduler, consumed_samples,
                                    self.cfg)
        return self.last

    def has(self, step: int) -> bool:
        """Whether this run already saved ``step``."""
        return self.last is not None and self.last.endswith(f"iter_{step:07d}")

    def close(self) -> None:
        if self._lock is not None:
            self._lock.close()
            self._lock = None
