#!/usr/bin/env python
"""Run the HF model and its Megatron conversion on the same prompts; print logit differences.

    python tools/checkpoint/check_parity.py --hf-dir /models/Qwen3-8B --ckpt /ckpt/qwen3-8b --prompt "1+1="
    torchrun --nproc-per-node 2 tools/checkpoint/check_parity.py ...   # Megatron side at TP=2 (CPU, gloo)

Without --prompt (or without a tokenizer in --hf-dir) random token ids are used. Prints one JSON line with

* the max / mean absolute logit difference (fp32, padded vocabulary stripped) and the top-1 agreement;
* max_abs_logprob_diff / mean_abs_logprob_diff: next-token log-probs over the *real* vocabulary (recorded in
  the checkpoint's offgrpo_model.json), HF's as a float64 log_softmax, Megatron's computed as the trainer does
  (vocab_parallel_logprobs with vocab_size=real, so the padded columns must stay out of the softmax).

Exits 0 when both are within tolerance (--tol, --logprob-tol), 1 when not, and 2 with a one-line
"error: ..." for a missing or damaged input (config.json, a truncated .distcp, offgrpo_model.json).
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
    p.add_argument("--logprob-tol", type=float, default=1e-4, help="max abs next-token log-prob difference allowed")
    args = p.parse_args(argv)

    import torch
    from transformers import AutoModelForCausalLM

    from megatron_offgrpo.models import (
        ShapeMismatchError, build_gpt_model, build_transformer_config, checkpoint_padded_vocab_size,
        checkpoint_vocab_size, load_model_checkpoint, model_config_from_hf, verify_checkpoint_files,
    )  # fmt: skip
    from megatron_offgrpo.models.checkpoint import ensure_single_process_parallel_state
    from megatron_offgrpo.models.parity import (
        compare_logits, compare_logprobs, gather_real_vocab_logits, hf_logits, megatron_next_token_logprobs,
        megatron_vocab_parallel_logits, reference_next_token_logprobs,
    )  # fmt: skip
    from megatron_offgrpo.utils.cpu_backend import initialize_cpu_model_parallel

    # Inputs first (cheap: config, metadata, file sizes), so a damaged one fails before any model is built.
    arch = model_config_from_hf(args.hf_dir)
    verify_checkpoint_files(args.ckpt)
    vocab = checkpoint_vocab_size(args.ckpt)
    if vocab != arch.vocab_size:
        raise ShapeMismatchError(
            f"{args.ckpt} was converted from a model with vocab_size={vocab} but {args.hf_dir} has "
            f"vocab_size={arch.vocab_size}: compare a checkpoint with the model it was converted from"
        )

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        initialize_cpu_model_parallel(tensor_model_parallel_size=world)
    else:
        ensure_single_process_parallel_state()
    tokens = _tokens(args, vocab)

    hf = AutoModelForCausalLM.from_pretrained(args.hf_dir, dtype=torch.float32, attn_implementation="eager")
    reference = hf_logits(hf, tokens)
    del hf

    config = build_transformer_config(arch, tp=world, params_dtype=torch.float32)
    model = build_gpt_model(arch, config, vocab_size=checkpoint_padded_vocab_size(args.ckpt), backend="local")
    load_model_checkpoint(model, args.ckpt)
    local_logits = megatron_vocab_parallel_logits(model, tokens)
    result = compare_logits(reference, gather_real_vocab_logits(local_logits, vocab))
    result.update(compare_logprobs(reference_next_token_logprobs(reference, tokens),
                                   megatron_next_token_logprobs(local_logits, tokens, vocab)))  # fmt: skip
    result.update(tp=world, tokens=list(tokens.shape), vocab_size=vocab)
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(result))
    ok = result["max_abs_diff"] <= args.tol and result["max_abs_logprob_diff"] <= args.logprob_tol
    return 0 if ok else 1


if __name__ == "__main__":
    from megatron_offgrpo.models.errors import run_cli

    sys.exit(run_cli(main))
