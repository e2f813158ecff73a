"""Megatron's vocabulary padding never enters the numbers: end to end against float64 ``transformers``.

A tiny Qwen2 with a 600-token vocabulary is converted with ``--tp 1``, ``2`` and ``4`` (embedding padded to 640, 768
and 1024 rows). One offline GRPO step from each conversion must give the same loss and the same updated real
weights (fp32, 1e-6), leave the padded rows exactly as converted (zero), and its loss must equal the loss computed
independently in float64 by the unpadded HF model (``log_softmax`` over its 600 columns) and the float64
reference loss of ``tests/loss_reference.py``. Before the fix the three conversions gave three different losses.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from loss_reference import ref_group_advantages, ref_policy_loss
from megatron_offgrpo.utils.distributed import run_on_ranks
from train_helpers import TINY_YAML

VOCAB = 600
TPS = (1, 2, 4)
GROUPS = [[1.0, 1.0, 1.0, 1.0], [1.0, 0.0, 0.0, 1.0]]  # one all-positive group (bias b applies), one mixed
KL_COEF, CLIP_EPS, BIAS = 0.1, 0.2, 0.5


def _hf_model(path, tied):
    import transformers

    config = transformers.Qwen2Config(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=128, tie_word_embeddings=tied, rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6}, attn_implementation="eager")
    model = transformers.Qwen2ForCausalLM(config).eval()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():  # every weight random, norms and biases included
            p.copy_((1.0 if "norm" in name else 0.0) + (0.2 if p.dim() == 1 else 0.1) * torch.randn(p.shape, generator=g))
    model.save_pretrained(path)
    return model


def _dataset(prefix):
    """Two groups of four trajectories over the whole vocabulary (the last real id 599 included)."""
    from megatron_offgrpo.data import SequenceRecord, TrajectoryDatasetWriter

    rng = np.random.default_rng(5)
    with TrajectoryDatasetWriter(prefix, vocab_size=VOCAB, per_token_arrays=("ref_logp",)) as writer:
        for g, rewards in enumerate(GROUPS):
            prompt = list(rng.integers(0, VOCAB, size=5))
            seqs = []
            for i, r in enumerate(rewards):
                response = list(rng.integers(0, VOCAB, size=6 + 3 * i)) + [VOCAB - 1]
                tokens = np.array(prompt + response)
                ref = np.concatenate([[0.0], -6.0 - rng.random(len(tokens) - 1)]).astype(np.float32)
                seqs.append(SequenceRecord(tokens, len(prompt), r, i, per_token={"ref_logp": ref}))
            writer.add_group({"problem_id": f"p{g}"}, seqs)
        writer.commit()
    return prefix


def _convert_worker(rank, world, hf_dir, out_dir, tp):
    from megatron_offgrpo.models.converter import convert_hf_to_mcore

    return convert_hf_to_mcore(hf_dir, out_dir, tp=tp, progress=False)["padded_vocab_size"]


def _train_worker(rank, world, overrides):
    from megatron_offgrpo.config import load_config
    from megatron_offgrpo.training.trainer import train

    result = train(load_config(TINY_YAML, overrides))
    return {"loss": result.history[0]["loss"], "checkpoint": result.checkpoint}


def _model_tensors(ckpt, tmp):
    """The model tensors of a training checkpoint, read with torch's own DCP converter (not our loader)."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    out = os.path.join(tmp, os.path.basename(os.path.dirname(os.path.dirname(ckpt))) + ".pt")
    dcp_to_torch_save(ckpt, out)
    state = torch.load(out, weights_only=False)
    return {k: v for k, v in state.items() if torch.is_tensor(v) and not k.startswith("optimizer")}


def _float64_loss(hf, prefix):
    """The step's loss computed from scratch: float64 HF logits over the real vocabulary, float64 reference loss."""
    from megatron_offgrpo.data import TrajectoryDataset

    ds = TrajectoryDataset(prefix)
    items = [ds[i] for i in range(len(ds))]
    hf = hf.double()
    T = max(len(it["tokens"]) for it in items)
    logp = torch.zeros(len(items), T, dtype=torch.float64)
    ref = torch.zeros(len(items), T, dtype=torch.float64)
    mask = torch.zeros(len(items), T)
    with torch.no_grad():
        for b, it in enumerate(items):
            tokens = it["tokens"]
            logits = hf(tokens[None]).logits[0]  # [n, 600]: no padding exists here
            lp = torch.log_softmax(logits, dim=-1)[:-1].gather(-1, tokens[1:, None])[:, 0]
            n = len(tokens)
            logp[b, : n - 1] = lp  # position j predicts token j + 1
            ref[b, : n - 1] = it["ref_logp"][1:].double()
            mask[b, it["prompt_len"] - 1 : n - 1] = 1  # the response tokens are the targets that count
    rewards = [it["reward"] for it in items]
    adv = torch.tensor(ref_group_advantages(rewards, [it["group_id"] for it in items], BIAS, "sample"))
    return ref_policy_loss(logp, mask, adv, "offline_grpo", ref=ref, clip_eps=CLIP_EPS, kl_coef=KL_COEF).item()


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_loss_and_update_do_not_depend_on_the_conversion_padding_and_match_float64_hf(tmp_path, tied):
    tmp = str(tmp_path)
    hf_dir = os.path.join(tmp, "hf")
    hf = _hf_model(hf_dir, tied)
    prefix = _dataset(os.path.join(tmp, "data", "ds"))
    results, padded = {}, {}
    for tp in TPS:
        ckpt = os.path.join(tmp, f"mcore_tp{tp}")
        (padded[tp],) = run_on_ranks(_convert_worker, 1, hf_dir, ckpt, tp)
        overrides = [
            f"name=tp{tp}", "train_steps=1", f"model.architecture={hf_dir}", f"model.load={ckpt}",
            "model.transformer_impl=local", f"data.train_prefix={prefix}", "data.groups_per_batch=2",
            "data.group_size=4", "data.micro_batch_size=8", "data.seq_length=32", "data.pad_token_id=0",
            f"loss.kl_coef={KL_COEF}", f"loss.clip_eps={CLIP_EPS}", f"loss.all_positive_bias={BIAS}",
            "optimizer.lr=1e-3", "optimizer.warmup_steps=0", "optimizer.adam_eps=1e-3",
            f"checkpoint.dir={tmp}/run_tp{tp}/ckpt", "logging.progress_bar=false", "logging.plot=false",
        ]
        (results[tp],) = run_on_ranks(_train_worker, 1, overrides)
    assert padded == {1: 640, 2: 768, 4: 1024}

    expected = _float64_loss(hf, prefix)
    for tp in TPS:
        assert abs(results[tp]["loss"] - expected) <= 2e-6 * max(1.0, abs(expected)), (tp, results[tp]["loss"], expected)
        assert abs(results[tp]["loss"] - results[1]["loss"]) <= 1e-6 * max(1.0, abs(expected))

    weights = {tp: _model_tensors(results[tp]["checkpoint"], tmp) for tp in TPS}
    vocab_rows = ("embedding.word_embeddings.weight", "output_layer.weight")
    for tp in TPS:
        w = weights[tp]
        assert w.keys() == weights[1].keys()
        for name, tensor in w.items():
            real = tensor[:VOCAB] if name in vocab_rows else tensor
            assert torch.allclose(real, weights[1][name][: len(real)], rtol=1e-6, atol=1e-6), (tp, name)
            if name in vocab_rows:
                assert tensor.shape[0] == padded[tp]
                assert torch.equal(tensor[VOCAB:], torch.zeros_like(tensor[VOCAB:])), (tp, name)  # never trained
    output = "embedding.word_embeddings.weight" if tied else "output_layer.weight"
    assert not torch.equal(weights[1][output][:VOCAB], hf.lm_head.weight.float())  # it did train
