"""Synthetic OpenThoughts3-format teacher rollouts for the shipped sample, the tests and the benchmark.

Each problem is small arithmetic with a known answer; its K "teacher" solutions mix correct answers written in
equivalent forms (``\\frac{p}{q}``, ``\\dfrac``, ``p/q``, decimals), wrong answers, and missing boxes, so that all
the group types of a real dataset appear: all-positive, mixed, low-agreement (rejected), unanswerable (rejected),
a wrong majority (the vote disagrees with the ground truth), plus a few non-math rows for ``--domain math``.
Rows follow the public dataset: one row per rollout with ``conversations`` / ``domain`` / ``source``; the extra
``answer`` field carries the ground truth so the build can report the vote's accuracy.
"""

from __future__ import annotations

import json
import random
from fractions import Fraction
from typing import Dict, Iterator, List, Optional, Tuple

KINDS = ("all_correct", "mixed", "low_agreement", "unanswerable", "wrong_majority", "code")
KIND_WEIGHTS = (0.34, 0.34, 0.10, 0.08, 0.08, 0.06)

_FILLER = [
    "First I rewrite the expression carefully.",
    "Let me double-check the arithmetic step by step.",
    "I should be careful with the signs here.",
    "Another way to see this is to expand both terms.",
    "Let me verify by substituting back.",
    "Reducing the fraction gives the same value.",
]


def _forms(value: Fraction, rng: random.Random) -> str:
    """One LaTeX rendering of ``value``, chosen among equivalent forms."""
    p, q = value.numerator, value.denominator
    if q == 1:
        return rng.choice([str(p), f"{p}", f"{p}.0" if rng.random() < 0.2 else str(p)])
    forms = [f"\\frac{{{p}}}{{{q}}}", f"\\dfrac{{{p}}}{{{q}}}", f"{p}/{q}"]
    if 1000 % q == 0 or 100 % q == 0:
        forms.append(f"{float(value):g}")
    return rng.choice(forms)


def _problem(rng: random.Random) -> Tuple[str, Fraction]:
    kind = rng.randrange(3)
    if kind == 0:
        a, b, c, d = rng.randint(1, 9), rng.randint(2, 9), rng.randint(1, 9), rng.randint(2, 9)
        return f"Compute $\\frac{{{a}}}{{{b}}} + \\frac{{{c}}}{{{d}}}$ and give the answer in lowest terms.", \
            Fraction(a, b) + Fraction(c, d)
    if kind == 1:
        a, b, c = rng.randint(2, 30), rng.randint(2, 30), rng.randint(1, 99)
        return f"What is ${a} \\times {b} - {c}$?", Fraction(a * b - c)
    a, b = rng.randint(1, 40), rng.choice([2, 4, 5, 8, 10])
    return f"A rope of length {a} metres is cut into {b} equal pieces. How long is each piece, in metres?", \
        Fraction(a, b)


def _solution(value: Optional[Fraction], rng: random.Random, long: bool = False) -> str:
    steps = rng.sample(_FILLER, k=rng.randint(1, 4))
    if long:
        steps = steps * 12
    think = "<think>\n" + " ".join(steps)
    if value is not None and rng.random() < 0.3:
        # A tentative box inside the thinking: extraction must ignore it and take the final part's box.
        think += f" Maybe it is \\boxed{{{_forms(value + 1, rng)}}}? No, let me recompute."
    think += "\n</think>\n\n"
    if value is None:
        return think + "I could not determine the value with certainty."
    return think + f"Putting it together, the answer is $\\boxed{{{_forms(value, rng)}}}$."


def generate_rows(num_problems: int = 48, k: int = 16, seed: int = 0, long_fraction: float = 0.02) -> Iterator[Dict]:
    """OpenThoughts3-style rows (one per rollout), deterministic for ``seed``."""
    rng = random.Random(seed)
    for _ in range(num_problems):
        kind = rng.choices(KINDS, KIND_WEIGHTS)[0]
        problem, truth = _problem(rng)
        if kind == "code":
            for _ in range(k):
                yield {"conversations": [{"from": "human", "value": "Write a function that reverses a list."},
                                         {"from": "gpt", "value": "```python\ndef rev(x):\n    return x[::-1]\n```"}],
                       "domain": "code", "source": "synthetic-code"}
            continue
        values: List[Optional[Fraction]]
        if kind == "all_correct":
            values = [truth] * k
        elif kind == "mixed":
            n_ok = rng.randint(k // 2 + 1, k - 1)
            values = [truth] * n_ok + [truth + rng.choice([-1, 1, 2]) for _ in range(k - n_ok)]
        elif kind == "low_agreement":
            values = [truth + (i % 5) for i in range(k)]
        elif kind == "unanswerable":
            values = [None] * k
        else:  # wrong_majority: the teacher agrees on a wrong value
            wrong = truth * 2
            values = [wrong] * (k - 3) + [truth] * 3
        rng.shuffle(values)
        for v in values:
            yield {
                "conversations": [{"from": "human", "value": problem},
                                  {"from": "gpt", "value": _solution(v, rng, long=rng.random() < long_fraction)}],
                "domain": "math",
                "source": "synthetic-arith",
                "answer": _forms(truth, rng),
            }


def student_pass_rates(rows: List[Dict], seed: int = 0) -> List[Dict]:
    """A synthetic student's pass rate per math problem (what its own rollouts would give)."""
    rng = random.Random(seed + 1)
    seen: Dict[str, float] = {}
    for row in rows:
        if row.get("domain") != "math":
            continue
        problem = row["conversations"][0]["value"]
        if problem not in seen:
            seen[problem] = rng.choice([0.0, 0.125, 0.25, 0.5, 0.75, 0.875, 1.0])
    return [{"problem": p, "pass_rate": r} for p, r in seen.items()]


def write_jsonl(rows: List[Dict], path: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
