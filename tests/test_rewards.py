"""Answer extraction, equivalence, majority voting and group statistics against hand-built tables of real LaTeX.

The equivalence oracle for the table is mathematics itself (the expected column is written by hand); math-verify is
the library under it, so these also pin which cases the fast path must leave to it.
"""

import threading
import time

import pytest

from megatron_offgrpo.rewards import (
    ALL_NEGATIVE,
    ALL_POSITIVE,
    MIXED,
    EquivalenceChecker,
    LabelConfig,
    extract_final_answer,
    group_type,
    label_group,
    label_groups,
    majority_vote,
    normalize_answer_string,
)

EXTRACTION_CASES = [
    # (text, expected answer)
    ("So the answer is \\boxed{42}.", "42"),
    ("\\boxed{\\frac{1}{\\sqrt{2}}}", "\\frac{1}{\\sqrt{2}}"),
    ("nested \\boxed{\\left\\{1, 2\\right\\}} set", "\\left\\{1, 2\\right\\}"),
    ("escaped braces \\boxed{\\{1,2\\}}", "\\{1,2\\}"),
    ("first \\boxed{1} then \\boxed{2}", "2"),  # several boxes: the last one
    ("<think>maybe \\boxed{3}</think> Final: \\boxed{4}", "4"),
    ("<think>I think \\boxed{3}</think> so the answer is four.", None),  # box only inside the thinking
    ("no think tag, answer \\fbox{7}", "7"),
    ("\\boxed{\\boxed{5}}", "5"),
    ("$\\boxed{x^{2}+1}$", "x^{2}+1"),
    ("The answer is \\boxed{\\text{Yes}}", "\\text{Yes}"),
    ("\\boxed 9 is it", "9"),
    ("interval \\boxed{(-\\infty, 3]}", "(-\\infty, 3]"),
    ("no answer at all", None),
    ("empty \\boxed{}", None),
    ("truncated \\boxed{\\frac{1}{2", None),
    ("ok \\boxed{1} then truncated \\boxed{\\frac{1}{2", "1"),
    ("\\boxedfoo{3}", None),
]


@pytest.mark.parametrize("text,expected", EXTRACTION_CASES)
def test_extract_final_answer(text, expected):
    assert extract_final_answer(text) == expected


EQUIVALENCE_CASES = [
    ("\\frac{1}{2}", "0.5", True),
    ("\\dfrac{3}{4}", "\\frac{3}{4}", True),
    ("\\tfrac{3}{4}", "0.75", True),
    ("2\\sqrt{2}", "\\sqrt{8}", True),
    ("\\frac{11}{12}", "11/12", True),
    ("(1, 2]", "(1,2]", True),
    ("[1, 2)", "(1, 2]", False),
    ("\\{1,2\\}", "\\{2,1\\}", True),
    ("\\text{Yes}", "Yes", True),
    ("x = 3", "3", True),
    ("10\\%", "0.1", True),
    ("3", "4", False),
    ("\\frac{1}{2}", "\\frac{1}{3}", False),
    ("\\pi", "3.14159", False),
    ("2\\sqrt{2}", "2\\sqrt{3}", False),
]


@pytest.mark.parametrize("gold,target,expected", EQUIVALENCE_CASES)
def test_equivalence_table(gold, target, expected):
    checker = EquivalenceChecker(timeout_s=10)
    assert checker.equivalent(gold, target) is expected
    assert checker.counters.parse_timeouts == checker.counters.verify_timeouts == 0


def test_none_is_never_equivalent():
    checker = EquivalenceChecker()
    assert not checker.equivalent(None, None)
    assert not checker.equivalent("1", None)
    assert checker.counters.pairs == 0


def test_fast_path_skips_math_verify():
    calls = []

    def parse(a):
        calls.append(a)
        return [a]

    checker = EquivalenceChecker(parse_fn=parse, verify_fn=lambda g, t: False)
    assert checker.equivalent("\\dfrac{1}{2}", "\\frac{1}{2}")
    assert checker.equivalent("\\left( 1,2 \\right)", "(1,2)")
    assert calls == [] and checker.counters.fast_path == 2
    # \leftarrow is not sizing: must not normalise to "arrow"
    assert normalize_answer_string("\\leftarrow") != normalize_answer_string("arrow")


def test_verify_timeout_is_counted_not_fatal():
    def slow_verify(g, t):
        time.sleep(5)
        return True

    checker = EquivalenceChecker(timeout_s=0.05, parse_fn=lambda a: [a], verify_fn=slow_verify)
    t0 = time.time()
    assert checker.equivalent("1", "2") is False
    assert time.time() - t0 < 2
    assert checker.counters.verify_timeouts == 1


def test_parse_timeout_and_errors_counted():
    def slow_parse(a):
        time.sleep(5)

    checker = EquivalenceChecker(timeout_s=0.05, parse_fn=slow_parse)
    assert checker.equivalent("1", "2") is False
    assert checker.counters.parse_timeouts >= 1

    def bad_verify(g, t):
        raise ValueError("boom")

    checker = EquivalenceChecker(parse_fn=lambda a: [a], verify_fn=bad_verify)
    assert checker.equivalent("1", "2") is False
    assert checker.counters.verify_errors == 1


def test_timeout_outside_main_thread_raises_not_silent_zero():
    errors = []

    def run():
        try:
            EquivalenceChecker(timeout_s=1).equivalent("\\frac{1}{2}", "0.5")
        except RuntimeError as e:
            errors.append(str(e))

    t = threading.Thread(target=run)
    t.start()
    t.join()
    assert len(errors) == 1 and "main thread" in errors[0]


def test_majority_vote_clusters_equivalent_forms():
    answers = ["0.5", "\\frac{1}{2}", "3", None, "\\dfrac{1}{2}", "3"]
    vote = majority_vote(answers, EquivalenceChecker(), min_agreement=0.5)
    assert vote.label == "0.5" and vote.label_index == 0
    assert vote.cluster_of == [0, 0, 1, -1, 0, 1]
    assert vote.rewards == [1.0, 1.0, 0.0, 0.0, 1.0, 0.0]
    assert vote.agreement == pytest.approx(3 / 6)
    assert vote.accepted and vote.num_distinct == 2


def test_majority_tie_goes_to_first_cluster():
    vote = majority_vote(["7", "8", "8", "7"], EquivalenceChecker())
    assert vote.label == "7" and vote.rewards == [1.0, 0.0, 0.0, 1.0]
    vote = majority_vote([None, "8", "7", "7", "8"], EquivalenceChecker())
    assert vote.label == "8"


def test_none_never_wins_and_min_agreement():
    vote = majority_vote([None, None, None, "5"], EquivalenceChecker(), min_agreement=0.5)
    assert vote.label == "5" and vote.agreement == 0.25 and not vote.accepted
    vote = majority_vote([None, None], EquivalenceChecker())
    assert vote.label is None and not vote.accepted and vote.rewards == [0.0, 0.0]
    vote = majority_vote(["1", "1", "2", "3"], EquivalenceChecker(), min_agreement=0.5)
    assert vote.accepted  # exactly 0.5 is enough
    vote = majority_vote(["1", "1", "2", "3"], EquivalenceChecker(), min_agreement=0.6)
    assert not vote.accepted


def test_group_type_table():
    assert group_type([1, 1, 1]) == ALL_POSITIVE
    assert group_type([1, 0, 1]) == MIXED
    assert group_type([0, 0]) == ALL_NEGATIVE
    assert group_type([]) == ALL_NEGATIVE


def _resp(ans):
    return f"<think>compute...</think> The result is \\boxed{{{ans}}}." if ans is not None else "I give up."


def test_label_group_vote_and_reference_accuracy():
    responses = [_resp(a) for a in ["\\frac{1}{2}", "0.5", "1/2", "2", None]]
    out = label_group(responses, reference="\\dfrac{1}{2}", config=LabelConfig())
    assert out.label == "\\frac{1}{2}" and out.reject_reason is None
    assert out.rewards == [1.0, 1.0, 1.0, 0.0, 0.0]
    assert out.reference_match is True
    s = out.stats
    assert (s.k, s.num_distinct, s.num_no_answer, s.group_type) == (5, 2, 1, MIXED)
    assert s.fraction_positive == pytest.approx(0.6) and s.agreement == pytest.approx(0.6)

    out = label_group([_resp("3")] * 4, reference="4", config=LabelConfig())
    assert out.stats.all_positive and out.reference_match is False

    out = label_group([_resp("3"), _resp("4")] * 2, reference="4", config=LabelConfig(label_source="reference"))
    assert out.rewards == [0.0, 1.0, 0.0, 1.0] and out.label == "4"

    assert label_group([_resp(None)] * 3, None, LabelConfig()).reject_reason == "no_answer"
    assert label_group([_resp(i) for i in range(4)], None, LabelConfig()).reject_reason == "low_agreement"
    assert label_group([_resp(1)], None, LabelConfig(label_source="reference")).reject_reason == "missing_reference"


def test_process_workers_match_serial():
    items = [([_resp(a) for a in ans], None) for ans in (["1", "1", "2"], ["\\frac{1}{2}", "0.5", "3"], ["x", "y", "y"])]
    serial = [(o.rewards, o.label) for o in label_groups(items, LabelConfig(), workers=1)]
    parallel = [(o.rewards, o.label) for o in label_groups(items, LabelConfig(), workers=2, chunksize=1)]
    assert serial == parallel
    assert serial[1] == ([1.0, 1.0, 0.0], "\\frac{1}{2}")
