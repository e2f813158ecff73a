#!/usr/bin/env python
"""Regenerate the shipped sample: ``examples/data/ot3_sample.jsonl`` (synthetic OpenThoughts3-format teacher
rollouts), ``examples/data/student_pass_rates.jsonl`` and the tiny tokenizer in ``examples/tiny_tokenizer``.

    python tools/preprocess/make_sample_data.py
"""

from __future__ import annotations

import argparse
import os
import sys

from megatron_offgrpo.preprocess.synthetic import generate_rows, student_pass_rates, write_jsonl
from megatron_offgrpo.preprocess.tiny_tokenizer import TINY_TOKENIZER_DIR, save_tiny_tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out-dir", default=os.path.join(REPO, "examples", "data"))
    p.add_argument("--num-problems", type=int, default=48)
    p.add_argument("--k", type=int, default=16, help="rollouts per problem (OpenThoughts3: 16)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tokenizer-dir", default=TINY_TOKENIZER_DIR)
    a = p.parse_args(argv)
    os.makedirs(a.out_dir, exist_ok=True)
    rows = list(generate_rows(a.num_problems, a.k, a.seed))
    write_jsonl(rows, os.path.join(a.out_dir, "ot3_sample.jsonl"))
    write_jsonl(student_pass_rates(rows, a.seed), os.path.join(a.out_dir, "student_pass_rates.jsonl"))
    save_tiny_tokenizer(a.tokenizer_dir)
    print(f"wrote {len(rows)} rows to {a.out_dir}/ot3_sample.jsonl and the tokenizer to {a.tokenizer_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
