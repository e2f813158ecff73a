"""Final-answer extraction from a teacher solution (docs/design.md §2).

**Where.** Only the *final solution part* is read: the text after the last closing ``</think>``, or the whole text
when there is none. Its boxes are the complete top-level ``\\boxed{...}`` (or ``\\fbox{...}``); braces are matched
with a balanced scan (escaped ``\\{``/``\\}`` do not count), so nested LaTeX such as ``\\boxed{\\frac{1}{\\sqrt{2}}}``
is returned whole, and an unclosed box (a truncated generation) ends the scan.

**Which boxes: the final answer run.** The answer is the last box of the final part together with the boxes
before it that are chained to it by *connective text only*, read backwards from the last box until the first gap
that is not connective. Connective text is any mix of

* whitespace that contains no blank line (a blank line is a paragraph break: the run never crosses paragraphs);
* ``,`` ``;`` ``&`` ``$`` ``~`` ``**``, the math delimiters ``\\(`` ``\\)`` ``\\[`` ``\\]``, the line break ``\\\\``
  and LaTeX spacing (``\\quad``, ``\\qquad``, ``\\,``, ``\\;``, ``\\:``, ``\\!``, ``\\ ``);
* the words ``and`` / ``or``, bare or as ``\\text{ and }`` (also ``\\textrm``, ``\\textnormal``, ``\\mbox``);
* an assignment ``NAME =`` (or ``NAME &=``) directly in front of the next box, NAME being one letter or a Greek
  letter macro with an optional subscript (``x``, ``x_1``, ``y_{2}``, ``\\theta``).

Anything else ends the run: a word (``then``, ``the answer is``), a period, a blank line. So
``we get \\boxed{4}. Hence the answer is \\boxed{5}`` answers ``5`` alone, while ``x = \\boxed{2} or x = \\boxed{-3}``,
``$\\boxed{2}$, $\\boxed{-3}$`` and ``\\boxed{(1,2)} \\quad \\text{and} \\quad \\boxed{(3,4)}`` answer both boxes.

**The answer string.** Each box's content is unwrapped (a box that is entirely another box, surrounding ``$``,
whitespace); empty boxes are dropped; contents identical after :func:`normalize_answer_string` collapse to the
first. One content left: it is the answer, as written. Several: they are one set-valued answer, written as the
LaTeX set literal ``\\{a, b\\}`` in the order of appearance. ``math-verify`` compares two set literals as sets
(order-independent), a set literal against a list such as ``2, -3`` as sets too, and against an ordered gold such as
``(2, -3)`` element by element in the written order. The names of the assignments are kept in the elements
(``\\{x=2, y=3\\}``) only when they name at least two different unknowns, so that the swapped solution of a system
is a different answer; one unknown (``x = \\boxed{2} or x = \\boxed{-3}``) or its indexed roots (``x_1``, ``x_2``)
carry no information, and their names are dropped.

A trajectory without a complete, non-empty box has no answer (``None``): the vote never counts it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import List, Optional, Tuple

THINK_CLOSE = "</think>"

# \boxed and \fbox; `\boxed` must not be a prefix of a longer macro name (e.g. a hypothetical \boxedfoo).
_BOX_RE = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")


def final_solution_part(text: str) -> str:
    """The part of ``text`` after the last ``</think>``; the whole text when there is none."""
    cut = text.rfind(THINK_CLOSE)
    return text if cut < 0 else text[cut + len(THINK_CLOSE):]


def _balanced_group(text: str, open_pos: int) -> Optional[int]:
    """Index just past the ``}`` closing the ``{`` at ``open_pos``; ``None`` when it never closes."""
    depth = 0
    i = open_pos
    n = len(text)
    while i < n:
        c = text[i]
        if c == "\\":
            # Skip the escaped character: `\{` and `\}` are literal braces (LaTeX sets), not grouping.
            i += 2
            continue
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return i + 1
        i += 1
    return None


def boxed_spans(text: str) -> List[Tuple[int, int, str]]:
    """All complete top-level boxes in ``text`` as ``(start, end, content)``, in order of appearance.

    A box nested inside another box is part of the outer content, not a separate span. The form without braces
    (``\\boxed 5``) takes the next whitespace-delimited token, as LaTeX would take a single token.
    """
    spans: List[Tuple[int, int, str]] = []
    pos = 0
    while True:
        m = _BOX_RE.search(text, pos)
        if m is None:
            return spans
        j = m.end()
        while j < len(text) and text[j] in " \t":
            j += 1
        if j < len(text) and text[j] == "{":
            end = _balanced_group(text, j)
            if end is None:  # unbalanced (e.g. truncated generation): not an answer, look no further.
                return spans
            spans.append((m.start(), end, text[j + 1:end - 1]))
            pos = end
        elif j > m.end() and j < len(text):
            tok = re.match(r"[^\s$]+", text[j:])
            if tok is None:
                pos = j
                continue
            spans.append((m.start(), j + tok.end(), tok.group(0)))
            pos = j + tok.end()
        else:
            pos = m.end()


def _unwrap(content: str) -> str:
    """Strip redundant wrappers: a box that is entirely another box, surrounding ``$``, whitespace."""
    s = content.strip()
    while True:
        inner = boxed_spans(s)
        if len(inner) == 1 and inner[0][0] == 0 and inner[0][1] == len(s):
            s = inner[0][2].strip()
            continue
        if len(s) >= 2 and s[0] == "$" and s[-1] == "$":
            s = s.strip("$").strip()
            continue
        return s


# --- the final answer run -------------------------------------------------------------------------------------

# A paragraph break: the run never crosses it.
_BLANK_LINE_RE = re.compile(r"\n[ \t]*\n")
# Text that may separate two boxes of one answer (see the module docstring). At most one alternative can match at
# a position, so the full match is linear in the gap length (gaps can be whole solutions).
_CONNECTIVE_RE = re.compile(
    r"(?:\s|[,;&$~]|\*\*|\\[()\[\]]|\\\\|\\q?quad(?![A-Za-z])|\\[,;:! ]"
    r"|(?<![A-Za-z])(?:and|or)(?![A-Za-z])"
    r"|\\(?:text|textrm|textnormal|mbox)\s*\{[\s,]*(?:(?:and|or)[\s,]*)?\})*",
    re.IGNORECASE,
)
_GREEK = (
    "alpha|beta|gamma|delta|epsilon|varepsilon|zeta|eta|theta|vartheta|iota|kappa|lambda|mu|nu|xi|rho|sigma|tau"
    "|upsilon|phi|varphi|chi|psi|omega"
)
# `NAME =` right before a box. A one-letter NAME must not end a word (`max =`) or a macro name, nor be an exponent;
# Greek letters count by macro, except `\pi` (a constant, not an unknown). Only the last 64 characters are read.
_ASSIGNMENT_RE = re.compile(
    r"(?P<name>(?P<base>(?<![\w\\^])[A-Za-z]|\\(?:" + _GREEK + r")(?![A-Za-z]))"
    r"(?:_(?:\{[A-Za-z0-9]+\}|[A-Za-z0-9]))?)\s*&?\s*=\s*\Z"
)
_ASSIGNMENT_WINDOW = 64


@dataclass(frozen=True)
class _RunBox:
    """One box of the final answer run: its unwrapped content and the assignment in front of it, if any."""

    content: str
    name: Optional[str]  # e.g. "x_1"
    base: Optional[str]  # the unknown without its index, e.g. "x"


def _split_assignment(before: str) -> Tuple[str, Optional[str], Optional[str]]:
    """``(text before the assignment, name, base name)`` when ``before`` ends with ``NAME =``.

    ``(before, None, None)`` otherwise. The search starts late but its look-behind still sees the whole text.
    """
    window_start = max(0, len(before) - _ASSIGNMENT_WINDOW)
    m = _ASSIGNMENT_RE.search(before, window_start)
    if m is None:
        return before, None, None
    return before[:m.start()], m.group("name"), m.group("base")


def _is_connective(gap: str) -> bool:
    """True when ``gap`` (between two boxes, assignment removed) chains them into one answer."""
    return _BLANK_LINE_RE.search(gap) is None and _CONNECTIVE_RE.fullmatch(gap) is not None


def _final_answer_run(part: str) -> List[_RunBox]:
    """The boxes of the final answer run of ``part`` (see the module docstring), in order of appearance."""
    spans = boxed_spans(part)
    run: List[_RunBox] = []
    i = len(spans) - 1
    while i >= 0:
        prev_end = spans[i - 1][1] if i > 0 else 0
        gap, name, base = _split_assignment(part[prev_end:spans[i][0]])
        run.append(_RunBox(_unwrap(spans[i][2]), name, base))
        if i == 0 or not _is_connective(gap):
            break
        i -= 1
    run.reverse()
    return run


def final_answer_elements(text: str) -> List[str]:
    """The distinct answers boxed in the final answer run of ``text``, in order of appearance (empty: no answer).

    Assignment names are kept (``x=2``) only when they name two or more different unknowns; see the module docstring.
    """
    run = [b for b in _final_answer_run(final_solution_part(text)) if b.content]
    keep_names = len({b.base for b in run if b.base is not None}) >= 2
    elements: List[str] = []
    seen = set()
    for b in run:
        element = f"{b.name}={b.content}" if keep_names and b.name is not None else b.content
        key = normalize_answer_string(element)
        if key not in seen:  # `\boxed{5} and \boxed{5}` is one answer, not the set {5, 5}
            seen.add(key)
            elements.append(element)
    return elements


def set_literal(elements: List[str]) -> str:
    """The LaTeX set literal ``\\{a, b\\}`` of ``elements``, in the given order."""
    return "\\{" + ", ".join(elements) + "\\}"


def extract_final_answer(text: str) -> Optional[str]:
    """The trajectory's final answer, or ``None``: the one answer of the final answer run, or the set literal of
    its distinct answers when there are several (module docstring). Empty boxes (``\\boxed{}``) count as no answer.
    """
    elements = final_answer_elements(text)
    if not elements:
        return None
    return elements[0] if len(elements) == 1 else set_literal(elements)


# --- set literals ----------------------------------------------------------------------------------------------

_SET_OPEN_RE = re.compile(r"\s*(?:\\left\s*)?\\\{")
_SET_CLOSE_RE = re.compile(r"(?:\\right\s*)?\\\}\s*\Z")


def _split_top_level(inner: str) -> Optional[List[str]]:
    """``inner`` split at the commas outside any bracket; ``None`` when a bracket closes that was not opened here.

    Opening ``{ ( [ \\{`` and closing ``} ) ] \\}`` are counted without pairing their kinds, so half-open intervals
    such as ``[1, 2)`` are one element; other escapes (``\\,`` is a thin space, not a separator) are skipped.
    """
    parts: List[str] = []
    depth = 0
    start = 0
    i = 0
    while i < len(inner):
        c = inner[i]
        if c == "\\":
            nxt = inner[i + 1:i + 2]
            depth += 1 if nxt == "{" else -1 if nxt == "}" else 0
            i += 2
        else:
            if c in "{([":
                depth += 1
            elif c in "})]":
                depth -= 1
            elif c == "," and depth == 0:
                parts.append(inner[start:i])
                start = i + 1
            i += 1
        if depth < 0:
            return None
    parts.append(inner[start:])
    return parts


def set_literal_elements(answer: str) -> Optional[List[str]]:
    """The elements of ``answer`` when it is one LaTeX set literal ``\\{a, b, ...\\}`` (``\\left\\{...\\right\\}``
    too), stripped, in written order; ``None`` when it is not (e.g. ``\\{1\\} \\cup \\{2\\}``, ``(1, 2)``).
    """
    m = _SET_OPEN_RE.match(answer)
    c = _SET_CLOSE_RE.search(answer)
    if m is None or c is None or c.start() < m.end():
        return None
    parts = _split_top_level(answer[m.end():c.start()])
    if parts is None:  # the opening \{ closed before the end: not a single literal
        return None
    elements = [p.strip() for p in parts]
    return [] if elements == [""] else elements


# --- string canonicalisation -----------------------------------------------------------------------------------

# Upright e is Euler's number (ISO 80000-2); math-verify reads `\mathrm{e}` as a text symbol "e" (so
# `\mathrm{e}^{2}` != `e^2`) and fails on `\operatorname{e}`. The argument must be exactly `e`, so `\mathrm{exp}`
# or `\mathrm{el}` are untouched. The replacement keeps braces, `{e}`, so that a preceding macro name cannot absorb
# the letter (`\cdot\mathrm{e}` -> `\cdot{e}`, not `\cdote`).
_EULER_RE = re.compile(
    r"\\(?:mathrm|operatorname|mathup|rm)\s*\{\s*e\s*\}"  # \mathrm{e}, \operatorname{e}, \rm{e}
    r"|\{\s*\\rm\s+e\s*\}"  # {\rm e}
    r"|\\(?:mathrm|operatorname|mathup)\s+e(?![A-Za-z])"  # \mathrm e (a one-token argument)
)


def rewrite_euler_e(ans: str) -> str:
    """``ans`` with every upright ``e`` (``\\mathrm{e}``, ``\\operatorname{e}``, ``{\\rm e}``) written as ``{e}``."""
    return _EULER_RE.sub("{e}", ans)


_WS_RE = re.compile(r"\s+")
_SPACING_RE = re.compile(r"\\[,;:! ]|\\q?quad(?![A-Za-z])")
# \left( ... \right) sizing only; \leftarrow and friends are different macros and must survive.
_SIZING_RE = re.compile(r"\\(?:left|right)(?![A-Za-z])")


def normalize_answer_string(ans: str) -> str:
    """A cheap canonical string for the exact-match fast path of the equivalence check.

    Only rewrites that can never change the mathematical value: whitespace and LaTeX spacing, ``\\dfrac``/``\\tfrac``
    to ``\\frac``, ``\\left``/``\\right`` sizing, upright ``e`` (:func:`rewrite_euler_e`), a trailing period, and the
    elements of a set literal sorted and deduplicated (a set has no order). Anything that does not match after this
    goes to ``math-verify``.
    """
    s = rewrite_euler_e(ans)
    s = _SPACING_RE.sub("", s)
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = _SIZING_RE.sub("", s)
    s = _WS_RE.sub("", s).rstrip(".")
    elements = set_literal_elements(s)
    if elements is not None and len(elements) > 1:
        s = "\\{" + ",".join(sorted(set(elements))) + "\\}"
    return s
