"""The fused output layer + log-probs (losses/fused_output.py) against the float64 dense reference.

The reference builds the full logits ``h @ W[:real]^T`` in float64 and takes ``log_softmax`` over the real
vocabulary (tests/loss_reference.py), the entropy from the same softmax, and autograd's gradients w.r.t. the
hidden states and the output weight. The fused function must give the same log-probs, entropies and gradients on
one process (every tiling), under real tensor parallelism over gloo (TP 2 and 4, with and without sequence
parallelism, a padded vocabulary with a rank holding only padding, bf16 inputs), with tied embeddings, and through
a real Megatron GPTModel whose output layer hands its hidden states through (TP 2, tied embeddings, padded
vocabulary). Megatron's local layer spec refuses sequence parallelism without Apex, so on CPU the sequence-parallel
contract is pinned by the TP tests below (hidden states sharded as GPTModel returns them: ``[b, s/tp, H]``).
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.distributed as dist

import megatron_offgrpo.losses.fused_output as fused_module
from loss_reference import ref_logprobs, ref_policy_loss
from megatron_offgrpo.losses import (
    fused_output_loss,
    fused_vocab_parallel_logprobs,
    get_loss,
    loss_names,
    policy_loss,
    vocab_parallel_logprobs,
)
from megatron_offgrpo.utils.distributed import run_on_ranks

B, S, H = 2, 8, 12  # S divisible by every TP size (sequence parallelism shards it)
V = 32  # the padded vocabulary: 8 rows per rank at TP=4, 16 at TP=2
REAL_V = 21  # TP=4: rank 2 holds 16..23 (5 real rows), rank 3 only padding; TP=2: rank 1 holds 16..31 (5 real)


def _inputs(seed: int = 5):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, S, H, generator=g)
    weight = torch.randn(V, H, generator=g) * 0.7
    # A constant feature (as a bias would be) and padding rows reading only it: every padding logit is 12, which
    # would dominate every softmax if counted.
    hidden[..., 0] = 3.0
    weight[REAL_V:] = 0.0
    weight[REAL_V:, 0] = 4.0
    targets = torch.randint(0, REAL_V, (B, S), generator=g)
    targets[0, :6] = torch.tensor([0, 7, 8, 15, 16, REAL_V - 1])  # the TP shards' boundaries and the last real id
    grad_logp = torch.randn(B, S, generator=g)
    grad_entropy = torch.randn(B, S, generator=g)
    return hidden, weight, targets, grad_logp, grad_entropy


def _reference(hidden, weight, targets, grad_logp, grad_entropy, real=REAL_V):
    """float64 dense: logits over the real rows, their log_softmax, entropy, and autograd's gradients (the
    weight's padding rows get none: they take no part)."""
    h = hidden.detach().double().requires_grad_(True)
    w = weight.detach().double().requires_grad_(True)
    logits = h @ w[:real].t()
    logp = ref_logprobs(logits, targets)
    log_q = torch.log_softmax(logits, dim=-1)
    entropy = -(log_q.exp() * log_q).sum(dim=-1)
    loss = (logp * grad_logp.double()).sum()
    if grad_entropy is not None:
        loss = loss + (entropy * grad_entropy.double()).sum()
    loss.backward()
    return logp.detach(), entropy.detach(), h.grad, w.grad


def assert_close(actual, expected, rtol=1e-5, atol=1e-6, what=""):
    """Error bounded relative to the largest expected magnitude."""
    actual, expected = actual.double(), expected.double()
    err = (actual - expected).abs().max().item()
    bound = atol + rtol * expected.abs().max().item()
    assert err <= bound, f"{what}: max abs err {err:.3e} > {bound:.3e}"


# (chunk_size, tile elements): one tile; token chunks x vocabulary blocks that divide nothing evenly; one token per
# tile; a tile narrower than one vocabulary shard but holding every token.
TILINGS = [(None, 1 << 25), (5, 35), (1, 4), (None, 64)]


@pytest.mark.parametrize("entropy", [False, True], ids=["logp", "logp+entropy"])
@pytest.mark.parametrize("tiling", TILINGS, ids=lambda t: f"chunk{t[0]}-tile{t[1]}")
def test_values_and_gradients_equal_float64_dense_reference(monkeypatch, tiling, entropy):
    chunk_size, tile = tiling
    monkeypatch.setattr(fused_module, "_TILE_ELEMENTS", tile)
    monkeypatch.setattr(fused_module, "_MIN_VOCAB_BLOCK", 1)
    hidden, weight, targets, g_lp, g_ent = _inputs()
    h = hidden.clone().requires_grad_(True)
    w = weight.clone().requires_grad_(True)
    out = fused_vocab_parallel_logprobs(h, w, targets, chunk_size=chunk_size, vocab_size=REAL_V,
                                        return_entropy=entropy)
    logp, ent = out if entropy else (out, None)
    loss = (logp * g_lp).sum() + ((ent * g_ent).sum() if entropy else 0.0)
    loss.backward()
    ref_lp, ref_ent, ref_gh, ref_gw = _reference(hidden, weight, targets, g_lp, g_ent if entropy else None)
    assert logp.dtype == torch.float32 and logp.shape == targets.shape
    assert_close(logp, ref_lp, what="logp")
    if entropy:
        assert_close(ent, ref_ent, what="entropy")
    assert_close(h.grad, ref_gh, what="grad hidden")
    assert_close(w.grad[:REAL_V], ref_gw[:REAL_V], what="grad weight")
    assert torch.equal(w.grad[REAL_V:], torch.zeros_like(w.grad[REAL_V:]))  # padding rows never move


def test_padding_rows_would_change_every_log_prob():
    """The test data is able to fail: counting the padding rows moves the log-probs far from the reference."""
    hidden, weight, targets, *_ = _inputs()
    ref_lp = _reference(hidden, weight, targets, torch.zeros(B, S), None)[0]
    counted = fused_vocab_parallel_logprobs(hidden, weight, targets)  # vocab_size None: every row is real
    assert (counted.double() - ref_lp).abs().min() > 1.0


def test_unfused_path_gives_the_same_numbers():
    """Same values and gradients as the output layer's logits followed by vocab_parallel_logprobs."""
    hidden, weight, targets, g_lp, _ = _inputs()
    h1, w1 = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    unfused = vocab_parallel_logprobs(h1 @ w1.t(), targets, vocab_size=REAL_V)
    (unfused * g_lp).sum().backward()
    h2, w2 = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    fused = fused_vocab_parallel_logprobs(h2, w2, targets, vocab_size=REAL_V)
    (fused * g_lp).sum().backward()
    assert_close(fused, unfused, rtol=1e-6, what="logp")
    assert_close(h2.grad, h1.grad, rtol=1e-6, what="grad hidden")
    assert_close(w2.grad, w1.grad, rtol=1e-6, what="grad weight")


def test_bf16_inputs_accumulate_in_fp32():
    """bf16 hidden states and weight: fp32 results and fp32 accumulation. With every logit equal, the log-prob
    is -log(V) exactly; a bf16 partition function would stop growing at 256 (8 mantissa bits)."""
    n, vocab = 6, 4096
    hidden = torch.randn(n, H).bfloat16()
    weight = torch.zeros(vocab, H, dtype=torch.bfloat16)
    targets = torch.randint(0, vocab, (n,))
    logp, entropy = fused_vocab_parallel_logprobs(hidden, weight, targets, return_entropy=True)
    assert logp.dtype == torch.float32 and entropy.dtype == torch.float32
    assert torch.allclose(logp.double(), torch.full((n,), -math.log(vocab), dtype=torch.float64), atol=1e-6)
    assert torch.allclose(entropy.double(), torch.full((n,), math.log(vocab), dtype=torch.float64), atol=1e-5)


def test_bf16_values_and_gradients_against_float64(monkeypatch):
    """bf16 inputs, several tiles: log-probs in fp32 from the bf16 logits, gradients in bf16."""
    monkeypatch.setattr(fused_module, "_TILE_ELEMENTS", 48)
    monkeypatch.setattr(fused_module, "_MIN_VOCAB_BLOCK", 1)
    hidden, weight, targets, g_lp, g_ent = _inputs()
    h = hidden.bfloat16().requires_grad_(True)
    w = weight.bfloat16().requires_grad_(True)
    logp, ent = fused_vocab_parallel_logprobs(h, w, targets, chunk_size=4, vocab_size=REAL_V, return_entropy=True)
    ((logp * g_lp).sum() + (ent * g_ent).sum()).backward()
    assert h.grad.dtype == torch.bfloat16 and w.grad.dtype == torch.bfloat16
    # The reference on the same (bf16-rounded) inputs; the logits are rounded to bf16 by the GEMM, as the unfused
    # output layer rounds them, hence a bf16-sized tolerance.
    ref_lp, ref_ent, ref_gh, ref_gw = _reference(h.detach(), w.detach(), targets, g_lp, g_ent)
    assert_close(logp, ref_lp, rtol=2e-2, what="logp")
    assert_close(ent, ref_ent, rtol=2e-2, what="entropy")
    assert_close(h.grad, ref_gh, rtol=2e-2, what="grad hidden")
    assert_close(w.grad[:REAL_V], ref_gw[:REAL_V], rtol=2e-2, what="grad weight")
    assert torch.equal(w.grad[REAL_V:].float(), torch.zeros(V - REAL_V, H))


def test_tied_embeddings_gradient_sums_both_uses():
    """One weight as the input embedding and the output layer: its gradient is the sum of both uses."""
    hidden, weight, targets, g_lp, _ = _inputs()
    tokens = torch.randint(0, REAL_V, (B, S), generator=torch.Generator().manual_seed(9))
    mix = torch.randn(H, H, generator=torch.Generator().manual_seed(10)) / H**0.5

    def model(emb, fused):
        h = torch.tanh(emb[tokens] @ mix.to(emb.dtype))  # a stand-in for the decoder
        if fused:
            return fused_vocab_parallel_logprobs(h, emb, targets, vocab_size=REAL_V, chunk_size=3)
        return ref_logprobs(h @ emb[:REAL_V].t(), targets)

    emb = weight.clone().requires_grad_(True)
    (model(emb, True) * g_lp).sum().backward()
    emb64 = weight.double().requires_grad_(True)
    (model(emb64, False) * g_lp.double()).sum().backward()
    assert_close(emb.grad, emb64.grad, what="tied grad")
    # The padding rows are neither looked up nor counted here: exactly zero.
    assert torch.equal(emb.grad[REAL_V:], torch.zeros_like(emb.grad[REAL_V:]))


def test_tokens_need_not_be_contiguous():
    """Per-token: a strided selection of tokens (CP chunks, packed rows) gives the reference's values there."""
    hidden, weight, targets, g_lp, _ = _inputs()
    rows = [0, 3, 4, 7]  # two CP-style chunks per sequence
    h = hidden[:, rows]  # not a view of contiguous memory
    logp = fused_vocab_parallel_logprobs(h, weight, targets[:, rows], vocab_size=REAL_V)
    ref_lp = _reference(hidden, weight, targets, g_lp, None)[0]
    assert_close(logp, ref_lp[:, rows], what="logp")


def test_bad_input_is_refused_with_the_fix():
    hidden, weight, targets, *_ = _inputs()
    with pytest.raises(ValueError, match="not the logits"):
        fused_vocab_parallel_logprobs(hidden @ weight.t(), weight, targets)
    with pytest.raises(TypeError, match="one dtype"):
        fused_vocab_parallel_logprobs(hidden.double(), weight, targets)
    with pytest.raises(ValueError, match="targets shape"):
        fused_vocab_parallel_logprobs(hidden, weight, targets[:, :-1])
    with pytest.raises(ValueError, match=r"\[0, 21\)"):
        fused_vocab_parallel_logprobs(hidden, weight, targets.clamp(min=REAL_V - 1) + 1, vocab_size=REAL_V)
    with pytest.raises(ValueError, match="vocab_size"):
        fused_vocab_parallel_logprobs(hidden, weight, targets, vocab_size=V + 1)
    with pytest.raises(ValueError, match="auto"):
        fused_module.fused_output_layer_enabled("maybe")
    assert fused_module.fused_output_layer_enabled("True") and not fused_module.fused_output_layer_enabled(False)


# ---- the training path: a registered loss with its gradients taken in the forward pass ---------------------

# One configuration per registered loss, each with another aggregation (and the KL / shaping where they apply).
LOSS_CASES = {
    "offline_grpo": dict(agg="seq-mean-token-mean", kl_coef=0.1, shaping_gamma=0.1),
    "grpo": dict(agg="token-mean", kl_coef=0.05, shaping_gamma=None),
    "sft": dict(agg="seq-mean-token-sum", kl_coef=0.0, shaping_gamma=None),
    "opd": dict(agg="seq-mean-token-sum-norm", kl_coef=0.0, shaping_gamma=None),
}


def _loss_inputs(seed: int = 11):
    g = torch.Generator().manual_seed(seed)
    mask = (torch.rand(B, S, generator=g) > 0.25).float()
    mask[:, 0] = 1.0
    return dict(
        mask=mask,
        adv=torch.tensor([0.7, -1.3]),
        rewards=torch.tensor([1.0, 0.0]),
        ref=-torch.rand(B, S, generator=g) * 4,
        old=-torch.rand(B, S, generator=g) * 4,
        teacher=-torch.rand(B, S, generator=g) * 4,
    )


def _registered_loss(kind: str, data, dtype=torch.float32):
    """``logp -> loss`` of a registered loss as the trainer builds it (the spec's inputs, then policy_loss)."""
    spec, case = get_loss(kind), LOSS_CASES[kind]
    arrays = {"old_logp": data["old"], "teacher_logp": data["teacher"]}

    def loss_fn(logp):
        advantages, old = spec.inputs(logp, arrays, data["adv"])
        loss, _ = policy_loss(logp, data["mask"], advantages, kind=kind, rewards=data["rewards"],
                              ref_logprobs=data["ref"] if spec.kl and case["kl_coef"] else None, old_logprobs=old,
                              clip_eps=0.2, kl_coef=case["kl_coef"], agg=case["agg"], max_response_len=S,
                              shaping_gamma=case["shaping_gamma"])
        return loss

    return loss_fn


def _loss_reference(kind: str, hidden, weight, targets, data, real=REAL_V):
    """float64 dense logits -> float64 log-probs -> tests/loss_reference.py's naive loss, and autograd's
    gradients w.r.t. the hidden states and the weight."""
    case = LOSS_CASES[kind]
    h = hidden.detach().double().requires_grad_(True)
    w = weight.detach().double().requires_grad_(True)
    logp = ref_logprobs(h @ w[:real].t(), targets)
    adv, old = data["adv"], None
    if kind == "sft":
        adv = data["rewards"]
    elif kind == "grpo":
        old = data["old"]
    elif kind == "opd":  # pi_old is the current policy; the advantage is teacher - pi_old, per token
        old = logp.detach()
        adv = data["teacher"].double() - old
    loss = ref_policy_loss(logp, data["mask"], adv, kind, ref=data["ref"] if case["kl_coef"] else None, old=old,
                           clip_eps=0.2, kl_coef=case["kl_coef"], agg=case["agg"], max_response_len=S,
                           shaping_gamma=case["shaping_gamma"])
    loss.backward()
    return loss.detach(), logp.detach(), h.grad, w.grad


def test_loss_cases_cover_every_registered_loss():
    assert set(LOSS_CASES) == set(loss_names())


@pytest.mark.parametrize("chunk_size", [None, 5, 1], ids=lambda c: f"chunk{c}")
@pytest.mark.parametrize("kind", sorted(LOSS_CASES))
def test_loss_with_gradients_in_forward_equals_float64_reference(kind, chunk_size):
    """fused_output_loss (the trainer's default): the loss value, the log-probs and both gradients of every
    registered loss against the float64 dense reference, in one tile, in 5-token tiles and token by token."""
    hidden, weight, targets, *_ = _inputs()
    data = _loss_inputs()
    h = hidden.clone().requires_grad_(True)
    w = weight.clone().requires_grad_(True)
    loss, logp = fused_output_loss(h, w, targets, _registered_loss(kind, data), chunk_size=chunk_size,
                                   vocab_size=REAL_V)
    (3.0 * loss).backward()  # the incoming gradient scales the stored ones
    ref_loss, ref_lp, ref_gh, ref_gw = _loss_reference(kind, hidden, weight, targets, data)
    assert loss.dim() == 0 and not logp.requires_grad and logp.shape == targets.shape
    assert_close(loss, ref_loss, what=f"{kind} loss")
    assert_close(logp, ref_lp, what=f"{kind} logp")
    assert_close(h.grad, 3.0 * ref_gh, what=f"{kind} grad hidden")
    assert_close(w.grad[:REAL_V], 3.0 * ref_gw[:REAL_V], what=f"{kind} grad weight")
    assert torch.equal(w.grad[REAL_V:], torch.zeros_like(w.grad[REAL_V:]))
    assert h.grad.abs().max() > 1e-3 and w.grad.abs().max() > 1e-3  # the case is able to fail


def test_loss_without_autograd_makes_no_gradients(monkeypatch):
    """Under no_grad (validation) the loss and log-probs are the same, and no gradient GEMM runs: the function
    falls back to the forward-only tiles (autograd would report the weight as needing a gradient regardless)."""
    hidden, weight, targets, *_ = _inputs()
    data = _loss_inputs()
    w = weight.clone().requires_grad_(True)
    with torch.no_grad():
        calls = []
        monkeypatch.setattr(fused_module._FusedOutputLoss, "apply", lambda *a: calls.append(a))
        loss, logp = fused_output_loss(hidden, w, targets, _registered_loss("offline_grpo", data), vocab_size=REAL_V)
    assert not calls
    ref_loss, ref_lp, *_ = _loss_reference("offline_grpo", hidden, weight, targets, data)
    assert_close(loss, ref_loss, what="loss")
    assert_close(logp, ref_lp, what="logp")


def test_loss_with_gradients_in_forward_bf16():
    """bf16 hidden states and weight: an fp32 loss and log-probs, gradients in bf16 (fp32 accumulation of the
    weight gradient over token chunks), against the reference on the bf16-rounded inputs."""
    hidden, weight, targets, *_ = _inputs()
    data = _loss_inputs()
    h = hidden.bfloat16().requires_grad_(True)
    w = weight.bfloat16().requires_grad_(True)
    loss, logp = fused_output_loss(h, w, targets, _registered_loss("offline_grpo", data), chunk_size=3,
                                   vocab_size=REAL_V)
    loss.backward()
    assert loss.dtype == torch.float32 and logp.dtype == torch.float32
    assert h.grad.dtype == torch.bfloat16 and w.grad.dtype == torch.bfloat16
    ref_loss, ref_lp, ref_gh, ref_gw = _loss_reference("offline_grpo", h.detach(), w.detach(), targets, data)
    assert_close(loss, ref_loss, rtol=2e-2, what="bf16 loss")
    assert_close(logp, ref_lp, rtol=2e-2, what="bf16 logp")
    assert_close(h.grad, ref_gh, rtol=3e-2, what="bf16 grad hidden")
    assert_close(w.grad[:REAL_V], ref_gw[:REAL_V], rtol=3e-2, what="bf16 grad weight")


def test_loss_with_gradients_in_forward_tied_embeddings():
    """The weight as embedding and output layer: its gradient sums the embedding lookup's (ordinary autograd)
    and the output layer's (made in forward)."""
    hidden, weight, targets, *_ = _inputs()
    data = _loss_inputs()
    tokens = torch.randint(0, REAL_V, (B, S), generator=torch.Generator().manual_seed(9))
    mix = torch.randn(H, H, generator=torch.Generator().manual_seed(10)) / H**0.5
    emb = weight.clone().requires_grad_(True)
    h = torch.tanh(emb[tokens] @ mix)
    loss, _ = fused_output_loss(h, emb, targets, _registered_loss("offline_grpo", data), chunk_size=4,
                                vocab_size=REAL_V)
    loss.backward()
    emb64 = weight.double().requires_grad_(True)
    h64 = torch.tanh(emb64[tokens] @ mix.double())
    logp64 = ref_logprobs(h64 @ emb64[:REAL_V].t(), targets)
    case = LOSS_CASES["offline_grpo"]
    ref_policy_loss(logp64, data["mask"], data["adv"], "offline_grpo", ref=data["ref"], clip_eps=0.2,
                    kl_coef=case["kl_coef"], shaping_gamma=case["shaping_gamma"]).backward()
    assert_close(emb.grad, emb64.grad, what="tied grad")


def test_a_loss_mixing_tokens_would_be_caught():
    """The separability the forward-gradient path relies on is what the reference tests check: a loss whose
    per-token gradient depends on other tokens (a sequence-level ratio) gives wrong gradients there, so the
    registered losses' agreement above is a real check."""
    hidden, weight, targets, *_ = _inputs()

    def sequence_level(logp):  # GSPO-like: exp of the sequence-mean log-prob
        return -torch.exp(logp.mean(dim=-1)).sum()

    h = hidden.clone().requires_grad_(True)
    loss, _ = fused_output_loss(h, weight, targets, sequence_level, chunk_size=3, vocab_size=REAL_V)
    loss.backward()
    h64 = hidden.double().requires_grad_(True)
    sequence_level(ref_logprobs(h64 @ weight.double()[:REAL_V].t(), targets)).backward()
    assert (h.grad.double() - h64.grad).abs().max() > 1e-3


# ---- real tensor parallelism over gloo -----------------------------------------------------------------------


def _tp_worker(rank, world):
    """Every layout on 4 ranks: TP=4 (all ranks) and TP=2 (pairs {0,1}, {2,3}), replicated or sequence-sharded
    hidden states, fp32 and bf16. Returns this rank's outputs and gradients."""
    from megatron_offgrpo.utils.cpu_backend import enable_cpu_backend

    enable_cpu_backend()  # Megatron's sequence-parallel gather allocates on the "current CUDA device"
    # Tiles of 5 tokens x 3 vocabulary rows: several blocks per shard, and a short last one.
    fused_module._TILE_ELEMENTS, fused_module._MIN_VOCAB_BLOCK = 15, 1
    dist.init_process_group("gloo")
    pairs = [dist.new_group([0, 1]), dist.new_group([2, 3])]  # every rank creates every group, in order
    hidden, weight, targets, g_lp, g_ent = _inputs()
    out = {}
    for name, tp, group, tp_rank in [("tp4", 4, dist.group.WORLD, rank), ("tp2", 2, pairs[rank // 2], rank % 2)]:
        rows = V // tp
        for sp in (False, True):
            for dtype in (torch.float32, torch.bfloat16):
                if dtype == torch.bfloat16 and (sp or tp == 4):
                    continue  # bf16 once is enough
                w = weight[tp_rank * rows : (tp_rank + 1) * rows].to(dtype).clone().requires_grad_(True)
                if sp:
                    seq = S // tp
                    h = hidden[:, tp_rank * seq : (tp_rank + 1) * seq].to(dtype).clone().requires_grad_(True)
                else:
                    h = hidden.to(dtype).clone().requires_grad_(True)
                logp, ent = fused_vocab_parallel_logprobs(h, w, targets, tp_group=group, chunk_size=5,
                                                          vocab_size=REAL_V, sequence_parallel=sp,
                                                          return_entropy=True)
                ((logp * g_lp).sum() + (ent * g_ent).sum()).backward()
                out[(name, sp, str(dtype))] = (logp.detach(), ent.detach(), h.grad, w.grad)
                # The training path: offline GRPO with its gradients taken in forward, 5-token tiles.
                w, h = w.detach().requires_grad_(True), h.detach().requires_grad_(True)
                loss, logp = fused_output_loss(h, w, targets, _registered_loss("offline_grpo", _loss_inputs()),
                                               tp_group=group, chunk_size=5, vocab_size=REAL_V, sequence_parallel=sp)
                loss.backward()
                out[("loss", name, sp, str(dtype))] = (loss.detach(), logp, h.grad, w.grad)
    return out


@pytest.fixture(scope="module")
def tp_results():
    return run_on_ranks(_tp_worker, 4)


@pytest.mark.parametrize("sp", [False, True], ids=["replicated", "sequence-parallel"])
@pytest.mark.parametrize("layout", ["tp4", "tp2"])
def test_tensor_parallel_equals_float64_reference(tp_results, layout, sp):
    hidden, weight, targets, g_lp, g_ent = _inputs()
    ref_lp, ref_ent, ref_gh, ref_gw = _reference(hidden, weight, targets, g_lp, g_ent)
    tp = 4 if layout == "tp4" else 2
    groups = [[0, 1, 2, 3]] if tp == 4 else [[0, 1], [2, 3]]
    for ranks in groups:
        grads_w = []
        for tp_rank, r in enumerate(ranks):
            logp, ent, grad_h, grad_w = tp_results[r][(layout, sp, str(torch.float32))]
            assert_close(logp, ref_lp, what=f"{layout} rank {r} logp")  # every rank holds every token's log-prob
            assert_close(ent, ref_ent, what=f"{layout} rank {r} entropy")
            # Replicated hidden states: every rank's gradient is the full one (all-reduced); sequence-parallel: each
            # rank's shard gets its slice of it (reduce-scattered).
            seq = S // tp
            expected_gh = ref_gh[:, tp_rank * seq : (tp_rank + 1) * seq] if sp else ref_gh
            assert_close(grad_h, expected_gh, what=f"{layout} rank {r} grad hidden")
            grads_w.append(grad_w)
        grad_w = torch.cat(grads_w)  # the ranks' rows, in vocabulary order
        assert_close(grad_w[:REAL_V], ref_gw[:REAL_V], what=f"{layout} grad weight")
        assert torch.equal(grad_w[REAL_V:], torch.zeros_like(grad_w[REAL_V:]))
    if tp == 4:  # rank 3 holds only padding: zero weight gradient, yet the full log-probs
        assert torch.equal(tp_results[3][(layout, sp, str(torch.float32))][3], torch.zeros(V // 4, H))


@pytest.mark.parametrize("sp", [False, True], ids=["replicated", "sequence-parallel"])
@pytest.mark.parametrize("layout", ["tp4", "tp2"])
def test_tensor_parallel_loss_with_gradients_in_forward(tp_results, layout, sp):
    """fused_output_loss under TP (statistics all-reduced per token chunk) and SP: every rank's loss and log-probs,
    its slice of the hidden states' gradient and its rows of the weight's, against the float64 reference."""
    hidden, weight, targets, *_ = _inputs()
    ref_loss, ref_lp, ref_gh, ref_gw = _loss_reference("offline_grpo", hidden, weight, targets, _loss_inputs())
    tp = 4 if layout == "tp4" else 2
    for ranks in ([[0, 1, 2, 3]] if tp == 4 else [[0, 1], [2, 3]]):
        grads_w = []
        for tp_rank, r in enumerate(ranks):
            loss, logp, grad_h, grad_w = tp_results[r][("loss", layout, sp, str(torch.float32))]
            assert_close(loss, ref_loss, what=f"{layout} rank {r} loss")
            assert_close(logp, ref_lp, what=f"{layout} rank {r} logp")
            seq = S // tp
            assert_close(grad_h, ref_gh[:, tp_rank * seq : (tp_rank + 1) * seq] if sp else ref_gh,
                         what=f"{layout} rank {r} grad hidden")
            grads_w.append(grad_w)
        grad_w = torch.cat(grads_w)
        assert_close(grad_w[:REAL_V], ref_gw[:REAL_V], what=f"{layout} grad weight")
        assert torch.equal(grad_w[REAL_V:], torch.zeros_like(grad_w[REAL_V:]))


def test_tensor_parallel_bf16_inputs(tp_results):
    hidden, weight, targets, g_lp, g_ent = _inputs()
    # The reference on the bf16-rounded inputs: what remains is the logits' bf16 rounding by the GEMM.
    ref_lp, ref_ent, ref_gh, ref_gw = _reference(hidden.bfloat16(), weight.bfloat16(), targets, g_lp, g_ent)
    for ranks in ([0, 1], [2, 3]):
        for r in ranks:
            logp, ent, grad_h, _ = tp_results[r][("tp2", False, str(torch.bfloat16))]
            assert logp.dtype == torch.float32 and grad_h.dtype == torch.bfloat16
            assert_close(logp, ref_lp, rtol=2e-2, what="bf16 logp")
            assert_close(ent, ref_ent, rtol=2e-2, what="bf16 entropy")
            assert_close(grad_h, ref_gh, rtol=2e-2, what="bf16 grad hidden")
        grad_w = torch.cat([tp_results[r][("tp2", False, str(torch.bfloat16))][3] for r in ranks])
        assert_close(grad_w[:REAL_V], ref_gw[:REAL_V], rtol=2e-2, what="bf16 grad weight")
    # The training path in bf16 under TP=2.
    ref_loss, ref_lp, ref_gh, ref_gw = _loss_reference("offline_grpo", hidden.bfloat16(), weight.bfloat16(), targets,
                                                       _loss_inputs())
    for ranks in ([0, 1], [2, 3]):
        for r in ranks:
            loss, logp, grad_h, _ = tp_results[r][("loss", "tp2", False, str(torch.bfloat16))]
            assert grad_h.dtype == torch.bfloat16
            assert_close(loss, ref_loss, rtol=2e-2, what="bf16 loss")
            assert_close(logp, ref_lp, rtol=2e-2, what="bf16 logp")
            assert_close(grad_h, ref_gh, rtol=3e-2, what="bf16 grad hidden")
        grad_w = torch.cat([tp_results[r][("loss", "tp2", False, str(torch.bfloat16))][3] for r in ranks])
        assert_close(grad_w[:REAL_V], ref_gw[:REAL_V], rtol=3e-2, what="bf16 grad weight (loss)")


# ---- through a real Megatron GPTModel ------------------------------------------------------------------------


def _gpt_worker(rank, world):
    """A tiny Qwen3-shaped GPTModel at TP=2 with tied embeddings, over a padded vocabulary:
    the unfused step (Megatron's output layer -> logits -> vocab_parallel_logprobs) and the fused one
    (output_hidden_states -> fused_vocab_parallel_logprobs) on the same batch. Returns both log-probs and every
    parameter's gradient."""
    from megatron_offgrpo.models import build_gpt_model, build_transformer_config, tiny_architecture
    from megatron_offgrpo.models.provider import output_hidden_states
    from megatron_offgrpo.utils.cpu_backend import initialize_cpu_model_parallel

    initialize_cpu_model_parallel(tensor_model_parallel_size=2)
    arch = dataclasses.replace(tiny_architecture(vocab_size=250), tie_word_embeddings=True)
    config = build_transformer_config(arch, tp=2)
    torch.manual_seed(0)
    model = build_gpt_model(arch, config, backend="local")  # padded to 256 rows: rank 1 holds 6 padding rows
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 250, (2, 16), generator=g)
    labels = torch.roll(tokens, -1, dims=1)
    position_ids = torch.arange(16).expand(2, 16)
    upstream = torch.randn(2, 16, generator=g)
    out = {}
    for fused in (False, True):
        model.zero_grad(set_to_none=True)
        if fused:
            with output_hidden_states(model) as weight:
                hidden = model(tokens, position_ids, None)
            assert hidden.shape == (2, 16, arch.hidden_size)  # [b, s, H], as the logits would be
            assert weight is model.embedding.word_embeddings.weight  # tied: the embedding's weight
            logp = fused_vocab_parallel_logprobs(hidden, weight, labels, vocab_size=250)
        else:
            logits = model(tokens, position_ids, None)
            assert logits.shape == (2, 16, 128)
            logp = vocab_parallel_logprobs(logits, labels, vocab_size=250)
        (logp * upstream).sum().backward()
        out[fused] = (logp.detach(), {n: p.grad.clone() for n, p in model.named_parameters()})
    # Outside the block the model computes logits again.
    assert model(tokens, position_ids, None).shape == (2, 16, 128)
    return out


def test_gpt_model_with_hidden_states_output_gives_the_unfused_step():
    for rank, out in enumerate(run_on_ranks(_gpt_worker, 2)):
        (lp_ref, grads_ref), (lp, grads) = out[False], out[True]
        assert_close(lp, lp_ref, what=f"rank {rank} logp")
        assert grads.keys() == grads_ref.keys() and "embedding.word_embeddings.weight" in grads
        for name in grads_ref:
            assert_close(grads[name], grads_ref[name], rtol=1e-5, atol=1e-7, what=f"rank {rank} grad {name}")
        emb = grads["embedding.word_embeddings.weight"]
        if rank == 1:  # rows 250..255 of the vocabulary are padding: never looked up, never in the softmax
            assert torch.equal(emb[250 - 128 :], torch.zeros_like(emb[250 - 128 :]))


# ---- CUDA: the Triton tile kernels (ready for a lent GPU) ----------------------------------------------------

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (the Triton tile kernels)")


@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", [(1, 64, 4099), (333, 256, 37984), (2048, 512, 151936 // 4)],
                         ids=lambda s: "x".join(map(str, s)))
def test_triton_matches_torch_path_and_float64(dtype, shape):
    n, hidden_size, vocab = shape
    real = vocab - 17  # a padded tail
    g = torch.Generator(device="cuda").manual_seed(0)
    hidden = (torch.randn(n, hidden_size, generator=g, device="cuda")).to(dtype)
    weight = (torch.randn(vocab, hidden_size, generator=g, device="cuda") / hidden_size**0.5 * 3).to(dtype)
    targets = torch.randint(0, real, (n,), generator=g, device="cuda")
    targets[0] = real - 1
    g_lp = torch.randn(n, generator=g, device="cuda")
    g_ent = torch.randn(n, generator=g, device="cuda")
    results = {}
    for backend in ("torch", "triton"):
        h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
        logp, ent = fused_vocab_parallel_logprobs(h, w, targets, backend=backend, vocab_size=real,
                                                  return_entropy=True)
        ((logp * g_lp).sum() + (ent * g_ent).sum()).backward()
        results[backend] = (logp, ent, h.grad, w.grad)
    ref_lp, ref_ent, ref_gh, ref_gw = _reference(hidden.cpu(), weight.cpu(), targets.cpu(), g_lp.cpu(),
                                                 g_ent.cpu(), real=real)
    tol = 1e-4 if dtype == torch.float32 else 2e-2  # TF32-free fp32 GEMMs; bf16 logits rounded by the GEMM
    for backend, (logp, ent, gh, gw) in results.items():
        assert_close(logp.cpu(), ref_lp, rtol=tol, what=f"{backend} logp")
        assert_close(ent.cpu(), ref_ent, rtol=tol, what=f"{backend} entropy")
        assert_close(gh.cpu(), ref_gh, rtol=tol, what=f"{backend} grad hidden")
        assert_close(gw[:real].cpu(), ref_gw[:real], rtol=tol, what=f"{backend} grad weight")
        assert torch.count_nonzero(gw[real:]) == 0


@cuda
def test_triton_path_never_holds_the_logits():
    """16k tokens x 38k vocabulary rows (Qwen at TP=4) in bf16: the logits would be 1.2 GB, their fp32 copy 2.4 GB;
    the fused forward + backward peaks at a small fraction of one logits buffer above the inputs."""
    n, hidden_size, vocab = 16384, 1024, 151936 // 4
    g = torch.Generator(device="cuda").manual_seed(0)
    hidden = torch.randn(n, hidden_size, generator=g, device="cuda").bfloat16().requires_grad_(True)
    weight = (torch.randn(vocab, hidden_size, generator=g, device="cuda") / 32).bfloat16().requires_grad_(True)
    targets = torch.randint(0, vocab, (n,), generator=g, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fused_vocab_parallel_logprobs(hidden, weight, targets, backend="triton").sum().backward()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    logits_bytes = n * vocab * 2
    grads_bytes = hidden.numel() * 2 + weight.numel() * 2
    assert peak - grads_bytes < 0.35 * logits_bytes, (peak, grads_bytes, logits_bytes)


@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_triton_loss_with_gradients_in_forward(dtype):
    """The training path on CUDA: Triton tile kernels and the torch path against the float64 reference, several
    token chunks over a padded vocabulary."""
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(B, S, H, generator=g)
    weight = torch.randn(V, H, generator=g) * 0.7
    targets = torch.randint(0, REAL_V, (B, S), generator=g)
    data = _loss_inputs()
    ref_loss, ref_lp, ref_gh, ref_gw = _loss_reference("offline_grpo", hidden.to(dtype), weight.to(dtype), targets,
                                                       data)
    cuda_data = {k: v.cuda() for k, v in data.items()}
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    for backend in ("torch", "triton"):
        h = hidden.to(dtype).cuda().requires_grad_(True)
        w = weight.to(dtype).cuda().requires_grad_(True)
        loss, logp = fused_output_loss(h, w, targets.cuda(), _registered_loss("offline_grpo", cuda_data),
                                       chunk_size=5, backend=backend, vocab_size=REAL_V)
        loss.backward()
        assert_close(loss.cpu(), ref_loss, rtol=tol, what=f"{backend} loss")
        assert_close(logp.cpu(), ref_lp, rtol=tol, what=f"{backend} logp")
        assert_close(h.grad.cpu(), ref_gh, rtol=tol, what=f"{backend} grad hidden")
        assert_close(w.grad[:REAL_V].cpu(), ref_gw[:REAL_V], rtol=tol, what=f"{backend} grad weight")
