"""Plain records passed between the preprocessing stages, and the reject/error types for bad input."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional


class InputError(ValueError):
    """Bad input in strict mode: the message names the file, the line (or row) and the field."""


@dataclass
class Reject:
    """A record (row, trajectory or group) that did not make it into the dataset, and why.

    Every reject is counted in the summary and written as one line of the rejects JSONL.
    """

    stage: str  # read | label | select | tokenize
    reason: str  # e.g. malformed_json, invalid_utf8, missing_field, empty_response, low_agreement, over_max_seq_len
    file: Optional[str] = None
    line: Optional[int] = None  # 1-based line (JSONL) or row number (Parquet / datasets)
    field: Optional[str] = None
    detail: str = ""
    problem_id: Optional[str] = None
    rollout_index: Optional[int] = None

    def location(self) -> str:
        loc = f"{self.file}:{self.line}" if self.file is not None else "<input>"
        return loc + (f": field '{self.field}'" if self.field else "")

    def as_dict(self) -> Dict[str, Any]:
        return asdict(self)


@dataclass
class RawGroup:
    """One problem with all its teacher rollouts, as read from the input (before labelling).

    ``origins`` holds ``file:line`` for each response, so later per-trajectory rejects still point at the input.
    ``prompt`` is the rendered chat-template prompt when the reader was given the tokenizer (the build), else None.
    """

    problem: str
    problem_id: str
    responses: List[str] = field(default_factory=list)
    origins: List[str] = field(default_factory=list)
    reference: Optional[str] = None
    source: Optional[str] = None
    domain: Optional[str] = None
    prompt: Optional[str] = None
