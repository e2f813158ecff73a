"""Grading benchmark samples with the project's rewards module: the same extraction and equivalence as majority
voting (docs/design.md §§2 and 8), so a benchmark score and a training reward never disagree about one answer.

Per sample: the final answer is :func:`~megatron_offgrpo.rewards.extraction.extract_final_answer` of the response,
and it is correct when :class:`~megatron_offgrpo.rewards.equivalence.EquivalenceChecker` finds it equivalent to the
reference answer. A **truncated** sample (``finish_reason == "length"``: the generation hit ``max_tokens``) is
wrong whatever it contains and does not vote: its reasoning was cut, so an answer seen in it is a tentative one.
Its extracted answer is still recorded, for inspection.

Per problem: the majority vote over the non-truncated answers (:func:`~megatron_offgrpo.eval.metrics.majority_correct`).

Workers are processes (the verifier's timeout is a signal alarm that only works in a main thread); results come
back in input order whatever the number of workers.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Iterator, List, Optional, Sequence

from megatron_offgrpo.rewards.equivalence import EquivalenceChecker, VerifierCounters
from megatron_offgrpo.rewards.extraction import boxed_spans, extract_final_answer

__all__ = ["GradeItem", "SampleGrade", "ProblemGrade", "normalize_reference", "grade_problem", "grade_problems",
           "FINISH_STOP", "FINISH_LENGTH"]

FINISH_STOP = "stop"
FINISH_LENGTH = "length"
# Above this many samples in total, the default (workers=0) grades in a process pool.
_PARALLEL_MIN_SAMPLES = 2048


@dataclass(frozen=True)
class GradeItem:
    """One problem to grade: its id, reference answer, and its samples' responses and finish reasons."""

    problem_id: str
    reference: str
    responses: Sequence[str]
    finish_reasons: Sequence[str]


@dataclass(frozen=True)
class SampleGrade:
    """One graded sample: the extracted final answer (``None``: no complete box), whether it is correct, and
    whether the generation was truncated (then never correct)."""

    extracted_answer: Optional[str]
    correct: bool
    truncated: bool


@dataclass
class ProblemGrade:
    """The grades of one problem's samples and its majority vote.

    ``majority_answer`` is the winning cluster's representative (``None`` when no non-truncated sample has an
    answer); ``majority_correct`` whether it is correct. ``counters`` are the verifier's (timeouts, errors).
    """

    problem_id: str
    samples: List[SampleGrade]
    majority_answer: Optional[str]
    majority_correct: bool
    counters: VerifierCounters = field(default_factory=VerifierCounters)


def normalize_reference(answer: str) -> str:
    """The reference answer as the grader compares it: a boxed reference (``\\boxed{5}``) is read like a response's
    final answer, surrounding ``$`` and whitespace are dropped. Raises ``ValueError`` for an empty reference."""
    text = str(answer).strip()
    if boxed_spans(text):
        extracted = extract_final_answer(text)
        if extracted is not None:
            text = extracted
    text = text.strip()
    # Only a pair of math delimiters around the whole answer: an escaped dollar (``5\$``) is part of it.
    while len(text) >= 2 and text[0] == "$" and text[-1] == "$" and not text.endswith("\\$"):
        text = text[1:-1].strip()
    if not text or text == "$":
        raise ValueError(f"empty reference answer {answer!r}")
    return text


def grade_problem(item: GradeItem, timeout_s: Optional[float] = 5.0) -> ProblemGrade:
    """Grade every sample of one problem against its reference and take the majority vote (module docstring)."""
    from megatron_offgrpo.rewards.voting import majority_vote

    if len(item.responses) != len(item.finish_reasons):
        raise ValueError(f"problem {item.problem_id}: {len(item.responses)} responses but "
                         f"{len(item.finish_reasons)} finish reasons")
    checker = EquivalenceChecker(timeout_s=timeout_s)
    reference = normalize_reference(item.reference)
    samples: List[SampleGrade] = []
    for response, finish in zip(item.responses, item.finish_reasons):
        answer = extract_final_answer(response)
        truncated = finish == FINISH_LENGTH
        correct = (not truncated) and checker.equivalent(reference, answer)
        samples.append(SampleGrade(answer, bool(correct), truncated))
    voters = [None if s.truncated else s.extracted_answer for s in samples]
    vote = majority_vote(voters, checker, min_agreement=0.0)
    maj_ok = vote.label is not None and samples[vote.label_index].correct
    return ProblemGrade(item.problem_id, samples, vote.label, bool(maj_ok), checker.counters)


_WORKER_TIMEOUT: Optional[float] = None


def _init_worker(timeout_s: Optional[float]) -> None:
    global _WORKER_TIMEOUT
    _WORKER_TIMEOUT = timeout_s


def _grade_task(item: GradeItem) -> ProblemGrade:
    return grade_problem(item, _WORKER_TIMEOUT)


def _iter_grades(items: Sequence[GradeItem], workers: int, timeout_s: Optional[float]) -> Iterator[ProblemGrade]:
    if workers <= 1:
        for item in items:
            yield grade_problem(item, timeout_s)
        return
    from megatron_offgrpo.utils.pool import OrderedProcessPool  # the project's one pool (spawned workers)

    with OrderedProcessPool(workers, initializer=_init_worker, initargs=(timeout_s,)) as pool:
        yield from pool.imap(_grade_task, items)


def grade_problems(
    items: Sequence[GradeItem],
    workers: int = 0,
    timeout_s: Optional[float] = 5.0,
    progress: bool = True,
) -> List[ProblemGrade]:
    """Grade ``items`` in order (:func:`grade_problem`), with a progress bar (ETA) over problems.

    ``workers``: processes; 0 picks one for small jobs and ``min(8, cpu count)`` above 2048 samples.
    """
    from tqdm import tqdm

    if workers <= 0:
        total = sum(len(i.responses) for i in items)
        workers = min(8, os.cpu_count() or 1) if total >= _PARALLEL_MIN_SAMPLES else 1
    workers = min(workers, max(1, len(items)))
    bar = tqdm(total=len(items), desc="grading", unit="problem", disable=not progress, dynamic_ncols=True)
    grades: List[ProblemGrade] = []
    try:
        for grade in _iter_grades(items, workers, timeout_s):
            grades.append(grade)
            bar.update(1)
    finally:
        bar.close()
    return grades
