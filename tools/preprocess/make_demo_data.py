#!/usr/bin/env python
"""The CPU demo's inputs (:mod:`megatron_offgrpo.preprocess.demo_tasks`).

    python tools/preprocess/make_demo_data.py data            # examples/demo/{train.jsonl,benchmark.jsonl}
    python tools/preprocess/make_demo_data.py initial-model outputs/demo/initial_model

``data``: OpenThoughts3-format teacher rollouts to train on (``train.jsonl``) and the held-out benchmark the demo
evaluates before and after training (``benchmark.jsonl``), deterministic for ``--seed``: the shipped files are
what this command writes with the defaults.
``initial-model``: the demo's initial policy, a seeded random-init tiny Qwen3 with the tiny tokenizer, as an HF
model directory (``scripts/run_demo.sh`` converts it with ``tools/checkpoint/hf_to_mcore.py``).
Exit status 2 with one ``error:`` line for bad arguments or an existing output directory.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections import Counter

from megatron_offgrpo.preprocess.demo_tasks import TASKS, benchmark_rows, split_problems, training_rows, write_jsonl

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEFAULT_OUT = os.path.join(REPO, "examples", "demo")


def _data(a: argparse.Namespace) -> int:
    split = split_problems(a.num_train, a.num_benchmark, a.seed, tuple(a.tasks.split(",")))
    rows = list(training_rows(split.train, a.k, a.seed, a.mixed_fraction))
    os.makedirs(a.out_dir, exist_ok=True)
    train_path, bench_path = os.path.join(a.out_dir, "train.jsonl"), os.path.join(a.out_dir, "benchmark.jsonl")
    write_jsonl(rows, train_path)
    write_jsonl(benchmark_rows(split.benchmark), bench_path)
    per_task = ", ".join(f"{t} {n}" for t, n in Counter(q.task for q in split.train).items())
    print(f"wrote {len(rows)} rollouts of {len(split.train)} problems ({per_task}) to {train_path}, and "
          f"{len(split.benchmark)} held-out problems to {bench_path}")
    return 0


def _initial_model(a: argparse.Namespace) -> int:
    from megatron_offgrpo.preprocess.demo_tasks import write_initial_model

    write_initial_model(a.out, hidden_size=a.hidden_size, num_layers=a.num_layers, seed=a.seed)
    print(f"wrote the initial model (tiny Qwen3, {a.num_layers} layers, hidden {a.hidden_size}, seed {a.seed}) "
          f"to {a.out}")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("data", help="teacher rollouts + held-out benchmark")
    d.add_argument("--out-dir", default=DEFAULT_OUT)
    d.add_argument("--tasks", default=",".join(TASKS), help=f"comma-separated (default {','.join(TASKS)})")
    d.add_argument("--num-train", type=int, default=200, help="training problems per task")
    d.add_argument("--num-benchmark", type=int, default=30, help="held-out benchmark problems per task")
    d.add_argument("--k", type=int, default=8, help="teacher rollouts per training problem")
    d.add_argument("--mixed-fraction", type=float, default=0.6, help="fraction of groups with wrong rollouts")
    d.add_argument("--seed", type=int, default=0)
    m = sub.add_parser("initial-model", help="the seeded random-init tiny model, HF format")
    m.add_argument("out", help="output directory (must not exist)")
    m.add_argument("--hidden-size", type=int, default=128, help="head_dim = hidden / 4 (vLLM on CPU needs >= 32)")
    m.add_argument("--num-layers", type=int, default=2)
    m.add_argument("--seed", type=int, default=1234)
    a = p.parse_args(argv)
    try:
        return _data(a) if a.command == "data" else _initial_model(a)
    except (ValueError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
