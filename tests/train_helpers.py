"""Helpers shared by the trainer tests: the tiny config, run overrides, and readers of a run's outputs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from typing import Callable, Dict, List

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLE = os.path.join(REPO, "examples", "data", "ot3_sample.jsonl")
TOKENIZER = os.path.join(REPO, "examples", "tiny_tokenizer")
TINY_YAML = os.path.join(REPO, "examples", "tiny_cpu.yaml")  # every run here, in-process or CLI, starts from it


_BUILT: Dict[str, str] = {}  # what -> prefix of the one copy built in this test session


def _copy_dataset(src: str, dst: str) -> str:
    """Copy every file of the dataset at prefix ``src`` (``src.*``) to prefix ``dst``."""
    import glob
    import shutil

    os.makedirs(os.path.dirname(os.path.abspath(dst)), exist_ok=True)
    for path in glob.glob(glob.escape(src) + ".*"):
        shutil.copyfile(path, dst + path[len(src):])
    return dst


def _built_once(what: str, make: Callable[[str], str]) -> str:
    """The prefix of a dataset built once per test session (in a temporary directory removed at exit)."""
    if what not in _BUILT:
        import atexit
        import shutil
        import tempfile

        tmp = tempfile.mkdtemp(prefix=f"offgrpo-{what}-")
        atexit.register(shutil.rmtree, tmp, True)
        _BUILT[what] = make(os.path.join(tmp, "sample"))
    return _BUILT[what]


def _build(prefix: str) -> str:
    from megatron_offgrpo.preprocess import BuildConfig, build_dataset

    build_dataset(BuildConfig([SAMPLE], TOKENIZER, prefix, max_seq_len=384, domain="math", progress=False))
    return prefix


def build_sample(prefix: str) -> str:
    """The shipped OT3 sample, built with the real pipeline, at ``prefix`` (built once per session, then copied:
    the copy is byte-identical, and each test owns its files)."""
    return _copy_dataset(_built_once("sample", _build), prefix)


def sample_with_reference(prefix: str) -> str:
    """:func:`build_sample` plus :func:`add_synthetic_reference`, at ``prefix`` (built once per session)."""
    return _copy_dataset(_built_once("sample_ref", lambda p: add_synthetic_reference(_build(p))), prefix)


def add_synthetic_reference(prefix: str) -> str:
    """Attach a seeded synthetic ``ref_logp`` array (values in (-5, -4]) to the dataset at ``prefix``."""
    import numpy as np

    from megatron_offgrpo.data import TrajectoryDataset, add_per_token_array

    ds = TrajectoryDataset(prefix)
    rng = np.random.default_rng(0)
    arrays = [(-4.0 - rng.random(n)).astype(np.float32) for n in ds.sequence_lengths]
    add_per_token_array(prefix, "ref_logp", arrays, {"model": "synthetic-reference"})
    return prefix


def train_overrides(dataset: str, tmp: str, name: str, **extra) -> List[str]:
    """``a.b=c`` overrides of a small run named ``name`` writing under ``tmp/name``."""
    base = {
        "name": name,
        "train_steps": 1,
        "model.transformer_impl": "local",
        "data.train_prefix": dataset,
        "data.groups_per_batch": 2,
        "data.group_size": 4,
        "data.micro_batch_size": 8,
        "data.seq_length": 384,
        "data.pad_token_id": 257,
        "loss.kl_coef": 0.1,
        "optimizer.lr": 1e-3,
        "optimizer.warmup_steps": 0,  # Megatron's warmup starts at lr 0: a 1-step test would not move
        "checkpoint.dir": os.path.join(tmp, name, "ckpt"),
        "logging.dir": os.path.join(tmp, name, "logs"),
        "logging.progress_bar": False,
        "logging.plot": False,
    }
    base.update(extra)
    return [f"{k}={'null' if v is None else v}" for k, v in base.items()]


def train_worker(rank: int, world: int, overrides: List[str]) -> Dict:
    """One training run on this rank (for ``run_on_ranks``)."""
    from megatron_offgrpo.config import load_config
    from megatron_offgrpo.training.trainer import train

    result = train(load_config(TINY_YAML, overrides))
    return {"history": result.history, "checkpoint": result.checkpoint, "stopped_by": result.stopped_by}


def read_weights_worker(rank: int, world: int, checkpoints: List[str], overrides: List[str]) -> Dict:
    """Model weights of each training checkpoint, loaded at TP = PP = EP = 1 with the model of ``overrides``."""
    import torch
    from megatron.core import dist_checkpointing

    from megatron_offgrpo.config import load_config
    from megatron_offgrpo.training.setup import build_training_objects, initialize_distributed

    cfg = load_config(TINY_YAML, overrides)
    initialize_distributed(cfg)
    module = build_training_objects(cfg).model[0].module
    out = {}
    for path in checkpoints:
        state = dist_checkpointing.load({"model": module.sharded_state_dict()}, path)["model"]
        out[path] = {k: v.clone() for k, v in state.items() if torch.is_tensor(v)}
    return out


def read_jsonl(path: str) -> Dict[int, Dict]:
    """metrics.jsonl by step (a resumed run re-logs the steps after its checkpoint: the last one wins)."""
    by_step = {}
    with open(path) as f:
        for line in f:
            row = json.loads(line)
            by_step[row["step"]] = row
    return by_step


def latest_name(ckpt_dir: str):
    path = os.path.join(ckpt_dir, "latest")
    return open(path).read().strip() if os.path.exists(path) else None


def train_cli(overrides: List[str], **kw) -> subprocess.Popen:
    """``python -m megatron_offgrpo.train TINY_YAML ...`` as a child process (stdout and stderr together)."""
    return subprocess.Popen([sys.executable, "-m", "megatron_offgrpo.train", TINY_YAML, *overrides],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


def wait_for(predicate: Callable[[], bool], proc: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


STEP_METRICS = ("loss", "kl", "clip_frac", "logprob_pos", "logprob_neg", "grad_norm")


def assert_same_step(name: str, h: Dict, base: Dict, w: Dict, base_w: Dict, keys=STEP_METRICS) -> None:
    """One layout's first-step metrics ``h`` and updated weights ``w`` equal the baseline's, to fp32 noise; a mean
    over nothing is absent in every layout alike."""
    import torch

    for key in keys:
        assert (key in h) == (key in base), (name, key)
        if key in base:
            assert abs(h[key] - base[key]) <= 1e-5 * max(1.0, abs(base[key])), (name, key, h[key], base[key])
    assert w.keys() == base_w.keys()
    for k in base_w:
        diff = (w[k] - base_w[k]).abs()
        assert torch.allclose(w[k], base_w[k], rtol=1e-5, atol=1e-6), (name, k, diff.max().item(),
                                                                         int((diff > 1e-6).sum()), diff.numel())
