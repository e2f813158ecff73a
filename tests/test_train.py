"""The trainer end to end on CPU (real gloo processes): layout invariance, resume, preemption, learning.

Every run starts from the same initial weights, loaded through the checkpoint path (a TP=1 model checkpoint);
updated weights are read back from each run's training checkpoint at TP=1, so the comparison crosses layouts.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from megatron_offgrpo.config import load_config
from megatron_offgrpo.utils.distributed import run_on_ranks

from train_helpers import TINY_YAML, assert_same_step
from train_helpers import sample_with_reference
from train_helpers import build_sample as _build_sample
from train_helpers import latest_name as _latest
from train_helpers import read_jsonl as _read_jsonl
from train_helpers import read_weights_worker
from train_helpers import train_cli as _cli
from train_helpers import train_overrides as _overrides
from train_helpers import train_worker as _train_worker
from train_helpers import wait_for as _wait_for


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """The shipped sample, built with the real pipeline, plus a synthetic precomputed ref_logp array."""
    return sample_with_reference(str(tmp_path_factory.mktemp("data") / "sample"))


def _init_checkpoint_worker(rank, world, path):
    """Random-init tiny model at TP=1, saved as the model checkpoint every run loads."""
    from megatron_offgrpo.models import save_model_checkpoint, write_checkpoint_metadata
    from megatron_offgrpo.training.setup import build_architecture, build_training_objects, initialize_distributed

    cfg = load_config(None, ["data.train_prefix=unused", "model.transformer_impl=local"])
    initialize_distributed(cfg)
    objs = build_training_objects(cfg)
    save_model_checkpoint(objs.model[0].module, path)
    write_checkpoint_metadata(path, build_architecture(cfg), objs.padded_vocab_size)


def _read_weights_worker(rank, world, checkpoints, init):
    """Model weights of each training checkpoint, loaded at TP=1 / PP=1 (the tiny model)."""
    return read_weights_worker(rank, world, checkpoints,
                               ["data.train_prefix=unused", "model.transformer_impl=local", f"model.load={init}"])


@pytest.fixture(scope="module")
def init_checkpoint(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("init") / "tiny")
    run_on_ranks(_init_checkpoint_worker, 1, path)
    return path


def run_layouts_and_compare(dataset, init_checkpoint, tmp, layouts, baseline, **common):
    """One training step per layout (``name -> (world size, overrides)``), all from ``init_checkpoint``; assert
    that the metrics and every updated weight (read back at TP=1) equal those of the ``baseline`` layout.

    Returns the baseline's updated weights.
    """
    results = {}
    for name, (world, extra) in layouts.items():
        # A large Adam eps makes the first update ~linear in the gradient, so fp32 reduction-order noise on
        # near-zero gradients cannot flip an update's sign (lr * g / (|g| + eps) with the default eps can).
        overrides = _overrides(dataset, tmp, name, **{"model.load": init_checkpoint, "optimizer.adam_eps": 1e-3,
                                                      **common, **extra})
        results[name] = run_on_ranks(_train_worker, world, overrides)[0]
    weights = run_on_ranks(_read_weights_worker, 1, [r["checkpoint"] for r in results.values()], init_checkpoint)[0]

    base = results[baseline]["history"][0]
    base_w = weights[results[baseline]["checkpoint"]]
    assert base["loss"] != 0 and base["kl"] > 0
    for name, r in results.items():
        h = r["history"][0]
        assert_same_step(name, h, base, weights[r["checkpoint"]], base_w)
    return base_w


def test_one_step_is_the_same_under_tp_pp_dp_and_microbatching(dataset, init_checkpoint, tmp_path):
    layouts = {
        "base": (1, {}),
        "micro": (1, {"data.micro_batch_size": 2}),
        "tp2": (2, {"parallel.tp": 2}),
        "pp2": (2, {"parallel.pp": 2, "data.micro_batch_size": 4}),
        "dp2": (2, {"data.micro_batch_size": 2}),
    }
    updated = run_layouts_and_compare(dataset, init_checkpoint, str(tmp_path), layouts, "base")
    initial = run_on_ranks(_read_weights_worker, 1, [init_checkpoint], init_checkpoint)[0][init_checkpoint]
    moved = sum(float((updated[k] - initial[k]).abs().max()) > 0 for k in updated)
    assert moved == len(updated)  # the step changed every tensor


def test_killed_run_resumes_bit_identically_and_mismatch_is_refused(dataset, tmp_path):
    tmp = str(tmp_path)
    steps = 8
    (full,) = run_on_ranks(_train_worker, 1, _overrides(dataset, tmp, "full", train_steps=steps))
    expected = {h["step"]: h["loss"] for h in full["history"]}

    overrides = _overrides(dataset, tmp, "killed", train_steps=steps, **{"checkpoint.save_interval": 2})
    ckpt_dir = os.path.join(tmp, "killed", "ckpt")
    proc = _cli(overrides)
    _wait_for(lambda: _latest(ckpt_dir) is not None, proc)
    proc.kill()  # SIGKILL: no chance to save anything more
    proc.wait()
    saved = int(_latest(ckpt_dir).split("_")[1])
    assert saved < steps
    proc = _cli(overrides)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
    assert f"resumed from {ckpt_dir}/iter_{saved:07d}" in out
    logged = _read_jsonl(os.path.join(tmp, "killed", "logs", "metrics.jsonl"))
    for s in range(saved + 1, steps + 1):
        assert logged[s]["loss"] == expected[s], (s, logged[s]["loss"], expected[s])  # bit-identical

    # The same checkpoint continues under another layout (TP=2), with the same losses up to fp32 noise, from a
    # copy of the dataset at another path: a run's data is identified by content, not by where it lives.
    moved = os.path.join(tmp, "moved")
    shutil.copytree(os.path.dirname(dataset), moved)
    moved_prefix = os.path.join(moved, os.path.basename(dataset))
    other = _overrides(moved_prefix, tmp, "killed", train_steps=steps + 1, **{"parallel.tp": 2})
    (res, _) = run_on_ranks(_train_worker, 2, other)
    assert res["history"][0]["step"] == steps + 1

    # A checkpoint of another run is refused, naming each field: here another batch geometry, and other data at
    # the same path (the reference log-probs recomputed).
    from megatron_offgrpo.data import TrajectoryDataset, add_per_token_array

    lengths = TrajectoryDataset(moved_prefix).sequence_lengths
    add_per_token_array(moved_prefix, "ref_logp", [np.zeros(n, np.float32) for n in lengths], {"model": "other"})
    bad = _overrides(moved_prefix, tmp, "killed", train_steps=steps + 2, **{"data.groups_per_batch": 4})
    proc = subprocess.run([sys.executable, "-m", "megatron_offgrpo.train", TINY_YAML, *bad], capture_output=True,
                          text=True, timeout=300)
    out = proc.stderr + proc.stdout
    assert proc.returncode != 0 and "data.groups_per_batch" in out and "data.content" in out, out[-3000:]


def test_all_positive_bias_changes_advantages_only_on_all_positive_groups(dataset):
    from megatron_offgrpo.data import TrajectoryDataset
    from megatron_offgrpo.losses import group_statistics
    from megatron_offgrpo.training.step import build_step_batch

    ds = TrajectoryDataset(dataset)
    groups = list(ds.groups().values())[:6]
    samples = [ds[i] for g in groups for i in g[:4]]
    adv = {}
    for b in (0.0, 0.5):
        cfg = load_config(None, [f"data.train_prefix={dataset}", f"loss.all_positive_bias={b}",
                                 "data.micro_batch_size=4", "data.seq_length=384"])
        adv[b] = torch.cat([mb.advantages for mb in build_step_batch(samples, cfg, 1, 0).microbatches])
    rewards = torch.tensor([s["reward"] for s in samples])
    all_pos = group_statistics(rewards, torch.tensor([s["group_id"] for s in samples])).all_positive
    assert all_pos.any() and (~all_pos).any()
    assert torch.equal(adv[0.5] - adv[0.0], 0.5 * all_pos.float())


@pytest.fixture(scope="module")
def contrast_dataset(tmp_path_factory):
    """Groups whose positive and negative responses use disjoint tokens, so the method's effect is measurable.

    (On the shipped sample, right and wrong rollouts share almost every token; a tiny model's per-token averages
    then move together.)
    """
    from megatron_offgrpo.data import TrajectoryDatasetWriter
    from megatron_offgrpo.data.writer import SequenceRecord

    prefix = str(tmp_path_factory.mktemp("contrast") / "contrast")
    rng = np.random.default_rng(0)
    with TrajectoryDatasetWriter(prefix, vocab_size=261) as writer:
        for g in range(16):
            prompt = [258, *rng.integers(97, 123, size=6)]  # <|im_start|> + a lowercase "problem"
            rollouts = []
            for i in range(8):
                positive = i % 2 == 0
                alphabet = (48, 58) if positive else (65, 75)  # digits vs capitals
                response = list(rng.integers(*alphabet, size=10)) + [256]
                rollouts.append(SequenceRecord(np.array(prompt + response), len(prompt), float(positive), i))
            writer.add_group({"problem_id": f"p{g}"}, rollouts)
        writer.commit()
    return prefix


@pytest.mark.parametrize("clip_eps", [None, 0.2])
def test_short_training_raises_positive_and_not_negative_trajectories(contrast_dataset, tmp_path, clip_eps):
    tmp = str(tmp_path)
    overrides = _overrides(contrast_dataset, tmp, "learn", train_steps=30, **{
        "optimizer.lr": 1e-3, "loss.kl_coef": 0.0, "loss.clip_eps": clip_eps, "data.groups_per_batch": 4,
        "data.group_size": 8, "data.seq_length": 32, "data.valid_prefix": contrast_dataset,
        "validation.interval": 30, "validation.batches": 4, "checkpoint.dir": None, "logging.plot": True})
    run_on_ranks(_train_worker, 1, overrides)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(os.path.join(tmp, "learn", "logs"))
    events.Reload()
    pos = [e.value for e in events.Scalars("valid/logprob_pos")]  # validation at step 0 and step 30
    neg = [e.value for e in events.Scalars("valid/logprob_neg")]
    assert len(pos) == 2 and len(neg) == 2
    assert pos[1] > pos[0] + 1.0, pos  # positive trajectories became much more likely
    if clip_eps is None:
        assert neg[1] < neg[0], neg  # no clip: negatives are pushed down
    else:
        # max(p, 1 - eps) blocks the push-down of negatives the model does not yet favour (p < 0.8): they must
        # not rise with the positives; only shared parameters move them at all.
        assert neg[1] - neg[0] < 0.25 * (pos[1] - pos[0]), (pos, neg)
    assert os.path.exists(os.path.join(tmp, "learn", "logs", "curves.png"))


def _score_worker(rank, world, overrides, prefix):
    from megatron_offgrpo.inference.scoring import score_dataset

    return score_dataset(load_config(TINY_YAML, overrides), prefix)


def test_precomputed_reference_is_the_initial_policy(init_checkpoint, tmp_path):
    """Scoring the data with the initial model gives ref_logp such that the first step's KL is exactly ~0.

    That pins the alignment (entry j is log p(token_j | tokens_<j)) against the trainer's own label shift: an
    off-by-one would give a large KL. The scores are also the same at TP=2.
    """
    from megatron_offgrpo.data import TrajectoryDataset, add_per_token_array

    prefix = _build_sample(str(tmp_path / "scored"))
    overrides = [f"model.load={init_checkpoint}", "model.transformer_impl=local", "data.micro_batch_size=16",
                 "data.seq_length=384", "data.pad_token_id=257"]
    (scores,) = run_on_ranks(_score_worker, 1, overrides, prefix)
    scores_tp2 = run_on_ranks(_score_worker, 2, overrides + ["parallel.tp=2"], prefix)[0]
    ds = TrajectoryDataset(prefix)
    assert sorted(scores) == list(range(len(ds))) == sorted(scores_tp2)
    for i in range(0, len(ds), 37):
        assert scores[i].shape == (len(ds[i]["tokens"]),) and scores[i][0] == 0.0
        assert np.allclose(scores[i], scores_tp2[i], rtol=1e-5, atol=1e-5)
        assert (scores[i][1:] < 0).all()
    add_per_token_array(prefix, "ref_logp", [scores[i] for i in range(len(ds))], {"model": "init"})
    (res,) = run_on_ranks(_train_worker, 1, _overrides(prefix, str(tmp_path), "kl0", **{
        "model.load": init_checkpoint, "loss.kl_coef": 0.1}))
    assert 0 <= res["history"][0]["kl"] < 1e-9, res["history"][0]["kl"]


def test_scores_are_the_same_in_every_layout(init_checkpoint, tmp_path):
    """Scoring runs on the step's own batch code and forward step: DP=2 with packing, CP=2, and PP=2 with packing
    (fixed-size packs, two microbatches per schedule) score every sequence as one rank does, in place (CP ranks'
    positions put back, packed rows unpacked)."""
    prefix = _build_sample(str(tmp_path / "scored"))
    base = [f"model.load={init_checkpoint}", "model.transformer_impl=local", "model.attention_backend=torch",
            "data.micro_batch_size=6", "data.seq_length=1536", "data.pad_token_id=257"]
    (expected,) = run_on_ranks(_score_worker, 1, base, prefix)
    for layout in (["parallel.cp=2"], ["data.packing=true"],
                   ["parallel.pp=2", "data.packing=true", "data.micro_batch_size=3"]):
        scores = run_on_ranks(_score_worker, 2, base + layout, prefix)[0]
        assert sorted(scores) == sorted(expected), layout
        for i in expected:
            assert scores[i].shape == expected[i].shape and scores[i][0] == 0.0, (layout, i)
            assert np.allclose(scores[i], expected[i], rtol=1e-5, atol=1e-5), (layout, i)


def test_a_run_ended_by_its_epochs_saves_its_final_weights(contrast_dataset, tmp_path):
    """data.num_epochs ends the run before train_steps: the last step is saved (16 groups / 4 per step = 4 steps)."""
    tmp = str(tmp_path)
    overrides = _overrides(contrast_dataset, tmp, "epochs", train_steps=100, **{
        "data.num_epochs": 1, "data.groups_per_batch": 4, "data.group_size": 8, "data.seq_length": 32,
        "loss.kl_coef": 0.0})
    (res,) = run_on_ranks(_train_worker, 1, overrides)
    assert [h["step"] for h in res["history"]] == [1, 2, 3, 4] and res["stopped_by"] == "completed"
    assert _latest(os.path.join(tmp, "epochs", "ckpt")) == "iter_0000004"
