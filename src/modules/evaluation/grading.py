"""Answer extraction and grading, built on ``math-verify``.

``is_correct(response, reference)`` takes a model's full output and a reference answer as a data set
gives it (a bare value, a GSM8K answer ending in ``#### N``, or a full solution with a ``\\boxed{}``).

The final answer of a response is, in order of preference:
    1. the last ``\\boxed{...}`` (``\\fbox`` too), with ``\\textbf`` / ``\\mathbf`` / ``\\text`` wrappers
       and AoPS-style parentheses removed: ``\\boxed{\\textbf{(073)}}`` -> ``073``;
    2. the last GSM8K ``#### N`` line;
    3. the last ``The answer is ...`` / ``Answer: ...``;
    4. otherwise the right-hand side of the last math span (``$180 + 24 = 204$`` -> ``204``), else the
       last number (regular expressions only: an unmarked response is often a garbled one, and math-verify
       can spend seconds on garbage).
References are read the same way, except that a reference with no marker is its own answer.

Comparison: two numbers (thousands separators, ``$``, ``%`` and trailing ``.0`` allowed) agree within a
relative tolerance of 1e-6; anything else is compared symbolically by ``math-verify`` (LaTeX fractions,
radicals, intervals, sets, equations), falling back to a normalised string match.

Timeouts: math-verify bounds parsing and verification with ``signal.alarm``, which only works in the main
thread of the main interpreter and raises elsewhere. The timeouts are used in the main thread and turned
off in any other (a dataloader or reward worker thread), so grading never raises for its thread.
"""

from __future__ import annotations

import logging
import math
import re
import threading

# math-verify logs a warning for every expression it cannot parse or that times out; a wrong answer is
# not an event worth a log line
for _name in ("math_verify", "math_verify.parser", "math_verify.grader", "latex2sympy2_extended"):
    logging.getLogger(_name).setLevel(logging.CRITICAL)

PARSE_TIMEOUT_S = 3
VERIFY_TIMEOUT_S = 5
REL_TOL = 1e-6

_NUM = re.compile(r"^[-+]?(\d{1,3}(,\d{3})+|\d+)?(\.\d+)?$")
_WRAPPERS = re.compile(r"\\(?:textbf|mathbf|mathrm|text|bf|displaystyle)\s*")


def _braced(text: str, i: int) -> tuple[str, int] | None:
    """The content of the brace group opening at ``text[i] == '{'`` and the index after it."""
    depth = 0
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i + 1 : j], j + 1
    return None


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` or ``\\fbox{...}`` in ``text`` (nested braces kept)."""
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    i = start + (6 if text.startswith("\\boxed", start) else 5)
    while i < len(text) and text[i] == " ":
        i += 1
    if i < len(text) and text[i] == "{":
        group = _braced(text, i)
        return group[0] if group else None
    m = re.match(r"\s*([^\s$]+)", text[i:])  # \boxed 5
    return m.group(1) if m else None


def _unwrap(ans: str) -> str:
    """``\\textbf{(113) }`` -> ``113``: formatting wrappers and AoPS choice parentheses off."""
    ans = ans.strip()
    for _ in range(3):
        m = _WRAPPERS.match(ans)
        if not m or not ans[m.end() :].startswith("{"):
            break
        group = _braced(ans, m.end())
        if group is None or group[1] != len(ans):
            break
        ans = group[0].strip()
    m = re.fullmatch(r"\(\s*([-+]?[\d.,]+)\s*\)", ans)
    return (m.group(1) if m else ans).strip()


_ANSWER_MARKER = re.compile(r"(?i)(?:the (?:final )?answer is|answer\s*:)\s*:?\s*")
_CLAUSE_END = re.compile(r"[.;]\s|,\s(?=[A-Za-z]{3,}\b)|\s(?:since|because|so|but)\s")


def extract_answer(text: str) -> str | None:
    """The final answer a response states by a marker (boxed, ``####``, "the answer is"), or None."""
    boxed = last_boxed(text)
    if boxed is not None:
        return _unwrap(boxed)
    m = re.findall(r"####\s*([^\n]+)", text)
    if m:
        return m[-1].strip()
    markers = list(_ANSWER_MARKER.finditer(text))
    if markers:  # the last marker; its answer ends with the line or the first clause ("5. Then ...")
        rest = text[markers[-1].end():].split("\n", 1)[0].strip()
        rest = _CLAUSE_END.split(rest, 1)[0].strip().rstrip(".").strip()
        return rest or None
    return None


def reference_answer(reference: str) -> str:
    """The answer inside a data set's reference: after ``####``, in the last box, or the value itself."""
    reference = str(reference)
    ans = extract_answer(reference) if ("####" in reference or "\\boxed" in reference or "\\fbox" in reference) else None
    return (ans if ans is not None else reference).strip()


def as_number(s: str) -> float | None:
    """``"1,234"``, ``"$18"``, ``"18.0"``, ``"50%"`` -> float; None for anything that is not a plain number."""
    s = s.strip().strip("$").strip()
    s = re.sub(r"^\\\$", "", s).replace("\\%", "%").rstrip("%").strip().rstrip(".")
    if s and _NUM.match(s) and any(c.isdigit() for c in s):  # "1, 234" is a list, not a number
        value = float(s.replace(",", ""))
        return value if math.isfinite(value) else None
    return None


def canonical_answer(ans: str | None) -> str | None:
    """A key under which equal answers collide, for majority voting: numbers in one form, LaTeX tidied."""
    if ans is None:
        return None
    num = number_with_unit(ans)
    if num is not None:
        return str(int(num)) if num == int(num) and abs(num) < 1e15 else repr(num)
    s = re.sub(r"\\left|\\right|\\!|\\,|\\;|\s+", "", ans).replace("dfrac", "frac").replace("tfrac", "frac")
    return s.strip("$.").lower()


def _timeouts() -> tuple[int | None, int | None]:
    if threading.current_thread() is threading.main_thread():
        return PARSE_TIMEOUT_S, VERIFY_TIMEOUT_S
    return None, None  # signal.alarm raises outside the main thread


def _parse(text: str, as_math: bool):
    from math_verify import parse

    parse_timeout, _ = _timeouts()
    if as_math:
        text = text.replace("$", "").strip()
        text = f"${text}$"
    try:
        return parse(text, parsing_timeout=parse_timeout)
    except Exception:  # noqa: BLE001  a grader must grade, not raise, whatever the model wrote
        return []


def _verify(gold, pred) -> bool:
    from math_verify import verify

    if not gold or not pred:
        return False
    try:
        return bool(verify(gold, pred, timeout_seconds=_timeouts()[1]))
    except Exception:  # noqa: BLE001
        return False


_NUM_WITH_UNIT = re.compile(r"^\\?\$?\s*([-+]?\d[\d,]*(?:\.\d+)?)(?:\s*\\?%|\s+([A-Za-z]{2,}[A-Za-z .]*))$")
NOT_UNITS = {"pi", "sqrt", "cdot", "times", "frac"}


def number_with_unit(s: str) -> float | None:
    """A plain number (``as_number``), or one followed by a unit word: ``"18 dollars"``, ``"$18 per day"``.
    A letter stuck to the number (``2i``, ``5x``) or a symbol (``3 pi``) is not a unit."""
    num = as_number(s)
    if num is not None:
        return num
    m = _NUM_WITH_UNIT.match(s.strip())
    if m is None or (m.group(2) and m.group(2).split()[0].lower() in NOT_UNITS):
        return None
    return as_number(m.group(1))


def answers_match(predicted: str, reference: str, rel_tol: float = REL_TOL) -> bool:
    """Whether two extracted answers are equal: numerically, else symbolically, else as strings."""
    a, b = number_with_unit(predicted), as_number(reference)
    if a is not None and b is not None:
        return abs(a - b) <= rel_tol * max(1.0, abs(b))
    if _verify(_parse(reference, as_math=True), _parse(predicted, as_math=True)):
        return True
    return canonical_answer(predicted) == canonical_answer(reference)


_MATH_SPAN = re.compile(r"\$\$(.+?)\$\$|\$(.+?)\$|\\\[(.+?)\\\]|\\\((.+?)\\\)", re.S)
_LAST_NUMBER = re.compile(r"[-+]?\d[\d,]*(?:\.\d+)?")


def unmarked_answer(response: str) -> str | None:
    """The answer of a response with no marker: the right-hand side of its last math span (``$...$``,
    ``\\[...\\]``, ``\\(...\\)``), else its last number. Regular expressions only: an unmarked response is
    often a truncated or garbled one, and math-verify can spend seconds parsing garbage."""
    spans = [next(g for g in m.groups() if g is not None) for m in _MATH_SPAN.finditer(response)]
    spans = [sp.strip() for sp in spans if sp.strip()]
    if spans:
        return spans[-1].split("=")[-1].strip()
    numbers = _LAST_NUMBER.findall(response)
    return numbers[-1].rstrip(",") if numbers else None


def final_answer(response: str) -> str | None:
    """The canonical final answer of a response (what a majority vote counts), or None."""
    predicted = extract_answer(response)
    return canonical_answer(predicted if predicted is not None else unmarked_answer(response))


def grade(response: str, reference: str) -> tuple[bool, str | None]:
    """``(correct, extracted answer)`` of a model's full ``response`` against a data set's ``reference``."""
    ref = reference_answer(reference)
    predicted = extract_answer(response)
    if predicted is not None:
        return answers_match(predicted, ref), predicted
    predicted = unmarked_answer(response)
    if predicted is None:
        return False, None
    return answers_match(predicted, ref), predicted


def is_correct(response: str, reference: str) -> bool:
    """Whether the final answer in ``response`` (a model's full output) equals ``reference``."""
    return grade(response, reference)[0]
