#!/usr/bin/env python
r"""Build an offline-GRPO trajectory dataset (docs/design.md §5) from teacher rollouts.

Example (the shipped sample)::

    python tools/preprocess/build_dataset.py --input examples/data/ot3_sample.jsonl \
        --tokenizer examples/tiny_tokenizer --output-prefix outputs/data/ot3_sample \
        --domain math --max-seq-len 640 --workers 2 --stats-plot outputs/data/ot3_sample_stats.png

A failed or killed build leaves the previous dataset and its rejects file unchanged; the next build removes what a
killed one left behind. Errors in the input or the arguments end the build with exit status 2 and one line
``error: ...`` on stderr that names the file (and line) or the flag, and the fix.
"""

from __future__ import annotations

import argparse
import logging
import sys
import warnings

# Megatron-Core warns on import that Transformer Engine / Apex are absent; preprocessing uses neither.
warnings.filterwarnings("ignore", message=".*(Transformer Engine|Apex).*")
warnings.filterwarnings("ignore", category=DeprecationWarning)

from megatron_offgrpo.preprocess.build import add_build_arguments, build_dataset, config_from_args
from megatron_offgrpo.data.format import DatasetFormatError
from megatron_offgrpo.preprocess.records import InputError


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_build_arguments(p)  # one flag per BuildConfig field (names, defaults, help written once, there)
    p.add_argument("--stats-plot", default=None, help="write the group-type pie + length histogram PNG here")
    return p.parse_args(argv)


def main(argv=None) -> int:
    a = parse_args(argv)
    # Recovery of a killed build and the removal of its temporaries are logged as warnings: show them plainly.
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    cfg = config_from_args(a)
    try:
        res = build_dataset(cfg)
    except (InputError, DatasetFormatError) as e:
        # Bad input, a bad flag, or another build committing the same prefix: the message says what to do, so one
        # line, no traceback.
        print("error: " + " ".join(str(e).split("\n")), file=sys.stderr)
        return 2
    from megatron_offgrpo.preprocess.report import draw_stats_plot, print_summary

    res.manifest["prefix"] = a.output_prefix
    print_summary(res)
    if a.stats_plot:
        draw_stats_plot(res, a.stats_plot)
        print(f"stats plot: {a.stats_plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
