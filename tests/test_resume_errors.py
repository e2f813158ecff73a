"""Damaged inputs are refused before any process group or model exists, naming the file and the fix.

Real damage, as a disk or a copy produces it: a ``.distcp`` cut short, a ``train_state.json`` overwritten, a
``latest`` naming nothing, a pointer of the dataset's ``P.idx`` shifted by 2 bytes (which used to train 8 steps on
shifted tokens and exit 0).
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from train_helpers import TINY_YAML, sample_with_reference, train_overrides


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return sample_with_reference(str(tmp_path_factory.mktemp("data") / "sample"))


@pytest.fixture(scope="module")
def trained(dataset, tmp_path_factory):
    """A run of 2 steps with a checkpoint after each."""
    tmp = str(tmp_path_factory.mktemp("run"))
    overrides = train_overrides(dataset, tmp, "run", train_steps=2, **{"checkpoint.save_interval": 1})
    out = subprocess.run([sys.executable, "-m", "megatron_offgrpo.train", TINY_YAML, *overrides],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    return tmp, overrides


def _run(overrides, *extra):
    return subprocess.run([sys.executable, "-m", "megatron_offgrpo.train", TINY_YAML, *overrides, *extra],
                          capture_output=True, text=True, timeout=300)


def _damaged_copy(trained, tmp_path, damage):
    src, overrides = trained
    ckpt = str(tmp_path / "ckpt")
    shutil.copytree(os.path.join(src, "run", "ckpt"), ckpt)
    damage(os.path.join(ckpt, "iter_0000002"), ckpt)
    return [o for o in overrides if not o.startswith("checkpoint.dir=")] + [f"checkpoint.dir={ckpt}", "train_steps=3"]


def _truncate_distcp(path, ckpt):
    f = sorted(glob.glob(os.path.join(path, "*.distcp")), key=os.path.getsize)[-1]
    with open(f, "r+b") as fh:
        fh.truncate(os.path.getsize(f) - 100)


def _garble_state(path, ckpt):
    with open(os.path.join(path, "train_state.json"), "w") as f:
        f.write('{"step": 2, "consum')  # a write cut short


def _dangling_latest(path, ckpt):
    shutil.rmtree(path)


@pytest.mark.parametrize("damage,expected", [
    (_truncate_distcp, r"iter_0000002/__\d+_\d+\.distcp is truncated"),
    (_garble_state, r"iter_0000002/train_state.json: not valid JSON .* \(e\.g\. iter_0000001\)"),
    (_dangling_latest, r"latest names 'iter_0000002', which is not a checkpoint directory"),
], ids=["truncated-distcp", "garbled-train-state", "dangling-latest"])
def test_damaged_checkpoint_is_named_before_anything_starts(trained, tmp_path, damage, expected):
    import re

    overrides = _damaged_copy(trained, tmp_path, damage)
    out = _run(overrides)
    assert out.returncode == 2, out.stdout[-2000:] + out.stderr[-2000:]
    assert re.search(expected, out.stderr), out.stderr
    assert "Traceback" not in out.stderr and "parameters" not in out.stdout  # no model was ever built


def test_shifted_index_pointer_is_refused_naming_the_index(dataset, tmp_path):
    from megatron.core.datasets.indexed_dataset import _IndexReader

    prefix = str(tmp_path / "copy" / "sample")
    shutil.copytree(os.path.dirname(dataset), os.path.dirname(prefix))
    count = _IndexReader(prefix + ".idx", multimodal=False).sequence_count
    # Megatron's index layout: 34 header bytes, int32 lengths, then int64 pointers.
    pointers_at = 34 + 4 * count
    with open(prefix + ".idx", "r+b") as f:  # shift the 4th sequence's pointer by 2 bytes, size unchanged
        f.seek(pointers_at + 3 * 8)
        value = int(np.frombuffer(f.read(8), np.int64)[0])
        f.seek(pointers_at + 3 * 8)
        f.write(np.int64(value + 2).tobytes())
    out = _run(train_overrides(prefix, str(tmp_path), "shifted", train_steps=8))
    assert out.returncode == 2, out.stdout[-2000:] + out.stderr[-2000:]
    assert f"{prefix}.idx" in out.stderr and "Traceback" not in out.stderr, out.stderr


def test_two_runs_cannot_write_one_checkpoint_dir(tmp_path):
    """The lock rank 0 holds for a run's lifetime: a second holder is refused naming the first, and the lock dies
    with its process (so a killed run never blocks its own resume)."""
    from megatron_offgrpo.training.checkpointing import CheckpointDirInUseError, lock_checkpoint_dir

    ckpt = str(tmp_path / "ckpt")
    held = lock_checkpoint_dir(ckpt)
    with pytest.raises(CheckpointDirInUseError, match=rf"{ckpt} is in use by host \S+ pid {os.getpid()}"):
        lock_checkpoint_dir(ckpt)
    held.close()
    lock_checkpoint_dir(ckpt).close()
    # A holder killed with SIGKILL releases it too.
    code = f"from megatron_offgrpo.training.checkpointing import lock_checkpoint_dir as l; f = l({ckpt!r}); " \
           "print('locked', flush=True); import time; time.sleep(60)"
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    with pytest.raises(CheckpointDirInUseError, match=f"pid {proc.pid}"):
        lock_checkpoint_dir(ckpt)
    proc.kill()
    proc.wait()
    lock_checkpoint_dir(ckpt).close()


def test_srun_tasks_become_ranks_of_one_world(monkeypatch):
    """Under srun every task reads its rank from SLURM (a plain srun used to start N worlds of one)."""
    from megatron_offgrpo.utils.distributed import distributed_env_from_launcher

    # A private copy of the environment: the function adds variables that must not leak into later tests.
    monkeypatch.setattr(os, "environ", {k: v for k, v in os.environ.items()
                                        if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")})
    monkeypatch.setenv("SLURM_PROCID", "3")
    monkeypatch.setenv("SLURM_NTASKS", "4")
    monkeypatch.setenv("SLURM_LOCALID", "1")
    monkeypatch.setenv("SLURM_JOB_ID", "123457")
    monkeypatch.setenv("MASTER_ADDR", "node-a")  # exported by the batch script: wins over scontrol
    distributed_env_from_launcher()
    env = os.environ
    assert (env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"], env["MASTER_ADDR"], env["MASTER_PORT"]) == \
        ("3", "4", "1", "node-a", str(20000 + 123457 % 20000))
