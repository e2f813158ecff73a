"""The SLURM launchers (launch/slurm/) against a real SLURM: a controller and two nodes on this machine
(tests/slurm_cluster.py), the tiny model of examples/tiny_cpu.yaml, one srun task per rank over gloo.

What is asserted, and why it matters on a real cluster:

* a 2-node job (TP=2 across the nodes) trains to the end, ends COMPLETED, and writes its per-run log
  ``train-JOBID-RESTART.log`` (a requeue must never overwrite the log of the run it replaces);
* a preemption (SIGUSR1 to the batch shell, what ``--signal=B:USR1@120`` sends) is forwarded to the ranks, which
  save and exit 75; the script requeues the job, and the requeued run (``SLURM_RESTART_COUNT=1``, its own log)
  resumes from ``latest`` and finishes with the losses and the final weights of an uninterrupted job, bit for bit;
* the time-limit path (``checkpoint.exit_after_seconds``, counted from the allocation start the script exports)
  saves, exits 75 and requeues until the run is done;
* a bad config (exit 2) is reported and not requeued;
* ``pipeline.sh`` chains convert -> precompute -> train with ``afterok`` dependencies, and every job ends COMPLETED,
  in order.

Every wait is bounded; a failing assertion prints the jobs' logs.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from datetime import datetime
from typing import Dict, List

import pytest
import torch

from slurm_cluster import slurm_cluster  # noqa: F401  (the session fixture)
from train_helpers import REPO, TINY_YAML, build_sample, latest_name, read_jsonl, sample_with_reference
from train_helpers import train_overrides

STEPS = 40  # long enough that a SIGUSR1 sent after the step-4 checkpoint lands well before the end
COMMON = {"parallel.tp": 2, "checkpoint.save_interval": 4, "checkpoint.keep_last": 2, "data.micro_batch_size": 4}
# Two fake nodes, one task (rank) each, no GPUs; the rank count must be asked explicitly.
JOB = ["--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=0", "--time=00:15:00"]
TRAIN = os.path.join(REPO, "launch", "slurm", "train.sbatch")
PIPELINE = os.path.join(REPO, "launch", "slurm", "pipeline.sh")
JOB_TIMEOUT = 300


def _job_env(**extra) -> Dict[str, str]:
    """What the tests export to the jobs (sbatch passes the submitting environment on)."""
    env = {"OMP_NUM_THREADS": "1"}  # the two fake nodes share this machine's two cores
    if os.path.exists(os.path.join(sys.prefix, "bin", "activate")):
        env["OFFGRPO_VENV"] = sys.prefix  # the env hook, exercised
    env.update(extra)
    return env


def _logs(log_dir: str, tail: int = 6000) -> str:
    """Every log of a test's jobs (the batch output and the per-run step logs), for failure messages."""
    if not os.path.isdir(log_dir):
        return f"(no log folder {log_dir})"
    parts = []
    for name in sorted(os.listdir(log_dir)):
        with open(os.path.join(log_dir, name), errors="replace") as f:
            text = f.read()
        # The ranks' deprecation warnings are noise here.
        noise = ("Warning", "warnings.warn", "return func(")
        text = "\n".join(line for line in text.splitlines() if not any(n in line for n in noise))
        parts.append(f"===== {name}\n{text[-tail:]}")
    return "\n".join(parts)


def _read(path: str) -> str:
    with open(path, errors="replace") as f:
        return f.read()


def _submit_train(cluster, tmp: str, name: str, overrides: List[str], cwd: str = None, **env) -> tuple:
    """``sbatch train.sbatch TINY_YAML overrides`` with its log folder created first (a missing --output folder
    makes SLURM drop the job silently); returns (job id, log folder)."""
    log_dir = os.path.join(tmp, "logs")
    os.makedirs(log_dir, exist_ok=True)
    env = _job_env(OFFGRPO_LOG_DIR=log_dir, **env)
    job = cluster.sbatch([*JOB, f"--job-name={name}", f"--output={log_dir}/%x-%j.out", TRAIN, TINY_YAML, *overrides],
                         env=env, cwd=cwd or tmp)
    return job, log_dir


def _final_model_tensors(ckpt_dir: str, out: str) -> Dict[str, torch.Tensor]:
    """The model tensors of ``ckpt_dir/latest``, read with torch's own DCP converter (not our loader)."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(os.path.join(ckpt_dir, latest_name(ckpt_dir)), out)
    state = torch.load(out, weights_only=False)
    return {k: v for k, v in state.items() if torch.is_tensor(v) and not k.startswith("optimizer")}


def _unix(slurm_time: str) -> float:
    return datetime.strptime(slurm_time, "%Y-%m-%dT%H:%M:%S").timestamp()


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return sample_with_reference(str(tmp_path_factory.mktemp("data") / "sample"))


@pytest.fixture(scope="module")
def uninterrupted(slurm_cluster, dataset, tmp_path_factory):  # noqa: F811
    """One sbatch job of the STEPS-step run, never signalled (the oracle of the preemption test). Submitted from
    the checkout without OFFGRPO_REPO: the script must find the repository in the submit directory."""
    tmp = str(tmp_path_factory.mktemp("uninterrupted"))
    overrides = train_overrides(dataset, tmp, "ref", train_steps=STEPS, **COMMON)
    job, log_dir = _submit_train(slurm_cluster, tmp, "ref", overrides, cwd=REPO)
    info = slurm_cluster.wait_for_job(job, timeout=JOB_TIMEOUT, on_timeout=lambda: _logs(log_dir))
    return {"job": job, "info": info, "log_dir": log_dir, "tmp": tmp,
            "metrics": read_jsonl(os.path.join(tmp, "ref", "logs", "metrics.jsonl"))
            if os.path.exists(os.path.join(tmp, "ref", "logs", "metrics.jsonl")) else {},
            "ckpt": os.path.join(tmp, "ref", "ckpt")}


def test_trains_on_two_nodes_and_logs_per_run(uninterrupted):
    """The tiny model trains across both nodes (TP=2: one rank per node, ranks from SLURM_PROCID), the job ends
    COMPLETED with exit 0 and no restart, and its step log is named after the job id and the restart count."""
    run, job = uninterrupted, uninterrupted["job"]
    logs = _logs(run["log_dir"])
    info = run["info"]
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", (info, logs)
    assert info["Restarts"] == "0" and info["NumNodes"] == "2" and info["NumTasks"] == "2", info
    step_log = os.path.join(run["log_dir"], f"train-{job}-0.log")
    assert os.path.exists(step_log), logs
    text = _read(step_log)
    assert "tp=2 pp=1 cp=1 dp=1" in text, logs  # one model over the two ranks, not two worlds of one
    assert "decision: training finished (exit 0): done" in text, logs
    assert sorted(run["metrics"]) == list(range(1, STEPS + 1)), logs
    assert latest_name(run["ckpt"]) == f"iter_{STEPS:07d}"


def test_usr1_preemption_requeues_and_resumes_bit_identically(slurm_cluster, dataset, uninterrupted, tmp_path):  # noqa: F811
    """SIGUSR1 to the batch shell mid-run -> forwarded to srun -> every rank saves and exits 75 -> the script
    requeues the job -> the requeued run (restart 1, its own log) resumes from latest and finishes. Its losses
    (metrics.jsonl, the last value per step) and final weights equal the uninterrupted job's, bit for bit."""
    tmp = str(tmp_path)
    overrides = train_overrides(dataset, tmp, "run", train_steps=STEPS, **COMMON)
    job, log_dir = _submit_train(slurm_cluster, tmp, "preempted", overrides, OFFGRPO_REPO=REPO)
    ckpt_dir = os.path.join(tmp, "run", "ckpt")
    metrics = os.path.join(tmp, "run", "logs", "metrics.jsonl")

    # Once a periodic checkpoint exists and a step after it was logged (the writer's helpers exist by then).
    deadline = time.monotonic() + JOB_TIMEOUT
    while not (latest_name(ckpt_dir) and os.path.exists(metrics) and len(_read(metrics).splitlines()) >= 5):
        state = slurm_cluster.job(job).get("JobState")
        assert state in ("PENDING", "RUNNING"), (state, _logs(log_dir))
        assert time.monotonic() < deadline, f"no checkpoint after {JOB_TIMEOUT} s\n{_logs(log_dir)}"
        time.sleep(0.1)
    slurm_cluster.signal_batch(job, "USR1")
    info = slurm_cluster.wait_for_job(job, timeout=JOB_TIMEOUT, on_timeout=lambda: _logs(log_dir))
    logs = _logs(log_dir)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", (info, logs)

    first, second = (os.path.join(log_dir, f"train-{job}-{r}.log") for r in (0, 1))
    assert os.path.exists(first) and os.path.exists(second), logs
    first, second = _read(first), _read(second)
    assert "forwarding it to srun" in first and "srun exited with code 75" in first, logs
    assert "decision: stopped with a complete checkpoint (exit 75): requeueing" in first, logs
    stopped = [int(s) for s in re.findall(r"stopping at step (\d+) \(signal\)", first)]
    assert stopped and stopped[0] < STEPS, logs  # the signal did interrupt the run
    assert f"resumed from {ckpt_dir}/iter_{stopped[0]:07d}" in second, logs
    assert "decision: training finished (exit 0): done" in second, logs
    assert "restart 1]" in second and "restart 1]" not in first, logs

    logged = read_jsonl(metrics)
    ref = uninterrupted["metrics"]
    assert sorted(logged) == list(range(1, STEPS + 1)) and sorted(ref) == list(range(1, STEPS + 1)), logs
    for s in range(1, STEPS + 1):
        assert logged[s]["loss"] == ref[s]["loss"], (s, logged[s]["loss"], ref[s]["loss"])  # bit-identical

    assert latest_name(ckpt_dir) == latest_name(uninterrupted["ckpt"]) == f"iter_{STEPS:07d}"
    mine = _final_model_tensors(ckpt_dir, os.path.join(tmp, "run.pt"))
    theirs = _final_model_tensors(uninterrupted["ckpt"], os.path.join(tmp, "ref.pt"))
    assert mine.keys() == theirs.keys() and mine, sorted(mine)
    for k in mine:
        assert torch.equal(mine[k], theirs[k]), k


def test_time_limit_saves_exits_75_and_requeues_until_done(slurm_cluster, dataset, tmp_path):  # noqa: F811
    """``checkpoint.exit_after_seconds=1`` counted from the allocation start (OFFGRPO_JOB_START_TIME, exported by
    the script): every run of the job is past it after its first step, so it saves, exits 75 and is requeued; the
    run that reaches train_steps ends the job COMPLETED. Each run's log is its own; the exported start time is the
    allocation's (scontrol's StartTime), not the trainer's."""
    tmp = str(tmp_path)
    steps = 2
    overrides = train_overrides(dataset, tmp, "tl", train_steps=steps, **{**COMMON, "checkpoint.save_interval": 0,
                                                                          "checkpoint.exit_after_seconds": 1})
    job, log_dir = _submit_train(slurm_cluster, tmp, "timelimit", overrides, OFFGRPO_REPO=REPO,
                                 OFFGRPO_MAX_RESTARTS="4")
    info = slurm_cluster.wait_for_job(job, timeout=400, on_timeout=lambda: _logs(log_dir))
    logs = _logs(log_dir)
    assert info["JobState"] == "COMPLETED", (info, logs)
    restarts = int(info["Restarts"])
    # Run 0 does step 1; run 1 does step 2 and ends the job (or, if the trainer saves once more at the limit,
    # run 2 finds nothing left to do).
    assert 1 <= restarts <= steps, (info, logs)
    for r in range(restarts):
        text = _read(os.path.join(log_dir, f"train-{job}-{r}.log"))
        assert "(time_limit)" in text and "srun exited with code 75" in text, logs
        assert "decision: stopped with a complete checkpoint (exit 75): requeueing" in text, logs
    last = _read(os.path.join(log_dir, f"train-{job}-{restarts}.log"))
    assert "decision: training finished (exit 0): done" in last, logs
    exported = int(re.search(r"OFFGRPO_JOB_START_TIME=(\d+)", last).group(1))
    assert abs(exported - _unix(info["StartTime"])) <= 2, (exported, info["StartTime"])
    assert sorted(read_jsonl(os.path.join(tmp, "tl", "logs", "metrics.jsonl"))) == list(range(1, steps + 1)), logs


def test_bad_config_fails_without_requeue(slurm_cluster, dataset, tmp_path):  # noqa: F811
    """Exit code 2 (bad config) is not "resume me": the job FAILS with that code, once, and the log says why."""
    tmp = str(tmp_path)
    overrides = train_overrides(dataset, tmp, "bad", **COMMON) + ["optimizer.lr=-1"]
    job, log_dir = _submit_train(slurm_cluster, tmp, "badconfig", overrides, OFFGRPO_REPO=REPO)
    info = slurm_cluster.wait_for_job(job, timeout=JOB_TIMEOUT, on_timeout=lambda: _logs(log_dir))
    logs = _logs(log_dir)
    assert info["JobState"] == "FAILED" and info["ExitCode"] == "2:0" and info["Restarts"] == "0", (info, logs)
    text = _read(os.path.join(log_dir, f"train-{job}-0.log"))
    assert "optimizer.lr" in text and "decision: training failed with exit code 2" in text, logs


def _tiny_hf_model(path: str) -> None:
    """A tiny random Qwen2 over the tiny tokenizer's vocabulary (261 ids), saved as HF safetensors."""
    import transformers

    config = transformers.Qwen2Config(
        vocab_size=261, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False, rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6}, attn_implementation="eager")
    torch.manual_seed(0)
    transformers.Qwen2ForCausalLM(config).save_pretrained(path)


def test_pipeline_chains_convert_precompute_train(slurm_cluster, tmp_path):  # noqa: F811
    """pipeline.sh submits convert -> precompute -> train with afterok dependencies and prints the job ids; each
    job ends COMPLETED, each starts after the previous one ended, the reference log-probs come from the converted
    model, and training on them runs to the end."""
    tmp = str(tmp_path)
    hf_dir, mcore_dir = os.path.join(tmp, "hf"), os.path.join(tmp, "mcore")
    _tiny_hf_model(hf_dir)
    prefix = build_sample(os.path.join(tmp, "data", "sample"))  # no ref_logp yet: the pipeline adds it
    log_dir = os.path.join(tmp, "pipeline-logs")  # pipeline.sh creates it before any sbatch
    overrides = train_overrides(prefix, tmp, "piped", train_steps=3, **COMMON)
    cmd = ["bash", PIPELINE, "--config", TINY_YAML, "--hf-dir", hf_dir, "--mcore-dir", mcore_dir, "--convert-tp", "2",
           "--prefix", prefix, "--array", "ref_logp", "--producer", "tiny-qwen2", "--nodes", "2",
           "--ntasks-per-node", "1", "--gpus-per-node", "0", "--time", "00:15:00", "--log-dir", log_dir,
           "--", *overrides]
    r = slurm_cluster.run(cmd, cwd=tmp, env=_job_env(), timeout=120)
    jobs = dict(kv.split("=") for kv in r.stdout.strip().splitlines()[-1].removeprefix("jobs: ").split())
    assert list(jobs) == ["convert", "precompute", "train"], r.stdout
    infos = {}
    for step, job in jobs.items():
        infos[step] = slurm_cluster.wait_for_job(int(job), timeout=JOB_TIMEOUT, on_timeout=lambda: _logs(log_dir))
        assert infos[step]["JobState"] == "COMPLETED", (step, infos[step], _logs(log_dir))
        assert os.path.exists(os.path.join(log_dir, f"{step}-{job}-0.log")), _logs(log_dir)
    assert infos["precompute"]["Dependency"] == "(null)"  # resolved
    assert _unix(infos["convert"]["EndTime"]) <= _unix(infos["precompute"]["StartTime"])
    assert _unix(infos["precompute"]["EndTime"]) <= _unix(infos["train"]["StartTime"])
    with open(prefix + ".json") as f:
        producer = json.load(f)["per_token_arrays"]["ref_logp"]["producer"]
    assert producer["model"] == "tiny-qwen2" and producer["load"] == mcore_dir, producer
    assert sorted(read_jsonl(os.path.join(tmp, "piped", "logs", "metrics.jsonl"))) == [1, 2, 3], _logs(log_dir)


def test_pipeline_usage_errors_submit_nothing(tmp_path):
    """Bad usage exits 2 before any sbatch (a half-submitted chain is worse than none); the usage says that the
    evaluation step is not part of the chain yet."""
    r = subprocess.run(["bash", PIPELINE, "--help"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0 and "evaluation is not part of the chain yet" in r.stdout, r
    for args in (["--skip-convert", "--skip-precompute", "--skip-train"],
                 ["--skip-convert", "--skip-precompute", "--config", str(tmp_path / "missing.yaml")],
                 ["--config", TINY_YAML, "--skip-convert", "--prefix", str(tmp_path / "none")],
                 ["--bogus"]):
        r = subprocess.run(["bash", PIPELINE, *args], capture_output=True, text=True, timeout=30)
        assert r.returncode == 2 and "pipeline: error:" in r.stderr and "job" not in r.stdout, (args, r)
