"""Preemption signals delivered the way each launcher delivers them: one complete checkpoint, a clean exit, and a
resume that continues bit-identically.

* ``torchrun`` + SIGTERM to its process group (what a terminal's Ctrl-C, ``kill -TERM -PGID`` or a scheduler does):
  torchrun forwards it with ``killpg`` to every rank's process group, checkpoint-writer helpers included.
* ``torchrun`` + SIGUSR1 to its process group (SLURM's ``--signal=USR1``): torchrun itself dies of it without
  forwarding; the ranks learn of it through the parent-death signal.
* SIGTERM to the rank processes only (what ``srun`` does with a signal it forwards to its tasks).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from train_helpers import TINY_YAML, latest_name, read_jsonl, sample_with_reference, train_overrides
from train_helpers import wait_for

STEPS = 12
# A periodic save before the signal matters: the checkpoint writer's helper processes exist from the first save on,
# and a group-wide signal used to kill them (BrokenPipeError at the save on signal).
COMMON = {"parallel.tp": 2, "checkpoint.save_interval": 2, "checkpoint.keep_last": 5, "data.micro_batch_size": 4}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return sample_with_reference(str(tmp_path_factory.mktemp("data") / "sample"))


def _torchrun(overrides):
    # A session of its own: its process group is what a terminal or a scheduler signals.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         "-m", "megatron_offgrpo.train", TINY_YAML, *overrides],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True, env=env)


@pytest.fixture(scope="module")
def uninterrupted(dataset, tmp_path_factory):
    """Losses of the same run without any signal (the oracle for the resumed runs)."""
    tmp = str(tmp_path_factory.mktemp("ref"))
    proc = _torchrun(train_overrides(dataset, tmp, "ref", train_steps=STEPS, **COMMON))
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-3000:]
    return {s: row["loss"] for s, row in read_jsonl(os.path.join(tmp, "ref", "logs", "metrics.jsonl")).items()}


def _ranks(launcher_pid):
    return [p for p in psutil.Process(launcher_pid).children() if "megatron_offgrpo.train" in " ".join(p.cmdline())]


@pytest.mark.parametrize("how", ["torchrun-group-SIGTERM", "torchrun-group-SIGUSR1", "ranks-SIGTERM"])
def test_signal_saves_one_checkpoint_and_resumes_bit_identically(dataset, uninterrupted, tmp_path, how):
    tmp = str(tmp_path)
    overrides = train_overrides(dataset, tmp, "run", train_steps=STEPS, **COMMON)
    metrics = os.path.join(tmp, "run", "logs", "metrics.jsonl")
    ckpt_dir = os.path.join(tmp, "run", "ckpt")
    proc = _torchrun(overrides)
    wait_for(lambda: latest_name(ckpt_dir) == "iter_0000002" and len(open(metrics).readlines()) >= 3, proc, timeout=400)
    if how == "ranks-SIGTERM":
        ranks = _ranks(proc.pid)
        assert len(ranks) == 2
        for p in ranks:
            p.send_signal(signal.SIGTERM)
    else:
        os.killpg(proc.pid, signal.SIGTERM if how.endswith("SIGTERM") else signal.SIGUSR1)
    out, _ = proc.communicate(timeout=300)  # until every rank has closed the pipe, too

    # No rank failed (torchrun itself reports the signal it got, or its ranks' exit code 75 "resume me", as errors
    # of its own).
    assert "BrokenPipeError" not in out and "]: Traceback" not in out, out[-4000:]
    logged = read_jsonl(metrics)
    stopped_at = max(logged)
    assert 3 <= stopped_at < STEPS, stopped_at
    periodic = [f"iter_{s:07d}" for s in range(2, stopped_at + 1, 2)]
    expected = sorted({*periodic, f"iter_{stopped_at:07d}"})
    assert out.count("saved checkpoint") == len(expected), out[-4000:]  # the periodic ones, then one on the signal
    assert latest_name(ckpt_dir) == f"iter_{stopped_at:07d}"
    assert sorted(n for n in os.listdir(ckpt_dir) if n != ".lock") == [*expected, "latest"]  # complete, no .tmp
    with open(os.path.join(ckpt_dir, f"iter_{stopped_at:07d}", "train_state.json")) as f:
        assert json.load(f)["step"] == stopped_at
    assert not psutil.pid_exists(proc.pid) or psutil.Process(proc.pid).status() == psutil.STATUS_ZOMBIE

    resumed = _torchrun(overrides)
    out, _ = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, out[-3000:]
    logged = read_jsonl(metrics)
    assert sorted(logged) == list(range(1, STEPS + 1))
    for s in range(1, STEPS + 1):
        assert logged[s]["loss"] == uninterrupted[s], (s, logged[s]["loss"], uninterrupted[s])  # bit-identical


def test_cli_says_resume_me_even_for_a_signal_during_start_up(dataset, tmp_path):
    """A plain CLI run (one process, as srun starts each task): SIGUSR1 sent while Python is still importing torch
    and Megatron is not fatal (the handler is installed first thing); the run trains one step, saves it, and exits
    75 ("stopped, resume me"); the same command then resumes and exits 0 when done."""
    from train_helpers import train_cli

    tmp = str(tmp_path)
    overrides = train_overrides(dataset, tmp, "cli", train_steps=3)
    proc = train_cli(overrides)
    time.sleep(1.0)  # inside the imports
    proc.send_signal(signal.SIGUSR1)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 75, out[-3000:]
    assert latest_name(os.path.join(tmp, "cli", "ckpt")) == "iter_0000001", out[-3000:]
    proc = train_cli(overrides)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0 and "resumed from" in out, out[-3000:]
    assert sorted(read_jsonl(os.path.join(tmp, "cli", "logs", "metrics.jsonl"))) == [1, 2, 3]
