"""Best-checkpoint selection CLI (thin: see :mod:`megatron_offgrpo.eval.selection`).

    python -m megatron_offgrpo.eval.select --run-dir outputs/run/checkpoints --benchmark aime24 --n 16 \\
        --top-k 2 --export-dir outputs/run/best_hf [--output DIR] [--metric avg_at_n] [generation options]

Evaluates every ``iter_NNNNNNN`` of ``--run-dir`` (the run's ``checkpoint.dir``) on the benchmark, writes
``ranking.md`` / ``ranking.json`` / ``score_vs_step.png`` / ``top_k.json`` into ``--output`` (default
``<run-dir>/selection_<benchmark>``), and exports the best checkpoint to HF at ``--export-dir``. Re-running scores
only checkpoints not scored before with the same settings. ``--delete-others`` deletes the checkpoints outside the
top k (never the one ``latest`` names); nothing is deleted without it. Exit status: 0 done, 2 bad input.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional

from megatron_offgrpo.eval.benchmarks import REGISTRY, BenchmarkError
from megatron_offgrpo.eval.cli import add_generation_arguments, settings_from_args


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m megatron_offgrpo.eval.select", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run-dir", required=True, help="the run's checkpoint.dir (holds iter_NNNNNNN and latest)")
    p.add_argument("--benchmark", required=True, help=f"one of {', '.join(REGISTRY)}, or a .jsonl / .parquet file")
    p.add_argument("--output", default=None, help="selection directory (default: <run-dir>/selection_<benchmark>)")
    p.add_argument("--metric", default="avg_at_n", help="avg_at_n (default), maj_at_n or pass@K")
    p.add_argument("--top-k", type=int, default=1, help="how many of the best checkpoints to keep (top_k.json)")
    p.add_argument("--export-dir", default=None, help="export the best checkpoint to HF here")
    p.add_argument("--delete-others", action="store_true",
                   help="DELETE the checkpoints outside the top k (never the one 'latest' names)")
    add_generation_arguments(p)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    a = build_parser().parse_args(argv)
    from megatron_offgrpo.eval.benchmarks import load_benchmark
    from megatron_offgrpo.eval.runner import SamplesFileError
    from megatron_offgrpo.eval.selection import SelectionError, print_ranking, select_checkpoints
    from megatron_offgrpo.models.errors import CheckpointFormatError

    try:
        benchmark = load_benchmark(a.benchmark)
        settings = settings_from_args(a, benchmark)
        output = a.output or os.path.join(a.run_dir, f"selection_{benchmark.name}")
        result = select_checkpoints(a.run_dir, benchmark, settings, output, top_k=a.top_k, metric=a.metric,
                                    export_dir=a.export_dir, hf_template=a.hf_template,
                                    delete_others=a.delete_others, grading_workers=a.grading_workers,
                                    progress=not a.no_progress)
    except (BenchmarkError, SelectionError, SamplesFileError, CheckpointFormatError, FileExistsError,
            FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print_ranking(result, settings.n)
    print(f"best: {result.best.checkpoint.path} ({a.metric} {result.best.score:.2f}); scored now: "
          f"{len(result.scored)}, cached: {len(result.ranking) - len(result.scored)}")
    print(f"wrote {output}/ranking.md, ranking.json, score_vs_step.png, top_k.json"
          + (f"; exported the best to {result.export_dir}" if result.export_dir else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
