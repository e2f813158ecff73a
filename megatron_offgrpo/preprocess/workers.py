"""What the build's worker processes run: label and tokenize whole groups, many per task.

A task is a chunk of groups named by their spans in the spill (:mod:`.spill`); the worker reads the groups itself,
so the main process ships a few numbers per group and receives the results. This module is imported by every
worker: it stays light (no ``transformers``, no Megatron-Core, no torch; math-verify is imported only when an
answer pair needs it).
"""

from __future__ import annotations

import multiprocessing
import os
import pickle
import threading
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from megatron_offgrpo.preprocess.records import RawGroup
from megatron_offgrpo.preprocess.spill import load_groups
from megatron_offgrpo.preprocess.tokenize import GroupEncoder, TokenizedTrajectory
from megatron_offgrpo.rewards.labeling import GroupLabel, LabelConfig, label_group

_STATE: Dict[str, Any] = {}


@dataclass
class GroupResult:
    """One group back from a worker: its header (the :class:`RawGroup` without the response texts), its label
    (``None`` in a tokenize-only task) and its tokenized trajectories (``None`` when not tokenized)."""

    group: int
    header: RawGroup
    label: Optional[GroupLabel]
    tokens: Optional[List[TokenizedTrajectory]]


# In transit, a chunk's token ids travel as one int32 array and each trajectory as a tuple
# (start, length, prompt_len, truncated, reject_reason, detail): pickling thousands of small arrays and objects
# cost a worker as much as tokenizing them.
_Packed = Tuple[int, int, int, bool, Optional[str], str]


def _pack(trajs: List[TokenizedTrajectory], parts: List[np.ndarray], pos: int) -> Tuple[List[_Packed], int]:
    packed: List[_Packed] = []
    for tt in trajs:
        if tt.tokens is None:
            packed.append((-1, 0, tt.prompt_len, tt.truncated, tt.reject_reason, tt.detail))
        else:
            parts.append(tt.tokens)
            packed.append((pos, len(tt.tokens), tt.prompt_len, tt.truncated, None, ""))
            pos += len(tt.tokens)
    return packed, pos


def unpack_chunk(chunk: tuple) -> List[GroupResult]:
    """The :class:`GroupResult` s of a :func:`process_chunk` result (token arrays are views of one array)."""
    rows, flat = chunk
    out = []
    for gid, header, label, packed in rows:
        tokens = None
        if packed is not None:
            tokens = [TokenizedTrajectory(None if start < 0 else flat[start:start + n], prompt_len, truncated,
                                          reason, detail)
                      for start, n, prompt_len, truncated, reason, detail in packed]
        out.append(GroupResult(gid, header, label, tokens))
    return out


def _exit_with_parent(parent: int) -> None:
    # A build killed with SIGKILL cannot stop its pool; its workers would wait for tasks forever.
    while os.getppid() == parent:
        time.sleep(1.0)
    os._exit(1)


def init_worker(spill_path: str, label_config: LabelConfig, encoder_path: str) -> None:
    """Pool initializer: the spill to read, the labelling rules and the file of the build's tokenizer state
    (:meth:`~.tokenize.ChatTokenizer.encoder_state`, pickled; loaded at the first task that tokenizes, as the pool
    starts before the tokenizer is loaded). The worker ends itself when the build's process is gone."""
    if multiprocessing.parent_process() is not None:  # a pool worker, not the build's own process (workers <= 1)
        threading.Thread(target=_exit_with_parent, args=(os.getppid(),), daemon=True).start()
    _STATE["spill"] = spill_path
    _STATE["label"] = label_config
    _STATE["encoder_path"] = encoder_path
    _STATE.pop("encoder", None)


def _encoder() -> GroupEncoder:
    if "encoder" not in _STATE:
        with open(_STATE["encoder_path"], "rb") as f:
            _STATE["encoder"] = GroupEncoder(pickle.load(f))
    return _STATE["encoder"]


def _header(g: RawGroup) -> RawGroup:
    return RawGroup(g.problem, g.problem_id, [], g.origins, g.reference, g.source, g.domain, None)


def process_chunk(task: tuple) -> tuple:
    """``(mode, groups)``: ``label`` labels each group and tokenizes the accepted ones; ``label_only`` labels;
    ``tokenize`` tokenizes. Results in the order of ``groups``, packed for transit (:func:`unpack_chunk`)."""
    mode, spans = task
    rows = []
    parts: List[np.ndarray] = []
    pos = 0
    for (gid, _), g in zip(spans, load_groups(_STATE["spill"], spans)):
        label = None
        packed = None
        if mode in ("label", "label_only"):
            label = label_group(g.responses, g.reference, _STATE["label"])
        if mode == "tokenize" or (mode == "label" and label is not None and label.reject_reason is None):
            if g.prompt is None:
                raise ValueError(f"group {gid} was spilled without its rendered prompt (spill_groups(prompt_fn=...))")
            packed, pos = _pack(_encoder().tokenize_group(g.prompt, g.responses)[1], parts, pos)
        rows.append((gid, _header(g), label, packed))
    flat = np.concatenate(parts).astype(np.int32) if parts else np.zeros(0, np.int32)
    return rows, flat
