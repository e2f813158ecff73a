"""Config loading (YAML + overrides + interpolation) and validation: each bad config is rejected with its message."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from megatron_offgrpo.config import ConfigError, load_config, validate_config


@pytest.fixture()
def fake_dataset(tmp_path):
    """A dataset prefix whose files exist (validation only reads the manifest)."""
    prefix = tmp_path / "ds"
    for suffix in (".bin", ".idx"):
        (tmp_path / f"ds{suffix}").write_bytes(b"")
    (tmp_path / "ds.json").write_text(json.dumps({"per_token_arrays": {"ref_logp": {}}}))
    return str(prefix)


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


def test_missing_dataset_and_missing_ref_logp(tmp_path, fake_dataset):
    cfg = load_config(None, [f"data.train_prefix={tmp_path}/nope"])
    assert "build it with tools/preprocess/build_dataset.py" in _problems(cfg)
    (tmp_path / "ds.json").write_text(json.dumps({"per_token_arrays": {}}))
    cfg = load_config(None, [f"data.train_prefix={fake_dataset}", "loss.kl_coef=0.1"])
    assert "needs the per-token array 'ref_logp'" in _problems(cfg)
    cfg = load_config(None, [f"data.train_prefix={fake_dataset}", "loss.kl_coef=0"])
    validate_config(cfg, world_size=1)


def test_all_problems_are_reported_at_once(fake_dataset):
    cfg = load_config(None, [f"data.train_prefix={fake_dataset}", "parallel.pp=3", "loss.kind=ppo", "train_steps=0"])
    problems = _problems(cfg, 3)
    assert "num_layers" in problems and "ppo" in problems and "train_steps" in problems


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
