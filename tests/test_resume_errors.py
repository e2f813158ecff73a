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

from train_helpers import TINY_YAML, add_synthetic_reference, build_sample, train_overrides


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return add_synthetic_reference(build_sample(str(tmp_path_factory.mktemp("data") / "sample")))


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
