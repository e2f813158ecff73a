#!/usr/bin/env python
r"""Sample a (student) model on a prompt set: OT3-format rollouts for build_dataset.py, and per-problem pass rates.

Example (Lightning OPD: the SFT student's rollouts, then the teacher's log-probs with precompute_logprobs.py)::

    python tools/preprocess/generate_rollouts.py --model runs/sft/checkpoints/iter_0001000 \
        --input problems.jsonl --output data/student_rollouts.jsonl --n 8 --max-tokens 16384
    python tools/preprocess/build_dataset.py --input data/student_rollouts.jsonl --tokenizer TOKENIZER \
        --output-prefix data/student --student-pass-rates data/student_rollouts.pass_rates.jsonl ...

``--input``: JSONL / Parquet rows with ``problem``, optional ``answer`` and ``id``. ``--model``: an HF model
directory or a Megatron checkpoint (exported on the fly). Writes ``--output`` (one OT3 row per rollout),
``--pass-rates`` (default ``<output>.pass_rates.jsonl``; the ``--student-pass-rates`` input of build_dataset.py),
``<output>.rejects.jsonl`` and ``<output>.meta.json``. Problems with an ``answer`` are graded against it, the others
against the majority vote of their own samples (``--label-source``). Errors in the input or the arguments end with
exit status 2 and one line ``error: ...`` naming the file (and line) or the flag.
"""

from __future__ import annotations

import argparse
import sys
import warnings

warnings.filterwarnings("ignore", message=".*(Transformer Engine|Apex).*")

from megatron_offgrpo.inference.rollouts import LABEL_SOURCES, RolloutConfig, generate_rollouts  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    d = RolloutConfig(model="", inputs=[], output="")
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="HF model dir, training iter_N (or its run's checkpoint dir), or "
                   "tools/checkpoint/hf_to_mcore.py output")  # fmt: skip
    p.add_argument("--hf-template", default=None, help="HF dir with the config/tokenizer of a Megatron checkpoint "
                   "that does not name its model")  # fmt: skip
    p.add_argument("--input", nargs="+", required=True, help="prompt files (JSONL / Parquet / datasets dir)")
    p.add_argument("--output", required=True, help="rollouts JSONL (OT3 format)")
    p.add_argument("--pass-rates", default=None, help="pass-rate JSONL (default: <output stem>.pass_rates.jsonl)")
    p.add_argument("--n", type=int, default=d.n, help=f"samples per problem (default {d.n})")
    p.add_argument("--temperature", type=float, default=d.temperature)
    p.add_argument("--top-p", type=float, default=d.top_p)
    p.add_argument("--max-tokens", type=int, default=d.max_tokens)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--backend", choices=("auto", "vllm", "hf"), default=d.backend)
    p.add_argument("--tensor-parallel-size", "--tp", type=int, default=1)
    p.add_argument("--data-parallel-size", "--dp", type=int, default=1)
    p.add_argument("--prompt-template", default=d.prompt_template,
                   help="the user message; {problem} is replaced by the problem text (default: the problem as is)")
    p.add_argument("--domain", default=d.domain, help="domain of rows without one")
    p.add_argument("--source", default=d.source, help="source of rows without one")
    p.add_argument("--label-source", choices=LABEL_SOURCES, default=d.label_source,
                   help="auto: the row's answer when it has one, else the majority vote of the samples")
    p.add_argument("--min-agreement", type=float, default=d.min_agreement)
    p.add_argument("--verify-timeout-s", type=float, default=d.verify_timeout_s)
    p.add_argument("--keep-truncated", action="store_true", help="also write rollouts cut at --max-tokens")
    p.add_argument("--strict", action="store_true", help="fail at the first bad input row instead of rejecting it")
    p.add_argument("--work-dir", default=None, help="cache of HF exports of Megatron checkpoints")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def main(argv=None) -> int:
    a = parse_args(argv)
    from megatron_offgrpo.inference.hf_export import ModelResolutionError
    from megatron_offgrpo.preprocess.records import InputError

    cfg = RolloutConfig(
        model=a.model, inputs=list(a.input), output=a.output, pass_rates=a.pass_rates, n=a.n,
        temperature=a.temperature, top_p=a.top_p, max_tokens=a.max_tokens, seed=a.seed, backend=a.backend,
        tensor_parallel_size=a.tensor_parallel_size, data_parallel_size=a.data_parallel_size,
        prompt_template=a.prompt_template, domain=a.domain, source=a.source, label_source=a.label_source,
        min_agreement=a.min_agreement, verify_timeout_s=a.verify_timeout_s, keep_truncated=a.keep_truncated,
        strict=a.strict, work_dir=a.work_dir, hf_template=a.hf_template, progress=not a.no_progress,
    )  # fmt: skip
    try:
        res = generate_rollouts(cfg)
    except (InputError, ModelResolutionError, ValueError, FileNotFoundError) as e:
        print("error: " + " ".join(str(e).split("\n")), file=sys.stderr)
        return 2
    from rich.console import Console
    from rich.table import Table

    t = Table(title="student rollouts")
    t.add_column("item")
    t.add_column("value", justify="right")
    t.add_row("problems", str(res.problems))
    t.add_row("samples", f"{res.samples} ({cfg.n} per problem)")
    t.add_row("rollouts written", str(res.rollouts_written))
    for k, v in sorted(res.rejects.items()):
        t.add_row(f"input rows rejected: {k}", str(v))
    for k, v in sorted(res.notes.items()):
        t.add_row(k.replace("_", " "), str(v))
    t.add_row("mean pass rate", "n/a" if res.mean_pass_rate is None else f"{100 * res.mean_pass_rate:.1f}%")
    t.add_row("generated tokens", f"{res.tokens} in {res.generate_s:.1f} s ({res.tokens / max(res.generate_s, 1e-9):.1f}/s)")
    t.add_row("grading", f"{res.grade_s:.1f} s")
    Console().print(t)
    print(f"rollouts: {res.output}\npass rates: {res.pass_rates}\nrejects: {res.rejects_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
