"""Math benchmarks in their published layouts, as prompt rows for ``PromptDataModule``.

``MathBenchmark`` reads one split from a JSONL, JSON (a list of rows, or an object holding one such as
``{"data": [...]}``) or Parquet file, or from a Hugging Face ``datasets`` name, and returns rows
``{"id", "prompt", "answer"[, "solution"]}``. ``answer`` is the reference as the data set gives it;
``src.modules.evaluation.grading.is_correct`` reads its last ``\\boxed{}``, a GSM8K ``#### N`` or a bare value.

Formats (``format=``; ``auto`` picks one from the first row's keys):

    format                prompt               reference answer                              solution
    gsm8k                 question             answer (the full text ending in "#### N")     answer
    math, math500, aime   problem              answer, else solution (grader: last \\boxed)   solution
    amc                   question or problem  answer; a whole float loses its ".0" (27.0->27)  -
    minerva               problem              solution (grader: last \\boxed)                solution
    olympiadbench         question             final_answer: list joined by ", ", "$" gone    solution[0]

``prompt_field`` / ``answer_field`` / ``solution_field`` replace a format's field (or describe any
other layout). ``id`` is the row's ``id``/``idx``/``unique_id`` if it has one, else where the row sits:
its 1-based line in a JSONL file, its 0-based index in a JSON list, Parquet table or ``datasets`` split.

Files and ``datasets`` splits are read, and bad rows (bad JSON, missing field, empty prompt) named by file and
line, as every data source here reads them (``src.datamodules.rows``).
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, replace
from typing import Any

from src.datamodules.rows import (
    BadRow,
    DataRowError,
    RowReader,
    check_on_error,
    checked_rows,
    prompt_value,
    reference_text,
    row_id,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Layout:
    """Field names of one format; of several candidates, the first present and non-empty is taken."""

    prompt: tuple[str, ...]
    answer: tuple[str, ...]
    solution: tuple[str, ...] = ()
    unwrap_math: bool = False  # OlympiadBench writes each final answer as "$...$"


FORMATS = {
    "gsm8k": Layout(("question",), ("answer",), ("answer",)),
    "math": Layout(("problem",), ("answer", "solution"), ("solution",)),
    "math500": Layout(("problem",), ("answer", "solution"), ("solution",)),
    "aime": Layout(("problem",), ("answer", "solution"), ("solution",)),
    "amc": Layout(("question", "problem"), ("answer",)),
    "minerva": Layout(("problem",), ("solution",), ("solution",)),
    "olympiadbench": Layout(("question",), ("final_answer",), ("solution",), unwrap_math=True),
}


def detect_format(row: dict) -> str | None:
    """The format whose layout ``row``'s keys show, or None."""
    answer = row.get("answer")
    numeric = isinstance(answer, (int, float)) and not isinstance(answer, bool)
    if "final_answer" in row and "question" in row:
        return "olympiadbench"
    if "question" in row and "answer" in row and "problem" not in row:
        return "gsm8k" if isinstance(answer, str) and "####" in answer else "amc"
    if "problem" in row and numeric:
        return "amc"
    if "problem" in row and "answer" in row:
        return "math"
    if "problem" in row and "solution" in row:
        return "minerva"
    return None


def _solution_text(value: Any) -> str:
    if isinstance(value, (list, tuple)):  # OlympiadBench lists alternative solutions; one is a target
        value = value[0] if value else None
    return value.strip() if isinstance(value, str) else ""


def _pick(row: dict, fields: tuple[str, ...], what: str, convert) -> tuple[str, Any]:
    """The first of ``fields`` in ``row`` whose value converts to something non-empty."""
    for field in fields:
        if field in row and (value := convert(row[field])):
            return field, value
    present = [f for f in fields if f in row]
    if present:
        raise BadRow(f"empty {what} (field {present[0]!r})")
    raise BadRow(f"missing field {' or '.join(map(repr, fields))} (has {sorted(row)})")


class MathBenchmark:
    """One split of a math benchmark; calling it returns the rows (see the module docstring).

    Args:
        path: a ``.jsonl``/``.ndjson``, ``.json`` or ``.parquet`` file (give this or ``dataset``).
        format: ``auto`` or a key of ``FORMATS``.
        prompt_field, answer_field, solution_field: replace the format's field; an explicit
            ``solution_field`` is required in every row, a format's is optional.
        limit: keep the first ``limit`` rows (after checking, and after shuffling if asked).
        shuffle_seed: shuffle the rows with this seed first, for a deterministic random subset.
        on_error: ``raise`` (one ``DataRowError`` naming every bad row) or ``skip`` (drop, warn).
        dataset, subset, split, data_files: ``datasets.load_dataset(dataset, subset, split=split,
            data_files=data_files)``; needs ``pip install datasets``. A single ``data_files`` entry is
            read as ``split``.
    """

    def __init__(self, path: str | None = None, format: str = "auto", prompt_field: str | None = None,
                 answer_field: str | None = None, solution_field: str | None = None, limit: int | None = None,
                 shuffle_seed: int | None = None, on_error: str = "raise", dataset: str | None = None,
                 subset: str | None = None, split: str = "test", data_files: str | list | dict | None = None):
        if format != "auto" and format not in FORMATS:
            raise ValueError(f"unknown format {format!r}; one of {['auto', *FORMATS]}")
        self.reader = RowReader(path, dataset, subset, split, data_files)
        self.name = self.reader.name
        self.format, self.limit, self.shuffle_seed = format, limit, shuffle_seed
        self.on_error = check_on_error(on_error, limit)
        self.fields = {"prompt": prompt_field, "answer": answer_field, "solution": solution_field}

    def __call__(self) -> list[dict]:
        records, by_line = self.reader.records()
        where = (lambda pos: f"{self.name}:{pos}") if by_line else (lambda pos: f"{self.name}:row {pos}")
        first = next(((pos, r) for pos, r in records if not isinstance(r, BadRow)), None)
        layout = self._layout(*first, where) if first else None
        rows = checked_rows(self.name, records, by_line, lambda pos, record: self._row(pos, record, layout),
                            self.on_error)
        if self.shuffle_seed is not None:
            random.Random(self.shuffle_seed).shuffle(rows)
        return rows[: self.limit] if self.limit is not None else rows

    def _layout(self, pos: int, first: dict, where) -> Layout:
        name = self.format
        if name == "auto" and not (self.fields["prompt"] and self.fields["answer"]):
            name = detect_format(first)
            if name is None:
                raise DataRowError(f"{where(pos)}: cannot tell the format from the keys {sorted(first)}; set "
                                   f"format= (one of {list(FORMATS)}) or prompt_field= and answer_field=")
            log.info("%s: format %s (detected from the keys of the first row)", self.name, name)
        layout = FORMATS.get(name, Layout((), ()))
        overrides = {k: (v,) for k, v in self.fields.items() if v}
        return replace(layout, **overrides)

    def _row(self, pos: int, record: dict, layout: Layout) -> dict:
        _, prompt = _pick(record, layout.prompt, "prompt", prompt_value)
        _, answer = _pick(record, layout.answer, "answer", lambda v: reference_text(v, layout.unwrap_math))
        row = {"id": row_id(record, pos), "prompt": prompt, "answer": answer}
        if self.fields["solution"]:
            row["solution"] = _pick(record, layout.solution, "solution", _solution_text)[1]
        elif solution := next((s for f in layout.solution if (s := _solution_text(record.get(f)))), None):
            row["solution"] = solution
        return row
