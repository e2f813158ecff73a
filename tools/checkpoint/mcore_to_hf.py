#!/usr/bin/env python
"""Export a Megatron dist_checkpointing checkpoint (converted or trained, any TP/PP/EP) to Hugging Face format.

    python tools/checkpoint/mcore_to_hf.py --ckpt /ckpt/step_100 --hf-template /models/Qwen2.5-7B --out /export/step_100

Writes sharded safetensors + model.safetensors.index.json, config.json (dtype updated) and every non-weight
file of the template (tokenizer, generation config, chat template), with the vocabulary padding stripped,
so that transformers and vLLM load the directory directly.

The export streams: the checkpoint is read one stored chunk at a time and each shard is written as its
tensors come, so the memory needed is about the largest tensor, not the model. --workers N writes the shards
from N processes. The output appears under --out only once complete (written to <out>.tmp<pid>, renamed).

Exit code 2 with one "error: ..." line naming the file for a bad input: no config.json in --hf-template, a
missing or truncated .distcp / .metadata in --ckpt, a damaged offgrpo_model.json, a template of another model.
"""

import argparse
import sys


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="Megatron dist_checkpointing directory")
    p.add_argument("--hf-template", required=True, help="HF directory giving config.json and tokenizer files")
    p.add_argument("--out", required=True, help="output directory (must be empty or absent)")
    p.add_argument("--dtype", default=None, help="fp32 | bf16 | fp16 (default: the checkpoint's dtype)")
    p.add_argument("--max-shard-size-gb", type=float, default=5.0)
    p.add_argument("--workers", type=int, default=1, help="processes writing the shards (default 1)")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)

    from megatron_offgrpo.models.converter import convert_mcore_to_hf

    weight_map = convert_mcore_to_hf(
        args.ckpt, args.hf_template, args.out, dtype=args.dtype,
        max_shard_bytes=int(args.max_shard_size_gb * 1024**3), progress=not args.no_progress, workers=args.workers,
    )  # fmt: skip
    print(f"wrote {args.out}: {len(weight_map)} tensors in {len(set(weight_map.values()))} shard(s)")
    return 0


if __name__ == "__main__":  # the guard matters: dist_checkpointing's loader may spawn helper processes
    from megatron_offgrpo.models.errors import run_cli

    sys.exit(run_cli(main))  # a missing / damaged input: one "error: ..." line, exit code 2
