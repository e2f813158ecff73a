"""Final-answer extraction from a teacher solution (DESIGN 2).

The answer of a trajectory is the content of the *last* top-level ``\\boxed{...}`` (or ``\\fbox{...}``) in the
final solution part, i.e. after the last closing ``</think>`` when the trajectory has one. Braces are matched with
a balanced scan (escaped ``\\{``/``\\}`` do not count), so nested LaTeX such as ``\\boxed{\\frac{1}{\\sqrt{2}}}``
is returned whole. A trajectory without a complete box has no answer (``None``): the vote never counts it.
"""

from __future__ import annotations

import re
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


def extract_final_answer(text: str) -> Optional[str]:
    """The trajectory's final answer (content of the last box of the final part), or ``None``.

    Empty boxes (``\\boxed{}``) count as no answer.
    """
    spans = boxed_spans(final_solution_part(text))
    if not spans:
        return None
    ans = _unwrap(spans[-1][2])
    return ans if ans else None


_WS_RE = re.compile(r"\s+")
_SPACING_RE = re.compile(r"\\[,;:! ]|\\q?quad(?![A-Za-z])")
# \left( ... \right) sizing only; \leftarrow and friends are different macros and must survive.
_SIZING_RE = re.compile(r"\\(?:left|right)(?![A-Za-z])")


def normalize_answer_string(ans: str) -> str:
    """A cheap canonical string for the exact-match fast path of the equivalence check.

    Only rewrites that can never change the mathematical value: whitespace and LaTeX spacing, ``\\dfrac``/``\\tfrac``
    to ``\\frac``, ``\\left``/``\\right`` sizing, and a trailing period. Anything that does not match after this goes
    to ``math-verify``.
    """
    s = _SPACING_RE.sub("", ans)
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = _SIZING_RE.sub("", s)
    s = _WS_RE.sub("", s)
    return s.rstrip(".")
