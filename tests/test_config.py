"""Config loading (YAML + overrides + interpolation) and validation: each bad config is rejected with its message."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from megatron_offgrpo.config import ConfigError, load_config, validate_config


def _write_dataset(prefix, arrays=("ref_logp",)):
    import numpy as np

    from megatron_offgrpo.data import SequenceRecord, TrajectoryDatasetWriter

    with TrajectoryDatasetWriter(prefix, vocab_size=261, per_token_arrays=arrays) as w:
        seqs = [SequenceRecord(np.arange(1, 9), prompt_len=3, reward=float(r), rollout_index=r,
                               per_token={a: np.zeros(8, np.float32) for a in arrays}) for r in (0, 1)]
        w.add_group({"problem_id": "p0"}, seqs)
        w.commit()
    return prefix


@pytest.fixture()
def fake_dataset(tmp_path):
    """A real (tiny) dataset with a ref_logp array: validation verifies the files against the manifest."""
    return _write_dataset(str(tmp_path / "ds"))


def _problems(cfg, world_size=1):
    with pytest.raises(ConfigError) as e:
        validate_config(cfg, world_size=world_size)
    return "\n".join(e.value.problems)


def test_yaml_overrides_and_interpolation(tmp_path, fake_dataset):
    path = tmp_path / "c.yaml"
    path.write_text(
        "name: run\ntrain_steps: 7\ndata:\n  train_prefix: " + fake_dataset + "\n  seq_length: 128\n"
        "loss:\n  max_response_len: ${data.seq_length}\n"
    )
    cfg = load_config(str(path), ["optimizer.lr=2e-6", "parallel.tp=2", "loss.kind=sft"])
    assert cfg.train_steps == 7 and cfg.optimizer.lr == 2e-6 and cfg.parallel.tp == 2 and cfg.loss.kind == "sft"
    assert cfg.loss.max_response_len == 128
    validate_config(cfg, world_size=2)


def test_unknown_key_wrong_type_and_bad_override_are_named(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("optimizer:\n  learning_rate: 1e-6\n")
    with pytest.raises(ConfigError, match="learning_rate"):
        load_config(str(path))
    with pytest.raises(ConfigError, match="train_steps"):
        load_config(None, ["train_steps=many"])
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, ["optimizer.lr"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(str(tmp_path / "missing.yaml"))


@pytest.mark.parametrize(
    "overrides,world,message",
    [
        (["parallel.tp=4"], 4, "must divide the attention heads"),  # tiny model: 4 heads, 2 KV groups
        (["parallel.pp=3"], 3, "must divide num_layers"),
        (["parallel.cp=2", "data.seq_length=130"], 2, "divisible by 2\\*cp=4"),
        (["parallel.cp=2", "model.attention_backend=local"], 2, "refuses context parallelism.*attention_backend=torch"),
        (["data.packing=true", "model.attention_backend=local"], 1, "data.packing with model.attention_backend=local"),
        (["model.attention_backend=flash"], 1, "model.attention_backend='flash' is not one of"),
        (["data.groups_per_batch=3"], 2, "groups_per_batch=3 must be divisible by the data-parallel size 2"),
        (["data.micro_batch_size=3"], 1, "must be divisible by dp x micro_batch_size"),
        (["loss.kind=ppo"], 1, "loss.kind='ppo' is not one of"),
        (["loss.agg=seq-mean-token-sum-norm"], 1, "needs loss.max_response_len"),
        (["loss.kind=opd", "loss.kl_coef=0"], 1, "needs the per-token array 'teacher_logp'"),
        (["loss.kind=grpo"], 1, "needs the per-token array 'old_logp'"),
        (["parallel.tp=4", "parallel.cp=2", "parallel.sequence_parallel=true", "data.seq_length=132",
          "model.attention_backend=torch"], 8, "divisible by cp x tp=8 with sequence_parallel.*round it up to 136"),
        (["loss.fused_output_gradients=later"], 1, "loss.fused_output_gradients='later' is not one of"),
        (["parallel.ep=2"], 2, "needs a MoE model"),
        (["parallel.vpp=2"], 1, "needs parallel.pp > 1"),
        (["parallel.tp=2"], 3, "world size 3 is not divisible by tp\\*pp\\*cp = 2"),
        (["model.fp8=e4m3", "model.transformer_impl=local"], 1, "model.fp8 needs Transformer Engine"),
        (["model.load=/nonexistent"], 1, "model.load='/nonexistent' is not a directory"),
        (["optimizer.lr_schedule=step"], 1, "optimizer.lr_schedule='step' is not one of"),
    ],
)
def test_each_bad_config_is_rejected_with_its_message(fake_dataset, overrides, world, message):
    cfg = load_config(None, [f"data.train_prefix={fake_dataset}", *overrides])
    problems = _problems(cfg, world)
    assert re.search(message, problems), problems


def test_missing_dataset_and_missing_ref_logp(tmp_path):
    cfg = load_config(None, [f"data.train_prefix={tmp_path}/nope"])
    assert "build it with tools/preprocess/build_dataset.py" in _problems(cfg)
    no_ref = _write_dataset(str(tmp_path / "noref"), arrays=())
    cfg = load_config(None, [f"data.train_prefix={no_ref}", "loss.kl_coef=0.1"])
    assert "needs the per-token array 'ref_logp'" in _problems(cfg)
    cfg = load_config(None, [f"data.train_prefix={no_ref}", "loss.kl_coef=0"])
    validate_config(cfg, world_size=1)
    cfg = load_config(None, [f"data.train_prefix={no_ref}", "loss.reference=none"])
    assert "loss.reference=none but loss.kl_coef=0.1" in _problems(cfg)
    cfg = load_config(None, ["loss.kl_coef=0"])
    assert "data.train_prefix is required" in _problems(cfg)


def test_all_problems_are_reported_at_once(fake_dataset):
    cfg = load_config(None, [f"data.train_prefix={fake_dataset}", "parallel.pp=3", "loss.kind=ppo", "train_steps=0"])
    problems = _problems(cfg, 3)
    assert "num_layers" in problems and "ppo" in problems and "train_steps" in problems


@pytest.mark.parametrize(
    "override,message",
    [
        ("optimizer.lr=-1", r"optimizer.lr=-1.0 must be > 0"),
        ("optimizer.lr=0", r"optimizer.lr=0.0 must be > 0"),
        ("optimizer.lr=.nan", r"optimizer.lr=nan must be > 0"),
        ("loss.clip_eps=-0.2", r"loss.clip_eps=-0.2 must be > 0 and < 1"),
        ("loss.clip_eps=1.5", r"loss.clip_eps=1.5 must be > 0 and < 1"),
        ("loss.kl_coef=-0.1", r"loss.kl_coef=-0.1 must be >= 0"),
        ("optimizer.clip_grad=-1", r"optimizer.clip_grad=-1.0 must be >= 0"),
        ("optimizer.warmup_steps=-5", r"optimizer.warmup_steps=-5 must be >= 0"),
        ("optimizer.adam_beta2=1.0", r"optimizer.adam_beta2=1.0 must be >= 0 and < 1"),
        ("optimizer.min_lr=1", r"optimizer.min_lr=1.0 must be <= optimizer.lr"),
        ("optimizer.max_consecutive_skips=0", r"max_consecutive_skips=0 must be >= 1"),
        ("optimizer.on_nonfinite=ignore", r"on_nonfinite='ignore' is not one of"),
        ("data.seq_length=0", r"data.seq_length=0 must be >= 2"),
        ("data.pad_token_id=999", r"data.pad_token_id=999 is not a token of the vocabulary \(size 261\)"),
        ("checkpoint.exit_after_seconds=-1", r"exit_after_seconds=-1.0 must be > 0"),
        ("validation.batches=0", r"validation.batches=0 must be >= 1"),
        ("loss.all_positive_bias=.inf", r"loss.all_positive_bias=inf must be finite"),
    ],
)
def test_every_numeric_field_is_range_checked(fake_dataset, override, message):
    cfg = load_config(None, [f"data.train_prefix={fake_dataset}", override])
    assert re.search(message, _problems(cfg)), _problems(cfg)


def test_unknown_keys_type_and_range_errors_are_reported_together(tmp_path, fake_dataset):
    """One typo must not hide the next: every kind of problem of one config comes back in one error."""
    from megatron_offgrpo.config import load_and_validate_config

    path = tmp_path / "c.yaml"
    path.write_text(f"data:\n  train_prefix: {fake_dataset}\n  seq_lenght: 256\noptimizer:\n  learning_rate: 1\n")
    with pytest.raises(ConfigError) as e:
        load_and_validate_config(str(path), ["train_steps=many", "optimizer.lr=-1", "loss.clip_eps=-0.2",
                                             "model=3"], world_size=1)
    text = "\n".join(e.value.problems)
    for expected in ("data.seq_lenght: unknown key; did you mean data.seq_length?", "optimizer.learning_rate: unknown",
                     "train_steps='many': wrong type, expected int", "model: must be a section",
                     "optimizer.lr=-1.0 must be > 0", "loss.clip_eps=-0.2 must be"):
        assert expected in text, text
    assert len(e.value.problems) == 6, text


def test_cli_print_config_and_validation_exit_codes(tmp_path, fake_dataset):
    run = lambda *a: subprocess.run([sys.executable, "-m", "megatron_offgrpo.train", *a],  # noqa: E731
                                    capture_output=True, text=True, timeout=120)
    path = tmp_path / "c.yaml"
    path.write_text(f"data:\n  train_prefix: {fake_dataset}\n")
    out = run(str(path), "optimizer.lr=5e-7", "--print-config")
    assert out.returncode == 0 and "lr: 5.0e-07" in out.stdout
    out = run(str(path), "--validate-only")
    assert out.returncode == 0 and "config OK" in out.stdout
    out = run(str(path), "parallel.pp=3")
    assert out.returncode == 2 and "must divide num_layers" in out.stderr
    out = run(str(path), "optimizer.lr=-1", "optimizer.lr_decay=3", "--validate-only")
    assert out.returncode == 2 and "optimizer.lr=-1.0 must be > 0" in out.stderr and "lr_decay" in out.stderr
    assert "Traceback" not in out.stderr
