"""The layouts a 30B MoE run needs, trained on CPU (real gloo processes), each against its reference layout.

* Qwen3-MoE (tiny: 4 experts, top-2) with expert parallelism EP=2 and with PP=2 gives the EP=1 step: loss,
  metrics, the router's load-balancing loss, every updated weight (read back at EP=1). The router gradient of one
  step equals the float64 ``transformers`` gradient of the policy loss plus the load-balancing term at its
  intended scale (the policy loss's ``dp x num_microbatches`` factor must not touch it).
* Packing with pipeline parallelism (each pack padded to data.seq_length tokens) gives the padded PP=1 step, as
  packing at PP=1 does; TP=2 x CP=2 (4 ranks) gives it too.

Expert tensor parallelism cannot train on CPU with Megatron-Core 0.16.1, so it is not tested here: with TP>1 the
MoE layer demands sequence parallelism ("During training, performance may degrade if MoE and tensor parallelism
are enabled without also enabling sequence parallelism"), which the local layer spec's norms refuse ("sequence
parallel not supported by torch LayerNorm"); expert TP > 1 at TP=1 all-gathers a different token count from each
rank, which gloo refuses ("ProcessGroupGloo::allgather: invalid tensor size").
"""

from __future__ import annotations

import os

import pytest
import torch

from megatron_offgrpo.config import load_config
from megatron_offgrpo.utils.distributed import run_on_ranks

from layouts_helpers import (
    TINY_MOE,
    build_moe_dataset,
    build_tiny_moe_hf,
    convert_worker,
    reference_router_grads,
    router_grad_worker,
    run_moe_layouts,
)
from test_train import dataset, init_checkpoint, run_layouts_and_compare  # noqa: F401  (fixtures used by name)
from train_helpers import TINY_YAML, read_jsonl
from train_helpers import train_overrides as _overrides

QWEN3_30B_A3B = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "models",
                             "Qwen3-30B-A3B", "config.json")
# A small model, no padding anywhere (see build_moe_dataset), two microbatches of one group each.
MOE_RUN = {"data.micro_batch_size": 4, "data.seq_length": 32}


@pytest.fixture(scope="module")
def moe_model(tmp_path_factory):
    """The tiny random Qwen3-MoE in HF format and converted to the Megatron checkpoint every MoE run loads."""
    root = tmp_path_factory.mktemp("moe")
    hf = build_tiny_moe_hf(str(root / "hf"))
    run_on_ranks(convert_worker, 1, hf, str(root / "mcore"))
    return {"hf": hf, "mcore": str(root / "mcore")}


@pytest.fixture(scope="module")
def moe_dataset(tmp_path_factory):
    return build_moe_dataset(str(tmp_path_factory.mktemp("moe_data") / "moe"))


def test_moe_step_is_the_same_under_expert_and_pipeline_parallelism(moe_dataset, moe_model, tmp_path):
    layouts = {
        "ep1": (1, {}),
        "ep2": (2, {"parallel.ep": 2}),  # 2 experts per rank; dense parameters data-parallel over the 2 ranks
        "pp2": (2, {"parallel.pp": 2}),  # one MoE layer per stage: the load-balancing loss is summed over stages
    }
    metrics = run_moe_layouts(moe_dataset, moe_model, str(tmp_path), layouts, "ep1", **MOE_RUN)
    # Switch load balancing: 1 when routing is uniform, at most E / k = 2 when it is concentrated.
    assert 0 < metrics["ep1"]["moe_aux_loss"] <= TINY_MOE["num_experts"] / TINY_MOE["num_experts_per_tok"]


# Rollout lengths with padding in every microbatch: padded to 32 without PP, to data.seq_length=40 with PP.
PADDED_LENGTHS = (20, 27, 23, 25)
PADDED_RUN = {"data.micro_batch_size": 4, "data.seq_length": 40, "model.attention_backend": "torch"}


@pytest.fixture(scope="module")
def padded_moe_dataset(tmp_path_factory):
    return build_moe_dataset(str(tmp_path_factory.mktemp("moe_padded") / "moe"), lengths=PADDED_LENGTHS)


def test_moe_padding_is_left_out_of_the_load_balancing_loss(padded_moe_dataset, moe_model, tmp_path):
    """Padding positions are not routed into the load-balancing statistics (Megatron's padding_mask): a
    microbatch padded to its longest sequence (32), to the pipeline's fixed 40, packed without padding, or split
    over EP gives the same step, load-balancing loss included. Counting the padding would change the loss with
    the amount of padding."""
    layouts = {
        "pad": (1, {}),
        "pp2": (2, {"parallel.pp": 2}),
        "packed": (1, {"data.packing": True}),
        "ep2": (2, {"parallel.ep": 2}),
    }
    run_moe_layouts(padded_moe_dataset, moe_model, str(tmp_path), layouts, "pad", **PADDED_RUN)


@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "padded"])
def test_router_gradient_is_the_policy_loss_plus_the_load_balancing_loss(moe_dataset, padded_moe_dataset, moe_model,
                                                                        tmp_path, padded):
    """One step's router gradients against float64 ``transformers``: the load-balancing loss enters at
    ``coeff x mean over microbatches`` (two microbatches here, so a factor of ``num_microbatches`` too many or
    too few shows), and the logged ``loss`` / ``moe_aux_loss`` are its two parts. With padded microbatches the
    reference's load-balancing loss is over the real tokens only."""
    coeff = TINY_MOE["router_aux_loss_coef"]  # model.moe_aux_loss_coeff left null: the model's own coefficient
    dataset, run = (padded_moe_dataset, PADDED_RUN) if padded else (moe_dataset, MOE_RUN)
    overrides = _overrides(dataset, str(tmp_path), "grad", **{
        "model.architecture": moe_model["hf"], "model.load": moe_model["mcore"], "optimizer.clip_grad": 0, **run})
    (res,) = run_on_ranks(router_grad_worker, 1, overrides)
    step = res["step"]
    assert len(step.microbatches) == 2
    loss_cfg = load_config(TINY_YAML, overrides).loss
    policy, balance, full, policy_only = reference_router_grads(
        moe_model["hf"], step, {"kind": loss_cfg.kind, "clip_eps": loss_cfg.clip_eps, "kl_coef": loss_cfg.kl_coef,
                                "agg": loss_cfg.agg}, coeff)
    assert res["metrics"]["loss"] == pytest.approx(policy, rel=1e-5)
    assert res["metrics"]["moe_aux_loss"] == pytest.approx(balance, rel=1e-5)
    for layer in range(TINY_MOE["num_hidden_layers"]):
        got = res["grads"][f"decoder.layers.{layer}.mlp.router.weight"].double()
        scale = float(full[layer].abs().max())
        assert float((got - full[layer]).abs().max()) <= 1e-5 * scale, layer
        # The load-balancing term is a large part of the router gradient: leaving it out, or scaling it by 2,
        # would fail the check above by far.
        assert float((full[layer] - policy_only[layer]).abs().max()) >= 0.2 * scale, layer


def test_packed_pipeline_and_tp_x_cp_steps_equal_the_padded_step(dataset, init_checkpoint, tmp_path):
    layouts = {
        "pad": (1, {}),
        "packed": (1, {"data.packing": True}),
        # Two microbatches of 4 sequences, each pack padded to data.seq_length tokens for the pipeline.
        "packed_pp2": (2, {"data.packing": True, "parallel.pp": 2, "data.micro_batch_size": 4}),
        "tp2_cp2": (4, {"parallel.tp": 2, "parallel.cp": 2}),
    }
    run_layouts_and_compare(dataset, init_checkpoint, str(tmp_path), layouts, "pad",
                            **{"model.attention_backend": "torch", "data.seq_length": 1536})
    for name in layouts:  # a dense model has no load-balancing loss: the metric is absent, not 0
        logged = read_jsonl(os.path.join(str(tmp_path), name, "logs", "metrics.jsonl"))[1]
        assert "loss" in logged and "moe_aux_loss" not in logged, name


def test_a_pipeline_pack_is_padded_to_seq_length_and_an_overfull_one_is_refused(dataset):
    from megatron_offgrpo.data import TrajectoryDataset
    from megatron_offgrpo.training.step import build_step_batch

    ds = TrajectoryDataset(dataset, per_token_arrays=["ref_logp"])
    samples = [ds[i] for i in range(4)]
    lengths = [s["tokens"].numel() for s in samples]
    packed = sum(-(-n // 4) * 4 for n in lengths)  # each sequence aligned to 2*cp = 4
    seq_length = -(-(packed + 40) // 8) * 8
    cfg = load_config(None, [f"data.train_prefix={dataset}", "data.packing=true", "parallel.pp=2",
                             f"data.seq_length={seq_length}", "data.micro_batch_size=4", "data.pad_token_id=257"])
    response_tokens = torch.zeros(len(samples))
    for cp_rank in (0, 1):
        (mb,) = build_step_batch(samples, cfg, cp_size=2, cp_rank=cp_rank, reduce=False).microbatches
        assert mb.tokens.shape == (1, seq_length // 2)  # every pack has the pipeline's fixed shape
        # The filler is one more sequence (of pads only), from the end of the aligned pack to seq_length.
        aligned = torch.tensor([0] + [-(-n // 4) * 4 for n in lengths]).cumsum(0).tolist()
        assert mb.packed_seq["cu_seqlens_padded"].tolist() == aligned + [seq_length]
        assert mb.packed_seq["cu_seqlens"].tolist() == torch.tensor([0] + lengths).cumsum(0).tolist() + [seq_length]
        spans = [b - a for a, b in zip(aligned[:-1], aligned[1:])] + [seq_length - aligned[-1]]
        assert mb.packed_seq["max_seqlen"] == max(spans)
        response_tokens += mb.loss_mask.sum(dim=1)
    # The filler never enters the loss.
    assert response_tokens.tolist() == [float(s["tokens"].numel() - s["prompt_len"]) for s in samples]
    # PP=1 (no fixed shape): the pack holds just its sequences.
    cfg1 = load_config(None, [f"data.train_prefix={dataset}", "data.packing=true", f"data.seq_length={seq_length}",
                              "data.micro_batch_size=4"])
    (mb1,) = build_step_batch(samples, cfg1, cp_size=1, cp_rank=0, reduce=False).microbatches
    assert mb1.tokens.shape == (1, sum(lengths))

    small = -(-max(lengths) // 8) * 8  # every sequence fits, the pack of four does not
    cfg_small = load_config(None, [f"data.train_prefix={dataset}", "data.packing=true", "parallel.pp=2",
                                   f"data.seq_length={small}", "data.micro_batch_size=4"])
    with pytest.raises(ValueError, match=rf"needs {sum(lengths)} tokens > data.seq_length={small}.*raise "
                                         rf"data.seq_length to at least {sum(lengths)} or lower data.micro_batch_size"):
        build_step_batch(samples, cfg_small, cp_size=1, cp_rank=0, reduce=False)


def test_sequence_parallel_pads_each_cp_rank_to_a_multiple_of_tp(dataset):
    """TP=4 x CP=2 with sequence parallelism: every CP rank's part of a padded microbatch splits over TP (the
    sequence is padded to a multiple of lcm(2 cp, cp x tp) = 8, not just 2 cp = 4), for every sequence length."""
    from megatron_offgrpo.data import TrajectoryDataset
    from megatron_offgrpo.training.step import build_step_batch

    ds = TrajectoryDataset(dataset, per_token_arrays=["ref_logp"])
    cfg = load_config(None, [f"data.train_prefix={dataset}", "parallel.tp=4", "parallel.cp=2",
                             "parallel.sequence_parallel=true", "data.micro_batch_size=1", "data.seq_length=1536"])
    lengths = [ds[i]["tokens"].numel() for i in range(len(ds))]
    assert any((-(-n // 4) * 4 // 2) % 4 for n in lengths)  # 2 cp alone would leave some local lengths unsplittable
    for i in range(len(ds)):
        for cp_rank in (0, 1):
            (mb,) = build_step_batch([ds[i]], cfg, cp_size=2, cp_rank=cp_rank, reduce=False).microbatches
            assert mb.tokens.shape[1] % 4 == 0 and mb.tokens.shape[1] * 2 >= lengths[i], (i, mb.tokens.shape)


def test_moe_settings_are_validated_before_the_run():
    from megatron_offgrpo.config.loader import ConfigError, validate_config
    from megatron_offgrpo.models import model_config_from_hf, tiny_architecture
    from megatron_offgrpo.training.setup import moe_aux_loss_coeff

    def problems(*overrides, world_size=None):
        cfg = load_config(None, ["data.train_prefix=unused", *overrides])
        try:
            validate_config(cfg, world_size=world_size, check_files=False)
        except ConfigError as e:
            return "\n".join(e.problems)
        return ""

    moe = f"model.architecture={QWEN3_30B_A3B}"
    assert "model.moe_aux_loss_coeff=0.01 weighs the router loss of a MoE model" in problems(
        "model.moe_aux_loss_coeff=0.01")  # the tiny model is dense
    assert "model.moe_aux_loss_coeff=-0.1 must be >= 0" in problems(moe, "model.moe_aux_loss_coeff=-0.1")
    assert "needs parallel.sequence_parallel=true" in problems(moe, "parallel.tp=2", "data.seq_length=64",
                                                               world_size=2)
    assert problems(moe, "parallel.ep=8", "model.moe_aux_loss_coeff=0", "data.groups_per_batch=8",
                    world_size=8) == ""
    assert problems("data.packing=true", "parallel.pp=2", "model.attention_backend=torch", world_size=2) == ""

    # The coefficient: the model's own router_aux_loss_coef unless set; none for a dense model.
    arch = model_config_from_hf(QWEN3_30B_A3B)
    assert moe_aux_loss_coeff(load_config(None, [moe]), arch) == 0.001
    assert moe_aux_loss_coeff(load_config(None, [moe, "model.moe_aux_loss_coeff=0.02"]), arch) == 0.02
    assert moe_aux_loss_coeff(load_config(None, []), tiny_architecture()) == 0.0
