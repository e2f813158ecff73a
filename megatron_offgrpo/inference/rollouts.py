"""Student rollouts and pass rates: sample a model on a prompt set, write OpenThoughts3-format rollouts for
``tools/preprocess/build_dataset.py`` and a pass-rate file for difficulty-aware selection.

Input: JSONL / Parquet / a ``datasets`` directory, one problem per row: ``problem`` (required), ``answer``
(optional reference), ``id`` or ``problem_id`` (optional; else the hash of the problem text, the id
``build_dataset`` gives the same problem in the teacher's data; every rollout row carries it explicitly, so the
student's own dataset uses it too, whatever ``prompt_template``), optional ``domain`` / ``source``. A bad row (no problem, a non-string field, a
problem id already taken by another text, the same problem text twice) is rejected, named by file and line,
never dropped silently.

Outputs (each written under a temporary name and renamed into place when complete):

* ``output``: one JSON line per rollout, the OT3 shape ``preprocess/readers.py`` reads:
  ``{"conversations": [{"from": "human", "value": <user message>}, {"from": "gpt", "value": <completion>}],
  "domain", "source", "problem_id", "answer" (when known), "sample_index", "finish_reason", "num_tokens"}``.
  The user message is exactly the prompt the model was sampled with, so ``build_dataset`` templates the same
  prompt. Rollouts cut at ``max_tokens`` (no EOS: ``build_dataset`` would append one the model never produced)
  and empty ones are left out unless ``keep_truncated`` (counted, and listed in the rejects file).
* ``pass_rates``: one line per problem, the format of
  :func:`megatron_offgrpo.preprocess.selection.load_student_pass_rates`: ``{"problem_id", "pass_rate",
  "num_correct", "num_samples", "label_source", "label", "agreement"}``.
* ``output + ".rejects.jsonl"``: every rejected input row and every rollout left out, with the reason.
* ``output + ".meta.json"``: the model identity, the settings, the counts.

Grading is the project's rewards module (:func:`megatron_offgrpo.rewards.label_group`: final-answer extraction and
math-verify equivalence): against the reference ``answer`` when the problem has one, else against the
majority-vote label of the problem's own samples (``label_source="auto"``; or force ``reference`` / ``vote``).
A truncated sample is graded as incorrect and does not vote. ``pass_rate = correct samples / n``.
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

from megatron_offgrpo.preprocess.records import InputError, Reject

__all__ = ["RolloutConfig", "RolloutResult", "PromptRow", "read_prompts", "generate_rollouts", "grade_samples"]

LABEL_SOURCES = ("auto", "reference", "vote")


@dataclass
class RolloutConfig:
    """Arguments of :func:`generate_rollouts` (the CLI has one flag per field)."""

    model: str
    inputs: List[str]
    output: str
    pass_rates: Optional[str] = None  # default: <output stem>.pass_rates.jsonl
    n: int = 16
    temperature: float = 0.6
    top_p: float = 0.95
    max_tokens: int = 32768
    seed: int = 0
    backend: str = "auto"
    tensor_parallel_size: int = 1
    data_parallel_size: int = 1
    prompt_template: str = "{problem}"  # the user message; must contain {problem}
    domain: str = "math"  # for rows without one
    source: str = "student-rollouts"  # for rows without one
    label_source: str = "auto"  # auto (reference when the row has an answer, else vote) | reference | vote
    min_agreement: float = 0.5  # recorded for the vote (low agreement is noted, the pass rate still counts)
    verify_timeout_s: float = 5.0
    keep_truncated: bool = False
    strict: bool = False  # raise at the first bad input row instead of rejecting it
    work_dir: Optional[str] = None
    hf_template: Optional[str] = None
    progress: bool = True

    def pass_rates_path(self) -> str:
        if self.pass_rates:
            return self.pass_rates
        stem = self.output[: -len(".jsonl")] if self.output.endswith(".jsonl") else self.output
        return stem + ".pass_rates.jsonl"

    def validate(self) -> None:
        if "{problem}" not in self.prompt_template:
            raise ValueError(f"prompt_template must contain '{{problem}}', got {self.prompt_template!r}")
        if self.label_source not in LABEL_SOURCES:
            raise ValueError(f"label_source must be one of {LABEL_SOURCES}, got {self.label_source!r}")
        if not self.inputs:
            raise ValueError("no input file given")


@dataclass
class PromptRow:
    """One problem of the prompt set."""

    problem: str  # the user message (prompt_template applied)
    problem_id: str
    answer: Optional[str]
    domain: str
    source: str
    file: str
    line: int


@dataclass
class RolloutResult:
    """What happened (for the CLI's summary and the tests)."""

    problems: int
    samples: int
    rollouts_written: int
    rejects: Dict[str, int]
    notes: Dict[str, int]
    mean_pass_rate: Optional[float]
    output: str
    pass_rates: str
    rejects_path: str
    generate_s: float
    grade_s: float
    tokens: int
    model: Dict[str, Any] = field(default_factory=dict)


def read_prompts(cfg: RolloutConfig, rejects: List[Reject]) -> List[PromptRow]:
    """The prompt set, in input order; bad rows go to ``rejects`` (or raise :class:`InputError` if strict)."""
    from megatron_offgrpo.preprocess.readers import iter_rows, problem_id_for

    rows: List[PromptRow] = []
    by_text: Dict[str, str] = {}
    by_id: Dict[str, str] = {}

    def reject(r: Reject) -> None:
        if cfg.strict:
            raise InputError(f"{r.location()}: {r.reason}: {r.detail}")
        rejects.append(r)

    for path in cfg.inputs:
        count = 0
        for line, row in iter_rows(path):
            count += 1
            if isinstance(row, Reject):
                reject(row)
                continue
            problem = row.get("problem")
            if not isinstance(problem, str) or not problem.strip():
                reason = "missing_field" if problem is None else "bad_field"
                reject(Reject("read", reason, path, line, "problem", "a non-empty string 'problem' is required"))
                continue
            bad = [k for k in ("answer", "domain", "source") if row.get(k) is not None
                   and not isinstance(row[k], (str, int, float))]  # fmt: skip
            if bad:
                reject(Reject("read", "bad_field", path, line, bad[0], f"expected a string, got {type(row[bad[0]]).__name__}"))
                continue
            message = cfg.prompt_template.replace("{problem}", problem)
            key = problem.strip()
            raw_id = row.get("problem_id", row.get("id"))
            # The id of the *problem* (not of the templated message): the one build_dataset gives the same problem
            # in the teacher's data, so the pass rates select among those groups.
            pid = str(raw_id) if raw_id is not None else problem_id_for(key)
            where = f"{path}:{line}"
            if key in by_text:
                reject(Reject("read", "duplicate_problem", path, line, "problem", f"same problem as {by_text[key]}", pid))
                continue
            if pid in by_id:
                reject(Reject("read", "duplicate_problem_id", path, line, "problem_id",
                              f"duplicate problem_id {pid!r} (first seen at {by_id[pid]})", pid))  # fmt: skip
                continue
            by_text[key], by_id[pid] = where, where
            answer = row.get("answer")
            rows.append(PromptRow(
                problem=message, problem_id=pid, answer=None if answer is None else str(answer),
                domain=str(row.get("domain") or cfg.domain), source=str(row.get("source") or cfg.source), file=path, line=line,
            ))  # fmt: skip
        if count == 0:
            raise InputError(f"{path}: no records (the file is empty); regenerate it or leave it out of --input")
    return rows


def grade_samples(
    texts: Sequence[str], truncated: Sequence[bool], answer: Optional[str], label_source: str, min_agreement: float,
    timeout_s: float,
) -> Tuple[List[float], Dict[str, Any]]:
    """Rewards (1.0 correct) of one problem's samples and a record of how they were graded.

    ``label_source="auto"``: against ``answer`` when given, else the majority vote of the samples. Truncated
    samples get no answer (so they neither vote nor score).
    """
    from megatron_offgrpo.rewards import LabelConfig, label_group

    source = label_source if label_source != "auto" else ("reference" if answer is not None else "vote")
    if source == "reference" and answer is None:
        return [0.0] * len(texts), {"label_source": "reference", "label": None, "agreement": None,
                                    "note": "missing_reference"}  # fmt: skip
    responses = ["" if cut else t for t, cut in zip(texts, truncated)]
    out = label_group(responses, answer if source == "reference" else None,
                      LabelConfig(min_agreement=min_agreement, timeout_s=timeout_s, label_source=source))  # fmt: skip
    note = out.reject_reason if source == "vote" else None  # no_answer / low_agreement
    record = {"label_source": source, "label": out.label, "agreement": out.stats.agreement, "note": note}
    return list(out.rewards), record


class _AtomicLines:
    """A JSONL file written under ``path.tmp<pid>`` and moved into place by :meth:`commit` (fsynced)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.tmp = f"{path}.tmp{os.getpid()}"
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self.f = open(self.tmp, "w", encoding="utf-8")

    def write(self, obj: Dict[str, Any]) -> None:
        self.f.write(json.dumps(obj, ensure_ascii=False) + "\n")

    def commit(self) -> None:
        from megatron_offgrpo.data.atomic import fsync_dir

        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()
        os.replace(self.tmp, self.path)
        fsync_dir(os.path.dirname(os.path.abspath(self.path)))

    def abort(self) -> None:
        if not self.f.closed:
            self.f.close()
        if os.path.exists(self.tmp):
            os.remove(self.tmp)


def generate_rollouts(cfg: RolloutConfig) -> RolloutResult:
    """Sample ``cfg.n`` completions per problem, grade them, write the rollouts, pass rates and rejects.

    Raises :class:`InputError` for an unreadable / empty input (or the first bad row when ``strict``), ``ValueError``
    for bad settings, and what :func:`~megatron_offgrpo.inference.generation.generate` raises; nothing is written
    at the output paths then.
    """
    from tqdm import tqdm

    from megatron_offgrpo.data.atomic import atomic_write_json
    from megatron_offgrpo.inference.generation import FINISH_LENGTH, SamplingSettings, generate, resolve_model

    cfg.validate()
    settings = SamplingSettings(n=cfg.n, temperature=cfg.temperature, top_p=cfg.top_p, max_tokens=cfg.max_tokens,
                                seed=cfg.seed)  # fmt: skip
    settings.validate()
    rejects: List[Reject] = []
    prompts = read_prompts(cfg, rejects)
    if not prompts:
        raise InputError(f"{', '.join(cfg.inputs)}: no usable problem (every row was rejected: "
                         f"{dict(Counter(r.reason for r in rejects))})")  # fmt: skip
    model = resolve_model(cfg.model, work_dir=cfg.work_dir, hf_template=cfg.hf_template)
    t0 = time.perf_counter()
    completions = generate(model, [[{"role": "user", "content": p.problem}] for p in prompts], settings,
                           backend=cfg.backend, progress=cfg.progress, tensor_parallel_size=cfg.tensor_parallel_size,
                           data_parallel_size=cfg.data_parallel_size)  # fmt: skip
    generate_s = time.perf_counter() - t0

    t1 = time.perf_counter()
    notes: Counter = Counter()
    rejects_path = cfg.output + ".rejects.jsonl"
    out = _AtomicLines(cfg.output)
    rates = _AtomicLines(cfg.pass_rates_path())
    rej = _AtomicLines(rejects_path)
    written = tokens = 0
    pass_rates: List[float] = []
    try:
        for prompt, per in tqdm(list(zip(prompts, completions)), desc="grade", unit="problem", disable=not cfg.progress,
                                dynamic_ncols=True):  # fmt: skip
            truncated = [c.finish_reason == FINISH_LENGTH for c in per]
            rewards, record = grade_samples([c.text for c in per], truncated, prompt.answer, cfg.label_source,
                                            cfg.min_agreement, cfg.verify_timeout_s)  # fmt: skip
            if record.get("note"):  # no_answer / low_agreement (vote), missing_reference
                notes[f"problems_{record['note']}"] += 1
            notes["truncated_samples"] += sum(truncated)
            correct = int(sum(rewards))
            rate = correct / len(per)
            pass_rates.append(rate)
            rates.write({"problem_id": prompt.problem_id, "pass_rate": rate, "num_correct": correct,
                         "num_samples": len(per), **record})  # fmt: skip
            for j, (c, reward) in enumerate(zip(per, rewards)):
                tokens += len(c.token_ids)
                why = None
                if c.finish_reason == FINISH_LENGTH and not cfg.keep_truncated:
                    why = ("truncated", f"cut at {len(c.token_ids)} tokens (max_tokens {cfg.max_tokens}): no EOS")
                elif not c.text.strip():
                    why = ("empty_response", "the completion is empty")
                if why is not None:
                    rej.write(Reject("generate", why[0], prompt.file, prompt.line, None, why[1], prompt.problem_id,
                                     j).as_dict())
                    notes[f"left_out_{why[0]}"] += 1
                    continue
                row = {
                    "conversations": [{"from": "human", "value": prompt.problem}, {"from": "gpt", "value": c.text}],
                    "domain": prompt.domain, "source": prompt.source, "problem_id": prompt.problem_id,
                    "sample_index": j, "finish_reason": c.finish_reason, "num_tokens": len(c.token_ids),
                    "graded_correct": bool(reward),
                }  # fmt: skip
                if prompt.answer is not None:
                    row["answer"] = prompt.answer
                out.write(row)
                written += 1
        for r in rejects:
            rej.write(r.as_dict())
        # Rejects and pass rates first, the rollouts last: a kill in between leaves no rollouts file that lacks
        # its pass rates.
        rej.commit()
        rates.commit()
        out.commit()
    except BaseException:
        for f in (out, rates, rej):
            f.abort()
        raise
    grade_s = time.perf_counter() - t1
    notes = Counter({k: v for k, v in notes.items() if v})
    result = RolloutResult(
        problems=len(prompts), samples=len(prompts) * cfg.n, rollouts_written=written,
        rejects=dict(Counter(r.reason for r in rejects)), notes=dict(notes),
        mean_pass_rate=sum(pass_rates) / len(pass_rates) if pass_rates else None, output=cfg.output,
        pass_rates=cfg.pass_rates_path(), rejects_path=rejects_path, generate_s=generate_s, grade_s=grade_s,
        tokens=tokens, model=dict(model.identity),
    )  # fmt: skip
    meta = {"config": asdict(cfg), "result": asdict(result), "hf_dir": model.hf_dir}
    atomic_write_json(cfg.output + ".meta.json", meta)
    return result

