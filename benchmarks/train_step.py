"""Step time and peak memory of an offline GRPO step vs a plain Megatron cross-entropy (SFT) step.

Same model, same batch, forward + backward (the optimizer step is identical for all and left out):

    sft-ce:              GPTModel(tokens, labels=labels) -> Megatron's fused vocab-parallel cross entropy, masked mean
    offline-grpo:        GPTModel(tokens) -> logits -> vocab_parallel_logprobs -> policy_loss("offline_grpo", KL)
    offline-grpo-fused:  GPTModel(tokens) -> final hidden states (models.provider.output_hidden_states) ->
                         fused_output_loss(hidden, output weight, the same policy_loss): the logits never exist
                         and the loss's gradients are taken in the forward pass (three output-layer GEMMs, as in
                         sft-ce); the trainer's default (loss.fused_output_layer, loss.fused_output_gradients)
    offline-grpo-fused-recompute: fused_vocab_parallel_logprobs(hidden, output weight) -> policy_loss: the backward
                         recomputes the logits (four output-layer GEMMs; loss.fused_output_gradients=recompute)

Printed as ratios to sft-ce measured in the same invocation (targets for the offline GRPO step, issue 12: CPU
<= 1.1x time and <= 1.0x peak memory; GPU at 16k tokens <= 1.0x time and <= 0.6x peak memory). ``--rounds``
alternates the variants' child processes that many times and reports medians (a loaded machine drifts).
CPU (default): a Qwen-vocabulary toy (hidden 256, 4 layers, vocab 151936), fp32, local spec; each variant's peak
memory is measured in a fresh child process (VmHWM). CUDA (``--device cuda``): Qwen2.5-7B layer shapes with
``--layers`` layers in bf16 on the TE spec when importable, peak from ``torch.cuda.max_memory_allocated``, plus MFU
against ``--peak-tflops`` (H100 SXM dense bf16: 989).

    python benchmarks/train_step.py
    python benchmarks/train_step.py --device cuda --seq 4096 --layers 4
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Dict, List

import torch

VARIANTS = ("sft-ce", "offline-grpo", "offline-grpo-fused", "offline-grpo-fused-recompute")
# Issue 12's targets for the offline GRPO step / sft-ce: (time, peak memory) per device.
TARGETS = {"cpu": (1.1, 1.0), "cuda": (1.0, 0.6)}


def _architecture(args):
    from megatron_offgrpo.models import tiny_architecture

    if args.device == "cuda":  # Qwen2.5-7B layer shapes
        shape = dict(hidden_size=3584, ffn_hidden_size=18944, num_attention_heads=28, num_query_groups=4,
                     head_dim=128, vocab_size=152064, qkv_bias=True, qk_norm=False, family="qwen2")
    else:
        shape = dict(hidden_size=256, ffn_hidden_size=1024, num_attention_heads=4, num_query_groups=2,
                     head_dim=64, vocab_size=151936, qkv_bias=True, qk_norm=False, family="qwen2")
    return dataclasses.replace(tiny_architecture(), num_layers=args.layers, max_position_embeddings=args.seq,
                               rope_theta=1e6, **shape)


def _build(args):
    from megatron_offgrpo.models import build_gpt_model, build_transformer_config
    from megatron_offgrpo.utils.cpu_backend import initialize_cpu_model_parallel

    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
    if args.device == "cuda":
        import torch.distributed as dist
        from megatron.core import parallel_state
        from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

        torch.cuda.set_device(0)
        dist.init_process_group("nccl")
        parallel_state.initialize_model_parallel()
        model_parallel_cuda_manual_seed(0)
    else:
        initialize_cpu_model_parallel()
    arch = _architecture(args)
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    config = build_transformer_config(arch, params_dtype=dtype, hidden_dropout=0.0, attention_dropout=0.0)
    model = build_gpt_model(arch, config, backend="auto" if args.device == "cuda" else "local")
    if args.device == "cuda":
        model = model.cuda()
    return arch, model


def _batch(args, arch, device):
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, arch.vocab_size, (args.mbs, args.seq), generator=g)
    labels = torch.roll(tokens, -1, dims=1)
    mask = torch.zeros(args.mbs, args.seq)
    mask[:, args.seq // 8 : -1] = 1  # a prompt, then the response
    ref = -torch.rand(args.mbs, args.seq, generator=g) * 5
    adv = torch.linspace(-1, 1, args.mbs)
    pos = torch.arange(args.seq).expand(args.mbs, args.seq)
    return [t.to(device) for t in (tokens, labels, mask, ref, adv, pos)]


def _step(variant: str, model, batch, vocab_size: int) -> None:
    from megatron_offgrpo.losses import (
        fused_output_loss,
        fused_vocab_parallel_logprobs,
        policy_loss,
        vocab_parallel_logprobs,
    )
    from megatron_offgrpo.models.provider import output_hidden_states

    tokens, labels, mask, ref, adv, pos = batch
    if variant == "sft-ce":
        per_token = model(tokens, pos, None, labels=labels)  # Megatron's vocab-parallel cross entropy
        loss = (per_token.float() * mask).sum() / mask.sum()
    elif variant.startswith("offline-grpo-fused"):
        with output_hidden_states(model) as weight:
            hidden = model(tokens, pos, None)  # [b, s, H]: no output layer GEMM here
        if variant == "offline-grpo-fused":
            loss, _ = fused_output_loss(
                hidden, weight, labels, lambda lp: policy_loss(lp, mask, adv, kind="offline_grpo", ref_logprobs=ref)[0],
                vocab_size=vocab_size)
        else:
            logp = fused_vocab_parallel_logprobs(hidden, weight, labels, vocab_size=vocab_size)
            loss, _ = policy_loss(logp, mask, adv, kind="offline_grpo", ref_logprobs=ref)
    else:
        logits = model(tokens, pos, None)
        logp = vocab_parallel_logprobs(logits, labels, vocab_size=vocab_size)  # padding outside the softmax
        loss, _ = policy_loss(logp, mask, adv, kind="offline_grpo", ref_logprobs=ref)
    loss.backward()
    model.zero_grad(set_to_none=True)


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def measure(variant: str, args) -> Dict[str, float]:
    """Peak extra memory of one step (after a warm-up step) and the median step time, in this process."""
    arch, model = _build(args)
    device = "cuda" if args.device == "cuda" else "cpu"
    batch = _batch(args, arch, device)
    _step(variant, model, batch, arch.vocab_size)  # warm-up: allocator, kernels
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    sync()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        base = _rss_kib("VmRSS") * 1024
    times, cpu_times = [], []
    for _ in range(args.reps):
        sync()
        t0, c0 = time.perf_counter(), time.process_time()
        _step(variant, model, batch, arch.vocab_size)
        sync()
        times.append(time.perf_counter() - t0)
        cpu_times.append(time.process_time() - c0)
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else _rss_kib("VmHWM") * 1024
    from megatron_offgrpo.training.flops import train_flops_per_token  # the trainer's own estimate

    n_params = sum(p.numel() for p in model.parameters())
    padded_vocab = model.embedding.word_embeddings.weight.shape[0]
    return {"seconds": statistics.median(times), "cpu_seconds": statistics.median(cpu_times),
            "peak_extra_gib": (peak - base) / 2**30,
            "flops_per_token": train_flops_per_token(n_params, arch, padded_vocab, args.seq)}


def main(argv: List[str] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--seq", type=int, default=None, help="tokens per sequence (cpu 1024, cuda 4096)")
    parser.add_argument("--mbs", type=int, default=None, help="sequences per step (cpu 2, cuda 1)")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="for MFU (H100 SXM dense bf16)")
    parser.add_argument("--rounds", type=int, default=1, help="alternate the variants' processes this many times")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset (sft-ce always runs)")
    parser.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.seq = args.seq or (4096 if args.device == "cuda" else 1024)
    args.mbs = args.mbs or (1 if args.device == "cuda" else 2)

    if args.child:
        print(json.dumps(measure(args.child, args)))
        return
    variants = ["sft-ce"] + [v for v in args.variants.split(",") if v and v != "sft-ce"]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"--variants: unknown {unknown}; choose from {list(VARIANTS)}")
    runs: Dict[str, List[Dict[str, float]]] = {v: [] for v in variants}
    for _ in range(args.rounds):  # alternate, so that a drift of the machine's load hits every variant alike
        for variant in variants:  # each in a fresh process: clean allocator, honest peak
            cmd = [sys.executable, __file__, "--child", variant, "--device", args.device, "--seq", str(args.seq),
                   "--mbs", str(args.mbs), "--layers", str(args.layers), "--reps", str(args.reps)]
            out = subprocess.run(cmd, capture_output=True, text=True)
            if out.returncode:
                raise SystemExit(f"{variant} failed:\n{out.stderr[-4000:]}")
            runs[variant].append(json.loads(out.stdout.strip().splitlines()[-1]))
    results = {v: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for v, rs in runs.items()}
    tokens = args.seq * args.mbs
    print(f"train step (forward+backward), {args.layers} layers, {args.mbs} x {args.seq} tokens on {args.device}"
          f", median of {args.rounds} round(s) x {args.reps} reps")
    # CPU seconds (this process's, all threads): on a machine shared with other jobs, wall time includes waiting for
    # a core, which the CPU time does not; a ratio of CPU times is the steadier estimate there.
    print(f"{'variant':>28} {'time s':>9} {'cpu s':>9} {'peak extra GiB':>15} {'TFLOP/s':>9} {'MFU':>6}")
    for v, r in results.items():
        tflops = r["flops_per_token"] * tokens / r["seconds"] / 1e12
        mfu = f"{tflops / args.peak_tflops:.1%}" if args.device == "cuda" else "-"
        print(f"{v:>28} {r['seconds']:>9.4f} {r['cpu_seconds']:>9.4f} {r['peak_extra_gib']:>15.3f} {tflops:>9.2f} "
              f"{mfu:>6}")
    time_target, memory_target = TARGETS[args.device]
    b = results["sft-ce"]
    for v in variants[1:]:
        a = results[v]
        t, m = a["seconds"] / b["seconds"], a["peak_extra_gib"] / b["peak_extra_gib"]
        print(f"ratio {v} / sft-ce: time {t:.3f}x (target <= {time_target}x: {'met' if t <= time_target else 'MISSED'})"
              f", peak memory {m:.3f}x (target <= {memory_target}x: {'met' if m <= memory_target else 'MISSED'}), "
              f"cpu time {a['cpu_seconds'] / b['cpu_seconds']:.3f}x")
    if "offline-grpo" in results and "offline-grpo-fused" in results:
        a, c = results["offline-grpo-fused"], results["offline-grpo"]
        print(f"ratio offline-grpo-fused / offline-grpo: time {a['seconds'] / c['seconds']:.3f}x, "
              f"peak memory {a['peak_extra_gib'] / c['peak_extra_gib']:.3f}x, "
              f"cpu time {a['cpu_seconds'] / c['cpu_seconds']:.3f}x")


if __name__ == "__main__":
    main()
