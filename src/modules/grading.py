"""Answer extraction and grading.

``is_correct(response, reference)`` takes a model's full output and a reference answer as a data set
gives it. The final answer is taken, in order of preference, from the last ``\\boxed{...}``, a GSM8K
``#### N`` line, or an ``Answer: ...`` line; references are read the same way (a bare value is its own
answer). Numbers compare with a relative tolerance; anything else goes to ``math-verify`` when it is
installed (LaTeX fractions, intervals, sets), else to a normalised string match.
"""

from __future__ import annotations

import logging
import re

# math-verify warns on every call that its timeouts are off; they are off on purpose (see answers_match)
for _name in ("math_verify.parser", "math_verify.grader"):
    logging.getLogger(_name).setLevel(logging.ERROR)

_NUM = re.compile(r"^[-+]?(\d{1,3}(,\d{3})+|\d+)?(\.\d+)?$")


def _last_boxed(text: str) -> str | None:
    start = text.rfind("\\boxed")
    if start < 0:
        return None
    i = text.find("{", start)
    if i < 0:
        return None
    depth = 0
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i + 1 : j]
    return None


def extract_answer(text: str) -> str | None:
    """The final answer written in ``text``, or None if it states none."""
    boxed = _last_boxed(text)
    if boxed is not None:
        return boxed.strip()
    m = re.findall(r"####\s*([^\n]+)", text)
    if m:
        return m[-1].strip()
    m = re.findall(r"(?i)answer\s*(?:is|:)\s*([^\n]+)", text)
    if m:
        return m[-1].strip().rstrip(".")
    return None


def _as_number(s: str) -> float | None:
    s = s.strip().strip("$").replace(" ", "").rstrip(".")
    if s and _NUM.match(s) and any(c.isdigit() for c in s):
        return float(s.replace(",", ""))
    return None


def answers_match(predicted: str, reference: str, rel_tol: float = 1e-6) -> bool:
    a, b = _as_number(predicted), _as_number(reference)
    if a is not None and b is not None:
        return abs(a - b) <= rel_tol * max(1.0, abs(b))
    try:
        from math_verify import parse, verify

        # timeouts off: math-verify's timeouts use signal.alarm, which raises outside the main thread
        gold = parse(f"${reference}$", parsing_timeout=None)
        pred = parse(f"${predicted}$", parsing_timeout=None)
        if gold and pred:
            return bool(verify(gold, pred, timeout_seconds=None))
    except ImportError:
        pass
    norm = lambda s: re.sub(r"\s+", "", s).strip("$.").lower()  # noqa: E731
    return norm(predicted) == norm(reference)


def is_correct(response: str, reference: str) -> bool:
    """Whether the final answer in ``response`` equals ``reference``."""
    predicted = extract_answer(response)
    if predicted is None:
        return False
    ref = extract_answer(reference)
    return answers_match(predicted, ref if ref is not None else reference)
