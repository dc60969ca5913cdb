"""Tool-use prompts: a question, the tools it may call (JSON Schema function definitions) and a verifiable
answer, as rows for ``PromptDataModule`` (which renders each row's ``tools`` through the chat template).

``ToolPrompts`` reads JSONL, JSON, Parquet or a ``datasets`` split (the readers of ``math.py``) with rows

    {"question" | "prompt" | "messages": ..., "tools": [function definitions], "answer": ...}

A function definition is OpenAI / Qwen style ``{"type": "function", "function": {"name", "description",
"parameters"}}`` or its bare ``{"name", "description", "parameters"}``; a JSON string of either is read too.
Every row is checked before any is returned: a bad one (missing field, a tool without a name or with
non-object parameters) is named by file and line, all in one error, or each warned about with
``on_error="skip"``.

``ToolArithmeticTask`` is the synthetic task of the tool-use miniature: arithmetic on numbers too large
to do in the head (a short word problem whose numbers are given as ``(a = ..., b = ...)``), with the
calculator's schema; deterministic by seed, splits
disjoint by a hash of the problem. Each row carries a reference episode (``solution``) for the SFT stages:
the calculator call, the real calculator's reply, and the answer read off it; with ``direct_frac`` that
fraction of the rows instead states the answer at once, without the tool (a student that has not learnt
when to use its tools).
"""

from __future__ import annotations

import hashlib
import json
import random
from typing import Any

from src.datamodules.rows import BadRow, RowReader, check_on_error, checked_rows, prompt_value, reference_text, row_id

PROMPT_FIELDS = ("messages", "question", "prompt", "query", "problem")


def function_schema(tool: Any) -> dict:
    """A tool definition in the ``{"type": "function", "function": {...}}`` form (raises BadRow)."""
    if isinstance(tool, str):
        try:
            tool = json.loads(tool)
        except json.JSONDecodeError as e:
            raise BadRow(f"tool definition is not JSON ({e.msg})") from e
    if not isinstance(tool, dict):
        raise BadRow(f"tool definition is a {type(tool).__name__}, not an object")
    fn = tool.get("function", tool) if tool.get("type", "function") == "function" else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
        raise BadRow(f"tool definition without a name: {json.dumps(tool)[:80]}")
    params = fn.get("parameters", {"type": "object", "properties": {}})
    if not isinstance(params, dict) or params.get("type", "object") != "object":
        raise BadRow(f"tool {fn['name']!r}: parameters must be a JSON Schema object")
    return {"type": "function", "function": {"name": fn["name"], "description": fn.get("description", ""),
                                             "parameters": params}}


class ToolPrompts:
    """One split of a tool-use data set; calling it returns ``{"id", "prompt", "answer", "tools"}`` rows.

    Args:
        path: ``.jsonl``, ``.json`` or ``.parquet`` file (or give ``dataset``).
        prompt_field, answer_field, tools_field: the row's fields (the prompt is found among
            ``messages``, ``question``, ``prompt``, ``query``, ``problem`` when not given).
        on_error: ``raise`` (one ``DataRowError`` naming every bad row) or ``skip`` (warn about each).
        limit: keep the first ``limit`` good rows.
        dataset, subset, split: ``datasets.load_dataset(dataset, subset, split=split)``.
    """

    def __init__(self, path: str | None = None, prompt_field: str | None = None, answer_field: str = "answer",
                 tools_field: str = "tools", on_error: str = "raise", limit: int | None = None,
                 dataset: str | None = None, subset: str | None = None, split: str = "test"):
        check_on_error(on_error, limit)
        self.reader = RowReader(path, dataset, subset, split)
        self.name = self.reader.name
        self.prompt_field, self.answer_field, self.tools_field = prompt_field, answer_field, tools_field
        self.on_error, self.limit = on_error, limit

    def __call__(self) -> list[dict]:
        records, by_line = self.reader.records()
        rows = checked_rows(self.name, records, by_line, self._row, self.on_error)
        return rows[: self.limit] if self.limit is not None else rows

    def _row(self, pos: int, record: dict) -> dict:
        fields = (self.prompt_field,) if self.prompt_field else PROMPT_FIELDS
        field = next((f for f in fields if record.get(f)), None)
        if field is None:
            raise BadRow(f"missing or empty prompt: none of {list(fields)} (has {sorted(record)})")
        prompt = prompt_value(record[field])
        if not prompt:
            raise BadRow(f"empty prompt (field {field!r})")
        if record.get(self.answer_field) is None:
            raise BadRow(f"missing field {self.answer_field!r} (has {sorted(record)})")
        answer = reference_text(record[self.answer_field])
        if not answer:
            raise BadRow(f"empty answer (field {self.answer_field!r} is {record[self.answer_field]!r})")
        tools = record.get(self.tools_field)
        if isinstance(tools, str):
            try:
                tools = json.loads(tools)
            except json.JSONDecodeError as e:
                raise BadRow(f"field {self.tools_field!r} is not JSON ({e.msg})") from e
        if not isinstance(tools, list) or not tools:
            raise BadRow(f"field {self.tools_field!r} must be a non-empty list of function definitions")
        return {"id": row_id(record, pos), "prompt": prompt, "answer": answer,
                "tools": [function_schema(t) for t in tools]}


CALCULATOR_SCHEMA = {"type": "function", "function": {
    "name": "calculator", "description": "Evaluate an arithmetic expression exactly (+ - * / // % ** and parentheses).",
    "parameters": {"type": "object", "properties": {"expression": {"type": "string"}}, "required": ["expression"]}}}

# The numbers come last, in one frame for every story, so that the call copies them from the same place
# (a tiny model learns copying at a fixed offset in a few thousand examples, at a story-dependent one far later).
_STORIES = [
    ("A warehouse has a crates with b bolts in each crate. How many bolts are there?", "{a}*{b}"),
    ("A farm sold a eggs on Monday and b eggs on Tuesday. How many eggs in total?", "{a}+{b}"),
    ("A tank held a litres and b litres were drained. How many litres are left?", "{a}-{b}"),
    ("Each of a runners ran b metres. How many metres did they run together?", "{a}*{b}"),
]
NUMBERS = " (a = {a}, b = {b})"


TOOL_CALL = "<tool_call>{}</tool_call>"


def _split_of(problem: str) -> str:
    h = int(hashlib.sha256(problem.encode()).hexdigest()[:8], 16) % 10
    return "test" if h == 0 else "val" if h == 1 else "train"


class ToolArithmeticTask:
    """Word problems on ``digits``-digit numbers with the calculator's schema; answer the exact result.

    Args:
        split: ``train``, ``val`` or ``test`` (disjoint: a hash of the problem decides its split).
        n: rows; digits: size of each operand; seed: the generator's seed.
        direct_frac: fraction of the rows whose reference episode answers directly (``The answer is ...``)
            instead of calling the calculator; drawn from a stream of its own, so the problems do not change.
    """

    def __init__(self, split: str, n: int, digits: int = 6, seed: int = 0, direct_frac: float = 0.0):
        if split not in ("train", "val", "test"):
            raise ValueError(f"split must be train, val or test, not {split!r}")
        if not 0.0 <= direct_frac <= 1.0:
            raise ValueError(f"data.{split}.direct_frac must lie in [0, 1], got {direct_frac}")
        self.split, self.n, self.digits, self.seed = split, n, digits, seed
        self.direct_frac = direct_frac
        self._environment = None

    def demonstration(self, expression: str) -> list[dict]:
        """The reference episode: call the calculator, read its reply (the real tool's output), state it."""
        if self._environment is None:
            from src.tools import Calculator, ToolEnvironment

            self._environment = ToolEnvironment([Calculator()])
        call = TOOL_CALL.format(json.dumps({"name": "calculator", "arguments": {"expression": expression}}))
        replies = self._environment.execute(call)
        return [{"role": "assistant", "content": call}, *replies,
                {"role": "assistant", "content": f"The answer is {replies[-1]['content']}."}]

    def __call__(self) -> list[dict]:
        rng = random.Random(f"tool-arithmetic-{self.seed}")
        direct_rng = random.Random(f"tool-arithmetic-direct-{self.seed}")
        rows, seen, lo, hi = [], set(), 10 ** (self.digits - 1), 10**self.digits - 1
        for _ in range(200 * self.n):
            story, expr = rng.choice(_STORIES)
            a, b = rng.randint(lo, hi), rng.randint(lo, hi)
            if "-" in expr and b > a:
                a, b = b, a
            question = story + NUMBERS.format(a=a, b=b)
            if question in seen or _split_of(question) != self.split:
                continue
            seen.add(question)
            expression = expr.format(a=a, b=b)
            value = a * b if "*" in expr else a + b if "+" in expr else a - b
            if self.direct_frac and direct_rng.random() < self.direct_frac:
                solution = [{"role": "assistant", "content": f"The answer is {value}."}]
            else:
                solution = self.demonstration(expression)
            rows.append({"id": len(rows), "prompt": question, "answer": str(value), "expression": expression,
                         "tools": [CALCULATOR_SCHEMA], "solution": solution})
            if len(rows) == self.n:
                return rows
        raise ValueError(f"could not draw {self.n} distinct {self.split} problems of {self.digits} digits")
