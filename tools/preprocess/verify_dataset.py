#!/usr/bin/env python
"""Check a trajectory dataset against its manifest; exit 1 (listing every problem) if anything is wrong.

    python tools/preprocess/verify_dataset.py outputs/data/ot3_sample            # sizes, index hashes and sanity
    python tools/preprocess/verify_dataset.py outputs/data/ot3_sample --full     # + .bin hashes, NaN scan

The trainer runs the same checks (``data.verify_full`` for the full ones) before any process group exists.
"""

import argparse
import sys


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("prefix", help="dataset prefix P (of P.bin / P.idx / P.json)")
    p.add_argument("--full", action="store_true", help="also hash the .bin files and scan per-token arrays / ids")
    args = p.parse_args(argv)

    from megatron_offgrpo.data.verify import check_dataset

    report = check_dataset(args.prefix, full=args.full)
    for note in report.notes:
        print(f"note: {note}")
    for problem in report.problems:
        print(f"error: {problem}", file=sys.stderr)
    if report.problems:
        return 1
    print(f"{args.prefix}: OK ({'full' if args.full else 'cheap'} checks)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
