"""The loss core under real tensor and context parallelism (gloo processes) equals the float64 reference.

One spawn of 4 ranks runs every layout: TP=4 (all ranks), TP=2 (pairs {0,1} and {2,3}), and CP=2 (the same pairs,
each sequence split into Megatron's 4 load-balanced chunks).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from loss_reference import ref_logprobs, ref_policy_loss
from megatron_offgrpo.losses import (
    cp_chunk_indices,
    cp_sequence_token_counts,
    opd_advantages,
    policy_loss,
    split_for_context_parallel,
    vocab_parallel_logprobs,
)
from megatron_offgrpo.utils.distributed import run_on_ranks

B, T, V = 4, 12, 32  # T divisible by 2*cp = 4, V by tp = 4
CASES = [
    ("offline_grpo", "seq-mean-token-mean"),
    ("offline_grpo", "token-mean"),
    ("grpo", "seq-mean-token-sum"),
    ("sft", "seq-mean-token-mean"),
    ("opd", "seq-mean-token-mean"),
]


def _inputs(kind):
    g = torch.Generator().manual_seed(21)
    logits = torch.randn(B, T, V, generator=g) * 4
    targets = torch.randint(0, V, (B, T), generator=g)
    # Targets on every shard boundary of TP=2 and TP=4 (first and last id of each shard).
    targets[0, :8] = torch.tensor([0, 7, 8, 15, 16, 23, 24, 31])
    mask = torch.zeros(B, T)
    for b, (start, end) in enumerate([(2, 12), (5, 11), (1, 7), (9, 12)]):  # uneven responses across CP chunks
        mask[b, start:end] = 1
    full_lp = ref_logprobs(logits, targets).float()
    ref = full_lp + 0.3 * torch.randn(B, T, generator=g)
    old = full_lp + 0.3 * torch.randn(B, T, generator=g)
    if kind == "opd":
        adv = opd_advantages(full_lp + torch.randn(B, T, generator=g), old)
    elif kind == "sft":
        adv = torch.tensor([1.0, 0.0, 1.0, 1.0])
    else:
        adv = torch.tensor([1.5, -0.5, -1.0, 0.7])
    return logits, targets, mask, adv, (None if kind == "opd" else ref), old


def _loss_on(lp, mask, adv, ref, old, kind, agg, **kw):
    # SFT takes the rewards as rewards= (no advantages).
    adv_arg, extra = (None, {"rewards": adv}) if kind == "sft" else (adv, {})
    loss, _ = policy_loss(lp, mask, adv_arg, kind=kind, ref_logprobs=ref, old_logprobs=old, agg=agg, **kw, **extra)
    return loss


def _worker(rank, world):
    dist.init_process_group("gloo")
    pairs = [dist.new_group([0, 1]), dist.new_group([2, 3])]  # every rank creates every group, in order
    pair, pair_rank = pairs[rank // 2], rank % 2
    out = {}
    for kind, agg in CASES:
        logits, targets, mask, adv, ref, old = _inputs(kind)
        # Global denominators are known from the batch metadata (docs/design.md §4), not from any one shard.
        n_seq = float((adv > 0).sum()) if kind == "sft" else float(B)
        n_tok = float((mask * (adv > 0)[:, None]).sum()) if kind == "sft" else float(mask.sum())
        for name, tp, group, tp_rank in [("tp4", 4, dist.group.WORLD, rank), ("tp2", 2, pair, pair_rank)]:
            width = V // tp
            shard = logits[..., tp_rank * width : (tp_rank + 1) * width].clone().requires_grad_(True)
            lp = vocab_parallel_logprobs(shard, targets, tp_group=group, chunk_size=5)
            loss = _loss_on(lp, mask, adv, ref, old, kind, agg)
            loss.backward()
            out[(name, kind, agg)] = (loss.item(), shard.grad)

        # CP=2: this rank holds chunks r and 3-r of every sequence, full vocabulary.
        split = lambda t: None if t is None else split_for_context_parallel(t, 2, pair_rank)  # noqa: E731
        x = split(logits).clone().requires_grad_(True)
        local_mask = split(mask)
        counts = cp_sequence_token_counts(local_mask, pair)
        lp = vocab_parallel_logprobs(x, split(targets), tp_group=None)
        adv_local = split(adv) if kind == "opd" else adv
        loss = _loss_on(lp, local_mask, adv_local, split(ref), split(old), kind, agg, sequence_token_counts=counts,
                        num_sequences=n_seq, num_tokens=n_tok)
        loss.backward()
        naive = _loss_on(lp.detach(), local_mask, adv_local, split(ref), split(old), kind, agg)  # per-rank counts
        out[("cp2", kind, agg)] = (loss.item(), x.grad, naive.item())
    return out


def test_tp_and_cp_layouts_equal_the_float64_single_rank_loss():
    results = run_on_ranks(_worker, 4)
    for kind, agg in CASES:
        logits, targets, mask, adv, ref, old = _inputs(kind)
        x64 = logits.double().requires_grad_(True)
        expected = ref_policy_loss(ref_logprobs(x64, targets), mask, adv, kind, ref=ref, old=old, agg=agg)
        expected.backward()
        tol = 1e-5 * max(1.0, abs(expected.item()))

        # TP=4: every rank has the full loss; the shards' grads concatenate to the full gradient.
        for r in range(4):
            assert abs(results[r][("tp4", kind, agg)][0] - expected.item()) <= tol, (kind, agg, r)
        grad = torch.cat([results[r][("tp4", kind, agg)][1] for r in range(4)], dim=-1)
        assert torch.allclose(grad.double(), x64.grad, rtol=1e-5, atol=1e-7), (kind, agg)

        # TP=2 in both pairs.
        for first in (0, 2):
            for r in (first, first + 1):
                assert abs(results[r][("tp2", kind, agg)][0] - expected.item()) <= tol, (kind, agg, r)
            grad = torch.cat([results[first][("tp2", kind, agg)][1], results[first + 1][("tp2", kind, agg)][1]], -1)
            assert torch.allclose(grad.double(), x64.grad, rtol=1e-5, atol=1e-7), (kind, agg)

        # CP=2: the ranks' losses sum to the full loss; their grads scatter back to the full gradient.
        for first in (0, 2):
            parts = [results[first + c][("cp2", kind, agg)] for c in (0, 1)]
            assert abs(parts[0][0] + parts[1][0] - expected.item()) <= tol, (kind, agg)
            grad = torch.zeros_like(logits)
            for c in (0, 1):
                grad[:, cp_chunk_indices(T, 2, c)] = parts[c][1]
            assert torch.allclose(grad.double(), x64.grad, rtol=1e-5, atol=1e-7), (kind, agg)
            if agg == "seq-mean-token-mean":
                # Normalizing by the local token counts (the CP bug of docs/design.md §7) gives a different loss.
                assert abs(parts[0][2] + parts[1][2] - expected.item()) > 1e-3, (kind, agg)


REAL_V = 21  # TP=4: rank 2 holds 16..23 (5 real columns), rank 3 only padding; TP=2: rank 1 holds 16..31


def _padded_worker(rank, world):
    """Log-probs and gradients of logits whose columns >= REAL_V are Megatron's vocabulary padding."""
    dist.init_process_group("gloo")
    pairs = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    logits, targets, _, _, _, _ = _inputs("offline_grpo")
    logits[..., REAL_V:] = 30.0  # padding that would dominate every softmax if it were counted
    targets = targets % REAL_V
    upstream = torch.randn(B, T, generator=torch.Generator().manual_seed(3))
    out = {}
    for name, tp, group, tp_rank in [("tp4", 4, dist.group.WORLD, rank), ("tp2", 2, pairs[rank // 2], rank % 2)]:
        width = V // tp
        shard = logits[..., tp_rank * width : (tp_rank + 1) * width].clone().requires_grad_(True)
        lp = vocab_parallel_logprobs(shard, targets, tp_group=group, chunk_size=5, vocab_size=REAL_V)
        lp.backward(upstream)
        out[name] = (lp.detach(), shard.grad)
    return out


def test_padded_vocabulary_under_tp_equals_float64_over_the_real_columns():
    results = run_on_ranks(_padded_worker, 4)
    logits, targets, _, _, _, _ = _inputs("offline_grpo")
    targets = targets % REAL_V
    x64 = logits[..., :REAL_V].double().requires_grad_(True)
    expected = ref_logprobs(x64, targets)
    expected.backward(torch.randn(B, T, generator=torch.Generator().manual_seed(3)).double())
    for name, ranks in [("tp4", [0, 1, 2, 3]), ("tp2", [0, 1]), ("tp2", [2, 3])]:
        for r in ranks:
            assert torch.allclose(results[r][name][0].double(), expected, rtol=1e-5, atol=1e-6), (name, r)
        grad = torch.cat([results[r][name][1] for r in ranks], dim=-1)
        assert torch.equal(grad[..., REAL_V:], torch.zeros_like(grad[..., REAL_V:])), name
        assert torch.allclose(grad[..., :REAL_V].double(), x64.grad, rtol=1e-5, atol=1e-7), name


def _megatron_group_worker(rank, world):
    from megatron_offgrpo.utils.cpu_backend import initialize_cpu_model_parallel

    initialize_cpu_model_parallel(tensor_model_parallel_size=2)
    logits, targets, _, _, _, _ = _inputs("offline_grpo")
    width = V // 2
    shard = logits[..., rank * width : (rank + 1) * width]
    return vocab_parallel_logprobs(shard, targets)  # no group given: Megatron's TP group


def test_logprobs_default_to_megatrons_tp_group():
    logits, targets, _, _, _, _ = _inputs("offline_grpo")
    expected = ref_logprobs(logits, targets)
    for lp in run_on_ranks(_megatron_group_worker, 2):
        assert torch.allclose(lp.double(), expected, rtol=1e-5, atol=1e-6)
