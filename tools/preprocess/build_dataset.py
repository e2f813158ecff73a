#!/usr/bin/env python
"""Build an offline-GRPO trajectory dataset (DESIGN 5) from teacher rollouts.

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

from megatron_offgrpo.preprocess.build import BuildConfig, build_dataset
from megatron_offgrpo.data.format import DatasetFormatError
from megatron_offgrpo.preprocess.records import InputError


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", nargs="+", required=True, help="JSONL / Parquet files or datasets directories")
    p.add_argument("--tokenizer", required=True, help="local HF tokenizer path (with a chat template)")
    p.add_argument("--output-prefix", required=True, help="dataset prefix P (writes P.bin, P.idx, P.json, ...)")
    p.add_argument("--max-seq-len", type=int, default=16384)
    p.add_argument("--overlong", choices=("reject", "truncate"), default="reject")
    p.add_argument("--domain", default=None, help="keep only rows of this domain (e.g. math)")
    p.add_argument("--min-agreement", type=float, default=0.5, help="min winning-cluster fraction of K")
    p.add_argument("--label-source", choices=("vote", "reference"), default="vote")
    p.add_argument("--verify-timeout", type=float, default=5.0, help="seconds per math-verify parse/verify")
    p.add_argument("--num-groups", type=int, default=None)
    p.add_argument("--strategy", choices=("uniform", "difficulty"), default="uniform")
    p.add_argument("--student-pass-rates", default=None, help="JSONL {problem_id|problem, pass_rate}")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--min-rollouts", type=int, default=2, help="drop groups with fewer trajectories left")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--strict", action="store_true", help="stop at the first bad input row instead of rejecting it")
    p.add_argument("--rejects", default=None, help="rejects JSONL (default: P.rejects.jsonl)")
    p.add_argument("--teacher", default=None, help="model that wrote the rollouts (recorded in the manifest)")
    p.add_argument("--stats-plot", default=None, help="write the group-type pie + length histogram PNG here")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def main(argv=None) -> int:
    a = parse_args(argv)
    # Recovery of a killed build and the removal of its temporaries are logged as warnings: show them plainly.
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    cfg = BuildConfig(
        inputs=a.input, tokenizer=a.tokenizer, output_prefix=a.output_prefix, max_seq_len=a.max_seq_len,
        overlong=a.overlong, domain=a.domain, min_agreement=a.min_agreement, label_source=a.label_source,
        verify_timeout_s=a.verify_timeout, num_groups=a.num_groups, strategy=a.strategy,
        student_pass_rates=a.student_pass_rates, seed=a.seed, min_rollouts=a.min_rollouts, workers=a.workers,
        strict=a.strict, rejects_path=a.rejects, teacher=a.teacher, progress=not a.no_progress,
    )
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
