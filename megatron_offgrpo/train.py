"""CLI: ``python -m megatron_offgrpo.train CONFIG.yaml [a.b=c ...] [--print-config] [--validate-only]``.

Run it under ``torchrun`` or ``srun`` (one task per rank: the ranks come from ``SLURM_PROCID`` / ``SLURM_NTASKS``)
for several ranks; a plain ``python`` run is a world of one. The config is validated, with every problem listed,
before any process group or allocation.

Exit codes (what ``launch/slurm/train.sbatch`` decides on):

* 0 (:data:`EXIT_DONE`): training finished (``train_steps`` or ``data.num_epochs`` reached);
* 75 (:data:`EXIT_RESUME`, EX_TEMPFAIL): stopped by SIGTERM / SIGUSR1 or ``checkpoint.exit_after_seconds`` after
  saving a complete checkpoint: run the same command again (requeue) to resume;
* 2 (:data:`EXIT_BAD_INPUT`): the config, the dataset or a checkpoint is wrong (the message names the file / key);
* 1 (:data:`EXIT_FAILED`): training failed (non-finite steps; the warning names them) or crashed.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional

EXIT_DONE, EXIT_FAILED, EXIT_BAD_INPUT, EXIT_RESUME = 0, 1, 2, 75


def main(argv: Optional[List[str]] = None) -> int:
    # First thing, before the heavy imports (torch, Megatron: seconds): a preemption signal that arrives during
    # start-up must become "save after the first step", not the default action (death).
    from megatron_offgrpo.training.signals import StopFlag

    stop = StopFlag()
    stop.install()

    parser = argparse.ArgumentParser(prog="python -m megatron_offgrpo.train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", help="YAML config (see examples/)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. optimizer.lr=1e-6 parallel.tp=2")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("--validate-only", action="store_true", help="validate the config and exit")
    args = parser.parse_args(argv)

    from megatron_offgrpo.config import ConfigError, config_to_yaml, load_and_validate_config, load_config
    from megatron_offgrpo.utils.distributed import distributed_env_from_launcher

    try:
        if args.print_config:
            print(config_to_yaml(load_config(args.config, args.overrides)), end="")
            return EXIT_DONE
        distributed_env_from_launcher()  # under srun, WORLD_SIZE comes from SLURM_NTASKS
        # Everything (unknown keys, types, ranges, layout, dataset files against their manifest) is checked
        # here, before any process group or allocation, and reported at once.
        cfg = load_and_validate_config(args.config, args.overrides, world_size=int(os.environ.get("WORLD_SIZE", "1")))
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if args.validate_only:
        print("config OK")
        return EXIT_DONE

    from megatron_offgrpo.data.dataset import DatasetFormatError
    from megatron_offgrpo.training.checkpointing import (
        CheckpointDirInUseError,
        CheckpointFormatError,
        CheckpointMismatchError,
    )
    from megatron_offgrpo.training.guard import NonFiniteError
    from megatron_offgrpo.training.loop import train

    try:
        result = train(cfg, stop=stop)
    except (CheckpointMismatchError, CheckpointFormatError, CheckpointDirInUseError, DatasetFormatError,
            NonFiniteError) as e:
        # Problems of the inputs, found by every rank alike: one line naming the file and the fix, no traceback.
        if os.environ.get("RANK", "0") == "0" or isinstance(e, CheckpointDirInUseError):
            print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if result.stopped_by == "nonfinite":
        return EXIT_FAILED  # the warning above names the steps and the sequences
    if result.stopped_by in ("signal", "time_limit"):
        return EXIT_RESUME
    return EXIT_DONE


if __name__ == "__main__":
    sys.exit(main())
