#!/usr/bin/env python
"""Run the HF model and its Megatron conversion on the same prompts; print logit differences.

    python tools/checkpoint/check_parity.py --hf-dir /models/Qwen3-8B --ckpt /ckpt/qwen3-8b --prompt "1+1="
    torchrun --nproc-per-node 2 tools/checkpoint/check_parity.py ...   # Megatron side at TP=2 (CPU, gloo)

Without --prompt (or without a tokenizer in --hf-dir) random token ids are used. Prints the max / mean
absolute logit difference (fp32, padded vocabulary stripped) and the top-1 agreement; exits 1 when the max
difference exceeds --tol.
"""

import argparse
import json
import os
import sys


def _tokens(args, vocab_size):
    import torch

    if args.prompt:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(args.hf_dir)
        ids = [tok(p)["input_ids"] for p in args.prompt]
        n = min(len(i) for i in ids)  # equal lengths: no padding, no attention mask needed
        return torch.tensor([i[:n] for i in ids])
    g = torch.Generator().manual_seed(args.seed)
    return torch.randint(0, vocab_size, (args.num_random, args.seq_len), generator=g)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hf-dir", required=True)
    p.add_argument("--ckpt", required=True)
    p.add_argument("--prompt", action="append", default=[])
    p.add_argument("--num-random", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tol", type=float, default=1e-4, help="max abs logit difference allowed (fp32)")
    args = p.parse_args(argv)

    import torch
    from transformers import AutoModelForCausalLM

    from megatron_offgrpo.models import (
        build_gpt_model, build_transformer_config, checkpoint_padded_vocab_size, load_model_checkpoint,
        model_config_from_hf,
    )  # fmt: skip
    from megatron_offgrpo.models.checkpoint import ensure_single_process_parallel_state
    from megatron_offgrpo.models.parity import compare_logits, hf_logits, megatron_logits
    from megatron_offgrpo.utils.cpu_backend import initialize_cpu_model_parallel

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        initialize_cpu_model_parallel(tensor_model_parallel_size=world)
    else:
        ensure_single_process_parallel_state()
    arch = model_config_from_hf(args.hf_dir)
    tokens = _tokens(args, arch.vocab_size)

    hf = AutoModelForCausalLM.from_pretrained(args.hf_dir, dtype=torch.float32, attn_implementation="eager")
    reference = hf_logits(hf, tokens)
    del hf

    config = build_transformer_config(arch, tp=world, params_dtype=torch.float32)
    model = build_gpt_model(arch, config, vocab_size=checkpoint_padded_vocab_size(args.ckpt), backend="local")
    load_model_checkpoint(model, args.ckpt)
    result = compare_logits(reference, megatron_logits(model, tokens, arch.vocab_size))
    result.update(tp=world, tokens=list(tokens.shape))
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(result))
    return 0 if result["max_abs_diff"] <= args.tol else 1


if __name__ == "__main__":
    sys.exit(main())
