"""Precompute per-token log-probs of a dataset with a model and attach them as ``P.<array>`` (docs/design.md §5).

    python tools/preprocess/precompute_logprobs.py CONFIG.yaml --prefix P --array ref_logp --producer NAME [a.b=c ...]

CONFIG is a training config: its ``model`` section (architecture, ``model.load`` checkpoint) and ``parallel``
layout say which model scores and how; run it under torchrun for TP / PP / DP. The manifest records
``--producer`` (e.g. the reference or teacher checkpoint), which training checks for OPD's teacher consistency.
"""

from __future__ import annotations

import argparse
import sys

from megatron_offgrpo.data.format import PER_TOKEN_ARRAYS


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides")
    parser.add_argument("--prefix", required=True, help="dataset prefix P (P.bin / P.idx / P.json)")
    parser.add_argument("--array", required=True, choices=PER_TOKEN_ARRAYS)
    parser.add_argument("--producer", required=True, help="name recorded in the manifest (model / checkpoint)")
    args = parser.parse_intermixed_args(argv)  # overrides and flags in any order

    import torch.distributed as dist

    from megatron_offgrpo.config import ConfigError, load_config
    from megatron_offgrpo.data import TrajectoryDataset, add_per_token_array
    from megatron_offgrpo.inference.scoring import score_dataset

    try:
        cfg = load_config(args.config, [*args.overrides, f"data.train_prefix={args.prefix}"])
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    scores = score_dataset(cfg, args.prefix)
    if not dist.is_initialized() or dist.get_rank() == 0:
        n = len(TrajectoryDataset(args.prefix, per_token_arrays=()))
        missing = [i for i in range(n) if i not in scores]
        if missing:
            raise RuntimeError(f"{len(missing)} sequences were not scored (first: {missing[:5]})")
        producer = {"model": args.producer, "architecture": cfg.model.architecture, "load": cfg.model.load}
        add_per_token_array(args.prefix, args.array, [scores[i] for i in range(n)], producer)
        print(f"wrote {args.prefix}.{args.array} for {n} sequences (producer {args.producer})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
