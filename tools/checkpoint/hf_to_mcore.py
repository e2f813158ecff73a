#!/usr/bin/env python
"""Convert a Hugging Face checkpoint (Qwen2/2.5, Qwen3, Qwen3-MoE, Llama) to a Megatron dist_checkpointing one.

    python tools/checkpoint/hf_to_mcore.py --hf-dir /models/Qwen2.5-7B --out /ckpt/qwen25-7b --tp 4 --pp 1 --dtype bf16

The checkpoint loads under any TP/PP/EP (dist_checkpointing reshards); --tp fixes the vocabulary padding
(multiple of --make-vocab-size-divisible-by * tp, recorded in offgrpo_model.json) and, with --pp/--ep, is
validated against the model's head / layer / expert counts. offgrpo_model.json records both the real
vocabulary (vocab_size, the HF embedding rows) and the padded one.

The conversion streams: tensors are read, mapped and written one at a time, so the memory needed is about
the largest tensor (the embedding), not the model (benchmarks/convert.py measures it). --workers N splits the
layers over N processes. The output appears under --out only once complete (it is written to <out>.tmp<pid>
and renamed); a killed run leaves just that temporary directory, which the next run removes.

Exit code 2 with one "error: ..." line naming the file for a bad input: no config.json in --hf-dir, a missing
or truncated safetensors shard, an unsupported architecture, a tensor of the wrong shape, a non-empty --out.
"""

import argparse
import sys


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hf-dir", required=True, help="HF model directory (config.json + safetensors)")
    p.add_argument("--out", required=True, help="output checkpoint directory (must be empty or absent)")
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--ep", type=int, default=1)
    p.add_argument("--dtype", default=None, help="fp32 | bf16 | fp16 (default: the HF config's dtype)")
    p.add_argument("--make-vocab-size-divisible-by", type=int, default=128)
    p.add_argument("--workers", type=int, default=1, help="processes writing the layers (default 1)")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)

    from megatron_offgrpo.models.converter import convert_hf_to_mcore

    meta = convert_hf_to_mcore(
        args.hf_dir, args.out, tp=args.tp, pp=args.pp, ep=args.ep, dtype=args.dtype,
        make_vocab_size_divisible_by=args.make_vocab_size_divisible_by, progress=not args.no_progress,
        workers=args.workers,
    )  # fmt: skip
    arch = meta["architecture"]
    print(
        f"wrote {args.out}: {arch.family}, {arch.num_layers} layers, vocab {arch.vocab_size} "
        f"(padded {meta['padded_vocab_size']}), dtype {meta['dtype']}"
    )
    return 0


if __name__ == "__main__":  # the guard matters: dist_checkpointing's writer spawns helper processes
    from megatron_offgrpo.models.errors import run_cli

    sys.exit(run_cli(main))  # a missing / damaged input: one "error: ..." line, exit code 2
