"""Evaluation benchmarks: a registry of hub benchmarks at pinned revisions, local JSONL / Parquet files, and the
prompt protocol of the blog's evaluation (SkyThought; docs/design.md §8).

Registry (sources and row filters as SkyThought's task configs use them; the row count is asserted at load)::

    aime24   AI-MO/aimo-validation-aime, split train, rows whose url names 2024        30 problems (I + II)
    aime25   opencompass/AIME2025, configs AIME2025-I and AIME2025-II, split test      30 problems (15 + 15)
    aime25_1 / aime25_2   one part of aime25 (the blog reports AIME25-1 and AIME25-2)   15 problems each
    amc23    AI-MO/aimo-validation-amc, split train, rows whose url names 2023        40 problems
    math500  HuggingFaceH4/MATH-500, split test                                        500 problems

A hub benchmark is loaded with ``datasets.load_dataset(name, config, split=..., revision=...)``. Revisions are
commit hashes where one is known; ``opencompass/AIME2025`` is loaded at ``main`` (no commit hash was available
when this registry was written): the summary records the commit the hub resolved, when it can be asked.

A local file (``.jsonl`` / ``.json`` lines, or ``.parquet``) needs a ``problem`` (non-empty string) and an
``answer`` (non-empty string or number) per row, and may carry ``id`` (or ``problem_id``; default: the line / row
number) and ``subset`` (reported separately, like AIME25-I / -II). A bad row raises :class:`BenchmarkError` naming
the file, the line and the field.

Prompt: the problem followed by SkyThought's instruction, ``"{problem}\\nReturn your final response within
\\boxed{}"`` (its ``aime25_*`` / ``aime24_sky`` template), as the single user turn, rendered through the model's
chat template by the generation engine. Sampling defaults: temperature 0.6, top_p 0.95, 32768 new tokens.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

__all__ = [
    "BenchmarkError", "Problem", "Benchmark", "HubSource", "BenchmarkSpec", "REGISTRY", "DEFAULT_PROMPT_TEMPLATE",
    "load_benchmark", "load_benchmark_file", "load_hub_benchmark", "build_messages", "format_answer_value",
]

# SkyThought's "sky" template (aime25_1/2.yaml, aime24_sky.yaml): the instruction follows the problem.
DEFAULT_PROMPT_TEMPLATE = "{problem}\nReturn your final response within \\boxed{{}}"
DEFAULT_TEMPERATURE = 0.6
DEFAULT_TOP_P = 0.95
DEFAULT_MAX_TOKENS = 32768


class BenchmarkError(ValueError):
    """A benchmark that cannot be used as given: unknown name, bad file row, unexpected row count."""


@dataclass(frozen=True)
class Problem:
    """One benchmark problem: a unique id, the problem text, the reference answer, and an optional subset."""

    problem_id: str
    problem: str
    answer: str
    subset: Optional[str] = None


@dataclass
class Benchmark:
    """A loaded benchmark: its problems, where they came from, and its evaluation defaults."""

    name: str
    problems: List[Problem]
    source: Dict[str, Any]
    prompt_template: str = DEFAULT_PROMPT_TEMPLATE
    default_n: int = 1
    default_max_tokens: int = DEFAULT_MAX_TOKENS

    def fingerprint(self) -> str:
        """sha256 of the problems (ids, texts, answers, subsets) in order: what was actually evaluated."""
        h = hashlib.sha256()
        for p in self.problems:
            h.update(json.dumps([p.problem_id, p.problem, p.answer, p.subset], ensure_ascii=False).encode("utf-8"))
            h.update(b"\n")
        return h.hexdigest()


@dataclass(frozen=True)
class HubSource:
    """One hub dataset split contributing rows to a benchmark.

    ``row_filter`` keeps a row when its ``filter_field`` contains the string (SkyThought filters on ``url``);
    ``source_rows`` is the split's row count before filtering, ``expected_rows`` after (both asserted).
    ``make_id`` builds the problem id from the row and its index among the kept rows.
    """

    dataset: str
    revision: str
    split: str
    problem_field: str
    answer_field: str
    expected_rows: int
    config: Optional[str] = None
    source_rows: Optional[int] = None
    filter_field: Optional[str] = None
    filter_contains: Optional[str] = None
    subset: Optional[Callable[[Dict[str, Any]], Optional[str]]] = None
    make_id: Optional[Callable[[Dict[str, Any], int], str]] = None


@dataclass(frozen=True)
class BenchmarkSpec:
    """A registered benchmark: its hub sources and defaults (``n`` samples per problem, ``max_tokens``)."""

    name: str
    description: str
    sources: Tuple[HubSource, ...]
    default_n: int
    default_max_tokens: int = DEFAULT_MAX_TOKENS
    prompt_template: str = DEFAULT_PROMPT_TEMPLATE

    @property
    def expected_rows(self) -> int:
        return sum(s.expected_rows for s in self.sources)


_AIME_URL_RE = re.compile(r"(\d{4})_AIME_(I{1,2})_Problems/Problem_(\d+)")
_AMC_URL_RE = re.compile(r"(\d{4})_AMC_(\d+[AB])_Problems/Problem_(\d+)")


def _aime_url_id(row: Dict[str, Any], index: int) -> str:
    m = _AIME_URL_RE.search(str(row.get("url", "")))
    return f"{m.group(1)}-{m.group(2)}-{int(m.group(3))}" if m else f"aime-{row.get('id', index)}"


def _aime_url_subset(row: Dict[str, Any]) -> Optional[str]:
    m = _AIME_URL_RE.search(str(row.get("url", "")))
    return f"AIME{m.group(1)}-{m.group(2)}" if m else None


def _amc_url_id(row: Dict[str, Any], index: int) -> str:
    m = _AMC_URL_RE.search(str(row.get("url", "")))
    return f"{m.group(1)}-{m.group(2)}-{int(m.group(3))}" if m else f"amc-{index}"


def _amc_url_subset(row: Dict[str, Any]) -> Optional[str]:
    m = _AMC_URL_RE.search(str(row.get("url", "")))
    return f"AMC{m.group(1)}-{m.group(2)}" if m else None


def _aime25_source(part: str) -> HubSource:
    return HubSource(
        dataset="opencompass/AIME2025", config=f"AIME2025-{part}", revision="main", split="test",
        problem_field="question", answer_field="answer", expected_rows=15, source_rows=15,
        subset=lambda row, part=part: f"AIME2025-{part}",
        make_id=lambda row, i, part=part: f"2025-{part}-{i + 1}",
    )


_AIME24 = HubSource(
    # Hub API sha of main (last modified 2025-05-07); 90 rows = AIME 2022-2024, SkyThought keeps url ~ "2024".
    dataset="AI-MO/aimo-validation-aime", revision="13f9e12f613e720c2a2b2f345dd04b998a29494d", split="train",
    problem_field="problem", answer_field="answer", expected_rows=30, source_rows=90,
    filter_field="url", filter_contains="2024", subset=_aime_url_subset, make_id=_aime_url_id,
)
_AMC23 = HubSource(
    # Hub API sha of main (last modified 2025-05-07); 83 rows = AMC 12 2022 (43) + 2023 (40); answers are floats.
    dataset="AI-MO/aimo-validation-amc", revision="69d78a4a2c840e82d69af6bc742bda09005f6316", split="train",
    problem_field="problem", answer_field="answer", expected_rows=40, source_rows=83,
    filter_field="url", filter_contains="2023", subset=_amc_url_subset, make_id=_amc_url_id,
)
_MATH500 = HubSource(
    dataset="HuggingFaceH4/MATH-500", revision="6e4ed1a2a79af7d8630a6b768ec859cb5af4d3be", split="test",
    problem_field="problem", answer_field="answer", expected_rows=500, source_rows=500,
    make_id=lambda row, i: str(row.get("unique_id") or f"math500-{i}"),
)

REGISTRY: Dict[str, BenchmarkSpec] = {
    "aime24": BenchmarkSpec("aime24", "AIME 2024 I + II (30)", (_AIME24,), default_n=16),
    "aime25": BenchmarkSpec("aime25", "AIME 2025 I + II (15 + 15)", (_aime25_source("I"), _aime25_source("II")),
                            default_n=16),
    "aime25_1": BenchmarkSpec("aime25_1", "AIME 2025 I (15)", (_aime25_source("I"),), default_n=16),
    "aime25_2": BenchmarkSpec("aime25_2", "AIME 2025 II (15)", (_aime25_source("II"),), default_n=16),
    "amc23": BenchmarkSpec("amc23", "AMC 12 2023 A + B (40)", (_AMC23,), default_n=8),
    "math500": BenchmarkSpec("math500", "MATH-500 (500)", (_MATH500,), default_n=1),
}


def format_answer_value(value: Any) -> str:
    """A reference answer as text: strings stripped, integral floats without ``.0`` (AMC stores ``142.0``)."""
    if isinstance(value, bool):
        raise TypeError("a boolean is not an answer")
    if isinstance(value, float):
        if value != value or value in (float("inf"), float("-inf")):
            raise ValueError(f"non-finite answer {value!r}")
        return str(int(value)) if value.is_integer() else repr(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return value.strip()
    raise TypeError(f"answer of type {type(value).__name__}")


def build_messages(problem: Problem, template: str = DEFAULT_PROMPT_TEMPLATE) -> List[Dict[str, str]]:
    """The chat messages of one problem: a single user turn ``template.format(problem=...)``."""
    return [{"role": "user", "content": template.format(problem=problem.problem)}]


# ---- local files ----------------------------------------------------------------------------------------------

_FILE_HINT = ("every row needs 'problem' (non-empty text) and 'answer' (non-empty text or number); optional 'id' "
              "(or 'problem_id') and 'subset'")


def _row_problem(path: str, where: str, row: Any, index: int) -> Problem:
    if not isinstance(row, dict):
        raise BenchmarkError(f"{path}: {where}: expected a JSON object, got {type(row).__name__}; {_FILE_HINT}")
    for key in ("problem", "answer"):
        if key not in row or row[key] is None:
            raise BenchmarkError(f"{path}: {where}: field '{key}' is missing; {_FILE_HINT}")
    problem = row["problem"]
    if not isinstance(problem, str) or not problem.strip():
        raise BenchmarkError(f"{path}: {where}: field 'problem' must be non-empty text, got {problem!r}; {_FILE_HINT}")
    try:
        answer = format_answer_value(row["answer"])
    except (TypeError, ValueError) as e:
        raise BenchmarkError(f"{path}: {where}: field 'answer' is not usable ({e}); {_FILE_HINT}") from None
    if not answer:
        raise BenchmarkError(f"{path}: {where}: field 'answer' is empty; {_FILE_HINT}")
    pid_key = "id" if "id" in row else "problem_id" if "problem_id" in row else None
    pid = row[pid_key] if pid_key else index
    if pid is None or isinstance(pid, (dict, list, bool)) or str(pid).strip() == "":
        raise BenchmarkError(f"{path}: {where}: field '{pid_key}' must be a non-empty string or number, got {pid!r}")
    subset = row.get("subset")
    if subset is not None and not isinstance(subset, str):
        raise BenchmarkError(f"{path}: {where}: field 'subset' must be text, got {subset!r}")
    return Problem(str(pid).strip(), problem, answer, subset)


def _read_jsonl_rows(path: str) -> List[Tuple[str, Any]]:
    rows: List[Tuple[str, Any]] = []
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise BenchmarkError(f"{path}: line {lineno}: not UTF-8 ({e})") from None
            if not text.strip():  # a blank line is not a row
                continue
            try:
                rows.append((f"line {lineno}", json.loads(text)))
            except json.JSONDecodeError as e:
                raise BenchmarkError(f"{path}: line {lineno}: not valid JSON ({e.msg} at column {e.colno}); "
                                     "write one JSON object per line") from None
    return rows


def _read_parquet_rows(path: str) -> List[Tuple[str, Any]]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as e:  # noqa: BLE001 - pyarrow raises several types for a damaged file
        raise BenchmarkError(f"{path}: not a readable Parquet file ({e})") from None
    return [(f"row {i}", row) for i, row in enumerate(table.to_pylist())]


def load_benchmark_file(path: str, name: Optional[str] = None) -> Benchmark:
    """Load a local benchmark file (module docstring); its source records the path and the file's sha256."""
    if not os.path.isfile(path):
        raise BenchmarkError(f"{path}: no such file; pass a registered benchmark ({', '.join(REGISTRY)}) or a "
                             ".jsonl / .parquet file")
    lower = path.lower()
    if lower.endswith(".parquet"):
        rows = _read_parquet_rows(path)
    elif lower.endswith((".jsonl", ".json")):
        rows = _read_jsonl_rows(path)
    else:
        raise BenchmarkError(f"{path}: unknown benchmark file type; use .jsonl (one JSON object per line) or .parquet")
    if not rows:
        raise BenchmarkError(f"{path}: no rows; {_FILE_HINT}")
    problems: List[Problem] = []
    first_seen: Dict[str, str] = {}
    for index, (where, row) in enumerate(rows):
        p = _row_problem(path, where, row, index)
        if p.problem_id in first_seen:
            raise BenchmarkError(f"{path}: {where}: problem id {p.problem_id!r} already used at {first_seen[p.problem_id]}; "
                                 "ids must be unique")
        first_seen[p.problem_id] = where
        problems.append(p)
    with open(path, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    bench_name = name or os.path.splitext(os.path.basename(path))[0]
    return Benchmark(bench_name, problems, {"kind": "file", "path": os.path.abspath(path), "sha256": digest})


# ---- hub benchmarks -------------------------------------------------------------------------------------------


def _resolved_sha(dataset: str, revision: str) -> Optional[str]:
    """The commit the hub resolves ``revision`` to (best effort: ``None`` offline)."""
    try:
        from huggingface_hub import HfApi, constants

        if constants.HF_HUB_OFFLINE:
            return None
        return HfApi().dataset_info(dataset, revision=revision, timeout=10).sha
    except Exception:  # noqa: BLE001 - provenance only; loading itself reports real errors
        return None


def _load_hub_source(src: HubSource, loader: Optional[Callable[..., Any]]) -> Tuple[List[Problem], Dict[str, Any]]:
    where = f"{src.dataset}" + (f" ({src.config})" if src.config else "") + f" split {src.split} @ {src.revision}"
    ds = (loader or _datasets_loader)(src.dataset, src.config, split=src.split, revision=src.revision)
    rows = [dict(r) for r in ds]
    if src.source_rows is not None and len(rows) != src.source_rows:
        raise BenchmarkError(f"{where}: {len(rows)} rows, expected {src.source_rows}; the dataset changed at this "
                             "revision, or the registry is wrong: check the revision in megatron_offgrpo/eval/benchmarks.py")
    for key in (src.problem_field, src.answer_field) + ((src.filter_field,) if src.filter_field else ()):
        if rows and key not in rows[0]:
            raise BenchmarkError(f"{where}: no field {key!r} (fields: {sorted(rows[0])}); the dataset's schema changed")
    if src.filter_field:
        rows = [r for r in rows if src.filter_contains in str(r.get(src.filter_field) or "")]
    if len(rows) != src.expected_rows:
        raise BenchmarkError(f"{where}: {len(rows)} problems after selection, expected {src.expected_rows}; the "
                             "dataset changed at this revision, or the registry is wrong")
    problems = []
    for i, r in enumerate(rows):
        try:
            answer = format_answer_value(r[src.answer_field])
        except (TypeError, ValueError) as e:
            raise BenchmarkError(f"{where}: row {i}: field {src.answer_field!r} is not usable ({e})") from None
        text = r[src.problem_field]
        if not isinstance(text, str) or not text.strip() or not answer:
            raise BenchmarkError(f"{where}: row {i}: empty {src.problem_field!r} or {src.answer_field!r}")
        pid = src.make_id(r, i) if src.make_id else f"{src.dataset}:{i}"
        problems.append(Problem(pid, text, answer, src.subset(r) if src.subset else None))
    info = {"dataset": src.dataset, "config": src.config, "split": src.split, "revision": src.revision,
            "resolved_sha": _resolved_sha(src.dataset, src.revision) if loader is None else None,
            "rows": len(problems)}
    if src.filter_field:
        info["filter"] = f"{src.filter_field} contains {src.filter_contains!r}"
    return problems, info


def _datasets_loader(name: str, config: Optional[str], split: str, revision: str):
    from datasets import load_dataset

    try:
        return load_dataset(name, config, split=split, revision=revision)
    except (OSError, ValueError) as e:  # ConnectionError, missing revision / config, offline without a cache
        raise BenchmarkError(
            f"could not load {name}" + (f" ({config})" if config else "") + f" split {split} @ {revision} from the "
            f"hub: {type(e).__name__}: {e}. Check the network (or HF_HUB_OFFLINE with a filled HF cache), or save "
            "the problems to a .jsonl file with 'problem' and 'answer' fields and pass that file") from None


def load_hub_benchmark(name: str, loader: Optional[Callable[..., Any]] = None) -> Benchmark:
    """Load a registered benchmark from the hub (row counts asserted, ids unique). ``loader`` replaces
    ``datasets.load_dataset`` (tests): ``loader(dataset, config, split=..., revision=...)`` -> iterable of rows."""
    spec = REGISTRY.get(name)
    if spec is None:
        raise BenchmarkError(f"unknown benchmark {name!r}; registered: {', '.join(REGISTRY)}, or pass a .jsonl / "
                             ".parquet file")
    problems: List[Problem] = []
    sources: List[Dict[str, Any]] = []
    for src in spec.sources:
        p, info = _load_hub_source(src, loader)
        problems.extend(p)
        sources.append(info)
    ids = [p.problem_id for p in problems]
    dup = sorted({i for i in ids if ids.count(i) > 1})
    if dup:
        raise BenchmarkError(f"benchmark {name}: duplicate problem ids {dup[:5]}; the registry's id rule is wrong")
    if len(problems) != spec.expected_rows:  # belt and braces: the per-source checks add up to this
        raise BenchmarkError(f"benchmark {name}: {len(problems)} problems, expected {spec.expected_rows}")
    return Benchmark(name, problems, {"kind": "hub", "sources": sources}, spec.prompt_template, spec.default_n,
                     spec.default_max_tokens)


def load_benchmark(name_or_path: str, loader: Optional[Callable[..., Any]] = None) -> Benchmark:
    """A registered benchmark by name (:data:`REGISTRY`), or a local ``.jsonl`` / ``.parquet`` file."""
    if name_or_path in REGISTRY:
        return load_hub_benchmark(name_or_path, loader)
    if os.path.exists(name_or_path) or name_or_path.lower().endswith((".jsonl", ".json", ".parquet")):
        return load_benchmark_file(name_or_path)
    raise BenchmarkError(f"unknown benchmark {name_or_path!r}: neither a registered name ({', '.join(REGISTRY)}) "
                         "nor an existing file")
