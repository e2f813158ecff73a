"""Readers for the inputs users have, yielding :class:`~.records.RawGroup` s plus counted rejects.

Accepted row shapes (any input format):

- **OpenThoughts3** rows: ``conversations`` = list of ``{"from": "human"|"gpt", "value": ...}`` (or
  ``{"role": "user"|"assistant", "content": ...}``), with ``domain`` and ``source``. The first user turn is the
  problem; every assistant turn is one rollout (the public dataset has one per row, ~16 rows per problem).
- **Plain** rows: ``{"problem": str, "responses": [str, ...]}`` (or a single ``"response"``).
- Optional ``answer`` (ground truth, only used to report the vote's accuracy or with ``label_source=reference``),
  ``problem_id`` / ``id``.

Rows are grouped by exact (stripped) problem text across rows and files, in order of first appearance, whether the
rows of a problem are contiguous or not: :func:`group_rows` streams the rows once and hands each to a sink (the
build's on-disk spill, :mod:`.spill`, or :func:`read_groups`'s in-memory lists), keeping only a digest, an id and
two counters per problem; the parsing itself can run in worker processes (:func:`iter_parsed`). A ``problem_id`` is
the identity of a problem downstream (student pass rates, the group metadata), so a second problem text under an
id already taken is rejected (``duplicate_problem_id``, naming where the id was first seen). An input file without
a single record is an error (:class:`~.records.InputError` naming the file). Input formats:
``.jsonl``/``.json`` (JSON lines, read line by line here so that every error names its line), ``.parquet``
(``pyarrow``, by record batches) and a directory written by ``datasets.Dataset.save_to_disk`` (memory-mapped Arrow,
by batches).
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, Iterator, List, NamedTuple, Optional, Tuple, Union

from megatron_offgrpo.preprocess.records import InputError, RawGroup, Reject

USER_ROLES = ("human", "user")
ASSISTANT_ROLES = ("gpt", "assistant")


class RowError(ValueError):
    """A row that cannot be used; carries the offending field and a reason code."""

    def __init__(self, reason: str, field: Optional[str], detail: str) -> None:
        super().__init__(detail)
        self.reason, self.field, self.detail = reason, field, detail


def problem_id_for(problem: str) -> str:
    """Stable id of a problem without one: a hash of its text."""
    return hashlib.sha1(problem.encode("utf-8")).hexdigest()[:16]


def _message_parts(msg: Any, i: int) -> Tuple[str, Any]:
    if not isinstance(msg, dict):
        raise RowError("bad_field", f"conversations[{i}]", f"expected an object, got {type(msg).__name__}")
    role = msg.get("from", msg.get("role"))
    if "value" in msg:
        content = msg["value"]
    elif "content" in msg:
        content = msg["content"]
    else:
        raise RowError("missing_field", f"conversations[{i}].value", "message has no 'value'/'content'")
    if not isinstance(role, str):
        raise RowError("missing_field", f"conversations[{i}].from", "message has no 'from'/'role'")
    return role.lower(), content


def parse_row(row: Dict[str, Any]) -> Tuple[str, List[Any], Dict[str, Any]]:
    """``(problem, responses, extras)`` from one input row, or :class:`RowError`.

    ``responses`` may contain non-strings or empty strings: those are per-trajectory rejects, decided by the caller
    so that the rest of the row is kept.
    """
    if "conversations" in row:
        conv = row["conversations"]
        if not isinstance(conv, list):
            raise RowError("bad_field", "conversations", f"expected a list, got {type(conv).__name__}")
        problem: Any = None
        responses: List[Any] = []
        for i, msg in enumerate(conv):
            role, content = _message_parts(msg, i)
            if role in USER_ROLES and problem is None:
                problem = content
            elif role in ASSISTANT_ROLES:
                responses.append(content)
        if problem is None:
            raise RowError("missing_field", "conversations", "no user/human turn (the problem)")
        if not responses:
            raise RowError("missing_field", "conversations", "no assistant/gpt turn (a rollout)")
    elif "problem" in row:
        problem = row["problem"]
        if "responses" in row:
            responses = row["responses"]
            if not isinstance(responses, list):
                raise RowError("bad_field", "responses", f"expected a list, got {type(responses).__name__}")
        elif "response" in row:
            responses = [row["response"]]
        else:
            raise RowError("missing_field", "responses", "row has 'problem' but no 'responses'/'response'")
    else:
        raise RowError("missing_field", "problem", "row has neither 'conversations' nor 'problem'")
    if not isinstance(problem, str) or not problem.strip():
        raise RowError("bad_field", "problem", "problem text is empty or not a string")
    extras: Dict[str, Any] = {}
    for key in ("answer", "source", "domain"):
        val = row.get(key)
        if val is not None and not isinstance(val, (str, int, float)):
            raise RowError("bad_field", key, f"expected a string, got {type(val).__name__}")
        extras[key] = None if val is None else str(val)
    pid = row.get("problem_id", row.get("id"))
    extras["problem_id"] = None if pid is None else str(pid)
    return problem, list(responses), extras


RowSource = Iterator[Tuple[int, Union[Dict[str, Any], Reject]]]


def decode_line(path: str, line_no: int, raw: bytes) -> Union[Dict[str, Any], Reject]:
    """One JSON line as a row, or the reject saying why it is not one (undecodable, malformed, not an object)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return Reject("read", "invalid_utf8", path, line_no, None, f"byte {e.start}: {e.reason}")
    try:
        row = json.loads(text)
    except json.JSONDecodeError as e:
        return Reject("read", "malformed_json", path, line_no, None, f"column {e.colno}: {e.msg}")
    if not isinstance(row, dict):
        return Reject("read", "not_an_object", path, line_no, None, f"got {type(row).__name__}")
    return row


def iter_jsonl(path: str) -> RowSource:
    """``(line_no, row)`` for each non-blank line; undecodable / malformed lines come back as rejects."""
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, start=1):
            if raw.strip():
                yield line_no, decode_line(path, line_no, raw)


def iter_jsonl_blocks(path: str, block_bytes: int = 1 << 19) -> Iterator[Tuple[int, bytes]]:
    """A JSONL file as ``(number of its first line, block of whole lines)``, blocks of about ``block_bytes`` (a
    longer line makes a longer block). The main process only reads and cuts at a newline; splitting the lines
    and parsing them is the workers' (:func:`parse_block`), so the main process does no per-line work to feed them.
    """
    line_no, carry = 1, b""
    with open(path, "rb") as f:
        while True:
            data = f.read(block_bytes)
            if not data:
                break
            data = carry + data
            cut = data.rfind(b"\n") + 1
            if cut == 0:  # no line end yet: one line longer than the block
                carry = data
                continue
            block, carry = data[:cut], data[cut:]
            yield line_no, block
            line_no += block.count(b"\n")
    if carry:
        yield line_no, carry  # the last line, without a final newline


PARQUET_BATCH_ROWS = 1024


def iter_parquet(path: str, batch_rows: int = PARQUET_BATCH_ROWS) -> RowSource:
    """Rows of a Parquet file, read by record batches of ``batch_rows`` rows (``pyarrow``): memory is bounded by
    one batch whatever the file size; 1-based row numbers."""
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
        i = 0
        for batch in pf.iter_batches(batch_size=batch_rows):
            for row in batch.to_pylist():
                i += 1
                yield i, row
    except Exception as e:  # noqa: BLE001 - a corrupt container is not a per-row problem: fail naming the file
        raise InputError(f"{path}: cannot read as Parquet: {e}") from e


def iter_hf_rows(path: str, batch_rows: int = PARQUET_BATCH_ROWS) -> RowSource:
    """Rows of a ``datasets.Dataset.save_to_disk`` directory (memory-mapped Arrow, read by batches); 1-based."""
    import datasets

    try:
        ds = datasets.load_from_disk(path)
        if isinstance(ds, datasets.DatasetDict):
            raise ValueError(f"a DatasetDict with splits {list(ds)}; pass the directory of one split")
        i = 0
        for batch in ds.iter(batch_size=batch_rows):
            keys = list(batch)
            for values in zip(*(batch[k] for k in keys)):
                i += 1
                yield i, dict(zip(keys, values))
    except Exception as e:  # noqa: BLE001 - as for Parquet
        raise InputError(f"{path}: cannot read as a datasets directory: {e}") from e


def iter_rows(path: str) -> RowSource:
    """Dispatch on the input's extension."""
    if not os.path.exists(path):
        raise InputError(f"{path}: input file does not exist")
    lower = path.lower()
    if lower.endswith((".jsonl", ".json", ".ndjson")):
        return iter_jsonl(path)
    if os.path.isdir(path):
        return iter_hf_rows(path)
    if lower.endswith(".parquet"):
        return iter_parquet(path)
    raise InputError(f"{path}: unknown input format (expected .jsonl, .json, .parquet or a datasets directory)")


class ParsedRow(NamedTuple):
    """A row that parsed: what the grouping needs, and the row's spill record, already pickled (so that the
    parsing, which is most of the reading, can run in worker processes while the grouping stays in input order).

    The record is ``(responses, origin, reference, source, domain)``: the row's valid responses, its ``file:line``
    and its own fields (a group takes the first non-empty one of each); a group's header record is
    ``(problem, problem_id, prompt)`` (:func:`merge_records`). Workers send it as a plain tuple: a tuple pickles ten
    times faster than a class instance, and the rows of a whole input cross the pipe.
    """

    line: int
    key: bytes  # group_key(problem)
    problem: str
    problem_id: Optional[str]  # the row's own id, if any
    responses: int  # valid responses
    response_rejects: List[Tuple[str, str, str]]  # (reason, field, detail) of the others, in order
    record: bytes


ParseResult = Union[ParsedRow, Reject]


def parse_one(path: str, line_no: int, row: Union[Dict[str, Any], Reject], domain: Optional[str]) -> ParseResult:
    """Parse and validate one row (``domain`` filter included) into a :class:`ParsedRow`, or its reject."""
    if isinstance(row, Reject):
        return row
    try:
        problem, responses, extras = parse_row(row)
    except RowError as e:
        return Reject("read", e.reason, path, line_no, e.field, e.detail)
    if domain is not None and extras["domain"] != domain:
        return Reject("read", "domain_filtered", path, line_no, "domain", f"domain={extras['domain']!r}")
    fname = "conversations" if "conversations" in row else "responses"
    valid: List[str] = []
    rejects: List[Tuple[str, str, str]] = []
    for j, resp in enumerate(responses):
        if not isinstance(resp, str):
            rejects.append(("bad_field", f"{fname}[{j}]", f"response is {type(resp).__name__}, not a string"))
        elif not resp.strip():
            rejects.append(("empty_response", f"{fname}[{j}]", "empty response"))
        else:
            valid.append(resp)
    record = pickle.dumps((valid, f"{path}:{line_no}", extras["answer"], extras["source"], extras["domain"]),
                          protocol=pickle.HIGHEST_PROTOCOL)
    return ParsedRow(line_no, group_key(problem), problem, extras["problem_id"], len(valid), rejects, record)


def parse_block(task: Tuple[str, Optional[str], int, bytes]) -> List[ParseResult]:
    """Worker task: ``(path, domain, first line number, block of lines)`` -> one :func:`parse_one` result per
    non-blank line, in order (:func:`iter_jsonl_blocks` makes the blocks)."""
    path, domain, first_line, block = task
    out: List[Any] = []
    for n, raw in enumerate(block.split(b"\n"), start=first_line):
        if not raw.strip():
            continue
        r = parse_one(path, n, decode_line(path, n, raw), domain)
        out.append(tuple(r) if isinstance(r, ParsedRow) else r)
    return out


def iter_parsed(paths: Iterable[str], domain: Optional[str] = None, pool: Any = None,
                progress: Optional[Callable[[int], None]] = None) -> Iterator[Tuple[str, ParseResult]]:
    """``(path, parsed row or reject)`` for every row of ``paths``, in input order. JSON lines are parsed in
    batches by ``pool`` (an :class:`~megatron_offgrpo.utils.pool.OrderedProcessPool`) when given; Parquet and
    datasets rows arrive parsed from Arrow and are validated here. Raises :class:`~.records.InputError` for a
    missing, unreadable or empty input file."""
    for path in paths:
        rows = iter_rows(path)  # checks existence and format first
        records = 0
        if path.lower().endswith((".jsonl", ".json", ".ndjson")):
            tasks = ((path, domain, first, block) for first, block in iter_jsonl_blocks(path))
            # The caller parses too while the workers are busy or still starting: it would only wait otherwise.
            parsed = pool.imap(parse_block, tasks, caller_helps=True) if pool is not None else map(parse_block, tasks)
            for results in parsed:
                if progress is not None:
                    progress(len(results))
                for r in results:
                    records += 1
                    yield path, (ParsedRow._make(r) if isinstance(r, tuple) else r)
        else:
            for line_no, row in rows:
                records += 1
                if progress is not None:
                    progress(1)
                yield path, parse_one(path, line_no, row, domain)
        if records == 0:
            raise InputError(f"{path}: no records (the file is empty); regenerate it or leave it out of --input")


def merge_records(records: Iterable[tuple]) -> RawGroup:
    """The :class:`RawGroup` of one problem from its records in input order: the header, then its rows'."""
    it = iter(records)
    problem, problem_id, prompt = next(it)
    g = RawGroup(problem=problem, problem_id=problem_id, prompt=prompt)
    for responses, origin, reference, source, domain in it:
        if g.reference is None:
            g.reference = reference
        if g.source is None:
            g.source = source
        if g.domain is None:
            g.domain = domain
        g.responses.extend(responses)
        g.origins.extend([origin] * len(responses))
    return g


@dataclass
class GroupTable:
    """Per-problem bookkeeping of :func:`group_rows`, in order of first appearance (a few dozen bytes a problem)."""

    problem_ids: List[str] = field(default_factory=list)
    responses: List[int] = field(default_factory=list)  # valid responses of each problem
    rows: int = 0  # rows read, including rejected ones

    def __len__(self) -> int:
        return len(self.problem_ids)


def group_key(problem: str) -> bytes:
    """The identity of a problem in the grouping: a 128-bit digest of its stripped text (a collision needs ~2^64
    problems), so that the grouping state does not hold the problem texts."""
    return hashlib.blake2b(problem.strip().encode("utf-8"), digest_size=16).digest()


def group_rows(
    paths: Iterable[str],
    sink: Callable[[int, bytes], None],
    domain: Optional[str] = None,
    strict: bool = False,
    on_reject: Optional[Callable[[Reject], None]] = None,
    progress: Optional[Callable[[int], None]] = None,
    prompt_fn: Optional[Callable[[str], str]] = None,
    pool: Any = None,
) -> GroupTable:
    """Stream every row of ``paths`` once, assign it to its problem, and hand ``sink(group, pickled record)`` the
    group's header record when the problem first appears, then each row's record; rejects go to ``on_reject``.
    Only the per-problem :class:`GroupTable` stays in memory.

    Problems are numbered in order of first appearance (across rows and files); the header is ``(problem,
    problem_id, prompt_fn(problem))``. ``pool`` parses JSON lines in worker processes (:func:`iter_parsed`); the
    grouping, the ids and the rejects stay here, in input order. The arguments and the rejects are those of
    :func:`read_groups`, except the final ``no_valid_responses`` rejects, which :func:`reject_empty_groups` emits.
    """
    table = GroupTable()
    index: Dict[bytes, int] = {}
    id_origin: Dict[str, str] = {}  # problem_id -> "file:line" of the row that introduced it

    def reject(rej: Reject) -> None:
        if strict and rej.reason != "domain_filtered":
            raise InputError(f"{rej.location()}: {rej.reason}: {rej.detail}")
        if on_reject is not None:
            on_reject(rej)

    for path, r in iter_parsed(paths, domain, pool, progress):
        table.rows += 1
        if isinstance(r, Reject):
            reject(r)
            continue
        gid = index.get(r.key)
        if gid is None:
            pid = r.problem_id or problem_id_for(r.problem.strip())
            if pid in id_origin:
                # Another problem text already has this id: keep the first, reject this one (every row of it).
                reject(Reject("read", "duplicate_problem_id", path, r.line, "problem_id",
                              f"duplicate problem_id {pid!r} (first seen at {id_origin[pid]})", pid))
                continue
            id_origin[pid] = f"{path}:{r.line}"
            gid = index[r.key] = len(table.problem_ids)
            table.problem_ids.append(pid)
            table.responses.append(0)
            header = (r.problem, pid, prompt_fn(r.problem) if prompt_fn is not None else None)
            sink(gid, pickle.dumps(header, protocol=pickle.HIGHEST_PROTOCOL))
        pid = table.problem_ids[gid]
        for reason, field_name, detail in r.response_rejects:
            reject(Reject("read", reason, path, r.line, field_name, detail, pid))
        table.responses[gid] += r.responses
        sink(gid, r.record)
    return table


def reject_empty_groups(table: GroupTable, reject: Optional[Callable[[Reject], None]]) -> List[int]:
    """The problems that kept at least one response, in order; the others are recorded as rejects (their rows were
    already rejected one by one; this records that the problem itself is gone)."""
    kept: List[int] = []
    for gid, n in enumerate(table.responses):
        if n:
            kept.append(gid)
        elif reject is not None:
            reject(Reject("read", "no_valid_responses", None, None, None, "every response was rejected",
                          table.problem_ids[gid]))
    return kept


def read_groups(
    paths: Iterable[str],
    domain: Optional[str] = None,
    strict: bool = False,
    on_reject: Optional[Callable[[Reject], None]] = None,
    progress: Optional[Callable[[int], None]] = None,
) -> List[RawGroup]:
    """Read every row of ``paths`` and group the rollouts by problem text, all in memory (small inputs and tests;
    the build streams through :mod:`.spill` instead, with the same groups and rejects).

    Args:
        paths: input files.
        domain: keep only rows whose ``domain`` equals this (e.g. ``math``); others are rejected as
            ``domain_filtered`` (counted, not an error even in strict mode).
        strict: raise :class:`~.records.InputError` at the first bad row instead of rejecting it.
        on_reject: called with each :class:`~.records.Reject` (the build writes them to the rejects JSONL).
        progress: called with 1 per row read (progress bar hook).

    Raises :class:`~.records.InputError` for a missing, unreadable or empty (no record at all) input file.
    """
    by_group: Dict[int, List[tuple]] = {}
    table = group_rows(paths, lambda gid, record: by_group.setdefault(gid, []).append(pickle.loads(record)), domain,
                       strict, on_reject, progress)
    return [merge_records(by_group[gid]) for gid in reject_empty_groups(table, on_reject)]
