"""Readers for the inputs users have, yielding :class:`~.records.RawGroup` s plus counted rejects.

Accepted row shapes (any input format):

- **OpenThoughts3** rows: ``conversations`` = list of ``{"from": "human"|"gpt", "value": ...}`` (or
  ``{"role": "user"|"assistant", "content": ...}``), with ``domain`` and ``source``. The first user turn is the
  problem; every assistant turn is one rollout (the public dataset has one per row, ~16 rows per problem).
- **Plain** rows: ``{"problem": str, "responses": [str, ...]}`` (or a single ``"response"``).
- Optional ``answer`` (ground truth, only used to report the vote's accuracy or with ``label_source=reference``),
  ``problem_id`` / ``id``.

Rows are grouped by exact problem text across rows and files, in order of first appearance. A ``problem_id`` is
the identity of a problem downstream (student pass rates, the group metadata), so a second problem text under an
id already taken is rejected (``duplicate_problem_id``, naming where the id was first seen). An input file without
a single record is an error (:class:`~.records.InputError` naming the file). Input formats:
``.jsonl``/``.json`` (JSON lines, read line by line here so that every error names its line), ``.parquet``
(through HF ``datasets``, streamed) and a directory written by ``datasets.Dataset.save_to_disk``.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Tuple, Union

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


def iter_jsonl(path: str) -> RowSource:
    """``(line_no, row)`` for each non-blank line; undecodable / malformed lines come back as rejects."""
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield line_no, Reject("read", "invalid_utf8", path, line_no, None, f"byte {e.start}: {e.reason}")
                continue
            try:
                row = json.loads(text)
            except json.JSONDecodeError as e:
                yield line_no, Reject("read", "malformed_json", path, line_no, None, f"column {e.colno}: {e.msg}")
                continue
            if not isinstance(row, dict):
                yield line_no, Reject("read", "not_an_object", path, line_no, None, f"got {type(row).__name__}")
                continue
            yield line_no, row


def iter_hf_rows(path: str) -> RowSource:
    """Rows of a Parquet file (streamed) or a ``save_to_disk`` directory through HF ``datasets``; 1-based rows."""
    import datasets

    try:
        if os.path.isdir(path):
            ds: Iterable[Dict[str, Any]] = datasets.load_from_disk(path)
        else:
            ds = datasets.load_dataset("parquet", data_files=path, split="train", streaming=True)
        for i, row in enumerate(ds, start=1):
            yield i, row
    except Exception as e:  # noqa: BLE001 - a corrupt container is not a per-row problem: fail naming the file
        raise InputError(f"{path}: cannot read as Parquet / datasets directory: {e}") from e


def iter_rows(path: str) -> RowSource:
    """Dispatch on the input's extension."""
    if not os.path.exists(path):
        raise InputError(f"{path}: input file does not exist")
    lower = path.lower()
    if lower.endswith((".jsonl", ".json", ".ndjson")):
        return iter_jsonl(path)
    if lower.endswith(".parquet") or os.path.isdir(path):
        return iter_hf_rows(path)
    raise InputError(f"{path}: unknown input format (expected .jsonl, .json, .parquet or a datasets directory)")


def read_groups(
    paths: Iterable[str],
    domain: Optional[str] = None,
    strict: bool = False,
    on_reject: Optional[Callable[[Reject], None]] = None,
    progress: Optional[Callable[[int], None]] = None,
) -> List[RawGroup]:
    """Read every row of ``paths`` and group the rollouts by problem text.

    Args:
        paths: input files.
        domain: keep only rows whose ``domain`` equals this (e.g. ``math``); others are rejected as
            ``domain_filtered`` (counted, not an error even in strict mode).
        strict: raise :class:`~.records.InputError` at the first bad row instead of rejecting it.
        on_reject: called with each :class:`~.records.Reject` (the build writes them to the rejects JSONL).
        progress: called with 1 per row read (progress bar hook).

    Raises :class:`~.records.InputError` for a missing, unreadable or empty (no record at all) input file.
    """
    groups: Dict[str, RawGroup] = {}
    id_origin: Dict[str, str] = {}  # problem_id -> "file:line" of the row that introduced it

    def reject(rej: Reject) -> None:
        if strict and rej.reason != "domain_filtered":
            raise InputError(f"{rej.location()}: {rej.reason}: {rej.detail}")
        if on_reject is not None:
            on_reject(rej)

    for path in paths:
        records = 0
        for line_no, row in iter_rows(path):
            records += 1
            if progress is not None:
                progress(1)
            if isinstance(row, Reject):
                reject(row)
                continue
            try:
                problem, responses, extras = parse_row(row)
            except RowError as e:
                reject(Reject("read", e.reason, path, line_no, e.field, e.detail))
                continue
            if domain is not None and extras["domain"] != domain:
                reject(Reject("read", "domain_filtered", path, line_no, "domain", f"domain={extras['domain']!r}"))
                continue
            key = problem.strip()
            g = groups.get(key)
            if g is None:
                pid = extras["problem_id"] or problem_id_for(key)
                if pid in id_origin:
                    # Another problem text already has this id: keep the first, reject this one (every row of it).
                    reject(Reject("read", "duplicate_problem_id", path, line_no, "problem_id",
                                  f"duplicate problem_id {pid!r} (first seen at {id_origin[pid]})", pid))
                    continue
                id_origin[pid] = f"{path}:{line_no}"
                g = groups[key] = RawGroup(problem=problem, problem_id=pid)
            for field in ("reference", "source", "domain"):
                src = "answer" if field == "reference" else field
                if getattr(g, field) is None and extras[src] is not None:
                    setattr(g, field, extras[src])
            for j, resp in enumerate(responses):
                fname = "conversations" if "conversations" in row else "responses"
                if not isinstance(resp, str):
                    reject(Reject("read", "bad_field", path, line_no, f"{fname}[{j}]",
                                  f"response is {type(resp).__name__}, not a string", g.problem_id))
                elif not resp.strip():
                    reject(Reject("read", "empty_response", path, line_no, f"{fname}[{j}]", "empty response",
                                  g.problem_id))
                else:
                    g.responses.append(resp)
                    g.origins.append(f"{path}:{line_no}")
        if records == 0:
            raise InputError(f"{path}: no records (the file is empty); regenerate it or leave it out of --input")
    out: List[RawGroup] = []
    for g in groups.values():
        if not g.responses:
            # Its rows were already rejected one by one; record that the problem itself is gone.
            reject(Reject("read", "no_valid_responses", None, None, None, "every response was rejected", g.problem_id))
            continue
        out.append(g)
    return out
