"""Peak memory and time of per-token log-probs, forward + backward: ours vs the naive full-vocabulary path.

    naive:          torch.log_softmax(logits.float(), -1).gather(-1, targets[..., None])
    ours:           megatron_offgrpo.losses.vocab_parallel_logprobs(logits, targets)
                    (default backend: the fused Triton kernels on CUDA, the chunked torch code on CPU)
    torch-chunked:  the same with backend="torch" (CUDA only; on CPU it is what "ours" runs anyway)

All are run in the same invocation and printed as ratios to naive (these machines are noisy: only a ratio
measured side by side means anything). "Peak extra memory" is the high-water mark during forward +
backward minus what was live before (the logits and targets): it includes the logits' gradient, which both paths
must produce.

CPU (default): each measurement runs in a fresh child process; its peak RSS is reset through
``/proc/self/clear_refs`` before the run and read from ``VmHWM`` after. CUDA (``--device cuda``):
``torch.cuda.max_memory_allocated`` around the run, in this process.

    python benchmarks/logprob_memory.py                       # 4096 x 151936, bf16 and fp32 logits, CPU
    python benchmarks/logprob_memory.py --device cuda --tokens 16384
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from typing import Dict, List

import torch

from megatron_offgrpo.losses import vocab_parallel_logprobs

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def naive_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, targets[..., None]).squeeze(-1)


def ours_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return vocab_parallel_logprobs(logits, targets)


def torch_chunked_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return vocab_parallel_logprobs(logits, targets, backend="torch")


VARIANTS = {"naive": naive_logprobs, "ours": ours_logprobs, "torch-chunked": torch_chunked_logprobs}
CPU_VARIANTS = ("naive", "ours")


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _make_inputs(tokens: int, vocab: int, dtype: torch.dtype, device: str):
    g = torch.Generator(device=device).manual_seed(0)
    logits = (torch.randn(tokens, vocab, generator=g, device=device) * 3).to(dtype).requires_grad_(True)
    targets = torch.randint(0, vocab, (tokens,), generator=g, device=device)
    upstream = torch.randn(tokens, generator=g, device=device)
    return logits, targets, upstream


def _run_once(variant: str, logits, targets, upstream) -> None:
    VARIANTS[variant](logits, targets).backward(upstream)
    logits.grad = None


def measure_cpu_child(variant: str, tokens: int, vocab: int, dtype: str) -> Dict[str, float]:
    """In a fresh process: peak extra RSS of one forward+backward, then its wall time."""
    logits, targets, upstream = _make_inputs(tokens, vocab, DTYPES[dtype], "cpu")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak-RSS (VmHWM) counter to the current RSS
    before = _rss_kib("VmRSS")
    start = time.perf_counter()
    _run_once(variant, logits, targets, upstream)
    seconds = time.perf_counter() - start
    peak = _rss_kib("VmHWM")
    return {"peak_extra_gib": (peak - before) / 2**20, "seconds": seconds}


def measure_cuda(variant: str, tokens: int, vocab: int, dtype: str, reps: int) -> Dict[str, float]:
    logits, targets, upstream = _make_inputs(tokens, vocab, DTYPES[dtype], "cuda")
    _run_once(variant, logits, targets, upstream)  # warm-up (kernels, allocator)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    _run_once(variant, logits, targets, upstream)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    times = []
    for _ in range(reps):
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        _run_once(variant, logits, targets, upstream)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return {"peak_extra_gib": peak / 2**30, "seconds": statistics.median(times)}


def measure_cpu(variant: str, tokens: int, vocab: int, dtype: str) -> Dict[str, float]:
    cmd = [sys.executable, __file__, "--child", variant, "--tokens", str(tokens), "--vocab", str(vocab),
           "--dtypes", dtype]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: List[str] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--dtypes", default="bf16,fp32", help="comma-separated: bf16, fp32")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--reps", type=int, default=3, help="timed repetitions per variant (median reported)")
    parser.add_argument("--child", choices=list(VARIANTS), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child:
        print(json.dumps(measure_cpu_child(args.child, args.tokens, args.vocab, args.dtypes)))
        return

    print(f"per-token log-probs, forward+backward, [{args.tokens} x {args.vocab}] logits on {args.device}"
          + (f" ({torch.cuda.get_device_name()})" if args.device == "cuda" else f" ({torch.get_num_threads()} threads)"))
    print("peak extra = high-water mark minus the live logits; working = peak extra minus the logits' gradient,")
    print("which both paths must return (so 'working' is the temporary memory the chunking bounds)")
    print(f"{'logits':>6} {'variant':>13} {'peak extra GiB':>15} {'working GiB':>12} {'time s':>9}")
    variants = list(VARIANTS) if args.device == "cuda" else list(CPU_VARIANTS)
    # On CUDA the fused kernels should beat even the naive path; on CPU the chunking costs some time.
    time_target = "1.0x" if args.device == "cuda" else "1.3x"
    for dtype in args.dtypes.split(","):
        grad_gib = args.tokens * args.vocab * DTYPES[dtype].itemsize / 2**30
        runs: Dict[str, List[Dict[str, float]]] = {v: [] for v in variants}
        if args.device == "cuda":
            for v in variants:
                runs[v].append(measure_cuda(v, args.tokens, args.vocab, dtype, args.reps))
        else:
            for _ in range(args.reps):  # alternate so that machine noise hits both alike
                for v in variants:
                    runs[v].append(measure_cpu(v, args.tokens, args.vocab, dtype))
        summary = {
            v: {k: statistics.median(r[k] for r in rs) for k in ("peak_extra_gib", "seconds")}
            for v, rs in runs.items()
        }
        for v, s in summary.items():
            s["working_gib"] = max(s["peak_extra_gib"] - grad_gib, 0.0)
            print(f"{dtype:>6} {v:>13} {s['peak_extra_gib']:>15.3f} {s['working_gib']:>12.3f} {s['seconds']:>9.3f}")
        naive = summary["naive"]
        for v in variants[1:]:
            s = summary[v]
            print(f"{dtype:>6} ratio {v}/naive: peak extra {s['peak_extra_gib'] / naive['peak_extra_gib']:.3f}x, "
                  f"working {s['working_gib'] / naive['working_gib']:.3f}x (target <= 0.25x), "
                  f"time {s['seconds'] / naive['seconds']:.3f}x (target <= {time_target})")


if __name__ == "__main__":
    main()
