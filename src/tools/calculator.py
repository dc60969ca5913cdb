"""A safe calculator: the expression is parsed with ``ast`` and walked by hand, never ``eval``-ed.

Allowed: int and float literals, ``+ - * / // % **``, unary ``+``/``-``, parentheses, and the functions
``abs, round, min, max, sqrt``. Integers are Python ints, so big-number arithmetic is exact. Everything
else (names, attributes, strings, other calls, comparisons) is a ``CalculatorError`` naming the construct.

Cost is bounded before it is paid: a product or power whose result would exceed ``max_digits`` decimal
digits is refused from the operands' bit lengths (``9**9**9`` is refused in microseconds, not computed).

Deviations from Python: ``^`` (and ``×``, ``÷``) are read as ``**`` (``*``, ``/``), as models mean them;
``/`` of two integers that divide exactly returns the exact integer (Python returns
a float, which is wrong past 2**53), otherwise a float; ``sqrt`` of a perfect square integer is exact.
"""

from __future__ import annotations

import ast
import math
import operator
import sys

from src.tools.base import Tool, ToolError

_LOG2_10 = math.log2(10)
_FUNCTIONS = ("abs", "max", "min", "round", "sqrt")


class CalculatorError(ToolError):
    """An expression the calculator refuses or cannot evaluate; the message says why."""


class _Evaluator:
    def __init__(self, max_digits: int):
        self.max_digits = max_digits
        self.max_bits = math.ceil(max_digits * _LOG2_10)

    def too_large(self) -> CalculatorError:
        return CalculatorError(f"result would have more than {self.max_digits} digits")

    def check(self, value):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise CalculatorError(f"result is not a real number ({type(value).__name__})")
        if isinstance(value, int) and value.bit_length() > self.max_bits:
            raise self.too_large()
        if isinstance(value, float) and not math.isfinite(value):
            raise CalculatorError("result is not finite (overflow or undefined)")
        return value

    def visit(self, node):
        if isinstance(node, ast.Expression):
            return self.visit(node.body)
        if isinstance(node, ast.Constant):
            if isinstance(node.value, bool) or not isinstance(node.value, (int, float)):
                raise CalculatorError(f"only numbers are allowed, got {node.value!r}")
            return self.check(node.value)
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
            value = self.visit(node.operand)
            return -value if isinstance(node.op, ast.USub) else value
        if isinstance(node, ast.BinOp):
            return self.check(self.binop(node.op, self.visit(node.left), self.visit(node.right)))
        if isinstance(node, ast.Call):
            return self.check(self.call(node))
        if isinstance(node, ast.Name):
            raise CalculatorError(f"unknown name '{node.id}'; only numbers, + - * / // % **, parentheses and "
                                  f"{', '.join(_FUNCTIONS)} are allowed")
        if isinstance(node, ast.Attribute):
            raise CalculatorError("attribute access is not allowed")
        raise CalculatorError(f"{type(node).__name__} is not allowed in an arithmetic expression")

    def binop(self, op, a, b):
        both_int = isinstance(a, int) and isinstance(b, int)
        if isinstance(op, ast.Add):
            return a + b
        if isinstance(op, ast.Sub):
            return a - b
        if isinstance(op, ast.Mult):
            if both_int and a.bit_length() + b.bit_length() > self.max_bits + 1:
                raise self.too_large()
            return a * b
        if isinstance(op, (ast.Div, ast.FloorDiv, ast.Mod)):
            if b == 0:
                raise CalculatorError("division by zero")
            if isinstance(op, ast.FloorDiv):
                return a // b
            if isinstance(op, ast.Mod):
                return a % b
            if both_int and a % b == 0:
                return a // b
            return a / b
        if isinstance(op, ast.Pow):
            return self.power(a, b)
        raise CalculatorError(f"operator {type(op).__name__} is not allowed; use + - * / // % **")

    def power(self, base, exp):
        if isinstance(base, int) and isinstance(exp, int) and exp > 1 and abs(base) > 1:
            # |base|**exp has exp * log2|base| bits; for |base| >= 2 that is at least exp, so a huge exp
            # is refused before the float multiplication could overflow.
            if exp > self.max_bits or exp * math.log2(abs(base)) > self.max_bits + 1:
                raise self.too_large()
        elif exp > 0 and abs(base) > 1 and math.log2(exp) + math.log2(math.log2(abs(base))) > 10:
            raise CalculatorError("result is too large for a float")  # exp * log2|base| > 1024
        if base == 0 and exp < 0:
            raise CalculatorError("zero cannot be raised to a negative power")
        return operator.pow(base, exp)

    def call(self, node: ast.Call):
        if not isinstance(node.func, ast.Name) or node.func.id not in _FUNCTIONS:
            shown = node.func.id if isinstance(node.func, ast.Name) else ast.unparse(node.func)
            raise CalculatorError(f"function '{shown}' is not allowed; available: {', '.join(_FUNCTIONS)}")
        name = node.func.id
        if node.keywords:
            raise CalculatorError(f"{name}() takes no keyword arguments")
        args = [self.visit(a) for a in node.args]
        arity = {"abs": (1, 1), "sqrt": (1, 1), "round": (1, 2), "min": (1, None), "max": (1, None)}[name]
        if len(args) < arity[0] or (arity[1] is not None and len(args) > arity[1]):
            raise CalculatorError(f"{name}() got {len(args)} argument(s)")
        if name == "abs":
            return abs(args[0])
        if name == "min":
            return min(args)
        if name == "max":
            return max(args)
        if name == "round":
            if len(args) == 2 and (not isinstance(args[1], int) or abs(args[1]) > self.max_digits):
                raise CalculatorError("round(x, n) needs an integer n of moderate size")
            return round(*args)
        x = args[0]
        if x < 0:
            raise CalculatorError("sqrt of a negative number")
        if isinstance(x, int):
            r = math.isqrt(x)
            if r * r == x:
                return r
        return math.sqrt(x)


def evaluate(expression: str, max_digits: int = 4000, max_length: int = 2000) -> int | float:
    """The value of an arithmetic ``expression``; raises ``CalculatorError`` with a readable reason."""
    if not isinstance(expression, str) or not expression.strip():
        raise CalculatorError("empty expression")
    if len(expression) > max_length:
        raise CalculatorError(f"expression longer than {max_length} characters")
    expression = expression.strip().replace("^", "**").replace("×", "*").replace("÷", "/")
    try:
        tree = ast.parse(expression, mode="eval")
    except (SyntaxError, ValueError) as e:
        raise CalculatorError(f"cannot parse {expression!r}: {getattr(e, 'msg', e)}") from None
    except (RecursionError, MemoryError):
        raise CalculatorError("expression is nested too deeply") from None
    try:
        return _Evaluator(max_digits).visit(tree)
    except CalculatorError:
        raise
    except (OverflowError, ArithmeticError) as e:
        raise CalculatorError(f"arithmetic error: {e}") from None
    except (RecursionError, MemoryError):
        raise CalculatorError("expression is too complex") from None


class Calculator(Tool):
    """The calculator as a tool: ``{"expression": str}`` -> the value as text.

    Args:
        max_digits: largest integer result, in decimal digits (below Python's int-to-str limit of 4300).
        max_length: longest expression accepted, in characters.
    """

    name = "calculator"
    description = ("Evaluate an arithmetic expression exactly. Integers of any size are exact. Supports "
                   "+ - * / // % ** and parentheses, and the functions abs, round, min, max, sqrt.")
    parameters = {
        "type": "object",
        "properties": {"expression": {"type": "string",
                                      "description": "the expression, e.g. (123456789 * 987654321) % 97"}},
        "required": ["expression"],
    }

    def __init__(self, max_digits: int = 4000, max_length: int = 2000):
        limit = sys.get_int_max_str_digits() if hasattr(sys, "get_int_max_str_digits") else 0
        if limit and max_digits > limit:
            raise ValueError(f"calculator max_digits={max_digits} exceeds Python's int-to-str limit {limit}")
        self.max_digits, self.max_length = max_digits, max_length

    def run(self, expression: str) -> str:
        return repr(evaluate(expression, self.max_digits, self.max_length))
