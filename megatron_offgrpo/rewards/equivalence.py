"""Mathematical equivalence of two final answers: cheap paths first, then ``math-verify`` under a timeout.

Cheap paths, in order, each standing in for math-verify's own verdict on the answers it covers (the tests check
them against math-verify on the synthetic sample's answers and on a table of literals):

1. identical strings after :func:`~.extraction.normalize_answer_string` are equivalent;
2. two plain rational literals (integers, decimals of at most 6 places, ``\\frac{p}{q}``, ``p/q``; see
   :func:`rational_literal`) are equivalent when their exact values are equal and not equivalent when the values are
   more than :data:`NUMERIC_SEPARATION` apart; math-verify rounds a float to 6 decimals before comparing, so values
   closer than that (``0.333333`` against ``\\frac{1}{3}``) are left to it;
3. a pair already decided by this checker gets the same answer again (memo by exact strings: a vote compares each
   answer with every cluster representative, and most answers repeat);
4. a successful parse is reused across checkers (a process-wide cache by exact string; failures and timeouts are
   never cached, so they are retried exactly as before).

``math-verify`` bounds its own work with ``signal.alarm``, which only works in a process's main thread; called from
a thread pool it raises, and a framework that swallowed that error scored every answer 0 (docs/design.md §2).
This module owns the timeout instead (``signal.setitimer``, so sub-second budgets work too), refuses to run
outside the main thread with a clear error, and *counts* every timeout and verifier error. Parallelism therefore
means process workers (see :mod:`megatron_offgrpo.rewards.labeling`), each running this in its own main thread.

Before math-verify sees an answer, the default parser rewrites upright ``e`` (``\\mathrm{e}``, ``\\operatorname{e}``)
to Euler's number, which math-verify would otherwise read as a text symbol, and it refuses a *partial* read of a set
literal: math-verify reads ``\\{\\text{Yes}, 3\\}`` as just ``3`` (or as the bare string ``\\{``, equal to any
other unreadable set), which would make unrelated set-valued answers (:mod:`.extraction`) equivalent. Such a parse
is a counted parse error, so only the fast path (sets compared as sorted element strings) can match the answer.
"""

from __future__ import annotations

import logging
import re
import signal
import threading
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

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
            "use process workers (megatron_offgrpo.rewards.labeling.label_groups), not threads"
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
    numeric_path: int = 0
    memo_hits: int = 0
    parse_timeouts: int = 0
    parse_errors: int = 0
    verify_timeouts: int = 0
    verify_errors: int = 0

    def merge(self, other: "VerifierCounters") -> None:
        for k in self.__dataclass_fields__:
            setattr(self, k, getattr(self, k) + getattr(other, k))

    def as_dict(self) -> Dict[str, int]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


# At most 9 integer digits and 6 decimals: every literal is exact in a 15-digit float (math-verify's precision).
_INT = r"(?:0|[1-9][0-9]{0,8})"
_RATIONAL_RE = re.compile(
    rf"(?P<neg>-?)(?:(?P<int>{_INT})(?:\.(?P<dec>[0-9]{{1,6}}))?"
    rf"|\\frac\{{(?P<fn>-?{_INT})\}}\{{(?P<fd>{_INT})\}}"
    rf"|(?P<sn>{_INT})/(?P<sd>{_INT}))"
)
# Two literals further apart than this are different numbers for math-verify too: rounding each to 6 decimals moves
# it by at most 5e-7.
NUMERIC_SEPARATION = Fraction(1, 100_000)


def rational_literal(answer: str) -> Optional[Fraction]:
    """The exact value of an answer that is a plain rational literal, else ``None``.

    Literals, after stripping surrounding whitespace and reading ``\\dfrac`` / ``\\tfrac`` as ``\\frac``: ``-?N``,
    ``-?N.D`` (at most 6 decimals), ``-?\\frac{-?N}{M}``, ``-?N/M``, with ``N``, ``M`` of at most 9 digits, no leading
    zeros and ``M > 0``. Anything else (inner spaces, a trailing period, a leading ``+``, exponents, thousands
    separators, percentages, ``\\frac12``) is not a literal here and goes to math-verify. The raw answer is read,
    not :func:`~.extraction.normalize_answer_string`'s form: math-verify does not read ``3.`` as ``3``.
    """
    m = _RATIONAL_RE.fullmatch(answer.strip().replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac"))
    if m is None:
        return None
    if m.group("int") is not None:
        value = Fraction(m.group("int") + "." + (m.group("dec") or "0"))
    elif m.group("fn") is not None:
        if int(m.group("fd")) == 0:
            return None
        value = Fraction(int(m.group("fn")), int(m.group("fd")))
    else:
        if int(m.group("sd")) == 0:
            return None
        value = Fraction(int(m.group("sn")), int(m.group("sd")))
    return -value if m.group("neg") else value


def numeric_verdict(gold: str, target: str) -> Optional[bool]:
    """math-verify's verdict on two rational literals when it is certain (see the module docstring), else ``None``."""
    a = rational_literal(gold)
    if a is None:
        return None
    b = rational_literal(target)
    if b is None:
        return None
    if a == b:
        return True
    if abs(a - b) > NUMERIC_SEPARATION:
        return False
    return None


# Successful math-verify parses by exact answer string, shared by every checker of this process (bounded LRU).
_PARSE_CACHE: "OrderedDict[str, List[Any]]" = OrderedDict()
PARSE_CACHE_SIZE = 8192


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

    ``equivalent(gold, target)`` is ``math_verify.verify(gold, target)`` on the parsed answers, after the cheap
    paths of the module docstring (the numeric path and the process-wide parse cache only while the parser and the
    verifier are math-verify's, as they stand for its verdict). A timeout or error in parse or verify makes the pair
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
    _memo: Dict[Tuple[str, str], bool] = field(default_factory=dict, repr=False)

    @property
    def _is_math_verify(self) -> bool:
        return self.parse_fn is _default_parse and self.verify_fn is _default_verify

    def parsed(self, answer: str) -> Optional[List[Any]]:
        """The parsed answer (cached), or ``None`` when parsing timed out or failed."""
        if answer in self._cache:
            return self._cache[answer]
        shared = self.parse_fn is _default_parse
        if shared and answer in _PARSE_CACHE:
            _PARSE_CACHE.move_to_end(answer)
            self._cache[answer] = _PARSE_CACHE[answer]
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
        if shared and result is not None:
            _PARSE_CACHE[answer] = result
            if len(_PARSE_CACHE) > PARSE_CACHE_SIZE:
                _PARSE_CACHE.popitem(last=False)
        return result

    def equivalent(self, gold: Optional[str], target: Optional[str]) -> bool:
        """True when ``target`` is equivalent to ``gold``. ``None`` (no answer) is never equivalent to anything."""
        if gold is None or target is None:
            return False
        self.counters.pairs += 1
        key = (gold, target)
        if key in self._memo:
            self.counters.memo_hits += 1
            return self._memo[key]
        ng, nt = normalize_answer_string(gold), normalize_answer_string(target)
        if ng == nt:
            self.counters.fast_path += 1
            return True
        if self.timeout_s and threading.current_thread() is not threading.main_thread():
            # Whatever path decides this pair, a caller on a thread would get a verdict for some pairs and the error
            # for others: refuse them all alike.
            with time_limit(self.timeout_s):
                pass
        verdict = numeric_verdict(gold, target) if self._is_math_verify else None
        if verdict is not None:
            self.counters.numeric_path += 1
            self._memo[key] = verdict
            return verdict
        verdict, final = self._verify(gold, target)
        if final:  # a timeout or an error is not remembered: the next identical pair tries again, as before
            self._memo[key] = verdict
        return verdict

    def _verify(self, gold: str, target: str) -> Tuple[bool, bool]:
        """``(math-verify's verdict, whether it was reached without a timeout or an error)``."""
        before = (self.counters.parse_timeouts, self.counters.parse_errors)
        pg, pt = self.parsed(gold), self.parsed(target)
        if pg is None or pt is None:
            return False, before == (self.counters.parse_timeouts, self.counters.parse_errors)
        try:
            with time_limit(self.timeout_s):
                return self.verify_fn(pg, pt), True
        except VerifierTimeout:
            self.counters.verify_timeouts += 1
            return False, False
        except RuntimeError as e:
            if "main thread" in str(e):
                raise
            self.counters.verify_errors += 1
            return False, False
        except Exception:  # noqa: BLE001
            self.counters.verify_errors += 1
            return False, False
