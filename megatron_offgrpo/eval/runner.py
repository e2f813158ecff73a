"""Evaluate a model on a benchmark (generate -> grade -> summarize), and regrade saved generations.

Output directory (every file written atomically: a killed job leaves the previous version or none, never a part)::

    generation.json   what was generated and how: benchmark and its source, settings, model identity, backend,
                      timings, tokens/s (written once, right after generation)
    problems.jsonl    one row per problem: problem_id, subset, problem, answer, the chat messages sent
    samples.jsonl     one row per (problem, sample): problem_id, subset, sample_index, reference, response,
                      finish_reason, num_tokens, truncated, extracted_answer, correct
    summary.json      the metrics (avg@n, pass@k, maj@n, bootstrap interval, per subset) + generation.json's record
    grading.json      how grading went: time, workers, the verifier's counters (timeouts, errors)

The raw generations are saved (``samples.jsonl`` with ``correct: null``) *before* grading, so a failed grading
loses nothing: ``--regrade DIR`` grades them again. ``summary.json`` is a pure function of ``generation.json``,
``samples.jsonl`` and the bootstrap settings: a regrade with the same grader reproduces it byte for byte (the
grading time lives in ``grading.json`` for that reason).
"""

from __future__ import annotations

import json
import os
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

from megatron_offgrpo.eval.benchmarks import (
    DEFAULT_MAX_TOKENS,
    DEFAULT_PROMPT_TEMPLATE,
    DEFAULT_TEMPERATURE,
    DEFAULT_TOP_P,
    Benchmark,
    build_messages,
)
from megatron_offgrpo.eval.grading import FINISH_LENGTH, GradeItem, ProblemGrade, grade_problems
from megatron_offgrpo.eval.metrics import (
    avg_at_n,
    bootstrap_ci,
    pass_at_k_table,
    per_problem_accuracy,
)

__all__ = ["EvalSettings", "SamplesFileError", "BackendUnavailableError", "evaluate", "regrade", "summarize", "read_samples",
           "print_summary", "FORMAT_VERSION"]

FORMAT_VERSION = 1
GENERATION_FILE, PROBLEMS_FILE, SAMPLES_FILE = "generation.json", "problems.jsonl", "samples.jsonl"
SUMMARY_FILE, GRADING_FILE = "summary.json", "grading.json"


class SamplesFileError(ValueError):
    """A samples.jsonl (or its generation.json) that cannot be graded: names the file, line and field."""


@dataclass
class EvalSettings:
    """How to sample and how to report.

    The sampling fields (``n`` .. ``prompt_template``, ``backend``) decide the generations; the parallel sizes do
    not (they are recorded, but a result cached for one layout is valid for another). The bootstrap fields only
    decide the confidence interval.
    """

    n: int = 1
    temperature: float = DEFAULT_TEMPERATURE
    top_p: float = DEFAULT_TOP_P
    max_tokens: int = DEFAULT_MAX_TOKENS
    seed: int = 0
    prompt_template: str = DEFAULT_PROMPT_TEMPLATE
    backend: str = "auto"
    tensor_parallel_size: int = 1
    data_parallel_size: int = 1
    bootstrap_resamples: int = 1000
    bootstrap_seed: int = 0
    confidence: float = 0.95

    def __post_init__(self) -> None:
        problems = []
        if self.n < 1:
            problems.append(f"n must be >= 1, got {self.n}")
        if self.temperature < 0:
            problems.append(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            problems.append(f"top_p must be in (0, 1], got {self.top_p}")
        if self.max_tokens < 1:
            problems.append(f"max_tokens must be >= 1, got {self.max_tokens}")
        if self.backend not in ("auto", "vllm", "hf"):
            problems.append(f"backend must be auto, vllm or hf, got {self.backend!r}")
        if self.tensor_parallel_size < 1 or self.data_parallel_size < 1:
            problems.append("tensor / data parallel sizes must be >= 1")
        if self.bootstrap_resamples < 1:
            problems.append(f"bootstrap_resamples must be >= 1, got {self.bootstrap_resamples}")
        if not 0 < self.confidence < 1:
            problems.append(f"confidence must be in (0, 1), got {self.confidence}")
        try:
            self.prompt_template.format(problem="")
        except (KeyError, IndexError, ValueError) as e:
            problems.append(f"prompt_template must be a str.format template with only {{problem}} (write a literal "
                            f"brace as {{{{ or }}}}): {e!r}")
        if "{problem}" not in self.prompt_template:
            problems.append("prompt_template must contain {problem}")
        if problems:
            raise ValueError("; ".join(problems))

    def sampling(self) -> Dict[str, Any]:
        """The settings that decide the generations (recorded, and the cache key of checkpoint selection)."""
        return {"n": self.n, "temperature": self.temperature, "top_p": self.top_p, "max_tokens": self.max_tokens,
                "seed": self.seed, "prompt_template": self.prompt_template, "backend": self.backend}

    def bootstrap(self) -> Dict[str, Any]:
        return {"resamples": self.bootstrap_resamples, "seed": self.bootstrap_seed, "confidence": self.confidence}


# ---- files ----------------------------------------------------------------------------------------------------


def _atomic_write_lines(path: str, rows: Iterable[Dict[str, Any]]) -> None:
    """Write JSON lines to ``path`` atomically, streaming (a samples file can be gigabytes)."""
    from megatron_offgrpo.data.atomic import fsync_dir

    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.lexists(tmp):
            os.remove(tmp)
    fsync_dir(os.path.dirname(os.path.abspath(path)))


def _write_json(path: str, obj: Any) -> None:
    from megatron_offgrpo.data.atomic import atomic_write_json

    atomic_write_json(path, obj)


_SAMPLE_FIELDS = {"problem_id": str, "sample_index": int, "response": str, "reference": str}


def read_samples(path: str, references: Optional[Dict[str, str]] = None) -> "OrderedDict[str, Dict[str, Any]]":
    """Read and check a ``samples.jsonl``: ``{problem_id: {"subset", "reference", "rows": [row per sample_index]}}``
    in order of first appearance.

    Every row needs ``problem_id`` (text), ``sample_index`` (int), ``response`` (text) and ``reference`` (text;
    a row without one takes ``references[problem_id]`` when given, e.g. from ``problems.jsonl``);
    ``finish_reason`` defaults to ``"stop"``. Each problem must have samples ``0 .. n-1`` exactly once, one
    reference, and every problem the same ``n``. Raises :class:`SamplesFileError` naming the file, line and field.
    """
    problems: "OrderedDict[str, Dict[str, Any]]" = OrderedDict()
    if not os.path.isfile(path):
        raise SamplesFileError(f"{path}: no such file; --regrade needs the directory of an evaluation (samples.jsonl)")
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            where = f"{path}: line {lineno}"
            try:
                row = json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise SamplesFileError(f"{where}: not valid JSON ({e})") from None
            if not isinstance(row, dict):
                raise SamplesFileError(f"{where}: expected a JSON object")
            if "reference" not in row and references and row.get("problem_id") in references:
                row["reference"] = references[row["problem_id"]]
            for key, typ in _SAMPLE_FIELDS.items():
                if key not in row:
                    raise SamplesFileError(f"{where}: field '{key}' is missing (every row needs "
                                           f"{', '.join(_SAMPLE_FIELDS)})")
                if not isinstance(row[key], typ) or isinstance(row[key], bool):
                    raise SamplesFileError(f"{where}: field '{key}' must be {typ.__name__}, got {row[key]!r}")
            finish = row.get("finish_reason", "stop")
            if finish not in ("stop", FINISH_LENGTH):
                raise SamplesFileError(f"{where}: field 'finish_reason' must be 'stop' or 'length', got {finish!r}")
            row["finish_reason"] = finish
            entry = problems.setdefault(row["problem_id"], {"subset": row.get("subset"), "reference": row["reference"],
                                                            "rows": {}, "first_line": lineno})
            if row["reference"] != entry["reference"]:
                raise SamplesFileError(f"{where}: field 'reference' is {row['reference']!r} but line "
                                       f"{entry['first_line']} gave {entry['reference']!r} for problem "
                                       f"{row['problem_id']!r}")
            idx = row["sample_index"]
            if idx in entry["rows"]:
                raise SamplesFileError(f"{where}: problem {row['problem_id']!r} sample_index {idx} appears twice")
            entry["rows"][idx] = row
    if not problems:
        raise SamplesFileError(f"{path}: no samples")
    n = None
    for pid, entry in problems.items():
        idxs = sorted(entry["rows"])
        if idxs != list(range(len(idxs))):
            raise SamplesFileError(f"{path}: problem {pid!r} has sample indices {idxs}, expected 0..{len(idxs) - 1}")
        if n is None:
            n, first = len(idxs), pid
        elif len(idxs) != n:
            raise SamplesFileError(f"{path}: problem {pid!r} has {len(idxs)} samples but {first!r} has {n}; every "
                                   "problem needs the same number of samples")
        entry["rows"] = [entry["rows"][i] for i in idxs]
    return problems


# ---- metrics --------------------------------------------------------------------------------------------------


def _metrics(grades: Sequence[ProblemGrade], boot: Dict[str, Any]) -> Dict[str, Any]:
    correct = [[s.correct for s in g.samples] for g in grades]
    acc = per_problem_accuracy(correct)
    low, high = bootstrap_ci([100.0 * a for a in acc], boot["resamples"], boot["confidence"], boot["seed"])
    n_samples = sum(len(c) for c in correct)
    return {
        "num_problems": len(grades),
        "avg_at_n": avg_at_n(correct),
        "pass_at_k": {str(k): v for k, v in pass_at_k_table(correct).items()},
        "maj_at_n": 100.0 * sum(g.majority_correct for g in grades) / len(grades),
        "ci": {"metric": "avg_at_n", "low": low, "high": high, "confidence": boot["confidence"],
               "resamples": boot["resamples"], "seed": boot["seed"], "method": "percentile bootstrap over problems"},
        "truncated": sum(s.truncated for g in grades for s in g.samples),
        "no_answer": sum(s.extracted_answer is None for g in grades for s in g.samples),
        "num_samples": n_samples,
    }


def summarize(grades: Sequence[ProblemGrade], subsets: Sequence[Optional[str]], generation: Dict[str, Any],
              boot: Dict[str, Any]) -> Dict[str, Any]:
    """The ``summary.json`` object: metrics over all problems and per subset, plus the generation record."""
    overall = _metrics(grades, boot)
    n = len(grades[0].samples)
    summary: Dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "benchmark": generation.get("benchmark"),
        "num_problems": overall["num_problems"],
        "n": n,
        "num_samples": overall["num_samples"],
        "avg_at_n": overall["avg_at_n"],
        "pass_at_k": overall["pass_at_k"],
        "maj_at_n": overall["maj_at_n"],
        "ci": overall["ci"],
        "truncated": {"count": overall["truncated"], "fraction": overall["truncated"] / overall["num_samples"]},
        "no_answer": {"count": overall["no_answer"], "fraction": overall["no_answer"] / overall["num_samples"]},
    }
    names = [s for s in dict.fromkeys(subsets) if s is not None]
    if names:
        summary["subsets"] = {}
        for name in names:
            sub = [g for g, s in zip(grades, subsets) if s == name]
            m = _metrics(sub, boot)
            summary["subsets"][name] = {k: m[k] for k in ("num_problems", "avg_at_n", "pass_at_k", "maj_at_n", "ci")}
    for key in ("benchmark_source", "benchmark_fingerprint", "settings", "model", "backend", "backend_note", "timings",
                "tokens"):
        summary[key] = generation.get(key)
    return summary


def print_summary(summary: Dict[str, Any], console=None) -> None:
    """A rich table of the summary on the terminal."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    title = f"{summary.get('benchmark')}: {summary['num_problems']} problems x {summary['n']} samples"
    table = Table(title=title, show_header=True, header_style="bold")
    table.add_column("metric")
    table.add_column("all", justify="right")
    subsets = summary.get("subsets") or {}
    for name in subsets:
        table.add_column(name, justify="right")
    ci = summary["ci"]
    rows: List[Tuple[str, Callable[[Dict[str, Any]], str]]] = [
        ("problems", lambda m: str(m["num_problems"])),
        (f"avg@{summary['n']} (%)", lambda m: f"{m['avg_at_n']:.2f}"),
        (f"{int(ci['confidence'] * 100)}% CI", lambda m: f"[{m['ci']['low']:.2f}, {m['ci']['high']:.2f}]"),
    ]
    for k in summary["pass_at_k"]:
        rows.append((f"pass@{k} (%)", lambda m, k=k: f"{m['pass_at_k'][k]:.2f}"))
    rows.append((f"maj@{summary['n']} (%)", lambda m: f"{m['maj_at_n']:.2f}"))
    for label, fmt in rows:
        table.add_row(label, fmt(summary), *(fmt(subsets[s]) for s in subsets))
    console.print(table)
    tr, na = summary["truncated"], summary["no_answer"]
    console.print(f"truncated (finish_reason length, counted wrong): {tr['count']} of {summary['num_samples']} "
                  f"({100 * tr['fraction']:.1f}%); no boxed answer: {na['count']} ({100 * na['fraction']:.1f}%)")
    tokens, timings = summary.get("tokens") or {}, summary.get("timings") or {}
    if tokens.get("generated") is not None and timings.get("generation_s") is not None:
        console.print(f"backend {summary.get('backend')}: {tokens['generated']} tokens in "
                      f"{timings['generation_s']:.1f} s ({tokens.get('per_s') or 0:.1f} tokens/s)")
    model = summary.get("model") or {}
    if model:
        console.print(f"model: {model.get('source')} ({model.get('kind')}, step {model.get('step')}, "
                      f"fingerprint {str(model.get('fingerprint'))[:16]})")


# ---- grading + writing ----------------------------------------------------------------------------------------


def _grade_and_write(output_dir: str, problems: "OrderedDict[str, Dict[str, Any]]", generation: Dict[str, Any],
                     boot: Dict[str, Any], workers: int, progress: bool) -> Dict[str, Any]:
    items = [GradeItem(pid, e["reference"], [r["response"] for r in e["rows"]], [r["finish_reason"] for r in e["rows"]])
             for pid, e in problems.items()]
    t0 = time.perf_counter()
    grades = grade_problems(items, workers=workers, progress=progress)
    grading_s = time.perf_counter() - t0

    def graded_rows():
        for (pid, entry), grade in zip(problems.items(), grades):
            for row, g in zip(entry["rows"], grade.samples):
                out = dict(row)
                out.update(extracted_answer=g.extracted_answer, correct=g.correct, truncated=g.truncated)
                yield out

    _atomic_write_lines(os.path.join(output_dir, SAMPLES_FILE), graded_rows())
    summary = summarize(grades, [e["subset"] for e in problems.values()], generation, boot)
    _write_json(os.path.join(output_dir, SUMMARY_FILE), summary)
    counters: Dict[str, int] = {}
    for g in grades:
        for k, v in g.counters.as_dict().items():
            counters[k] = counters.get(k, 0) + v
    _write_json(os.path.join(output_dir, GRADING_FILE),
                {"grading_s": grading_s, "workers": workers, "verifier": counters,
                 "majority_answers": {g.problem_id: g.majority_answer for g in grades}})
    if counters.get("verify_timeouts") or counters.get("parse_timeouts"):
        print(f"warning: the answer verifier timed out {counters.get('parse_timeouts', 0)} (parse) + "
              f"{counters.get('verify_timeouts', 0)} (verify) times; those comparisons counted as not equivalent "
              f"(see {os.path.join(output_dir, GRADING_FILE)})")
    return summary


class BackendUnavailableError(ValueError):
    """The requested generation backend cannot run this model here (the message says why and what to do)."""


def _resolve_backend(resolved_model: Any, requested: str) -> Tuple[str, Optional[str]]:
    """``(backend generate will use, why auto did not pick vLLM)`` from the generation engine, before any work."""
    from megatron_offgrpo.inference.generation import choose_backend

    try:
        return choose_backend(resolved_model, requested)
    except RuntimeError as e:  # an explicit --backend vllm that cannot run here: a user error, not a crash
        raise BackendUnavailableError(f"{e}; use --backend hf or auto") from None


def evaluate(
    model_path: str,
    benchmark: Benchmark,
    settings: EvalSettings,
    output_dir: str,
    *,
    hf_template: Optional[str] = None,
    work_dir: Optional[str] = None,
    grading_workers: int = 0,
    progress: bool = True,
    overwrite: bool = False,
    resolved_model: Any = None,
) -> Dict[str, Any]:
    """Generate ``settings.n`` samples per problem of ``benchmark`` with the model at ``model_path`` (an HF dir, or
    a Megatron checkpoint exported on the fly by the generation engine), grade them and write ``output_dir``
    (module docstring). Returns the summary. Refuses an ``output_dir`` that already holds samples unless
    ``overwrite``. ``resolved_model`` skips :func:`resolve_model` (a caller that already resolved it)."""
    from megatron_offgrpo.inference.generation import SamplingSettings, generate, resolve_model

    samples_path = os.path.join(output_dir, SAMPLES_FILE)
    if os.path.exists(samples_path) and not overwrite:
        raise FileExistsError(f"{samples_path} exists: use --regrade {output_dir} to grade it again, pass "
                              "--overwrite to generate anew, or choose another --output")
    os.makedirs(output_dir, exist_ok=True)
    for stale in (SUMMARY_FILE, GRADING_FILE, GENERATION_FILE):  # --overwrite: no old result may outlive a failure
        if os.path.exists(os.path.join(output_dir, stale)):
            os.remove(os.path.join(output_dir, stale))
    t_start = time.perf_counter()
    if resolved_model is None:
        resolved_model = resolve_model(model_path, work_dir=work_dir, hf_template=hf_template)
    t_resolved = time.perf_counter()
    backend, backend_note = _resolve_backend(resolved_model, settings.backend)
    messages = [build_messages(p, settings.prompt_template) for p in benchmark.problems]
    _atomic_write_lines(os.path.join(output_dir, PROBLEMS_FILE), (
        {"problem_id": p.problem_id, "subset": p.subset, "problem": p.problem, "answer": p.answer, "messages": m}
        for p, m in zip(benchmark.problems, messages)))
    sampling = SamplingSettings(n=settings.n, temperature=settings.temperature, top_p=settings.top_p,
                                max_tokens=settings.max_tokens, seed=settings.seed)
    t_gen = time.perf_counter()
    completions = generate(resolved_model, messages, sampling, backend=backend, progress=progress,
                           tensor_parallel_size=settings.tensor_parallel_size,
                           data_parallel_size=settings.data_parallel_size)
    generation_s = time.perf_counter() - t_gen
    if len(completions) != len(benchmark.problems) or any(len(c) != settings.n for c in completions):
        raise RuntimeError(f"the generation engine returned {[len(c) for c in completions][:8]}... completions for "
                           f"{len(benchmark.problems)} prompts x n={settings.n}")
    generated = sum(len(c.token_ids) for per in completions for c in per)
    generation = {
        "format_version": FORMAT_VERSION,
        "benchmark": benchmark.name,
        "benchmark_source": benchmark.source,
        "benchmark_fingerprint": benchmark.fingerprint(),
        "num_problems": len(benchmark.problems),
        "settings": {**settings.sampling(), "tensor_parallel_size": settings.tensor_parallel_size,
                     "data_parallel_size": settings.data_parallel_size, "chat_template": "model"},
        "model": dict(resolved_model.identity),
        "backend": backend,
        "backend_note": backend_note,
        # The engine does not report its start-up apart from decoding: generation_s (and tokens/s) include it.
        "timings": {"model_resolve_s": t_resolved - t_start, "generation_s": generation_s,
                    "note": "generation_s includes the backend's start-up (model load, vLLM engine)"},
        "tokens": {"generated": generated, "per_s": generated / generation_s if generation_s > 0 else None,
                   "mean_per_sample": generated / (len(benchmark.problems) * settings.n)},
    }
    _write_json(os.path.join(output_dir, GENERATION_FILE), generation)
    # The raw generations first: a grading failure must not lose hours of sampling (--regrade recovers).
    problems: "OrderedDict[str, Dict[str, Any]]" = OrderedDict()
    for p, per in zip(benchmark.problems, completions):
        rows = [{"benchmark": benchmark.name, "problem_id": p.problem_id, "subset": p.subset, "sample_index": j,
                 "reference": p.answer, "response": c.text, "finish_reason": c.finish_reason,
                 "num_tokens": len(c.token_ids), "truncated": c.finish_reason == FINISH_LENGTH,
                 "extracted_answer": None, "correct": None} for j, c in enumerate(per)]
        problems[p.problem_id] = {"subset": p.subset, "reference": p.answer, "rows": rows}
    _atomic_write_lines(samples_path, (r for e in problems.values() for r in e["rows"]))
    return _grade_and_write(output_dir, problems, generation, settings.bootstrap(), grading_workers, progress)


def regrade(
    output_dir: str,
    *,
    bootstrap_resamples: int = 1000,
    bootstrap_seed: int = 0,
    confidence: float = 0.95,
    grading_workers: int = 0,
    progress: bool = True,
) -> Dict[str, Any]:
    """Grade ``output_dir/samples.jsonl`` again (no generation) and rewrite ``samples.jsonl``, ``summary.json`` and
    ``grading.json``. ``generation.json`` supplies the record (benchmark, settings, model, timings); without it
    (hand-made samples) the record is empty and the benchmark is named by the rows' ``benchmark`` field."""
    references = None
    problems_path = os.path.join(output_dir, PROBLEMS_FILE)
    if os.path.isfile(problems_path):
        try:
            with open(problems_path, encoding="utf-8") as f:
                references = {r["problem_id"]: r["answer"] for r in map(json.loads, filter(str.strip, f))}
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise SamplesFileError(f"{problems_path}: unreadable ({e})") from None
    problems = read_samples(os.path.join(output_dir, SAMPLES_FILE), references)
    gen_path = os.path.join(output_dir, GENERATION_FILE)
    if os.path.isfile(gen_path):
        try:
            with open(gen_path, encoding="utf-8") as f:
                generation = json.load(f)
        except (OSError, ValueError) as e:
            raise SamplesFileError(f"{gen_path}: unreadable ({e}); move it away to regrade without the record") from None
        if not isinstance(generation, dict):
            raise SamplesFileError(f"{gen_path}: expected a JSON object")
    else:
        first = next(iter(problems.values()))["rows"][0]
        generation = {"benchmark": first.get("benchmark") or os.path.basename(os.path.normpath(output_dir))}
    boot = {"resamples": bootstrap_resamples, "seed": bootstrap_seed, "confidence": confidence}
    return _grade_and_write(output_dir, problems, generation, boot, grading_workers, progress)
