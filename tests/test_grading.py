"""The grader on real benchmark files and on hand-made cases.

Every reference solution of the real files in ``../shared/data/math/`` (GSM8K test, AIME 2024, Minerva
math), fed to the grader as if it were a model's answer, must be graded correct against the reference
answer for at least 99% of the rows of each file; AMC 2023 ships answers only, so its rows are fed as a
model would write them (``The answer is $\\boxed{27}$``) against the published float (``27.0``). The rows
that fail are printed with the reason. And the grader must say no: each solution against the next
row's answer is wrong unless the two answers are equal.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from src.modules.evaluation.grading import (
    canonical_answer,
    extract_answer,
    final_answer,
    grade,
    is_correct,
    reference_answer,
)

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "math"


def _amc_response(r: dict) -> str:
    a = r["answer"]
    return f"The answer is $\\boxed{{{int(a) if a == int(a) else a}}}$."


def _gsm8k_response(r: dict) -> str:
    """The reference solution as a model would end it: "The answer is N." instead of "#### N"."""
    steps, _, answer = r["answer"].rpartition("####")
    return f"{steps.strip()}\nThe answer is {answer.strip()}."


# file -> (model-style response, reference as the data set gives it)
CASES = {
    "gsm8k": lambda r: (_gsm8k_response(r), r["answer"]),
    "aime24": lambda r: (r["solution"], r["answer"]),
    "amc23": lambda r: (_amc_response(r), r["answer"]),
    # Minerva ships no separate answer: the reference is its solution's last box, given bare
    "minerva_math": lambda r: (r["solution"], reference_answer(r["solution"])),
}


def _rows(name: str) -> list[dict]:
    path = DATA / f"{name}.jsonl"
    if not path.exists():
        pytest.skip(f"{path} not present")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.mark.parametrize("name", sorted(CASES))
def test_reference_solutions_grade_correct_on_real_data(name):
    rows = _rows(name)
    failures = []
    for i, row in enumerate(rows):
        response, reference = CASES[name](row)
        ok, predicted = grade(response, str(reference))
        if not ok:
            failures.append(f"{name}.jsonl line {i + 1}: reference {reference_answer(str(reference))!r}, "
                            f"extracted {predicted!r}")
    print(f"{name}: {len(rows) - len(failures)}/{len(rows)} graded correct", *failures, sep="\n  ")
    assert len(rows) > 0
    assert len(failures) <= 0.01 * len(rows), "\n".join(failures)


@pytest.mark.parametrize("name", sorted(CASES))
def test_a_solution_is_wrong_against_another_rows_answer(name):
    rows = _rows(name)
    false_pos = []
    for i, row in enumerate(rows):
        response, own = CASES[name](row)
        _, other = CASES[name](rows[(i + 1) % len(rows)])
        if canonical_answer(reference_answer(str(own))) == canonical_answer(reference_answer(str(other))):
            continue  # the neighbours share their answer
        if is_correct(response, str(other)):
            false_pos.append(f"line {i + 1}: {reference_answer(str(own))!r} accepted for {reference_answer(str(other))!r}")
    assert not false_pos, "\n".join(false_pos)


@pytest.mark.parametrize("response,reference,expected", [
    ("so she earns $18.", "18", True),                      # no marker: the last number
    ("The answer is 18 dollars.", "18", True),              # a unit after the number
    ("Janet makes 9 * 2 = 18.\n#### 18", "18", True),        # GSM8K convention
    ("#### 1,000", "1000", True),
    ("\\boxed{\\frac{1}{2}}", "0.5", True),
    ("\\boxed{\\dfrac12}", "\\frac{1}{2}", True),
    ("\\boxed{(1,2]}", "(1, 2]", True),                     # interval
    ("\\boxed{(1,2)}", "(1, 2]", False),
    ("\\boxed{\\{1,2\\}}", "\\{2,1\\}", True),               # set
    ("\\boxed{50\\%}", "50", True),
    ("\\boxed{x=3}", "3", True),
    ("\\boxed{\\sqrt{2}/2}", "\\frac{\\sqrt2}{2}", True),
    ("\\boxed{\\textbf{(073)}}", "073", True),              # AoPS style
    ("\\boxed{B}", "B", True),
    ("\\boxed{C}", "B", False),
    ("The answer is (B).", "B", True),
    ("\\boxed{3}", "4", False),
    ("2+2 is \\boxed{4}, not \\boxed{5}", "4", False),      # the last box counts
    ("", "4", False),
    ("I don't know", "4", False),
    ("\\boxed{", "4", False),                               # unbalanced: no answer, no crash
    ("\\boxed{3.0000001}", "3", True),                      # numeric tolerance
    ("\\boxed{3.01}", "3", False),
    ("\\boxed{2i}", "2", False),                            # a letter stuck to a number is no unit
    ("\\boxed{3 pi}", "3", False),
    ("\\boxed{1, 234}", "1234", False),                     # a list, not a thousands separator
    ("Answer: 5. Then 3 more apples", "5", True),           # the answer ends with its clause
    ("Answer: 5. Then 3 more apples", "3", False),
    ("The answer is 5, since 2+3=5 and not 4", "5", True),
    ("Final Answer: The final answer is $5$. I hope it is correct.", "5", True),
    ("\\boxed{" + "9" * 400 + "}", "9", False),              # overflows a float: no crash
    ("4+7=11 c1\n#### 1161", "1161", True),                  # the miniature's format
    ("4+7=11 c1\n0+5+1=6 c0", "1161", False),                # truncated before its answer
])
def test_hand_made_cases(response, reference, expected):
    assert is_correct(response, reference) is expected


def test_reference_forms():
    assert reference_answer("Janet sells 9 eggs.\n#### 18") == "18"
    assert reference_answer("so $s=\\boxed{1.6}$ cm") == "1.6"
    assert reference_answer("27.0") == "27.0"
    assert extract_answer("no answer here") is None
    assert canonical_answer("1,000") == canonical_answer("1000.0") == "1000"
    assert final_answer("so $180 + 24 = 204$.") == "204"
    assert final_answer("\\boxed{\\dfrac{1}{2}}") == final_answer("\\boxed{\\frac{1}{2}}")
    assert final_answer("The answer is 18 dollars.") == final_answer("\\boxed{18}") == "18"  # one vote
    assert final_answer("1" * 400) is not None  # a degenerate sample votes, it does not crash the eval


def test_grading_in_a_worker_thread_does_not_raise():
    """math-verify's signal.alarm timeouts raise outside the main thread; ours switch them off there."""
    results = []
    t = threading.Thread(target=lambda: results.append(
        (is_correct("\\boxed{\\frac{1}{2}}", "0.5"), is_correct("so $x = \\sqrt{4}$", "2"))))
    t.start()
    t.join()
    assert results == [(True, True)]
