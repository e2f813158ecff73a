"""FP8 readiness (issue 12 item 4): the offline GRPO step under Transformer Engine FP8 vs BF16, on one GPU.

Same weights, same batch, the trainer's loss path (final hidden states -> ``fused_vocab_parallel_logprobs`` with
the real vocabulary -> ``policy_loss(kind="offline_grpo")`` with KL), forward + backward. Variants:

    bf16                 the baseline
    fp8-tensorwise       TE FP8 (hybrid: E4M3 forward, E5M2 gradients), per-tensor current scaling
    fp8-tensorwise-ends  the same with the first and the last transformer layer kept in BF16
    fp8-delayed          TE FP8 with delayed scaling (amax history; Megatron refuses BF16 end layers with it)

FP8 applies inside Megatron's TransformerBlock only: the output layer (Megatron's own ColumnParallelLinear, not a
TE module) and the log-probs stay in BF16 GEMMs with fp32 softmax statistics, as DESIGN 3 needs (offline GRPO's
clip reads ``p = exp(logp)`` directly, so the FP8 drift of ``logp`` is part of the loss).

Printed, per variant, against BF16 measured in the same invocation: step time (median of ``--reps`` after warm-up
steps that also settle delayed scaling's amax history) and the per-token log-prob difference on the batch's
response tokens (max and mean ``|logp_fp8 - logp_bf16|``, max ``|p_fp8 - p_bf16|``). Each variant runs in a
fresh process from the weights the BF16 process saved, so the comparison is of numerics, not of initialisation.

    python benchmarks/fp8_step.py --seq 4096 --layers 4          # Qwen2.5-7B layer shapes, bf16 params

GPU only (FP8 GEMMs need Hopper / Ada or newer and Transformer Engine); elsewhere it exits with a message.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Dict, List

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

VARIANTS = {
    "bf16": {},
    "fp8-tensorwise": {"fp8": "hybrid", "fp8_recipe": "tensorwise"},
    "fp8-tensorwise-ends": {"fp8": "hybrid", "fp8_recipe": "tensorwise", "first_last_layers_bf16": True,
                            "num_layers_at_start_in_bf16": 1, "num_layers_at_end_in_bf16": 1},
    "fp8-delayed": {"fp8": "hybrid", "fp8_recipe": "delayed"},
}


def fp8_unavailable_reason() -> str:
    """Why FP8 cannot run here ('' when it can)."""
    if not torch.cuda.is_available():
        return "no CUDA device (this machine is CPU-only)"
    if torch.cuda.get_device_capability() < (8, 9):
        return f"{torch.cuda.get_device_name()} has no FP8 tensor cores (needs compute capability >= 8.9)"
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception as e:  # noqa: BLE001 - not installed, or broken for this CUDA: either way no FP8
        return f"Transformer Engine does not import ({type(e).__name__}: {e})"
    return ""


def _build(args, variant: str):
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    import train_step  # benchmarks/train_step.py: the same architecture and batch
    from megatron_offgrpo.models import build_gpt_model, build_transformer_config

    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
    torch.cuda.set_device(0)
    dist.init_process_group("nccl")
    parallel_state.initialize_model_parallel()
    torch.manual_seed(0)
    model_parallel_cuda_manual_seed(0)
    arch = train_step._architecture(args)
    overrides = dict(VARIANTS[variant])
    fp8, recipe = overrides.pop("fp8", None), overrides.pop("fp8_recipe", None)
    config = build_transformer_config(arch, params_dtype=torch.bfloat16, fp8=fp8, fp8_recipe=recipe,
                                      hidden_dropout=0.0, attention_dropout=0.0, **overrides)
    model = build_gpt_model(arch, config, backend="te").cuda()
    # The tensors only: TE's `_extra_state` entries hold each recipe's own FP8 metadata (scales, amax history).
    if os.path.exists(args.weights):
        missing, unexpected = model.load_state_dict(torch.load(args.weights, map_location="cuda"), strict=False)
        missing = [k for k in missing if not k.endswith("_extra_state")]
        if missing or unexpected:
            raise RuntimeError(f"{variant}: weights do not match the bf16 model: {missing[:5]} {unexpected[:5]}")
    else:
        torch.save({k: v for k, v in model.state_dict().items() if torch.is_tensor(v)
                    and not k.endswith("_extra_state")}, args.weights)
    return arch, model, train_step._batch(args, arch, "cuda")


def _logprobs(model, batch, vocab_size: int, with_grad: bool):
    from megatron_offgrpo.losses import fused_vocab_parallel_logprobs, policy_loss
    from megatron_offgrpo.models.provider import output_hidden_states

    tokens, labels, mask, ref, adv, pos = batch
    with torch.set_grad_enabled(with_grad):
        with output_hidden_states(model) as weight:
            hidden = model(tokens, pos, None)
        logp = fused_vocab_parallel_logprobs(hidden, weight, labels, vocab_size=vocab_size)
        if not with_grad:
            return logp
        loss, _ = policy_loss(logp, mask, adv, kind="offline_grpo", ref_logprobs=ref)
        loss.backward()
        model.zero_grad(set_to_none=True)
        return logp


def measure(variant: str, args) -> Dict[str, float]:
    """In this process: median step time after warm-up, and the batch's log-probs written to ``--logp-out``."""
    arch, model, batch = _build(args, variant)
    for _ in range(args.warmup):  # kernels, allocator, and delayed scaling's amax history
        _logprobs(model, batch, arch.vocab_size, with_grad=True)
    times = []
    for _ in range(args.reps):
        torch.cuda.synchronize()
        start = time.perf_counter()
        _logprobs(model, batch, arch.vocab_size, with_grad=True)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    logp = _logprobs(model, batch, arch.vocab_size, with_grad=False)
    torch.save({"logp": logp.cpu(), "mask": batch[2].cpu()}, args.logp_out)
    return {"seconds": statistics.median(times)}


def main(argv: List[str] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--mbs", type=int, default=1)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated; bf16 always runs first")
    parser.add_argument("--child", choices=list(VARIANTS), help=argparse.SUPPRESS)
    parser.add_argument("--weights", help=argparse.SUPPRESS)
    parser.add_argument("--logp-out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.device = "cuda"  # for train_step's architecture and batch helpers

    reason = fp8_unavailable_reason()
    if reason:
        raise SystemExit(f"fp8_step.py measures Transformer Engine FP8 on a GPU; {reason}. Nothing to measure: run "
                         "it on a Hopper/Ada GPU with Transformer Engine installed.")
    if args.child:
        print(json.dumps(measure(args.child, args)))
        return

    variants = ["bf16"] + [v for v in args.variants.split(",") if v and v != "bf16"]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"--variants: unknown {unknown}; choose from {list(VARIANTS)}")
    results, logps = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        weights = os.path.join(tmp, "weights.pt")
        for v in variants:  # each in a fresh process: FP8 is fixed when the model is built
            out_path = os.path.join(tmp, f"{v}.pt")
            cmd = [sys.executable, __file__, "--child", v, "--seq", str(args.seq), "--mbs", str(args.mbs),
                   "--layers", str(args.layers), "--reps", str(args.reps), "--warmup", str(args.warmup),
                   "--weights", weights, "--logp-out", out_path]
            out = subprocess.run(cmd, capture_output=True, text=True)
            if out.returncode:
                print(f"{v} failed:\n{out.stderr[-3000:]}", file=sys.stderr)
                continue
            results[v] = json.loads(out.stdout.strip().splitlines()[-1])
            logps[v] = torch.load(out_path, weights_only=False)
    if "bf16" not in results:
        raise SystemExit("the bf16 baseline failed: nothing to compare against")

    print(f"offline GRPO step (forward+backward, fused output layer + log-probs in BF16/FP32), {args.layers} layers, "
          f"{args.mbs} x {args.seq} tokens on {torch.cuda.get_device_name()}")
    print(f"{'variant':>20} {'time s':>9} {'vs bf16':>8} {'max|dlogp|':>11} {'mean|dlogp|':>12} {'max|dp|':>9}")
    base = logps["bf16"]
    sel = base["mask"].bool()
    for v, r in results.items():
        d = (logps[v]["logp"].double() - base["logp"].double())[sel].abs()
        dp = (logps[v]["logp"].double().exp() - base["logp"].double().exp())[sel].abs()
        print(f"{v:>20} {r['seconds']:>9.4f} {r['seconds'] / results['bf16']['seconds']:>7.3f}x "
              f"{d.max().item():>11.4f} {d.mean().item():>12.5f} {dp.max().item():>9.5f}")


if __name__ == "__main__":
    main()
