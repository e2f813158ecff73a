"""CLI: ``python -m megatron_offgrpo.train CONFIG.yaml [a.b=c ...] [--print-config] [--validate-only]``.

Run it under ``torchrun`` (or ``srun``) for several ranks; a plain ``python`` run is a world of one. The config is
validated, with every problem listed, before any process group or allocation.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m megatron_offgrpo.train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", help="YAML config (see examples/)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. optimizer.lr=1e-6 parallel.tp=2")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("--validate-only", action="store_true", help="validate the config and exit")
    args = parser.parse_args(argv)

    from megatron_offgrpo.config import ConfigError, config_to_yaml, load_and_validate_config, load_config

    try:
        if args.print_config:
            print(config_to_yaml(load_config(args.config, args.overrides)), end="")
            return 0
        # Everything (unknown keys, types, ranges, layout, dataset files against their manifest) is checked
        # here, before any process group or allocation, and reported at once.
        cfg = load_and_validate_config(args.config, args.overrides, world_size=int(os.environ.get("WORLD_SIZE", "1")))
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.validate_only:
        print("config OK")
        return 0

    from megatron_offgrpo.data.dataset import DatasetFormatError
    from megatron_offgrpo.training.checkpointing import CheckpointFormatError, CheckpointMismatchError
    from megatron_offgrpo.training.guard import NonFiniteError
    from megatron_offgrpo.training.loop import train

    try:
        result = train(cfg)
    except (CheckpointMismatchError, CheckpointFormatError, DatasetFormatError, NonFiniteError) as e:
        # Problems of the inputs, found by every rank alike: one line naming the file and the fix, no traceback.
        if os.environ.get("RANK", "0") == "0":
            print(f"error: {e}", file=sys.stderr)
        return 2
    if result.stopped_by == "nonfinite":
        return 1  # the warning above names the steps and the sequences
    return 0


if __name__ == "__main__":
    sys.exit(main())
