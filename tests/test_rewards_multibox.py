"""Answers with several boxes, the math-verify pin, and upright ``e``.

math-verify is the independent oracle: where a table says two answers are (not) the same, the test also asks
math-verify itself, on the strings the extraction produced, so that the chosen set representation is pinned to what
the installed math-verify really compares as a set. The expected columns are written by hand.
"""

import logging
import re
from importlib.metadata import version
from pathlib import Path

import pytest
import sympy
from math_verify import parse, verify

from megatron_offgrpo.rewards import (
    MIXED,
    EquivalenceChecker,
    LabelConfig,
    extract_final_answer,
    final_answer_elements,
    label_group,
    normalize_answer_string,
    rewrite_euler_e,
    set_literal_elements,
)

logging.getLogger("math_verify").setLevel(logging.ERROR)

REPO = Path(__file__).resolve().parents[1]


def _mv(answer: str):
    return parse("\\boxed{" + answer + "}", parsing_timeout=None)


def _oracle(gold: str, target: str) -> bool:
    """math-verify alone, on the raw strings (no fast path, no rewriting)."""
    return bool(verify(_mv(gold), _mv(target), timeout_seconds=None))


# --- which boxes are the final answer -------------------------------------------------------------------------

RUN_CASES = [
    # (response, expected answer) -- boxes chained by connective text form one answer
    ("so x = \\boxed{2} and x = \\boxed{-3}.", "\\{2, -3\\}"),
    ("$\\boxed{2}$, $\\boxed{-3}$", "\\{2, -3\\}"),
    ("The roots are \\boxed{2} or \\boxed{-3}", "\\{2, -3\\}"),
    ("\\[\\boxed{(1,2)} \\quad \\text{and} \\quad \\boxed{(3,4)}\\]", "\\{(1,2), (3,4)\\}"),
    ("\\(x=\\boxed{2}\\) \\text{ or } \\(x=\\boxed{-3}\\)", "\\{2, -3\\}"),
    ("\\begin{aligned} x &= \\boxed{2} \\\\ x &= \\boxed{-3} \\end{aligned}", "\\{2, -3\\}"),
    ("**\\boxed{2}** and **\\boxed{-3}**", "\\{2, -3\\}"),
    ("\\boxed{2};\n\\boxed{-3}", "\\{2, -3\\}"),  # a single line break is not a paragraph break
    ("\\boxed{1}, \\boxed{2}, \\qquad \\boxed{3}", "\\{1, 2, 3\\}"),
    ("<think>\\boxed{1} and \\boxed{7}</think> Answer: \\boxed{2} and \\boxed{-3}", "\\{2, -3\\}"),
    # ... anything else ends the run: only the boxes after it count
    ("we get \\boxed{4} ... the answer is \\boxed{5}", "5"),
    ("we get \\boxed{4}. \\boxed{5}", "5"),  # a period
    ("we get \\boxed{4}\n\n\\boxed{5}", "5"),  # a blank line (paragraph break)
    ("\\boxed{4} then \\boxed{5}", "5"),
    ("\\boxed{4} \\text{so} \\boxed{5}", "5"),
    ("\\boxed{4} + \\boxed{5}", "5"),
    ("\\boxed{4} band \\boxed{5}", "5"),  # `and` only as a word
    ("\\boxed{1} so \\boxed{2} and \\boxed{3}", "\\{2, 3\\}"),
    # duplicates collapse; empty boxes are dropped
    ("\\boxed{5} and \\boxed{5}", "5"),
    ("\\boxed{\\frac{1}{2}}, \\boxed{\\dfrac{1}{2}}", "\\frac{1}{2}"),
    ("\\boxed{5}, \\boxed{5}, \\boxed{6}", "\\{5, 6\\}"),
    ("the answer is \\boxed{5}.\n\n**Final Answer**\n\\boxed{5}", "5"),
    ("\\boxed{2} \\text{ or } \\boxed{}", "2"),
    ("\\boxed{} and \\boxed{}", None),
    # assignment names: kept only for two or more different unknowns
    ("x = \\boxed{2}, y = \\boxed{3}", "\\{x=2, y=3\\}"),
    ("\\alpha = \\boxed{1}, \\beta = \\boxed{2}", "\\{\\alpha=1, \\beta=2\\}"),
    ("x_1 = \\boxed{2}, x_{2} = \\boxed{-3}", "\\{2, -3\\}"),
    ("x = \\boxed{2}, y = \\boxed{2}", "\\{x=2, y=2\\}"),
    ("max = \\boxed{3} and \\boxed{4}", "\\{3, 4\\}"),  # `x` of `max` is no name
    ("x = \\boxed{2}", "2"),  # one box: its content, as before
]


@pytest.mark.parametrize("text,expected", RUN_CASES)
def test_final_answer_run(text, expected):
    assert extract_final_answer(text) == expected


def test_final_answer_elements_order_and_dedup():
    assert final_answer_elements("\\boxed{-3}, \\boxed{2} and \\boxed{-3}") == ["-3", "2"]
    assert final_answer_elements("nothing boxed") == []


# --- the set-valued answer under math-verify ------------------------------------------------------------------

MULTIBOX_PAIRS = [
    # (response a, response b, same answer?)
    ("\\boxed{2} and \\boxed{-3}", "\\boxed{-3}, \\boxed{2}", True),
    ("\\boxed{2} and \\boxed{-3}", "x = \\boxed{-3} or x = \\boxed{2}", True),
    ("\\boxed{2} and \\boxed{-3}", "\\boxed{2, -3}", True),  # one box holding the list
    ("\\boxed{2} and \\boxed{-3}", "\\boxed{\\{-3, 2\\}}", True),
    ("\\boxed{2} and \\boxed{-3}", "\\boxed{2}", False),  # a partial answer
    ("\\boxed{2} and \\boxed{-3}", "\\boxed{-3}", False),
    ("\\boxed{2} and \\boxed{-3}", "\\boxed{2} and \\boxed{3}", False),
    ("\\boxed{2} and \\boxed{-3}", "\\boxed{2}, \\boxed{-3}, \\boxed{5}", False),
    ("\\boxed{\\frac{1}{2}} or \\boxed{-\\frac{1}{3}}", "\\boxed{-\\frac13} or \\boxed{0.5}", True),
    ("\\boxed{(1,2)} and \\boxed{(3,4)}", "\\boxed{(3,4)}, \\boxed{(1,2)}", True),
    ("\\boxed{(1,2)} and \\boxed{(3,4)}", "\\boxed{(2,1)}, \\boxed{(3,4)}", False),
    ("x = \\boxed{2}, y = \\boxed{3}", "y = \\boxed{3}, x = \\boxed{2}", True),
    ("x = \\boxed{2}, y = \\boxed{3}", "x = \\boxed{3}, y = \\boxed{2}", False),  # the swapped solution
    ("x_1 = \\boxed{2}, x_2 = \\boxed{-3}", "x_1 = \\boxed{-3}, x_2 = \\boxed{2}", True),  # roots, any index
]


@pytest.mark.parametrize("a,b,expected", MULTIBOX_PAIRS)
def test_multibox_answers_compare_as_sets(a, b, expected):
    ea, eb = extract_final_answer(a), extract_final_answer(b)
    assert ea is not None and eb is not None
    # The oracle: math-verify itself on the extracted strings, both ways round.
    assert _oracle(ea, eb) is expected and _oracle(eb, ea) is expected, (ea, eb)
    checker = EquivalenceChecker(timeout_s=10)
    assert checker.equivalent(ea, eb) is expected and checker.equivalent(eb, ea) is expected
    assert checker.counters.parse_errors == checker.counters.parse_timeouts == 0


REFERENCE_CASES = [
    # (ground truth, response, reward)
    ("(2, -3)", "\\boxed{2} and \\boxed{-3}", True),
    ("2, -3", "\\boxed{2} and \\boxed{-3}", True),
    ("-3, 2", "\\boxed{2} and \\boxed{-3}", True),
    ("\\{2,-3\\}", "\\boxed{2} and \\boxed{-3}", True),
    ("\\{-3, 2\\}", "\\boxed{2} and \\boxed{-3}", True),
    ("x = 2 \\text{ or } x = -3", "\\boxed{-3} or \\boxed{2}", True),
    ("2, -3", "\\boxed{-3} or \\boxed{2}", True),
    ("2, -3", "\\boxed{2}", False),
    ("\\{2,-3\\}", "\\boxed{2}", False),
    ("2, -3", "\\boxed{2}, \\boxed{3}", False),
    # An ordered gold compares the set element by element in the written order (math-verify's rule for a set
    # against a tuple): that is why the elements keep the order of appearance rather than a sorted one.
    ("(2, -3)", "\\boxed{-3} and \\boxed{2}", False),
    ("(2, 3)", "x = \\boxed{2}, y = \\boxed{3}", True),
    ("(2, 3)", "y = \\boxed{3}, x = \\boxed{2}", False),
]


@pytest.mark.parametrize("reference,response,expected", REFERENCE_CASES)
def test_reference_side(reference, response, expected):
    answer = extract_final_answer(response)
    assert _oracle(reference, answer) is expected  # gold first: math-verify's verify is not symmetric
    assert EquivalenceChecker(timeout_s=10).equivalent(reference, answer) is expected
    out = label_group([response], reference, LabelConfig(label_source="reference"))
    assert out.rewards == [float(expected)]


def _resp(body: str) -> str:
    return f"<think>solve the quadratic, maybe \\boxed{{7}}</think> The solutions are {body}."


def test_vote_runs_on_the_combined_answer():
    responses = [
        _resp("\\boxed{2} and \\boxed{-3}"),
        _resp("\\boxed{-3}, \\boxed{2}"),
        _resp("$x = \\boxed{2}$ or $x = \\boxed{-3}$"),
        _resp("\\boxed{2}"),  # partial: must not agree
        _resp("\\boxed{-3}"),
    ]
    out = label_group(responses, reference="(2, -3)", config=LabelConfig(min_agreement=0.5))
    assert out.answers[:3] == ["\\{2, -3\\}", "\\{-3, 2\\}", "\\{2, -3\\}"]
    assert out.label == "\\{2, -3\\}" and out.reject_reason is None
    assert out.rewards == [1.0, 1.0, 1.0, 0.0, 0.0]
    assert out.stats.num_distinct == 3 and out.stats.group_type == MIXED
    assert out.stats.agreement == pytest.approx(0.6)
    assert out.reference_match is True


# --- set literals: the fast path and math-verify's partial reads ----------------------------------------------

@pytest.mark.parametrize("answer,elements", [
    ("\\{2, -3\\}", ["2", "-3"]),
    ("\\left\\{ 2, -3 \\right\\}", ["2", "-3"]),
    ("\\{(1,2], [3,4)\\}", ["(1,2]", "[3,4)"]),
    ("\\{a\\,b, c\\}", ["a\\,b", "c"]),  # \, is a thin space, not a separator
    ("\\{\\{1,2\\}, 3\\}", ["\\{1,2\\}", "3"]),
    ("\\{\\frac{1}{2}, x^{2,3}\\}", ["\\frac{1}{2}", "x^{2,3}"]),
    ("\\{\\}", []),
    ("\\{1\\} \\cup \\{2\\}", None),
    ("(1, 2)", None),
    ("2, -3", None),
])
def test_set_literal_elements(answer, elements):
    assert set_literal_elements(answer) == elements


def test_set_literal_fast_path_is_order_free():
    assert normalize_answer_string("\\{2, -3\\}") == normalize_answer_string("\\left\\{-3,2\\right\\}")
    assert normalize_answer_string("\\{2, -3\\}") != normalize_answer_string("\\{2, 3\\}")
    assert normalize_answer_string("(2, -3)") != normalize_answer_string("(-3, 2)")  # a tuple keeps its order


def test_partial_set_read_is_not_equivalence():
    # math-verify alone reads both text-valued sets as the bare string "\{", so it calls them equal ...
    assert _oracle("\\{\\text{A}, \\text{B}\\}", "\\{\\text{C}, \\text{D}\\}")
    assert _oracle("\\{\\text{Yes}, 3, 4\\}", "4")
    # ... the checker refuses a partial read of a set literal and leaves such answers to the fast path.
    checker = EquivalenceChecker(timeout_s=10)
    assert not checker.equivalent("\\{\\text{A}, \\text{B}\\}", "\\{\\text{C}, \\text{D}\\}")
    assert not checker.equivalent("\\{\\text{Yes}, 3, 4\\}", "4")
    assert checker.counters.parse_errors >= 2
    assert checker.equivalent("\\{\\text{A}, \\text{B}\\}", "\\{\\text{B}, \\text{A}\\}")  # fast path
    # A whole read with more members than written elements is fine (\pm).
    assert checker.equivalent("\\{\\pm 1, 2\\}", "\\{-1, 1, 2\\}")
    assert checker.equivalent("\\{2, 2\\}", "2")


# --- the math-verify pin ---------------------------------------------------------------------------------------

def test_math_verify_version_is_the_pinned_one():
    setup_py = (REPO / "setup.py").read_text()
    pins = re.findall(r'"math-verify\[([^\]]*)\]==([^";\s]+)"', setup_py)
    assert len(pins) == 1, "setup.py must pin math-verify exactly: a release can change every reward"
    extras, pinned = pins[0]
    assert "antlr4_13_2" in extras
    assert version("math-verify") == pinned, (
        f"installed math-verify {version('math-verify')} != pinned {pinned}: re-run tests/test_rewards*.py against "
        "the new release before moving the pin"
    )


# --- upright e is Euler's number ------------------------------------------------------------------------------

EULER_CASES = [
    # (answer with upright e, plain form, equivalent?)
    ("\\mathrm{e}^{2}", "e^2", True),
    ("2\\mathrm{e}", "2e", True),
    ("\\operatorname{e}", "e", True),
    ("\\operatorname{e}^{x}", "e^{x}", True),
    ("{\\rm e}^2", "e^2", True),
    ("\\mathrm e^{2}", "e^2", True),
    ("\\frac{1}{\\mathrm{e}}", "e^{-1}", True),
    ("\\ln(\\mathrm{e})", "1", True),
    ("3\\cdot\\mathrm{e}", "3e", True),
    ("\\mathrm{e}", "2.718281828", True),
    ("\\mathrm{e}^{2}", "e^3", False),
    ("2\\mathrm{e}", "2", False),
]


@pytest.mark.parametrize("upright,plain,expected", EULER_CASES)
def test_upright_e_is_euler(upright, plain, expected):
    checker = EquivalenceChecker(timeout_s=10)
    assert checker.equivalent(plain, upright) is expected and checker.equivalent(upright, plain) is expected
    # The oracle: math-verify on the rewritten string agrees with math-verify on the plain form.
    assert _oracle(plain, rewrite_euler_e(upright)) is expected


def test_upright_e_defect_and_value():
    # Without the rewrite math-verify reads \mathrm{e} as a symbol named e (the defect) ...
    assert not _oracle("e^2", "\\mathrm{e}^{2}")
    # ... with it, the value is sympy's E.
    parsed = _mv(rewrite_euler_e("\\mathrm{e}^{2}"))[0]
    assert sympy.simplify(parsed - sympy.E ** 2) == 0


@pytest.mark.parametrize("text", [
    "\\mathrm{exp}(2)", "\\mathrm{el}", "\\mathrm{ex}", "\\operatorname{exp}(x)", "\\mathbf{e}_1", "\\mathrm{E}",
    "\\text{e}", "e^{2}", "\\mathrm exp",
])
def test_upright_e_rewrite_leaves_other_words(text):
    assert rewrite_euler_e(text) == text


def test_upright_e_through_the_vote():
    responses = [f"The value is \\boxed{{{a}}}." for a in ("\\mathrm{e}^{2}", "e^2", "\\operatorname{e}^{2}", "e^3")]
    out = label_group(responses, reference="e^{2}", config=LabelConfig())
    assert out.rewards == [1.0, 1.0, 1.0, 0.0] and out.reference_match is True
    assert not EquivalenceChecker(timeout_s=10).equivalent("\\mathrm{el}", "e")
