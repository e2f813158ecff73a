"""A learnable synthetic task family for the CPU demo: teacher rollouts to train on and a held-out benchmark.

The shipped sample of :mod:`megatron_offgrpo.preprocess.synthetic` exercises every group type the dataset build
must handle, but its problems (fractions, long ``<think>`` filler) are far beyond what the demo's tiny
character-level model can learn in minutes. This family is made so that offline GRPO visibly raises the tiny
model's accuracy within the demo: three short tasks on 3-digit numbers whose answers follow from the prompt by a
rule a 2-layer transformer picks up from a few thousand examples, each with a one-line reasoning trace::

    copy       "Repeat the number 482."       <think>\nThe number is 482.\n</think>\nThe answer is \boxed{482}.
    reverse    "Reverse the digits of 482."   <think>\n482 reversed is 284.\n</think>\nThe answer is \boxed{284}.
    successor  "What number comes after 482?" <think>\n482 + 1 = 483\n</think>\nThe answer is \boxed{483}.

Every number has 3 digits (reversals and successors included), so each answer digit sits at a fixed distance from
the prompt digit it comes from: a character-level model learns that in a few hundred steps, where numbers of 2 to 4
digits (a length-dependent distance) and comparisons of two numbers were not learned in 300 steps in trials.

Teacher rollouts: ``k`` per problem (OpenThoughts3 format, one row per rollout). A problem's group is either
all-correct or mixed: ``k - w`` correct rollouts and ``w`` wrong ones (1 <= w < k / 2, so the correct answer is
always the strict majority and the majority vote labels the group with it). Wrong rollouts are the mistakes a
model makes on these tasks (a mistyped digit, digits rotated instead of reversed, a missed or doubled
increment), with a reasoning
line consistent with the wrong answer. So offline GRPO sees all-positive groups (the all-positive bias) and mixed
groups (positive and negative advantages), as on real data.

Held-out split: each task's problems are drawn without replacement from its finite universe (the 3-digit
numbers) with one seeded permutation; the benchmark takes the first problems of the permutation, the training set
the following ones, so no benchmark problem (text or task instance) is ever in the training file. Everything is
deterministic for the seed.

Benchmark rows are ``{"id", "problem", "answer", "subset"}`` (the evaluation CLI's local-file format; ``subset`` =
the task, reported separately). The demo evaluates with the prompt ``{problem}`` alone (``--prompt-template
'{problem}'``): the training prompts carry no instruction either, and the answer format is what training teaches.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, NamedTuple, Optional, Sequence, Tuple

__all__ = [
    "TASKS",
    "DemoProblem",
    "DemoSplit",
    "split_problems",
    "teacher_rollouts",
    "training_rows",
    "benchmark_rows",
    "solution_text",
    "write_jsonl",
    "write_initial_model",
    "BeforeAfterRow",
    "before_after_rows",
    "print_before_after",
]

TASKS = ("copy", "reverse", "successor")
SOURCE = "synthetic-demo"  # the ``source`` field of the training rows


@dataclass(frozen=True)
class DemoProblem:
    """One task instance: ``task`` (one of :data:`TASKS`), the prompt text, the answer, and the operands."""

    task: str
    problem: str
    answer: int
    operands: Tuple[int, ...]


@dataclass(frozen=True)
class DemoSplit:
    """Disjoint problem sets: ``train`` (teacher rollouts are written for these) and ``benchmark`` (held out)."""

    train: List[DemoProblem]
    benchmark: List[DemoProblem]


# ------------------------------------------------------------------------------------------ the tasks
# Each task: its universe of operand tuples, the prompt, the correct answer, the reasoning line for a claimed
# answer, and a wrong answer a model plausibly gives.


def _copy_universe() -> List[Tuple[int, ...]]:
    return [(n,) for n in range(100, 1000)]


def _reverse_universe() -> List[Tuple[int, ...]]:
    return [(n,) for n in range(100, 1000) if n % 10]  # no trailing zero: the reversal has 3 digits too


def _successor_universe() -> List[Tuple[int, ...]]:
    return [(n,) for n in range(100, 999)]  # answers 101 .. 999: 3 digits, as the operand


def _copy_wrong(ops: Tuple[int, ...], rng: random.Random) -> int:
    digits = list(str(ops[0]))
    i = rng.randrange(len(digits))
    choices = [d for d in "0123456789" if d != digits[i] and not (i == 0 and d == "0")]
    digits[i] = rng.choice(choices)  # one mistyped digit
    return int("".join(digits))


def _reverse_wrong(ops: Tuple[int, ...], rng: random.Random) -> int:
    d = str(ops[0])
    answer = int(d[::-1])
    # Not reversed, or rotated; a palindrome like 121 or 777 has fewer distinct mistakes of that kind.
    candidates = sorted({int(c) for c in (d, d[1:] + d[0], d[-1] + d[:-1])} - {answer})
    return rng.choice(candidates) if candidates else _copy_wrong((answer,), rng)


def _successor_wrong(ops: Tuple[int, ...], rng: random.Random) -> int:
    return ops[0] + rng.choice([0, 2])  # forgot the increment, or did it twice


_UNIVERSE: Dict[str, Callable[[], List[Tuple[int, ...]]]] = {
    "copy": _copy_universe, "reverse": _reverse_universe, "successor": _successor_universe,
}
_WRONG: Dict[str, Callable[[Tuple[int, ...], random.Random], int]] = {
    "copy": _copy_wrong, "reverse": _reverse_wrong, "successor": _successor_wrong,
}


def _make_problem(task: str, ops: Tuple[int, ...]) -> DemoProblem:
    if task == "copy":
        return DemoProblem(task, f"Repeat the number {ops[0]}.", ops[0], ops)
    if task == "reverse":
        return DemoProblem(task, f"Reverse the digits of {ops[0]}.", int(str(ops[0])[::-1]), ops)
    if task == "successor":
        return DemoProblem(task, f"What number comes after {ops[0]}?", ops[0] + 1, ops)
    raise ValueError(f"unknown demo task {task!r}: expected one of {', '.join(TASKS)}")


def solution_text(p: DemoProblem, claimed: int) -> str:
    """The teacher's response claiming ``claimed`` (the answer, or a mistake): a one-line ``<think>`` block whose
    reasoning is consistent with the claim, then the boxed answer."""
    if p.task == "copy":
        thought = f"The number is {claimed}."
    elif p.task == "reverse":
        thought = f"{p.operands[0]} reversed is {claimed}."
    else:
        thought = f"{p.operands[0]} + {claimed - p.operands[0]} = {claimed}"
    return f"<think>\n{thought}\n</think>\nThe answer is \\boxed{{{claimed}}}."


# ------------------------------------------------------------------------------------------ split and rollouts


def split_problems(num_train: int, num_benchmark: int, seed: int = 0, tasks: Sequence[str] = TASKS) -> DemoSplit:
    """``num_train`` training and ``num_benchmark`` benchmark problems per task, disjoint, deterministic for
    ``seed``. Problems are listed task by task interleaved (copy, reverse, successor, copy, ...), so that any
    prefix of either list is balanced over the tasks.

    Raises ``ValueError`` when a task's universe is smaller than ``num_train + num_benchmark``.
    """
    per_task_train: List[List[DemoProblem]] = []
    per_task_bench: List[List[DemoProblem]] = []
    for task in tasks:
        if task not in _UNIVERSE:
            raise ValueError(f"unknown demo task {task!r}: expected one of {', '.join(TASKS)}")
        universe = _UNIVERSE[task]()
        need = num_train + num_benchmark
        if need > len(universe):
            raise ValueError(f"task {task!r} has {len(universe)} distinct problems, {need} requested "
                             f"({num_train} train + {num_benchmark} benchmark): ask for fewer")
        # One permutation per task, from the seed and the task's name (adding a task changes no other task).
        rng = random.Random(f"demo-split/{seed}/{task}")
        order = rng.sample(range(len(universe)), need)
        problems = [_make_problem(task, universe[i]) for i in order]
        per_task_bench.append(problems[:num_benchmark])
        per_task_train.append(problems[num_benchmark:])
    return DemoSplit(train=_interleave(per_task_train), benchmark=_interleave(per_task_bench))


def _interleave(lists: List[List[DemoProblem]]) -> List[DemoProblem]:
    return [p for row in zip(*lists) for p in row]


def teacher_rollouts(p: DemoProblem, k: int, rng: random.Random, mixed_fraction: float = 0.6) -> List[Tuple[str, bool]]:
    """``k`` teacher responses to ``p`` as ``(text, correct)``, shuffled. With probability ``mixed_fraction`` the
    group is mixed: ``w`` wrong responses, ``1 <= w <= (k - 1) // 2`` (the correct answer stays the strict
    majority); else all are correct."""
    if k < 3:
        raise ValueError(f"k must be >= 3 (a mixed group needs a correct strict majority), got {k}")
    if not 0.0 <= mixed_fraction <= 1.0:
        raise ValueError(f"mixed_fraction must be in [0, 1], got {mixed_fraction}")
    wrong = rng.randint(1, (k - 1) // 2) if rng.random() < mixed_fraction else 0
    claims = [p.answer] * (k - wrong) + [_WRONG[p.task](p.operands, rng) for _ in range(wrong)]
    rng.shuffle(claims)
    return [(solution_text(p, c), c == p.answer) for c in claims]


def training_rows(problems: Sequence[DemoProblem], k: int = 8, seed: int = 0,
                  mixed_fraction: float = 0.6) -> Iterator[Dict]:
    """OpenThoughts3-format rows (one per rollout, ``k`` per problem, a problem's rows contiguous), with the
    ground truth in ``answer`` (the build reports the vote's accuracy against it); deterministic for ``seed``."""
    rng = random.Random(f"demo-rollouts/{seed}")
    for p in problems:
        for text, _ in teacher_rollouts(p, k, rng, mixed_fraction):
            yield {
                "conversations": [{"from": "human", "value": p.problem}, {"from": "gpt", "value": text}],
                "domain": "math",
                "source": f"{SOURCE}-{p.task}",
                "answer": str(p.answer),
            }


def benchmark_rows(problems: Sequence[DemoProblem]) -> List[Dict[str, str]]:
    """The evaluation CLI's local benchmark rows: ``id`` (``<task>-<index>``), ``problem``, ``answer``,
    ``subset`` (the task)."""
    counts: Dict[str, int] = {}
    rows = []
    for p in problems:
        i = counts[p.task] = counts.get(p.task, -1) + 1
        rows.append({"id": f"{p.task}-{i:03d}", "problem": p.problem, "answer": str(p.answer), "subset": p.task})
    return rows


def write_jsonl(rows: Sequence[Dict], path: str) -> None:
    """Write ``rows`` as JSON lines, atomically (a killed run leaves the previous file or none)."""
    from megatron_offgrpo.data.atomic import atomic_write_bytes

    atomic_write_bytes(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode("utf-8"))


def write_initial_model(out_dir: str, hidden_size: int = 128, num_layers: int = 2, seed: int = 1234,
                        tokenizer_dir: Optional[str] = None) -> str:
    """Write the demo's initial policy, a randomly initialized tiny Qwen3 (the shape of
    :func:`~megatron_offgrpo.models.architecture.tiny_architecture`), as an HF model directory: ``config.json``,
    ``model.safetensors`` (fp32), ``generation_config.json`` and the tiny tokenizer with its chat template.

    The demo starts from it as a user starts from any HF model (``tools/checkpoint/hf_to_mcore.py``, then
    ``model.load``), and evaluates it as is, so the "before" of the demo's table is exactly the model training
    starts from. Deterministic for ``seed`` (``transformers``' own initialization under ``torch.manual_seed``).
    Written under a temporary name and renamed: a killed run leaves no partial directory at ``out_dir``.
    Returns ``out_dir``. Raises ``FileExistsError`` if ``out_dir`` exists.
    """
    import os
    import shutil
    import tempfile

    import torch
    import transformers

    from megatron_offgrpo.models.architecture import model_config_from_hf, tiny_architecture
    from megatron_offgrpo.preprocess.tiny_tokenizer import load_tiny_tokenizer

    if os.path.exists(out_dir):
        raise FileExistsError(f"{out_dir} exists: remove it to write a new initial model")
    tok = load_tiny_tokenizer(tokenizer_dir)
    arch = tiny_architecture(len(tok), num_layers, hidden_size)
    cfg = transformers.Qwen3Config(
        vocab_size=arch.vocab_size, hidden_size=arch.hidden_size, intermediate_size=arch.ffn_hidden_size,
        num_hidden_layers=arch.num_layers, num_attention_heads=arch.num_attention_heads,
        num_key_value_heads=arch.num_query_groups, head_dim=arch.head_dim,
        max_position_embeddings=arch.max_position_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": arch.rope_theta}, rms_norm_eps=arch.norm_eps,
        tie_word_embeddings=arch.tie_word_embeddings, attention_bias=arch.qkv_bias,
        initializer_range=arch.initializer_range, bos_token_id=None, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id, architectures=[arch.hf_architecture],
    )
    # The converter maps the weights by what it reads from config.json: it must read back the intended shape.
    back = model_config_from_hf(cfg.to_dict())
    for name in ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups",
                 "head_dim", "vocab_size", "tie_word_embeddings", "qk_norm"):
        if getattr(back, name) != getattr(arch, name):
            raise AssertionError(f"config.json reads back {name}={getattr(back, name)!r}, not {getattr(arch, name)!r}")
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    model.generation_config = transformers.GenerationConfig(eos_token_id=tok.eos_token_id,
                                                            pad_token_id=tok.pad_token_id)
    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-initial-model-", dir=parent)
    try:
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; the model is an ordinary output
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


class BeforeAfterRow(NamedTuple):
    """One line of the demo's closing table: avg@n (percent) of the initial and of the trained model on one
    subset (``"all"`` = the whole benchmark), each with its bootstrap confidence interval ``(low, high)``."""

    subset: str
    num_problems: int
    before: float
    before_ci: Tuple[float, float]
    after: float
    after_ci: Tuple[float, float]


def before_after_rows(before: Dict, after: Dict) -> List[BeforeAfterRow]:
    """The closing table's rows, ``"all"`` first, then each subset, from two evaluation summaries
    (``summary.json`` of ``python -m megatron_offgrpo.eval``) of the same benchmark and sampling settings.

    Raises ``ValueError`` when the two were not evaluated alike (benchmark, n, temperature, top_p, max tokens,
    prompt template, seed): their avg@n would not be comparable.
    """
    keys = ("n", "temperature", "top_p", "max_tokens", "prompt_template", "seed")
    if before.get("benchmark_fingerprint") != after.get("benchmark_fingerprint"):
        raise ValueError("the two summaries are of different benchmarks (benchmark_fingerprint differs)")
    diff = [k for k in keys if before["settings"].get(k) != after["settings"].get(k)]
    if diff:
        raise ValueError(f"the two summaries were sampled differently ({', '.join(diff)} differ): not comparable")

    def row(name: str, b: Dict, a: Dict) -> BeforeAfterRow:
        return BeforeAfterRow(name, int(b["num_problems"]), float(b["avg_at_n"]),
                              (float(b["ci"]["low"]), float(b["ci"]["high"])), float(a["avg_at_n"]),
                              (float(a["ci"]["low"]), float(a["ci"]["high"])))

    subsets_after = after.get("subsets") or {}
    return [row("all", before, after)] + [row(name, b, subsets_after[name])
                                          for name, b in (before.get("subsets") or {}).items()]


def print_before_after(before_dir: str, after_dir: str) -> List[BeforeAfterRow]:
    """Print the demo's closing table: avg@n of the initial and the trained model per task, with 95% bootstrap
    intervals (rich), from the ``summary.json`` in each evaluation output directory; returns the rows."""
    import os

    from rich.console import Console
    from rich.table import Table

    with open(os.path.join(before_dir, "summary.json")) as f:
        before = json.load(f)
    with open(os.path.join(after_dir, "summary.json")) as f:
        after = json.load(f)
    rows = before_after_rows(before, after)
    st, ci = after["settings"], after["ci"]
    step = (after.get("model") or {}).get("step")
    table = Table(title=f"held-out {after.get('benchmark')}: avg@{st['n']} (%) [{int(ci['confidence'] * 100)}% CI], "
                        f"temperature {st['temperature']}, top_p {st['top_p']}", header_style="bold")
    for col, justify in (("task", "left"), ("problems", "right"), ("initial model", "right"),
                         (f"after training{f' (step {step})' if step is not None else ''}", "right"),
                         ("change", "right")):
        table.add_column(col, justify=justify)
    for r in rows:
        table.add_row(r.subset, str(r.num_problems), f"{r.before:.1f} [{r.before_ci[0]:.1f}, {r.before_ci[1]:.1f}]",
                      f"{r.after:.1f} [{r.after_ci[0]:.1f}, {r.after_ci[1]:.1f}]", f"{r.after - r.before:+.1f}")
    Console().print(table)
    return rows
