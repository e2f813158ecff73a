#!/usr/bin/env python
"""Generation throughput of the vLLM backend against the HF transformers backend, on the same tiny model.

    python benchmarks/generation_throughput.py [--prompts 32] [--n 4] [--max-tokens 64] [--hidden 256] [--layers 4]

A random fp32 Qwen3 model (head_dim 32, the in-repo tokenizer) is written locally with ``transformers`` (nothing is
downloaded). Both backends run the same workload through :func:`megatron_offgrpo.inference.generation.generate`:
``--prompts`` chat prompts x ``--n`` samples x at most ``--max-tokens`` new tokens, temperature 0.6 / top-p 0.95,
the model's EOS logit pinned to 0 so that few completions stop early (tokens/s counts the tokens generated).

Printed, all measured in this run: vLLM's start time (engine creation in its worker: the first call in an engine
cache minus a second identical call), the generated tokens and wall time of each backend, tokens/s of each, and the
ratio vLLM tokens/s / HF tokens/s. The machine's other load disturbs the absolute numbers: compare the ratio, and
re-run on a quiet machine for timings to report.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def write_model(path: str, hidden: int, layers: int) -> str:
    """A random fp32 Qwen3 (head_dim 32) with the tiny tokenizer; its EOS logit row zeroed (few early stops)."""
    import torch
    import transformers
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(os.path.join(REPO, "examples", "tiny_tokenizer"), local_files_only=True)
    heads = hidden // 32
    cfg = transformers.Qwen3Config(
        vocab_size=len(tok), hidden_size=hidden, intermediate_size=3 * hidden, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=max(1, heads // 2), head_dim=32, max_position_embeddings=2048,
        tie_word_embeddings=False, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=None,
        initializer_range=0.1,  # logits spread over several units: an EOS logit of 0 is rarely sampled
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.Qwen3ForCausalLM(cfg).to(torch.float32)
    with torch.no_grad():
        model.lm_head.weight[tok.eos_token_id] = 0.0  # EOS logit 0, far below the top logits: few early stops
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    args = ap.parse_args()

    from megatron_offgrpo.inference.generation import SamplingSettings, available_backends, generate, vllm_engine_cache

    status = available_backends()
    if status["vllm"] != "ok":
        print(f"error: {status['vllm']}", file=sys.stderr)
        return 2
    tmp = tempfile.mkdtemp(prefix="gen-bench-")
    try:
        model = write_model(os.path.join(tmp, "model"), args.hidden, args.layers)
        prompts = [[{"role": "user", "content": f"Problem {i}: what is {i} + {3 * i}? Explain your steps."}]
                   for i in range(args.prompts)]  # fmt: skip
        s = SamplingSettings(n=args.n, temperature=0.6, top_p=0.95, max_tokens=args.max_tokens, seed=0)

        def run(backend: str):
            t = time.perf_counter()
            out = generate(model, prompts, s, backend=backend, progress=False)
            return time.perf_counter() - t, sum(len(c.token_ids) for per in out for c in per)

        with vllm_engine_cache():
            first_s, _ = run("vllm")  # start + generation
            vllm_s, vllm_tokens = run("vllm")  # generation only (the engine is kept)
        hf_s, hf_tokens = run("hf")
        expected = args.prompts * args.n * args.max_tokens
        vllm_tps, hf_tps = vllm_tokens / vllm_s, hf_tokens / hf_s
        print(f"model: Qwen3 hidden {args.hidden}, {args.layers} layers, head_dim 32, fp32, vocab 261; workload "
              f"{args.prompts} prompts x {args.n} samples x {args.max_tokens} tokens ({expected} tokens)")  # fmt: skip
        print(f"vllm start (engine creation)  : {first_s - vllm_s:8.1f} s")
        print(f"vllm generation               : {vllm_tokens:8d} tokens in {vllm_s:7.2f} s = {vllm_tps:9.1f} tokens/s")
        print(f"hf generation (baseline)      : {hf_tokens:8d} tokens in {hf_s:7.2f} s = {hf_tps:9.1f} tokens/s")
        print(f"ratio vllm / hf tokens/s      : {vllm_tps / hf_tps:8.2f}")
        print(f"vllm incl. start vs hf (wall) : {hf_s / first_s:8.2f} x faster")
        if vllm_tokens != expected or hf_tokens != expected:
            print(f"note: at most {expected} tokens per backend (some samples stopped at EOS)")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
