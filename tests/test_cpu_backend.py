"""The CPU (gloo) backend runs Megatron-Core's TP / PP / DP machinery, and gives the single-rank answer.

Every multi-rank check runs real processes over gloo. The oracle for TP/PP/DP is the same model run on one
rank (itself checked against a float64 dense reference of the log-probs).
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import torch

from loss_reference import ref_logprobs
from mcore_models import SEQ, VOCAB, build_tiny_gpt, global_layer_key, pipeline_stage_state_dict
from megatron_offgrpo.utils.distributed import run_on_ranks

BATCH = 4
CLIP_GRAD = 1e-3  # below the step's grad norm, so that clipping (and hence the global norm) matters


def _batch():
    g = torch.Generator().manual_seed(11)
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)
    labels = torch.roll(tokens, -1, dims=1)
    mask = torch.zeros(BATCH, SEQ)
    for b in range(BATCH):
        mask[b, 3 + b : SEQ - 1] = 1  # prompt, response, one padding position
    advantages = torch.tensor([1.0, -0.5, 0.5, -1.0])
    return tokens, labels, mask, advantages


def _loss(logits, labels, mask, adv):
    from megatron_offgrpo.losses import policy_loss, vocab_parallel_logprobs

    lp = vocab_parallel_logprobs(logits, labels)  # Megatron's TP group, found through parallel_state
    loss, _ = policy_loss(lp, mask, adv, kind="offline_grpo")
    return loss, lp


# ------------------------------------------------------------------------------------------- inertness


def test_backend_is_inert_when_cuda_is_available():
    code = textwrap.dedent(
        """
        import torch
        torch.cuda.is_available = lambda: True  # what a GPU machine reports
        original = torch.cuda.current_device
        from megatron_offgrpo.utils import cpu_backend
        assert cpu_backend.enable_cpu_backend() is False
        assert cpu_backend.is_cpu_backend_enabled() is False
        assert torch.cuda.current_device is original
        assert not torch.overrides._get_current_function_mode_stack()  # no mode pushed
        print("inert")
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "inert" in out.stdout, out.stderr


def test_backend_redirects_cuda_allocations_on_cpu():
    code = textwrap.dedent(
        """
        import torch
        from megatron_offgrpo.utils.cpu_backend import enable_cpu_backend
        assert enable_cpu_backend() is True and enable_cpu_backend() is True
        a = torch.zeros(3, device="cuda")
        b = torch.empty(2, device=torch.cuda.current_device())
        c = torch.ones(2).cuda()
        d = torch.ones(2).to("cuda:0")
        assert all(t.device.type == "cpu" for t in (a, b, c, d))
        assert torch.ones(1).type() == "torch.cuda.FloatTensor"
        print("redirected")
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "redirected" in out.stdout, out.stderr


# ------------------------------------------------------------------------------------------- TP


def _tp_worker(rank, world, tp):
    from megatron.core import tensor_parallel
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    from megatron_offgrpo.utils.cpu_backend import initialize_cpu_model_parallel

    initialize_cpu_model_parallel(tensor_model_parallel_size=tp, seed=5)
    # The RNG tracker forks a per-TP-rank stream and restores the default one afterwards.
    before = torch.get_rng_state()
    with get_cuda_rng_tracker().fork():
        forked = torch.rand(4)
    assert torch.equal(torch.get_rng_state(), before)
    default = torch.rand(4)

    model = build_tiny_gpt()
    tokens, labels, mask, adv = _batch()
    position_ids = torch.arange(SEQ).expand(BATCH, SEQ)
    logits = model(tokens, position_ids, None)
    loss, lp = _loss(logits, labels, mask, adv)
    loss.backward()
    full_logits = tensor_parallel.gather_from_tensor_model_parallel_region(logits.detach())
    emb_grad = model.embedding.word_embeddings.weight.grad  # vocab-sharded along dim 0
    return dict(
        logits=full_logits,
        logprobs=lp.detach(),
        loss=loss.item(),
        norm_grad=model.decoder.final_layernorm.weight.grad.clone(),
        emb_grad=emb_grad.clone(),
        forked=forked,
        default=default,
    )


def test_tp2_gpt_model_matches_tp1_and_the_float64_logprobs():
    (single,) = run_on_ranks(_tp_worker, 1, 1)
    pair = run_on_ranks(_tp_worker, 2, 2)
    _, labels, _, _ = _batch()
    expected_lp = ref_logprobs(single["logits"], labels)
    assert torch.allclose(single["logprobs"].double(), expected_lp, rtol=1e-5, atol=1e-6)
    for r in pair:
        assert torch.allclose(r["logits"], single["logits"], rtol=1e-5, atol=1e-5)
        assert torch.allclose(r["logprobs"], single["logprobs"], rtol=1e-5, atol=1e-5)
        assert abs(r["loss"] - single["loss"]) <= 1e-5 * abs(single["loss"])
        assert torch.allclose(r["norm_grad"], single["norm_grad"], rtol=1e-4, atol=1e-7)
    emb = torch.cat([pair[0]["emb_grad"], pair[1]["emb_grad"]], dim=0)
    assert torch.allclose(emb, single["emb_grad"], rtol=1e-4, atol=1e-7)
    # Model-parallel randomness differs per TP rank; the default stream is shared.
    assert not torch.equal(pair[0]["forked"], pair[1]["forked"])
    assert torch.equal(pair[0]["default"], pair[1]["default"])


# ------------------------------------------------------------------------------------------- PP x DP


def _tensors(model):
    """The model's state as plain tensors (Megatron adds ``_extra_state`` entries that are not tensors)."""
    return {k: v.detach().clone() for k, v in model.state_dict().items() if torch.is_tensor(v)}


def _train_worker(rank, world, pp, reference_state):
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_offgrpo.utils.cpu_backend import initialize_cpu_model_parallel

    initialize_cpu_model_parallel(pipeline_model_parallel_size=pp, seed=5)
    model = build_tiny_gpt()
    stage, dp_rank, dp = ps.get_pipeline_model_parallel_rank(), ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
    if reference_state is not None:
        result = model.load_state_dict(pipeline_stage_state_dict(reference_state, stage, pp), strict=False)
        assert not result.unexpected_keys and all(k.endswith("_extra_state") for k in result.missing_keys), result
    initial = _tensors(model)
    distributed_optimizer = dp > 1
    ddp = DistributedDataParallel(
        config=model.config,
        ddp_config=DistributedDataParallelConfig(grad_reduce_in_fp32=True, use_distributed_optimizer=distributed_optimizer),
        module=model,
    )
    optimizer = get_megatron_optimizer(
        OptimizerConfig(optimizer="adam", lr=1e-2, adam_eps=1e-6, clip_grad=CLIP_GRAD, use_distributed_optimizer=distributed_optimizer), [ddp]
    )
    # Without this hook the schedule never reduces the grads over DP (Megatron-LM's training loop sets it).
    model.config.finalize_model_grads_func = finalize_model_grads
    tokens, labels, mask, adv = _batch()
    # The global batch is 2 microbatches of 2 sequences; with DP=2 each rank runs one of them.
    micro = [slice(0, 2), slice(2, 4)]
    if dp > 1:
        micro = [micro[dp_rank]]
    data = iter(micro)

    def forward_step(data_iterator, chunk):
        rows = next(data_iterator)
        out = chunk(tokens[rows], torch.arange(SEQ).expand(2, SEQ), None)

        def loss_func(logits):
            loss, _ = _loss(logits, labels[rows], mask[rows], adv[rows])
            return loss, {"loss": loss.detach().clone()}  # clone: the schedule scales `loss` in place

        return out, loss_func

    ddp.zero_grad_buffer()
    optimizer.zero_grad()
    losses = get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=data, model=[ddp], num_microbatches=len(micro),
        seq_length=SEQ, micro_batch_size=2, forward_only=False,
    )
    ok, grad_norm, _ = optimizer.step()
    assert ok
    updated = {global_layer_key(k, stage, pp): v for k, v in _tensors(model).items()}
    return dict(initial=initial, updated=updated, losses=[x["loss"].item() for x in losses], grad_norm=grad_norm,
                last_stage=ps.is_pipeline_last_stage(), dp_rank=dp_rank)


def test_pp2_dp2_distributed_optimizer_step_matches_single_rank():
    (single,) = run_on_ranks(_train_worker, 1, 1, None)
    assert single["grad_norm"] > CLIP_GRAD  # clipping is active, so the global norm matters
    ranks = run_on_ranks(_train_worker, 4, 2, single["initial"])
    last = [r for r in ranks if r["last_stage"]]
    assert sorted(r["dp_rank"] for r in last) == [0, 1]
    for r in last:  # each DP rank's last stage saw one microbatch of the reference
        assert abs(r["losses"][0] - single["losses"][r["dp_rank"]]) <= 1e-5 * abs(single["losses"][r["dp_rank"]])
    for r in ranks:
        assert abs(r["grad_norm"] - single["grad_norm"]) <= 1e-5 * single["grad_norm"]
        for key, value in r["updated"].items():
            moved = (single["updated"][key] - single["initial"][key]).abs().max()
            assert moved > 0 or "bias" in key, key  # the step really changed this tensor
            assert torch.allclose(value, single["updated"][key], rtol=1e-5, atol=1e-6), key
    covered = set().union(*(r["updated"].keys() for r in ranks))
    assert covered == set(single["updated"].keys())
