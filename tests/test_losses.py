"""Single-process tests of the loss core against the float64 dense reference in ``loss_reference``."""

from __future__ import annotations

import itertools

import pytest
import torch

from megatron_offgrpo.losses import (
    LOSS_AGGREGATIONS,
    group_advantages,
    group_statistics,
    opd_advantages,
    policy_loss,
    vocab_parallel_logprobs,
)
from loss_reference import ref_group_advantages, ref_logprobs, ref_policy_loss

RTOL = 1e-5


def assert_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float = RTOL, atol: float = 1e-7) -> None:
    actual, expected = actual.double(), expected.double()
    err = (actual - expected).abs()
    bound = atol + rtol * expected.abs().max().clamp(min=1e-30)
    assert torch.all(err <= bound), f"max abs err {err.max().item():.3e} > {bound.item():.3e}"


def _batch(B=5, T=7, V=13, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, T, V, generator=g) * scale
    targets = torch.randint(0, V, (B, T), generator=g)
    mask = torch.zeros(B, T)
    for b in range(B):  # prompt of 1-3 tokens, then a response, then padding
        start = 1 + b % 3
        end = T - (b % 2)
        mask[b, start:end] = 1
    return logits, targets, mask


# ---------------------------------------------------------------------------------------------- log-probs


@pytest.mark.parametrize("chunk_size", [None, 1, 4, 1000])
def test_logprobs_value_and_grad_match_float64(chunk_size):
    logits, targets, _ = _batch()
    x = logits.clone().requires_grad_(True)
    lp = vocab_parallel_logprobs(x, targets, chunk_size=chunk_size)
    assert lp.dtype == torch.float32 and lp.shape == targets.shape
    x64 = logits.double().requires_grad_(True)
    ref = ref_logprobs(x64, targets)
    assert_close(lp, ref)
    upstream = torch.randn(targets.shape, generator=torch.Generator().manual_seed(1))
    lp.backward(upstream)
    ref.backward(upstream.double())
    assert x.grad.dtype == torch.float32
    assert_close(x.grad, x64.grad)


def test_logprobs_bf16_logits_computed_in_fp32():
    logits, targets, _ = _batch(scale=8.0)
    x = logits.bfloat16().requires_grad_(True)
    lp = vocab_parallel_logprobs(x, targets, chunk_size=3)
    assert lp.dtype == torch.float32
    # The bf16 values are exact inputs: the result must match float64 on them to fp32 accuracy.
    x64 = x.detach().double().requires_grad_(True)
    ref = ref_logprobs(x64, targets)
    assert_close(lp, ref)
    lp.sum().backward()
    ref.sum().backward()
    assert x.grad.dtype == torch.bfloat16
    assert_close(x.grad.double(), x64.grad, rtol=1e-2, atol=1e-2 * x64.grad.abs().max().item())


def test_logprobs_huge_logits_do_not_overflow():
    logits, targets, _ = _batch()
    logits = logits * 1e4 + 3e4  # exp() of these overflows fp32 and fp64 without max subtraction
    x = logits.clone().requires_grad_(True)
    lp = vocab_parallel_logprobs(x, targets, chunk_size=2)
    assert torch.isfinite(lp).all()
    x64 = logits.double().requires_grad_(True)
    ref = ref_logprobs(x64, targets)
    assert_close(lp, ref, rtol=1e-6)
    lp.sum().backward()
    ref.sum().backward()
    assert torch.isfinite(x.grad).all()
    assert_close(x.grad, x64.grad)


def test_logprobs_rejects_out_of_vocab_targets_and_bad_shapes():
    logits, targets, _ = _batch()
    with pytest.raises(ValueError, match="target ids"):
        vocab_parallel_logprobs(logits, targets.masked_fill(targets == targets[0, 0], -100))
    with pytest.raises(ValueError, match="target ids"):
        vocab_parallel_logprobs(logits, targets + 13)
    with pytest.raises(ValueError, match="shape"):
        vocab_parallel_logprobs(logits, targets[:, :-1])


@pytest.mark.parametrize("chunk_size", [None, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_padded_vocabulary_columns_are_outside_the_softmax(chunk_size, dtype):
    """Megatron pads the output layer; with ``vocab_size`` the padding is not a token: the log-probs equal the
    float64 log-softmax over the real columns alone, and the padded columns get exactly zero gradient."""
    logits, targets, _ = _batch(V=13)
    real = 10
    targets = targets % real
    logits[..., real:] = torch.tensor([0.0, 25.0, -3.0])  # zero rows (as converted) and garbage alike
    x = logits.to(dtype).requires_grad_(True)
    lp = vocab_parallel_logprobs(x, targets, chunk_size=chunk_size, vocab_size=real)
    x64 = x.detach().double()[..., :real].requires_grad_(True)
    ref = ref_logprobs(x64, targets)
    assert_close(lp, ref)
    # Without the real vocabulary the padding is inside the partition function: a different number.
    assert (vocab_parallel_logprobs(x.detach(), targets) - lp).abs().max() > 1.0
    upstream = torch.randn(targets.shape, generator=torch.Generator().manual_seed(2))
    lp.backward(upstream)
    ref.backward(upstream.double())
    assert torch.equal(x.grad[..., real:], torch.zeros_like(x.grad[..., real:]))
    assert_close(x.grad[..., :real].float(), x64.grad, rtol=1e-2 if dtype == torch.bfloat16 else RTOL)


def test_padded_vocabulary_rejects_padding_targets_and_bad_sizes():
    logits, targets, _ = _batch(V=13)
    with pytest.raises(ValueError, match=r"\[0, 10\)"):
        vocab_parallel_logprobs(logits, targets.clamp(max=9).index_fill(1, torch.tensor([0]), 11), vocab_size=10)
    for bad in (0, 14):
        with pytest.raises(ValueError, match="vocab_size"):
            vocab_parallel_logprobs(logits, targets % 10, vocab_size=bad)


def test_logprobs_backward_memory_does_not_keep_fp32_copy():
    """The only tensor saved for backward of vocab size is the logits themselves (no fp32 log-softmax)."""
    logits, targets, _ = _batch(B=4, T=64, V=512)
    x = logits.bfloat16().requires_grad_(True)
    saved_numel = []

    def pack(t):
        saved_numel.append((t.numel(), t.dtype))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        vocab_parallel_logprobs(x, targets, chunk_size=16)
    big = [(n, d) for n, d in saved_numel if n >= x.numel()]
    assert big == [(x.numel(), torch.bfloat16)], saved_numel


# ---------------------------------------------------------------------------------------------- advantages


@pytest.mark.parametrize("std", ["sample", "population", "none"])
@pytest.mark.parametrize("bias", [0.0, 0.5])
def test_group_advantages_match_reference(std, bias):
    g = torch.Generator().manual_seed(3)
    group_ids = torch.tensor([4, 4, 4, 4, 9, 9, 9, 2, 2, 2, 2, 2, 7, 1, 1, 1])
    rewards = torch.randint(0, 2, (16,), generator=g).float()
    rewards[:4] = 1.0  # group 4 all positive
    rewards[4:7] = 0.0  # group 9 all negative
    rewards[12] = 1.0  # group 7: a single positive trajectory
    rewards[13:] = torch.tensor([0.3, 0.9, 0.6])  # fractional rewards
    out = group_advantages(rewards, group_ids, all_positive_bias=bias, std=std)
    ref = ref_group_advantages(rewards.tolist(), group_ids.tolist(), bias, std)
    assert out.dtype == torch.float32
    assert_close(out, torch.tensor(ref, dtype=torch.float64))


def test_all_positive_bias_changes_exactly_the_all_positive_groups():
    rewards = torch.tensor([1.0, 1, 1, 0, 1, 0, 0, 0, 1])
    group_ids = torch.tensor([0, 0, 0, 1, 1, 2, 2, 3, 4])  # 0 all-pos, 1 mixed, 2 all-neg, 3 single neg, 4 single pos
    plain = group_advantages(rewards, group_ids, all_positive_bias=0.0)
    biased = group_advantages(rewards, group_ids, all_positive_bias=0.5)
    diff = biased - plain
    assert torch.equal(diff, torch.tensor([0.5, 0.5, 0.5, 0, 0, 0, 0, 0, 0.5]))
    assert torch.equal(plain[[0, 1, 2, 5, 6, 7, 8]], torch.zeros(7))
    assert plain[3] < 0 < plain[4]
    # sample std of {0, 1} is 1/sqrt(2): A = +-0.5 / (0.7071 + eps)
    assert abs(plain[4].item() - 0.5 / (2 ** -0.5 + 1e-6)) < 1e-6


def test_group_advantages_treat_fp_noise_as_all_equal():
    rewards = torch.tensor([1.0, 1.0 + 1e-9, 1.0 - 1e-9, 0.0, 1e-8])
    group_ids = torch.tensor([0, 0, 0, 1, 1])
    out = group_advantages(rewards, group_ids, all_positive_bias=0.0)
    assert torch.equal(out, torch.zeros(5))  # without the tolerance these would be +-O(1)


def test_group_statistics_flags():
    stats = group_statistics(torch.tensor([1.0, 1, 0, 0, 1, 0]), torch.tensor([5, 5, 6, 6, 7, 7]))
    assert stats.num_groups == 3
    assert stats.all_positive.tolist() == [True, True, False, False, False, False]
    assert stats.all_negative.tolist() == [False, False, True, True, False, False]
    assert stats.size.tolist() == [2] * 6


def test_group_advantages_rejects_bad_input():
    with pytest.raises(ValueError, match="std"):
        group_advantages(torch.ones(2), torch.zeros(2, dtype=torch.long), std="bogus")
    with pytest.raises(ValueError, match=r"\[B\]"):
        group_advantages(torch.ones(2), torch.zeros(3, dtype=torch.long))


# ---------------------------------------------------------------------------------------------- policy losses


def _loss_inputs(kind, B=5, T=7, V=13, seed=0, scale=3.0):
    logits, targets, mask = _batch(B, T, V, seed, scale)
    g = torch.Generator().manual_seed(seed + 10)
    ref = ref_logprobs(logits, targets).float() + 0.3 * torch.randn(B, T, generator=g)
    old = ref_logprobs(logits, targets).float() + 0.4 * torch.randn(B, T, generator=g)
    if kind == "opd":
        teacher = ref_logprobs(logits, targets).float() + torch.randn(B, T, generator=g)
        adv = opd_advantages(teacher, old)
    elif kind == "sft":
        adv = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0])[:B]
    else:
        adv = torch.tensor([1.2, -0.8, 0.5, -1.5, 0.0])[:B]
    return logits, targets, mask, adv, ref, old


def _adv_args(kind, adv):
    """policy_loss's advantage arguments: SFT takes the rewards as ``rewards=`` (no advantages)."""
    return (None, {"rewards": adv}) if kind == "sft" else (adv, {})


def _run_both(kind, agg, clip_eps=0.2, kl_coef=0.1, use_ref=True, shaping_gamma=None, logits_scale=1.0):
    logits, targets, mask, adv, ref, old = _loss_inputs(kind, scale=3.0 * logits_scale)
    if kind == "opd":
        use_ref = False
    kwargs = dict(kind=kind, clip_eps=clip_eps, kl_coef=kl_coef, agg=agg, max_response_len=9,
                  shaping_gamma=shaping_gamma)
    x = logits.clone().requires_grad_(True)
    lp = vocab_parallel_logprobs(x, targets, chunk_size=4)
    adv_arg, extra = _adv_args(kind, adv)
    loss, metrics = policy_loss(lp, mask, adv_arg, ref_logprobs=ref if use_ref else None, old_logprobs=old, **kwargs,
                                **extra)
    loss.backward()
    x64 = logits.double().requires_grad_(True)
    lp64 = ref_logprobs(x64, targets)
    ref_loss = ref_policy_loss(lp64, mask, adv, ref=ref if use_ref else None, old=old, **kwargs)
    ref_loss.backward()
    return loss, x.grad, ref_loss, x64.grad, metrics


@pytest.mark.parametrize("kind,agg", list(itertools.product(["offline_grpo", "grpo", "sft", "opd"], LOSS_AGGREGATIONS)))
def test_policy_loss_value_and_grad_match_float64(kind, agg):
    loss, grad, ref_loss, ref_grad, _ = _run_both(kind, agg)
    assert_close(loss, ref_loss)
    assert grad.abs().sum() > 0
    assert_close(grad, ref_grad)


@pytest.mark.parametrize(
    "kind,options",
    [
        ("offline_grpo", dict(clip_eps=None)),  # the released code: no clip
        ("offline_grpo", dict(shaping_gamma=0.1)),  # LUFFY policy shaping
        ("offline_grpo", dict(kl_coef=0.0)),
        ("offline_grpo", dict(use_ref=False)),
        ("offline_grpo", dict(logits_scale=6.0)),  # peaked: many tokens with p > 1 - eps
        ("grpo", dict(clip_eps=None)),
        ("sft", dict(use_ref=False)),
        ("opd", dict(clip_eps=0.05)),
    ],
)
def test_policy_loss_options_match_float64(kind, options):
    loss, grad, ref_loss, ref_grad, _ = _run_both(kind, "seq-mean-token-mean", **options)
    assert_close(loss, ref_loss)
    assert_close(grad, ref_grad)


def test_offline_grpo_clip_is_max_p_one_minus_eps():
    """d loss / d logp = -A p for A > 0 always; for A < 0 only while p > 1 - eps (else the clip blocks it)."""
    p = torch.tensor([[0.9], [0.5], [0.9], [0.5]])  # one token per trajectory
    adv = torch.tensor([1.0, 1.0, -1.0, -1.0])
    logp = torch.log(p).requires_grad_(True)
    loss, metrics = policy_loss(logp, torch.ones(4, 1), adv, kind="offline_grpo", agg="seq-mean-token-sum",
                                num_sequences=1)
    loss.backward()
    expected = torch.tensor([[-0.9], [-0.5], [0.9], [0.0]])  # d(-surr)/dlogp
    assert torch.allclose(logp.grad, expected, atol=1e-6)
    assert abs(loss.item() - (-0.9 - 0.5 + 0.9 + 0.8)) < 1e-6
    assert abs(metrics["clip_frac"].item() - 0.25) < 1e-7


def test_microbatches_with_global_denominators_sum_to_full_batch():
    for kind, agg in [("offline_grpo", "seq-mean-token-mean"), ("grpo", "token-mean"), ("sft", "seq-mean-token-sum"),
                      ("opd", "seq-mean-token-mean")]:
        logits, targets, mask, adv, ref, old = _loss_inputs(kind)
        ref_arg = None if kind == "opd" else ref
        x = logits.clone().requires_grad_(True)
        adv_arg, extra = _adv_args(kind, adv)
        full, _ = policy_loss(vocab_parallel_logprobs(x, targets), mask, adv_arg, kind=kind, ref_logprobs=ref_arg,
                              old_logprobs=old, agg=agg, **extra)
        full.backward()
        full_grad = x.grad.clone()
        x.grad = None
        n_seq = float((adv > 0).sum()) if kind == "sft" else float(adv.shape[0])
        n_tok = float(mask.sum())
        total = 0.0
        for rows in ([0, 1], [2], [3, 4]):
            lp = vocab_parallel_logprobs(x[rows], targets[rows])
            part_adv, part_extra = _adv_args(kind, adv[rows])
            part, _ = policy_loss(lp, mask[rows], part_adv, kind=kind, ref_logprobs=None if ref_arg is None else
                                  ref[rows], old_logprobs=old[rows], agg=agg, num_sequences=n_seq, num_tokens=n_tok,
                                  **part_extra)
            part.backward()
            total += part.item()
        assert abs(total - full.item()) <= 1e-6 * max(1.0, abs(full.item())), (kind, agg)
        assert_close(x.grad, full_grad)


def test_empty_response_and_garbage_in_padding_are_harmless():
    logits, targets, mask, adv, ref, old = _loss_inputs("offline_grpo")
    mask[2] = 0  # an empty response
    lp = vocab_parallel_logprobs(logits, targets).detach()
    lp_garbage = lp.masked_fill(mask == 0, -1e30).requires_grad_(True)  # would overflow exp(ref - logp)
    ref_garbage = ref.masked_fill(mask == 0, float("nan"))
    loss, metrics = policy_loss(lp_garbage, mask, adv, kind="offline_grpo", ref_logprobs=ref_garbage)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(lp_garbage.grad).all()
    assert torch.all(lp_garbage.grad[mask == 0] == 0)
    clean, _ = policy_loss(lp, mask, adv, kind="offline_grpo", ref_logprobs=ref)
    assert abs(loss.item() - clean.item()) < 1e-7
    # The empty row still counts in N_seq (it is a trajectory of the batch) and adds 0.
    expected = ref_policy_loss(lp.double(), mask, adv, "offline_grpo", ref=ref)
    assert abs(loss.item() - expected.item()) < 1e-6
    for m in metrics.values():
        assert torch.isfinite(m)


def test_all_masked_batch_gives_zero_loss_and_zero_grad():
    lp = torch.randn(3, 4).requires_grad_(True)
    for kind, adv in [("offline_grpo", torch.ones(3)), ("sft", torch.zeros(3)), ("opd", torch.ones(3, 4))]:
        adv_arg, extra = _adv_args(kind, adv)
        loss, metrics = policy_loss(lp, torch.zeros(3, 4), adv_arg, kind=kind, old_logprobs=torch.zeros(3, 4), **extra)
        loss.backward()
        assert loss.item() == 0.0 and torch.all(lp.grad == 0)
        assert metrics["num_tokens"].item() == 0
        lp.grad = None


def test_sft_trains_on_positive_trajectories_only():
    logits, targets, mask, _, _, _ = _loss_inputs("sft")
    rewards = torch.tensor([1.0, 0.0, 1.0, 0.0, 0.0])
    x = logits.clone().requires_grad_(True)
    loss, metrics = policy_loss(vocab_parallel_logprobs(x, targets), mask, rewards=rewards, kind="sft")
    loss.backward()
    assert torch.all(x.grad[[1, 3, 4]] == 0) and x.grad[[0, 2]].abs().sum() > 0
    assert metrics["num_sequences"].item() == 2
    lp = ref_logprobs(logits, targets)
    expected = sum(-(lp[b] * mask[b]).sum() / mask[b].sum() for b in (0, 2)) / 2
    assert abs(loss.item() - expected.item()) < 1e-5


def test_metrics_report_kl_clip_advantage_and_all_positive_fraction():
    logits, targets, mask, adv, ref, old = _loss_inputs("offline_grpo")
    lp = vocab_parallel_logprobs(logits, targets)
    rewards = torch.tensor([1.0, 1, 0, 1, 1])
    group_ids = torch.tensor([0, 0, 1, 1, 2])  # group 0 all positive, 1 mixed, 2 all positive
    _, m = policy_loss(lp, mask, adv, kind="offline_grpo", ref_logprobs=ref, rewards=rewards, group_ids=group_ids)
    sel = mask.bool()
    d = (ref - lp)[sel].double()
    assert abs(m["kl_mean"].item() - (torch.exp(d) - d - 1).mean().item()) < 1e-6
    p = torch.exp(lp)[sel]
    advt = adv[:, None].expand_as(lp)[sel]
    assert abs(m["clip_frac"].item() - ((advt < 0) & (p < 0.8)).float().mean().item()) < 1e-7
    assert abs(m["adv_mean"].item() - adv.mean().item()) < 1e-7
    assert m["num_tokens"].item() == mask.sum().item()
    assert abs(m["all_positive_frac"].item() - 2 / 3) < 1e-7


def test_policy_loss_rejects_bad_arguments():
    lp, mask = torch.zeros(2, 3), torch.ones(2, 3)
    with pytest.raises(ValueError, match="unknown loss kind"):
        policy_loss(lp, mask, torch.zeros(2), kind="ppo")
    with pytest.raises(ValueError, match="old_logprobs"):
        policy_loss(lp, mask, torch.zeros(2), kind="grpo")
    with pytest.raises(ValueError, match="no KL"):
        policy_loss(lp, mask, torch.zeros(2, 3), kind="opd", old_logprobs=lp, ref_logprobs=lp)
    with pytest.raises(ValueError, match="advantages of shape"):
        policy_loss(lp, mask, torch.zeros(2), kind="opd", old_logprobs=lp)
    with pytest.raises(ValueError, match="max_response_len"):
        policy_loss(lp, mask, torch.zeros(2), kind="offline_grpo", agg="seq-mean-token-sum-norm")
    with pytest.raises(ValueError, match="aggregation"):
        policy_loss(lp, mask, torch.zeros(2), kind="offline_grpo", agg="mean")


def test_logprobs_backward_leaves_the_logits_untouched():
    for dtype in (torch.float32, torch.bfloat16):
        logits, targets, _ = _batch()
        x = logits.to(dtype).requires_grad_(True)
        before = x.detach().clone()
        vocab_parallel_logprobs(x, targets, chunk_size=4).sum().backward()
        assert torch.equal(x.detach(), before), dtype
