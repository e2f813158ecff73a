"""Evaluation (docs/design.md §8): benchmarks, grading with the project's rewards module, avg@n / pass@k / maj@n
metrics, the evaluation CLI and best-checkpoint selection.

    python -m megatron_offgrpo.eval --model PATH --benchmark aime24 --n 16 --output DIR   # or --regrade DIR
    python -m megatron_offgrpo.eval.select --run-dir CKPT_DIR --benchmark aime24 --top-k 2 --export-dir HF_OUT

Modules: :mod:`.metrics` (pure metric functions), :mod:`.grading`, :mod:`.benchmarks` (registry, files, prompt),
:mod:`.runner` (evaluate / regrade, output files), :mod:`.selection`, :mod:`.synthetic` (the shipped benchmark),
:mod:`.cli` and :mod:`.select` (command lines). Generation itself is :mod:`megatron_offgrpo.inference.generation`.
Imports stay lazy here so that the command lines start fast.
"""
