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

``--estimate [--world-size N] [--device-memory-gib 80]`` trains nothing: it prints the per-GPU memory of the
configured layout (:mod:`megatron_offgrpo.training.memory_plan`; no dataset, process group or GPU needed) and exits
0 when it fits, 3 (:data:`EXIT_DOES_NOT_FIT`) with the overrides of a layout that fits when it does not.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional

EXIT_DONE, EXIT_FAILED, EXIT_BAD_INPUT, EXIT_RESUME = 0, 1, 2, 75
EXIT_DOES_NOT_FIT = 3  # --estimate only


def _estimate(args) -> int:
    """``--estimate``: the memory table for the configured layout; a layout that fits when it does not."""
    from megatron_offgrpo.config import ConfigError, load_config, validate_config
    from megatron_offgrpo.training.memory_plan import (
        default_world_size,
        estimate_memory,
        format_estimate,
        format_overrides,
        suggest_layout,
    )

    world, source = default_world_size(args.world_size)
    cfg = load_config(args.config, args.overrides)
    validate_config(cfg, world_size=world, check_files=False)  # the dataset need not exist where one plans
    try:
        est = estimate_memory(cfg, world)
    except ValueError as e:  # a layout the world cannot hold (e.g. the expert layout)
        raise ConfigError([str(e)]) from None
    device_bytes = int(args.device_memory_gib * 2**30)
    print(f"world size {world} ({source}), device memory {args.device_memory_gib:g} GiB")
    print(format_estimate(est, device_bytes), end="")
    if est.total <= device_bytes:
        return EXIT_DONE
    suggestion = suggest_layout(cfg, world, device_bytes)
    if suggestion:
        print(f"suggested layout (smallest change that fits): {format_overrides(suggestion)}")
    else:
        print(f"no tp / pp / cp / recompute layout fits {args.device_memory_gib:g} GiB on {world} GPUs: add nodes "
              "or lower data.micro_batch_size / data.seq_length")
    return EXIT_DOES_NOT_FIT


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
    parser.add_argument("--estimate", action="store_true",
                        help="print the per-GPU memory of the layout and exit (0 fits, 3 does not: a layout that "
                             "fits is suggested); needs no dataset")
    parser.add_argument("--world-size", type=int, default=None,
                        help="--estimate: GPUs of the job (default $WORLD_SIZE, SLURM's tasks or 8 x nodes, else 8)")
    parser.add_argument("--device-memory-gib", type=float, default=80.0,
                        help="--estimate: memory of one GPU in GiB (default 80, H100 80GB)")
    args = parser.parse_intermixed_args(argv)  # overrides and flags in any order

    from megatron_offgrpo.config import ConfigError, config_to_yaml, load_and_validate_config, load_config
    from megatron_offgrpo.utils.distributed import distributed_env_from_launcher

    try:
        if args.print_config:
            print(config_to_yaml(load_config(args.config, args.overrides)), end="")
            return EXIT_DONE
        if args.estimate:
            return _estimate(args)
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
    from megatron_offgrpo.training.trainer import train

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


def _exit(code: int) -> None:
    """Exit with ``code``; a non-zero one first makes SIGTERM / SIGUSR1 ignored for the rest of the shutdown.

    ``srun --kill-on-bad-exit`` SIGTERMs the other ranks as soon as one exits non-zero -- also with 75 ("resume
    me"). A rank still printing its summary then died of it (Python restores the default actions while shutting
    down) and the step's code became 143, which a batch script must not requeue. Ignored signals stay ignored.
    """
    if code != EXIT_DONE:
        import signal

        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, signal.SIG_IGN)
    sys.exit(code)


if __name__ == "__main__":
    _exit(main())
