"""CUDA tests of the Triton log-prob kernels against the float64 reference and the chunked torch path."""

from __future__ import annotations

import pytest
import torch

from megatron_offgrpo.losses import triton_logprobs, vocab_parallel_logprobs
from megatron_offgrpo.losses.logprobs import BACKEND_ENV
from loss_reference import ref_logprobs

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

QWEN_VOCAB = 151936


def assert_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float = 1e-5, atol: float = 1e-7) -> None:
    """Error bounded relative to the largest expected magnitude (as in test_losses.py)."""
    actual, expected = actual.double(), expected.double()
    err = (actual - expected).abs()
    bound = atol + rtol * expected.abs().max().clamp(min=1e-30)
    assert torch.all(err <= bound), f"max abs err {err.max().item():.3e} > {bound.item():.3e}"


def _inputs(n: int, v: int, dtype: torch.dtype, scale: float = 3.0, offset: float = 0.0, seed: int = 0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    logits = (torch.randn(n, v, generator=g, device="cuda") * scale + offset).to(dtype)
    targets = torch.randint(0, v, (n,), generator=g, device="cuda")
    targets[0] = v - 1  # last column: the tail block's mask must not hide it
    upstream = torch.randn(n, generator=g, device="cuda")
    return logits, targets, upstream


def _ref(logits: torch.Tensor, targets: torch.Tensor, upstream: torch.Tensor):
    """float64 log-probs and gradient on the exact (already rounded) input values."""
    x64 = logits.detach().double().requires_grad_(True)
    lp = ref_logprobs(x64, targets)
    lp.backward(upstream.double())
    return lp.detach(), x64.grad


# Odd sizes: a single row, V not a multiple of the block, exactly one block, Qwen's vocabulary over TP=4.
SHAPES = [(1, 37984), (7, 10007), (33, 4096), (64, QWEN_VOCAB // 4), (3, 5)]
# Gradient tolerance relative to max |grad|: the gradient is rounded to the logits' dtype.
GRAD_RTOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_triton_matches_float64(dtype, shape):
    logits, targets, upstream = _inputs(*shape, dtype)
    x = logits.clone().requires_grad_(True)
    lp = vocab_parallel_logprobs(x, targets, backend="triton")
    assert lp.dtype == torch.float32
    lp.backward(upstream)
    ref, ref_grad = _ref(logits, targets, upstream)
    assert_close(lp, ref)  # computed in fp32 from exact inputs whatever their dtype
    assert x.grad.dtype == dtype and x.grad.shape == x.shape
    assert_close(x.grad, ref_grad, rtol=GRAD_RTOL[dtype])


def test_triton_huge_logits_do_not_overflow():
    logits, targets, upstream = _inputs(9, 10007, torch.float32, scale=1e4, offset=3e4)
    x = logits.clone().requires_grad_(True)
    lp = vocab_parallel_logprobs(x, targets, backend="triton")
    lp.backward(upstream)
    assert torch.isfinite(lp).all() and torch.isfinite(x.grad).all()
    ref, ref_grad = _ref(logits, targets, upstream)
    assert_close(lp, ref, rtol=1e-6)
    assert_close(x.grad, ref_grad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_simulated_tensor_parallel_shards(dtype):
    """TP=4 in one process: kernels on column slices (strided rows, no copies), lse combined as logprobs.py
    does; targets on every shard boundary."""
    tp, v_local = 4, 2503  # odd local vocabulary
    n = 4 * tp + 3
    logits, targets, upstream = _inputs(n, tp * v_local, dtype, scale=1e3 if dtype == torch.float32 else 3.0)
    boundaries = [r * v_local + d for r in range(tp) for d in (-1, 0) if 0 <= r * v_local + d < tp * v_local]
    targets[: len(boundaries)] = torch.tensor(boundaries, device="cuda")
    targets[len(boundaries)] = tp * v_local - 1

    shards = [logits[:, r * v_local : (r + 1) * v_local] for r in range(tp)]
    parts = [triton_logprobs.local_logsumexp_and_target(s, targets, r * v_local) for r, s in enumerate(shards)]
    local_lse = torch.stack([p[0] for p in parts])
    global_max = local_lse.max(dim=0).values  # the all-reduce(MAX), then all-reduce(SUM) of the same formula
    lse = global_max + torch.log(torch.exp(local_lse - global_max).sum(dim=0))
    target_logit = torch.stack([p[1] for p in parts]).sum(dim=0)
    grad = torch.cat(
        [triton_logprobs.logits_grad(s, targets, r * v_local, lse, upstream) for r, s in enumerate(shards)], dim=1
    )

    ref, ref_grad = _ref(logits, targets, upstream)
    assert_close(target_logit - lse, ref)
    assert grad.dtype == dtype
    assert_close(grad, ref_grad, rtol=GRAD_RTOL[dtype])


@pytest.mark.parametrize("shape", [(257, QWEN_VOCAB // 4), (16, QWEN_VOCAB)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_triton_equals_torch_chunked_on_cuda(shape, monkeypatch):
    logits, targets, upstream = _inputs(*shape, torch.float32)
    results = {}
    for backend in ("torch", "triton"):
        monkeypatch.setenv(BACKEND_ENV, backend)  # the environment variable, as the benchmark uses it
        x = logits.clone().requires_grad_(True)
        lp = vocab_parallel_logprobs(x, targets, chunk_size=100)
        lp.backward(upstream)
        results[backend] = (lp.detach(), x.grad)
    assert_close(results["triton"][0], results["torch"][0], rtol=1e-5)
    assert_close(results["triton"][1], results["torch"][1], rtol=1e-5)


def test_non_contiguous_inputs_and_expanded_grad():
    """3-D batch, transposed storage (vocabulary stride != 1: copied once), and a stride-0 upstream gradient
    (``.sum().backward()``)."""
    B, T, V = 3, 5, 3001
    storage = torch.randn(B, V, T, device="cuda") * 3
    logits = storage.transpose(1, 2)  # [B, T, V], vocabulary stride T
    targets = torch.randint(0, V, (B, T), device="cuda")
    x = logits.detach().clone().requires_grad_(True)  # clone keeps the transposed strides
    assert x.stride(-1) != 1
    lp = vocab_parallel_logprobs(x, targets, backend="triton")
    lp.sum().backward()
    x64 = logits.double().requires_grad_(True)
    ref = ref_logprobs(x64, targets)
    ref.sum().backward()
    assert lp.shape == (B, T)
    assert_close(lp, ref)
    assert_close(x.grad, x64.grad)


def test_int64_offsets_beyond_2_pow_31_elements():
    """N * V > 2^31: the last rows are only reachable with 64-bit offsets."""
    n = (1 << 31) // QWEN_VOCAB + 2
    logits, targets, upstream = _inputs(n, QWEN_VOCAB, torch.bfloat16)
    targets[-1] = QWEN_VOCAB - 1
    upstream[:-3] = 0.0  # only the last rows' gradient is checked (cheap float64 reference)
    x = logits.requires_grad_(True)
    lp = vocab_parallel_logprobs(x, targets, backend="triton")
    lp.backward(upstream)
    ref, ref_grad = _ref(logits[-3:], targets[-3:], upstream[-3:])
    assert_close(lp[-3:], ref)
    assert_close(x.grad[-3:], ref_grad, rtol=GRAD_RTOL[torch.bfloat16])
    assert (x.grad[:-3] == 0).all()


def test_triton_working_memory_is_only_the_gradient():
    n, v = 2048, QWEN_VOCAB // 2
    logits, targets, upstream = _inputs(n, v, torch.bfloat16)
    x = logits.requires_grad_(True)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    vocab_parallel_logprobs(x, targets, backend="triton").backward(upstream)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - before
    grad_bytes = x.numel() * x.element_size()
    assert extra <= grad_bytes + (4 << 20), (extra, grad_bytes)


def test_auto_backend_picks_triton_on_cuda(monkeypatch):
    monkeypatch.delenv(BACKEND_ENV, raising=False)
    logits, targets, _ = _inputs(4, 1000, torch.float32)
    called = []
    original = triton_logprobs.local_logsumexp_and_target
    monkeypatch.setattr(triton_logprobs, "local_logsumexp_and_target", lambda *a: called.append(1) or original(*a))
    vocab_parallel_logprobs(logits, targets)
    assert called
    with pytest.raises(RuntimeError, match="triton"):
        vocab_parallel_logprobs(logits.cpu(), targets.cpu(), backend="triton")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_triton_excludes_the_padded_vocabulary(dtype):
    """Megatron's padding columns: outside the softmax, zero gradient, same numbers as the torch path."""
    real = 10007
    logits, targets, upstream = _inputs(9, real + 121, dtype)
    logits[:, real:] = 30.0  # padding that would dominate every softmax if it were counted
    targets = targets % real
    out = {}
    for backend in ("triton", "torch"):
        x = logits.clone().requires_grad_(True)
        lp = vocab_parallel_logprobs(x, targets, backend=backend, vocab_size=real)
        lp.backward(upstream)
        out[backend] = (lp, x.grad)
    ref, ref_grad = _ref(logits[:, :real], targets, upstream)
    assert_close(out["triton"][0], ref)
    assert torch.equal(out["triton"][1][:, real:], torch.zeros_like(out["triton"][1][:, real:]))
    assert_close(out["triton"][1][:, :real], ref_grad, rtol=GRAD_RTOL[dtype])
    assert_close(out["triton"][0], out["torch"][0])
