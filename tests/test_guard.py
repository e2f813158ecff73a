"""The non-finite guard, with the faults injected the way they happen: a diverging learning rate, a NaN that
reaches the loss through one sequence, a broken model handed to the checkpoint writer.

What must survive: the weights never receive a non-finite update, the run says which step and which sequences,
and ``latest`` never points at a non-finite model. Checkpoints are read back with torch's own DCP reader
(``dcp_to_torch_save``), independent of the project's and Megatron's loaders.
"""

from __future__ import annotations

import contextlib
import io
import math
import os

import pytest
import torch

from megatron_offgrpo.utils.distributed import run_on_ranks
from train_helpers import TINY_YAML, latest_name, sample_with_reference, train_cli, train_overrides


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return sample_with_reference(str(tmp_path_factory.mktemp("data") / "sample"))


def _tensors(ckpt_path, tmp_path):
    """Every tensor of a checkpoint, through torch.distributed.checkpoint's format converter."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    out = os.path.join(str(tmp_path), os.path.basename(ckpt_path) + ".pt")
    dcp_to_torch_save(ckpt_path, out)
    flat = {}

    def walk(prefix, obj):
        if torch.is_tensor(obj):
            flat[prefix] = obj
        elif isinstance(obj, dict):
            for k, v in obj.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)

    walk("", torch.load(out, weights_only=False))
    return flat


def test_diverging_lr_never_reaches_the_weights_and_stops_the_run(dataset, tmp_path):
    tmp = str(tmp_path)
    overrides = train_overrides(dataset, tmp, "lr1e30", train_steps=10, **{
        "optimizer.lr": 1e30, "optimizer.max_consecutive_skips": 3, "checkpoint.save_interval": 1,
        "checkpoint.keep_last": 5})
    proc = train_cli(overrides)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 1, out[-3000:]  # a failure, not a finished run
    assert "step 2: non-finite" in out and "update skipped" in out, out[-3000:]
    assert "stopping: 3 non-finite step(s) in a row (steps 2-4" in out, out[-3000:]
    ckpt_dir = os.path.join(tmp, "lr1e30", "ckpt")
    assert latest_name(ckpt_dir) == "iter_0000003"  # nothing saved at or after the step that stopped the run
    first, last = (_tensors(os.path.join(ckpt_dir, f"iter_000000{i}"), tmp_path) for i in (1, 3))
    weights = [k for k in last if k.startswith("model.") or k.startswith("decoder.") or "weight" in k]
    assert weights
    for k, v in last.items():
        if v.is_floating_point():
            assert torch.isfinite(v).all(), k
    for k in weights:  # the skipped steps changed nothing
        assert torch.equal(first[k], last[k]), k


def _nan_in_one_sequence_worker(rank, world, overrides, poisoned):
    """Train with one sequence's reference log-probs turned NaN on the fly (as from an older, unverified dataset)."""
    from megatron_offgrpo.config import load_config
    from megatron_offgrpo.data import TrajectoryDataset
    from megatron_offgrpo.training.trainer import train

    original = TrajectoryDataset.__getitem__

    def getitem(self, i):
        item = original(self, i)
        if int(i) == poisoned and "ref_logp" in item:
            item["ref_logp"][item["prompt_len"] + 1] = float("nan")
        return item

    TrajectoryDataset.__getitem__ = getitem
    text = io.StringIO()
    try:
        with contextlib.redirect_stdout(text):
            result = train(load_config(TINY_YAML, overrides))
    finally:  # this rank process runs other tests after this one
        TrajectoryDataset.__getitem__ = original
    return {"history": result.history, "stopped_by": result.stopped_by, "out": text.getvalue()}


def test_nan_in_one_sequence_skips_that_step_names_it_and_training_goes_on(dataset, tmp_path):
    from megatron_offgrpo.data import GroupBatchSampler, TrajectoryDataset

    ds = TrajectoryDataset(dataset)
    sampler = GroupBatchSampler(ds.groups(), 2, 4, dp_rank=0, dp_size=1, seed=1234)
    poisoned = sampler.rank_batch(1)[3]  # a sequence of the second step's batch
    name = f"sequence {poisoned} (group {ds[poisoned]['group_id']}, rollout {ds[poisoned]['rollout_index']})"
    tmp = str(tmp_path)
    overrides = train_overrides(dataset, tmp, "nan", train_steps=3, **{
        "checkpoint.save_interval": 1, "checkpoint.keep_last": 3})
    (res,) = run_on_ranks(_nan_in_one_sequence_worker, 1, overrides, poisoned)
    assert res["stopped_by"] == "completed"
    skipped = [h["step"] for h in res["history"] if h["nonfinite"]]
    assert skipped == [2], res["history"]
    assert math.isnan(res["history"][1]["loss"]) and math.isfinite(res["history"][2]["loss"])
    assert "step 2: non-finite loss nan" in res["out"] and name in res["out"], res["out"][-2000:]
    ckpt_dir = os.path.join(tmp, "nan", "ckpt")
    after1, after2, after3 = (_tensors(os.path.join(ckpt_dir, f"iter_000000{i}"), tmp_path) for i in (1, 2, 3))
    for k, v in after2.items():  # step 2 changed no weight and no optimizer moment; step 3 trained again
        if v.is_floating_point() and "optimizer" not in k:
            assert torch.equal(v, after1[k]), k
    assert any(not torch.equal(after3[k], after2[k]) for k in after2 if after2[k].is_floating_point())


def _save_nan_model_worker(rank, world, ckpt_dir, dataset):
    from megatron_offgrpo.config import load_config
    from megatron_offgrpo.training import checkpointing
    from megatron_offgrpo.training.guard import NonFiniteError
    from megatron_offgrpo.training.setup import build_training_objects, initialize_distributed

    cfg = load_config(TINY_YAML, [f"data.train_prefix={dataset}", "model.transformer_impl=local", "parallel.tp=2",
                                  f"checkpoint.dir={ckpt_dir}"])
    initialize_distributed(cfg)
    objs = build_training_objects(cfg)
    checkpointing._materialize_optimizer_state(objs.optimizer)  # torch's Adam has no state before a first step
    args = (objs.model, objs.optimizer, objs.scheduler, 0, cfg)
    checkpointing.save_checkpoint(ckpt_dir, 1, *args)
    if rank == 1:  # one rank's shard only: every rank must still refuse together
        with torch.no_grad():
            objs.model[0].module.decoder.layers[0].mlp.linear_fc1.weight[0, 0] = float("inf")
    try:
        checkpointing.save_checkpoint(ckpt_dir, 2, *args)
    except NonFiniteError as e:
        return str(e)
    return None


def test_a_non_finite_model_is_never_saved(dataset, tmp_path):
    ckpt_dir = str(tmp_path / "ckpt")
    errors = run_on_ranks(_save_nan_model_worker, 2, ckpt_dir, dataset)
    assert all(e and "refusing to save a model with non-finite weights" in e for e in errors), errors
    assert "rank 1: decoder.layers.0.mlp.linear_fc1.weight" in errors[0]
    assert latest_name(ckpt_dir) == "iter_0000001" and sorted(os.listdir(ckpt_dir)) == ["iter_0000001", "latest"]


def _all_positive_step_worker(rank, world, dataset, logdir):
    from megatron_offgrpo.config import load_config
    from megatron_offgrpo.data import TrajectoryDataset
    from megatron_offgrpo.training.logger import MetricsLogger
    from megatron_offgrpo.training.loop import run_step
    from megatron_offgrpo.training.setup import build_training_objects, initialize_distributed
    from megatron_offgrpo.training.step import build_step_batch

    cfg = load_config(TINY_YAML, train_overrides(dataset, logdir, "nodata", **{"logging.plot": True}))
    initialize_distributed(cfg)
    objs = build_training_objects(cfg)
    ds = TrajectoryDataset(dataset)
    positives = [i for i in range(len(ds)) if ds.rewards[i] > 0][:8]
    mixed = list(range(8))
    out = []
    for rows in (positives, mixed):
        out.append(run_step(cfg, objs, build_step_batch([ds[i] for i in rows], cfg, 1, 0), forward_only=True))
    logger = MetricsLogger(cfg, True, 0)
    for step, metrics in enumerate(out + out, start=1):
        logger.log_step(step, metrics)
    return out, logger.close()


def test_a_metric_without_data_is_absent_never_zero(dataset, tmp_path):
    """A batch without negative trajectories has no negative log-prob: absent from the metrics (a gap in the curve,
    '-' in the table), not a 0 that plots as a spike."""
    (out, png) = run_on_ranks(_all_positive_step_worker, 1, dataset, str(tmp_path))[0]
    only_positive, mixed = out
    assert "logprob_neg" not in only_positive and only_positive["logprob_pos"] < 0
    assert mixed["logprob_neg"] < 0 and mixed["logprob_pos"] < 0
    assert png and os.path.getsize(png) > 0
