"""Mathematical equivalence of two final answers: a string fast path, then ``math-verify`` under a timeout.

``math-verify`` bounds its own work with ``signal.alarm``, which only works in a process's main thread; called from
a thread pool it raises, and a framework that swallowed that error scored every answer 0 (DESIGN 2). This module
owns the timeout instead (``signal.setitimer``, so sub-second budgets work too), refuses to run outside the main
thread with a clear error, and *counts* every timeout and verifier error. Parallelism therefore means process
workers (see :mod:`megatron_offgrpo.rewards.labeling`), each running this in its own main thread.

Before math-verify sees an answer, the default parser rewrites upright ``e`` (``\\mathrm{e}``, ``\\operatorname{e}``)
to Euler's number, which math-verify would otherwise read as a text symbol, and it refuses a *partial* read of a set
literal: math-verify reads ``\\{\\text{Yes}, 3\\}`` as just ``3`` (or as the bare string ``\\{``, equal to any
other unreadable set), which would make unrelated set-valued answers (:mod:`.extraction`) equivalent. Such a parse
is a counted parse error, so only the fast path (sets compared as sorted element strings) can match the answer.
"""

from __future__ import annotations

import logging
import signal
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Optional

from megatron_offgrpo.rewards.extraction import normalize_answer_string, rewrite_euler_e, set_literal_elements

# math-verify warns once that we disabled its internal timeout: that is deliberate (we own the alarm).
logging.getLogger("math_verify").setLevel(logging.ERROR)


class VerifierTimeout(BaseException):
    """Raised by our alarm handler. A BaseException so that ``except Exception`` inside sympy cannot swallow it."""


@contextmanager
def time_limit(seconds: Optional[float]) -> Iterator[None]:
    """Raise :class:`VerifierTimeout` in the block after ``seconds`` of wall time (main thread only)."""
    if seconds is None or seconds <= 0:
        yield
        return
    if threading.current_thread() is not threading.main_thread():
        raise RuntimeError(
            "answer verification with a timeout must run in a process's main thread (signal-based alarm); "
            "use process workers (megatron_offgrpo.rewards.labeling.label_groups_parallel), not threads"
        )

    def _handler(signum: int, frame: Any) -> None:
        raise VerifierTimeout()

    old = signal.signal(signal.SIGALRM, _handler)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


@dataclass
class VerifierCounters:
    """What the checker did; merged across workers and printed in the preprocessing summary."""

    pairs: int = 0
    fast_path: int = 0
    parse_timeouts: int = 0
    parse_errors: int = 0
    verify_timeouts: int = 0
    verify_errors: int = 0

    def merge(self, other: "VerifierCounters") -> None:
        for k in self.__dataclass_fields__:
            setattr(self, k, getattr(self, k) + getattr(other, k))

    def as_dict(self) -> Dict[str, int]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def _check_whole_set_read(answer: str, parsed: List[Any]) -> None:
    """Raise when ``answer`` is a set literal of several elements that math-verify did not read as a set of at
    least as many members (it falls back to the first readable piece instead of failing)."""
    elements = set_literal_elements(answer)
    if elements is None:
        return
    distinct = len({normalize_answer_string(e) for e in elements})
    if distinct < 2:
        return
    from sympy import FiniteSet

    first = parsed[0] if parsed else None
    # At least, not exactly: `\pm 1` is one written element and two members.
    if not (isinstance(first, FiniteSet) and len(first) >= distinct):
        raise ValueError(f"math-verify read only part of the set literal {answer!r}: {parsed!r}")


def _default_parse(answer: str) -> List[Any]:
    from math_verify import parse

    # Wrapping in \boxed makes math-verify's LaTeX extractor take the whole answer as one expression.
    result = parse("\\boxed{" + rewrite_euler_e(answer) + "}", parsing_timeout=None, raise_on_error=True)
    _check_whole_set_read(answer, result)
    return result


def _default_verify(gold: List[Any], target: List[Any]) -> bool:
    from math_verify import verify

    return bool(verify(gold, target, timeout_seconds=None, raise_on_error=True))


@dataclass
class EquivalenceChecker:
    """Decides whether two extracted answers are the same mathematical object.

    ``equivalent(gold, target)`` is ``math_verify.verify(gold, target)`` on the parsed answers, after a fast path
    (identical strings after :func:`normalize_answer_string`). A timeout or error in parse or verify makes the pair
    *not equivalent* and is counted in :attr:`counters`. Parsed answers are cached per checker. The default parser
    rewrites upright ``e`` and rejects partial reads of set literals (module docstring).

    Args:
        timeout_s: wall-time budget for each parse and each verify call (``None`` or 0: no limit).
        parse_fn / verify_fn: injection points for tests (default: math-verify).
    """

    timeout_s: Optional[float] = 5.0
    parse_fn: Callable[[str], List[Any]] = _default_parse
    verify_fn: Callable[[List[Any], List[Any]], bool] = _default_verify
    counters: VerifierCounters = field(default_factory=VerifierCounters)
    _cache: Dict[str, Optional[List[Any]]] = field(default_factory=dict, repr=False)

    def parsed(self, answer: str) -> Optional[List[Any]]:
        """The parsed answer (cached), or ``None`` when parsing timed out or failed."""
        if answer in self._cache:
            return self._cache[answer]
        result: Optional[List[Any]]
        try:
            with time_limit(self.timeout_s):
                result = self.parse_fn(answer)
        except VerifierTimeout:
            self.counters.parse_timeouts += 1
            result = None
        except RuntimeError as e:
            if "main thread" in str(e):
                raise
            self.counters.parse_errors += 1
            result = None
        except Exception:  # noqa: BLE001 - any verifier failure is counted, never fatal for the file
            self.counters.parse_errors += 1
            result = None
        if result is not None and len(result) == 0:
            result = None  # math-verify found nothing to parse: only the string path can match it
        self._cache[answer] = result
        return result

    def equivalent(self, gold: Optional[str], target: Optional[str]) -> bool:
        """True when ``target`` is equivalent to ``gold``. ``None`` (no answer) is never equivalent to anything."""
        if gold is None or target is None:
            return False
        self.counters.pairs += 1
        if normalize_answer_string(gold) == normalize_answer_string(target):
            self.counters.fast_path += 1
            return True
        pg, pt = self.parsed(gold), self.parsed(target)
        if pg is None or pt is None:
            return False
        try:
            with time_limit(self.timeout_s):
                return self.verify_fn(pg, pt)
        except VerifierTimeout:
            self.counters.verify_timeouts += 1
            return False
        except RuntimeError as e:
            if "main thread" in str(e):
                raise
            self.counters.verify_errors += 1
            return False
        except Exception:  # noqa: BLE001
            self.counters.verify_errors += 1
            return False
