"""Difficulty-aware selection of groups (``--num-groups N --strategy {uniform,difficulty}``).

- ``uniform``: N groups uniformly at random.
- ``difficulty`` without student data: stratify by teacher agreement (:data:`AGREEMENT_EDGES`) and allocate N
  equally across the non-empty strata (a stratum with too few groups gives its remainder to the others), then
  uniform within each stratum. Most OpenThoughts3 problems have agreement 1.0, so this over-represents the
  harder, less self-consistent ones relative to their natural share.
- ``difficulty`` with student pass rates (from the student's own rollouts): weighted sampling without replacement
  (Efraimidis-Spirakis keys ``u ** (1 / w)``) with ``w = teacher_fraction_positive * (1 - student_pass_rate) +
  floor``: problems the teacher solves and the student does not come first (the blog's case: all 16 teacher
  answers positive while the base model fails). A problem without a student pass rate gets the neutral 0.5.

Everything is a pure function of (inputs, seed); the selection keeps the input order of the chosen groups.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from megatron_offgrpo.preprocess.readers import problem_id_for
from megatron_offgrpo.preprocess.records import InputError

STRATEGIES = ("uniform", "difficulty")
AGREEMENT_EDGES = (0.0, 0.5, 0.625, 0.75, 0.875, 1.0)
PASS_RATE_EDGES = (0.0, 0.25, 0.5, 0.75, 1.0)
WEIGHT_FLOOR = 0.01
UNKNOWN_PASS_RATE = 0.5


def agreement_bin(agreement: float, edges: Sequence[float] = AGREEMENT_EDGES) -> str:
    """Bin label of a teacher agreement; exactly 1.0 (all answers agree) is its own bin."""
    if agreement >= edges[-1]:
        return f"={edges[-1]:g}"
    for lo, hi in zip(edges[:-1], edges[1:]):
        if lo <= agreement < hi:
            return f"[{lo:g},{hi:g})"
    return f"<{edges[0]:g}"


def agreement_bins(edges: Sequence[float] = AGREEMENT_EDGES) -> List[str]:
    return [f"[{lo:g},{hi:g})" for lo, hi in zip(edges[:-1], edges[1:])] + [f"={edges[-1]:g}"]


def pass_rate_bin(p: Optional[float], edges: Sequence[float] = PASS_RATE_EDGES) -> str:
    if p is None:
        return "unknown"
    if p >= edges[-1]:
        return f"={edges[-1]:g}"
    for lo, hi in zip(edges[:-1], edges[1:]):
        if lo <= p < hi:
            return f"[{lo:g},{hi:g})"
    return "unknown"


def load_student_pass_rates(path: str) -> Dict[str, float]:
    """``problem_id -> pass rate`` from a JSONL of ``{problem_id | problem, pass_rate | (num_correct, num_samples)}``.

    Rows keyed by ``problem`` text are mapped to the same hash id the readers give problems without an id.
    Bad rows raise :class:`~.records.InputError` naming the file and line (a small side file: fail loudly).
    """
    rates: Dict[str, float] = {}
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            where = f"{path}:{line_no}"
            try:
                row = json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise InputError(f"{where}: not a valid UTF-8 JSON line: {e}") from e
            if not isinstance(row, dict):
                raise InputError(f"{where}: expected a JSON object")
            if "problem_id" in row:
                key = str(row["problem_id"])
            elif isinstance(row.get("problem"), str):
                key = problem_id_for(row["problem"].strip())
            else:
                raise InputError(f"{where}: field 'problem_id' (or 'problem') missing")
            if "pass_rate" in row:
                p = row["pass_rate"]
            elif "num_correct" in row and "num_samples" in row and row["num_samples"]:
                p = row["num_correct"] / row["num_samples"]
            else:
                raise InputError(f"{where}: field 'pass_rate' (or num_correct/num_samples) missing")
            if not isinstance(p, (int, float)) or not 0.0 <= float(p) <= 1.0:
                raise InputError(f"{where}: field 'pass_rate' must be a number in [0, 1], got {p!r}")
            rates[key] = float(p)
    return rates


@dataclass
class SelectionReport:
    """Histograms before/after selection (printed by the build) and how many groups lacked a student rate."""

    strategy: str
    requested: Optional[int]
    before_agreement: Dict[str, int] = field(default_factory=dict)
    after_agreement: Dict[str, int] = field(default_factory=dict)
    before_pass_rate: Dict[str, int] = field(default_factory=dict)
    after_pass_rate: Dict[str, int] = field(default_factory=dict)
    missing_pass_rate: int = 0


def _hist(labels: Sequence[str], order: Sequence[str]) -> Dict[str, int]:
    out = {k: 0 for k in order}
    for lab in labels:
        out[lab] = out.get(lab, 0) + 1
    return out


def _equal_allocation(sizes: Sequence[int], n: int) -> List[int]:
    """Split ``n`` as evenly as possible over strata of the given capacities (water-filling)."""
    alloc = [0] * len(sizes)
    remaining = min(n, sum(sizes))
    open_ = [i for i, s in enumerate(sizes) if s > 0]
    while remaining > 0 and open_:
        share, extra = divmod(remaining, len(open_))
        nxt = []
        for j, i in enumerate(open_):
            want = share + (1 if j < extra else 0)
            take = min(want, sizes[i] - alloc[i])
            alloc[i] += take
            remaining -= take
            if alloc[i] < sizes[i]:
                nxt.append(i)
        if len(nxt) == len(open_) and remaining > 0 and share == 0 and extra == 0:
            break
        open_ = nxt
    return alloc


def select_groups(
    agreements: Sequence[float],
    fraction_positive: Sequence[float],
    num_groups: Optional[int],
    strategy: str = "uniform",
    seed: int = 0,
    student_pass_rates: Optional[Sequence[Optional[float]]] = None,
) -> Tuple[List[int], SelectionReport]:
    """Indices of the groups to keep (in input order) and the before/after report.

    Args:
        agreements: teacher agreement per group.
        fraction_positive: teacher fraction of positive rollouts per group.
        num_groups: how many to keep (``None`` or >= available: keep all, still reporting the histograms).
        strategy: ``uniform`` or ``difficulty``.
        seed: RNG seed; the result is a pure function of the arguments.
        student_pass_rates: per group, the student's pass rate or ``None`` when unknown; ``None`` for no file.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    n_all = len(agreements)
    abins = [agreement_bin(a) for a in agreements]
    report = SelectionReport(strategy, num_groups)
    report.before_agreement = _hist(abins, agreement_bins())
    pbins: Optional[List[str]] = None
    if student_pass_rates is not None:
        pbins = [pass_rate_bin(p) for p in student_pass_rates]
        report.before_pass_rate = _hist(pbins, [pass_rate_bin(e) for e in PASS_RATE_EDGES[:-1]] + ["=1", "unknown"])
        report.missing_pass_rate = sum(1 for p in student_pass_rates if p is None)

    rng = np.random.default_rng(seed)
    if num_groups is None or num_groups >= n_all:
        chosen = list(range(n_all))
    elif strategy == "uniform":
        chosen = sorted(rng.choice(n_all, size=num_groups, replace=False).tolist())
    elif student_pass_rates is not None:
        p = np.array([UNKNOWN_PASS_RATE if x is None else x for x in student_pass_rates], dtype=np.float64)
        w = np.asarray(fraction_positive, dtype=np.float64) * (1.0 - p) + WEIGHT_FLOOR
        keys = rng.random(n_all) ** (1.0 / w)
        chosen = sorted(np.argsort(-keys, kind="stable")[:num_groups].tolist())
    else:
        order = agreement_bins()
        members = {b: [i for i, ab in enumerate(abins) if ab == b] for b in order}
        alloc = _equal_allocation([len(members[b]) for b in order], num_groups)
        chosen = []
        for b, k in zip(order, alloc):
            if k:
                chosen += rng.choice(members[b], size=k, replace=False).tolist()
        chosen.sort()
    report.after_agreement = _hist([abins[i] for i in chosen], agreement_bins())
    if pbins is not None:
        report.after_pass_rate = _hist([pbins[i] for i in chosen], list(report.before_pass_rate))
    return chosen, report
