"""Evaluation CLI (thin: parses arguments, calls :mod:`megatron_offgrpo.eval.runner`).

Generate, grade and summarize::

    python -m megatron_offgrpo.eval --model PATH --benchmark aime24 --n 16 --output outputs/eval/aime24
    python -m megatron_offgrpo.eval --model outputs/tiny_cpu/checkpoints/iter_0000200 \\
        --benchmark examples/benchmarks/synthetic_arith.jsonl --n 4 --max-tokens 512 --backend hf --output DIR

Grade saved generations again (no model, no generation)::

    python -m megatron_offgrpo.eval --regrade DIR

``--model`` is an HF model directory or a Megatron checkpoint (a training ``iter_NNNNNNN`` or converter output,
exported to HF on the fly by the generation engine; ``--hf-template`` supplies config and tokenizer when the
checkpoint does not name them). ``--benchmark`` is a registered name (aime24, aime25, aime25_1, aime25_2, amc23,
math500) or a ``.jsonl`` / ``.parquet`` file with ``problem`` and ``answer`` fields. ``--n`` and
``--max-tokens`` default to the benchmark's defaults. Exit status: 0 done, 2 bad input (one ``error:`` line).
"""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING, List, Optional

from megatron_offgrpo.eval.benchmarks import (
    DEFAULT_PROMPT_TEMPLATE,
    DEFAULT_TEMPERATURE,
    DEFAULT_TOP_P,
    REGISTRY,
    BenchmarkError,
)

if TYPE_CHECKING:
    from megatron_offgrpo.eval.runner import EvalSettings


def add_generation_arguments(p: argparse.ArgumentParser) -> None:
    """The sampling, backend and reporting options shared with the checkpoint-selection CLI."""
    g = p.add_argument_group("generation")
    g.add_argument("--n", type=int, default=None, help="samples per problem (default: the benchmark's)")
    g.add_argument("--temperature", type=float, default=DEFAULT_TEMPERATURE)
    g.add_argument("--top-p", type=float, default=DEFAULT_TOP_P)
    g.add_argument("--max-tokens", type=int, default=None, help="new tokens per sample (default: the benchmark's)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--backend", choices=("auto", "vllm", "hf"), default="auto")
    g.add_argument("--prompt-template", default=DEFAULT_PROMPT_TEMPLATE,
                   help="str.format template of the user turn with {problem} (default: SkyThought's, "
                        "'{problem}\\nReturn your final response within \\boxed{}')")
    g.add_argument("--tp", type=int, default=1, help="tensor parallel size (vLLM)")
    g.add_argument("--dp", type=int, default=1, help="data parallel size (vLLM)")
    g.add_argument("--hf-template", default=None, help="HF dir with config + tokenizer for a Megatron checkpoint")
    g.add_argument("--work-dir", default=None, help="where a Megatron checkpoint is exported to HF")
    r = p.add_argument_group("reporting")
    r.add_argument("--grading-workers", type=int, default=0, help="grading processes (0: automatic)")
    r.add_argument("--bootstrap-resamples", type=int, default=1000)
    r.add_argument("--bootstrap-seed", type=int, default=0)
    r.add_argument("--confidence", type=float, default=0.95)
    r.add_argument("--no-progress", action="store_true", help="no progress bars")


def settings_from_args(a: argparse.Namespace, benchmark) -> "EvalSettings":
    """:class:`EvalSettings` from parsed arguments, the benchmark's defaults filling ``--n`` / ``--max-tokens``."""
    from megatron_offgrpo.eval.runner import EvalSettings

    return EvalSettings(
        n=a.n if a.n is not None else benchmark.default_n,
        temperature=a.temperature, top_p=a.top_p,
        max_tokens=a.max_tokens if a.max_tokens is not None else benchmark.default_max_tokens,
        seed=a.seed, prompt_template=a.prompt_template, backend=a.backend,
        tensor_parallel_size=a.tp, data_parallel_size=a.dp,
        bootstrap_resamples=a.bootstrap_resamples, bootstrap_seed=a.bootstrap_seed, confidence=a.confidence)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m megatron_offgrpo.eval", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="HF model dir or Megatron checkpoint")
    p.add_argument("--benchmark", help=f"one of {', '.join(REGISTRY)}, or a .jsonl / .parquet file")
    p.add_argument("--output", help="output directory")
    p.add_argument("--overwrite", action="store_true", help="generate again into an --output that has samples")
    p.add_argument("--regrade", metavar="DIR", help="grade DIR/samples.jsonl again, without generating")
    add_generation_arguments(p)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    p = build_parser()
    a = p.parse_args(argv)
    from megatron_offgrpo.eval.runner import SamplesFileError, evaluate, print_summary, regrade
    from megatron_offgrpo.models.errors import CheckpointFormatError

    try:
        if a.regrade:
            if a.model or a.benchmark:
                p.error("--regrade grades saved samples: it takes no --model / --benchmark")
            summary = regrade(a.regrade, bootstrap_resamples=a.bootstrap_resamples, bootstrap_seed=a.bootstrap_seed,
                              confidence=a.confidence, grading_workers=a.grading_workers,
                              progress=not a.no_progress)
            out = a.regrade
        else:
            missing = [f"--{k}" for k in ("model", "benchmark", "output") if not getattr(a, k)]
            if missing:
                p.error(f"{', '.join(missing)} required (or --regrade DIR)")
            from megatron_offgrpo.eval.benchmarks import load_benchmark

            benchmark = load_benchmark(a.benchmark)
            settings = settings_from_args(a, benchmark)
            summary = evaluate(a.model, benchmark, settings, a.output, hf_template=a.hf_template,
                               work_dir=a.work_dir, grading_workers=a.grading_workers, progress=not a.no_progress,
                               overwrite=a.overwrite)
            out = a.output
    except (BenchmarkError, SamplesFileError, CheckpointFormatError, FileExistsError, FileNotFoundError,
            ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print_summary(summary)
    print(f"wrote {out}/samples.jsonl and {out}/summary.json")
    return 0
