"""Grouping rows by problem in bounded memory: the build's on-disk spill.

Rows of one problem may arrive anywhere in the input (OpenThoughts3 has one row per rollout; shards of it are
usually, not always, contiguous), and a group is complete only after the last row has been read. Instead of holding
the input in memory, :func:`spill_groups` streams it once (:func:`~.readers.group_rows`; JSON lines are parsed by
the workers) and appends each accepted row, already parsed and validated, as one pickled record to a spill
file next to the output; in memory it keeps only
``(group, offset, length)`` per row (16 bytes, in flat arrays) and :class:`~.readers.GroupTable`'s few dozen bytes
per problem. After the pass, a stable sort of the row index by group gives each group's records in input order;
workers read the groups of their task straight from the file (:func:`load_groups`), so the build's main process
never holds more than the tasks in flight. Contiguous input reads back sequentially; scattered rows cost a seek per
row, served by the page cache while the spill fits in it. The spill is about the size of the accepted input.

The spill is a temporary of the output (``P.tmp<pid>.spill``): removed when the build ends, and removed by the next
build of ``P`` if a killed one left it (:func:`~megatron_offgrpo.data.atomic.remove_stale_temps`).
"""

from __future__ import annotations

import os
import pickle
from array import array
from dataclasses import dataclass
from typing import Any, Callable, Iterable, List, Optional, Sequence, Tuple

import numpy as np

from megatron_offgrpo.preprocess.readers import GroupTable, group_rows, merge_records, reject_empty_groups
from megatron_offgrpo.preprocess.records import RawGroup, Reject


class RecordFile:
    """Append-only file of pickled records addressed by ``(offset, length)``."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._f = open(path, "wb")
        self._offset = 0

    def append(self, obj: object) -> Tuple[int, int]:
        return self.append_bytes(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL))

    def append_bytes(self, data: bytes) -> Tuple[int, int]:
        """Append an already pickled record."""
        self._f.write(data)
        off = self._offset
        self._offset += len(data)
        return off, len(data)

    def close(self) -> None:
        if not self._f.closed:
            self._f.close()


def read_records(path: str, spans: Sequence[Tuple[int, int]]) -> List[object]:
    """The records at ``spans`` (``(offset, length)``) of a :class:`RecordFile`, in the given order.

    Spans that lie close together (the usual, contiguous case) are read with one ``pread`` of their whole range.
    """
    if not len(spans):
        return []
    with open(path, "rb") as f:
        fd = f.fileno()
        lo = min(o for o, _ in spans)
        hi = max(o + n for o, n in spans)
        if hi - lo <= 2 * sum(n for _, n in spans) + (1 << 16):
            buf = os.pread(fd, hi - lo, lo)
            return [pickle.loads(buf[o - lo:o - lo + n]) for o, n in spans]
        return [pickle.loads(os.pread(fd, n, o)) for o, n in spans]


# A worker's task names its groups by spans: (group id, [(offset, length), ...] of its row records).
GroupSpans = Tuple[int, List[Tuple[int, int]]]


def load_groups(path: str, groups: Sequence[GroupSpans]) -> List[RawGroup]:
    """The :class:`RawGroup` of each ``(group, spans)``, read from the spill at ``path`` (in worker processes)."""
    flat = [span for _, spans in groups for span in spans]
    tuples = read_records(path, flat)
    out: List[RawGroup] = []
    k = 0
    for gid, spans in groups:
        out.append(merge_records(tuples[k:k + len(spans)]))
        k += len(spans)
    return out


@dataclass
class SpilledGroups:
    """The groups of an input, spilled to ``path``: ``kept`` lists the problems that kept a response, in order of
    first appearance; :meth:`spans` addresses a group's row records."""

    path: str
    table: GroupTable
    kept: List[int]
    _starts: np.ndarray  # per group, its first position in _order
    _order: np.ndarray  # row records sorted by group (stable: input order within a group)
    _offsets: np.ndarray
    _lengths: np.ndarray

    def spans(self, gid: int) -> List[Tuple[int, int]]:
        rows = self._order[self._starts[gid]:self._starts[gid + 1]]
        return list(zip(self._offsets[rows].tolist(), self._lengths[rows].tolist()))

    def responses(self, gid: int) -> int:
        return self.table.responses[gid]

    def chunks(self, gids: Iterable[int], max_groups: int, max_responses: int) -> Iterable[List[GroupSpans]]:
        """``gids`` in order, cut into tasks of at most ``max_groups`` groups and (unless one group alone exceeds
        it) ``max_responses`` responses."""
        chunk: List[GroupSpans] = []
        n = 0
        for gid in gids:
            k = self.table.responses[gid]
            if chunk and (len(chunk) >= max_groups or n + k > max_responses):
                yield chunk
                chunk, n = [], 0
            chunk.append((gid, self.spans(gid)))
            n += k
        if chunk:
            yield chunk


def spill_groups(
    paths: Iterable[str],
    spill_path: str,
    domain: Optional[str] = None,
    strict: bool = False,
    on_reject: Optional[Callable[[Reject], None]] = None,
    progress: Optional[Callable[[int], None]] = None,
    prompt_fn: Optional[Callable[[str], str]] = None,
    pool: Any = None,
) -> SpilledGroups:
    """Read ``paths`` once (arguments and rejects as :func:`~.readers.read_groups`; ``pool`` parses JSON lines in
    workers) into the spill at ``spill_path``; returns the index of its groups. The caller removes
    ``spill_path`` when done."""
    spill = RecordFile(spill_path)
    rec_group, rec_offset, rec_length = array("i"), array("q"), array("i")

    def sink(gid: int, record: bytes) -> None:
        off, n = spill.append_bytes(record)
        rec_group.append(gid)
        rec_offset.append(off)
        rec_length.append(n)

    try:
        table = group_rows(paths, sink, domain, strict, on_reject, progress, prompt_fn, pool)
    finally:
        spill.close()
    groups = np.frombuffer(rec_group, dtype=np.int32) if len(rec_group) else np.zeros(0, np.int32)
    order = np.argsort(groups, kind="stable")
    starts = np.zeros(len(table) + 1, dtype=np.int64)
    np.cumsum(np.bincount(groups, minlength=len(table)), out=starts[1:])
    kept = reject_empty_groups(table, on_reject)
    return SpilledGroups(spill_path, table, kept, starts, order,
                         np.frombuffer(rec_offset, dtype=np.int64) if len(rec_offset) else np.zeros(0, np.int64),
                         np.frombuffer(rec_length, dtype=np.int32) if len(rec_length) else np.zeros(0, np.int32))
