"""The shipped synthetic benchmark ``examples/benchmarks/synthetic_arith.jsonl``: held-out arithmetic problems in the
style of the training sample, so that the evaluation CLI, the tests and the CPU demo never download anything.

Problems come from the training sample's own generator (:mod:`megatron_offgrpo.preprocess.synthetic`) with a
different seed, and every problem whose text occurs in the training sample (``examples/data/ot3_sample.jsonl``) is
skipped, as is a repeat: the benchmark is disjoint from what the demo trains on. Answers are exact (integers or
``\\frac{p}{q}`` in lowest terms). Regenerate (deterministic)::

    python -m megatron_offgrpo.eval.synthetic
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
from fractions import Fraction
from typing import Dict, Iterable, List, Optional, Set

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SYNTHETIC_BENCHMARK = os.path.join(REPO, "examples", "benchmarks", "synthetic_arith.jsonl")
TRAINING_SAMPLE = os.path.join(REPO, "examples", "data", "ot3_sample.jsonl")
DEFAULT_SEED = 20240611  # anything but the training sample's seed (0)
DEFAULT_NUM_PROBLEMS = 40


def format_answer(value: Fraction) -> str:
    """An exact LaTeX answer: ``7``, ``-3`` or ``\\frac{22}{5}`` (lowest terms, sign on the numerator)."""
    if value.denominator == 1:
        return str(value.numerator)
    return f"\\frac{{{value.numerator}}}{{{value.denominator}}}"


def training_problems(path: str = TRAINING_SAMPLE) -> Set[str]:
    """The problem texts (first human turn) of an OpenThoughts3-format JSONL file."""
    problems: Set[str] = set()
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                problems.add(json.loads(line)["conversations"][0]["value"])
    return problems


def synthetic_benchmark_rows(
    num_problems: int = DEFAULT_NUM_PROBLEMS, seed: int = DEFAULT_SEED, exclude: Iterable[str] = ()
) -> List[Dict[str, str]]:
    """``num_problems`` rows ``{"id", "problem", "answer"}``, deterministic for ``seed``, none of whose problem
    texts is in ``exclude`` or repeated."""
    from megatron_offgrpo.preprocess.synthetic import _problem

    rng = random.Random(seed)
    seen = set(exclude)
    rows: List[Dict[str, str]] = []
    attempts = 0
    while len(rows) < num_problems:
        attempts += 1
        if attempts > 100 * num_problems:
            raise RuntimeError(f"could not draw {num_problems} distinct held-out problems (seed {seed})")
        problem, value = _problem(rng)
        if problem in seen:
            continue
        seen.add(problem)
        rows.append({"id": f"synth-{len(rows):03d}", "problem": problem, "answer": format_answer(value)})
    return rows


def main(argv: Optional[List[str]] = None) -> int:
    from megatron_offgrpo.data.atomic import atomic_write_bytes

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=SYNTHETIC_BENCHMARK)
    p.add_argument("--num-problems", type=int, default=DEFAULT_NUM_PROBLEMS)
    p.add_argument("--seed", type=int, default=DEFAULT_SEED)
    p.add_argument("--training-sample", default=TRAINING_SAMPLE,
                   help="OpenThoughts3-format JSONL whose problems are excluded (held out)")
    a = p.parse_args(argv)
    rows = synthetic_benchmark_rows(a.num_problems, a.seed, training_problems(a.training_sample))
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    atomic_write_bytes(a.out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode("utf-8"))
    print(f"wrote {len(rows)} problems to {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
