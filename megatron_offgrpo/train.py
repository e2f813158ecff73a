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

    from megatron_offgrpo.config import ConfigError, config_to_yaml, load_config, validate_config

    try:
        cfg = load_config(args.config, args.overrides)
        if args.print_config:
            print(config_to_yaml(cfg), end="")
            return 0
        validate_config(cfg, world_size=int(os.environ.get("WORLD_SIZE", "1")))
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.validate_only:
        print("config OK")
        return 0

    from megatron_offgrpo.training.loop import train

    result = train(cfg)
    return 0 if result.stopped_by in ("completed", "signal", "time_limit") else 1


if __name__ == "__main__":
    sys.exit(main())
