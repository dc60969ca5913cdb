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

The whole split is checked before a row is returned, so a bad row fails the run at setup, never halfway
through. Each bad row (bad JSON, missing field, empty prompt) is named by file and line (``x.jsonl:17``)
or row (``x.parquet:row 16``): ``on_error="raise"`` raises one ``DataRowError`` listing them all,
``on_error="skip"`` drops them with a warning each and a count.
"""

from __future__ import annotations

import json
import logging
import random
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from src.datamodules.prompts import DataRowError

log = logging.getLogger(__name__)

ID_FIELDS = ("id", "idx", "unique_id")
MAX_LISTED = 20  # bad rows named in one error; a broken file would otherwise print every line


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


def checked_rows(name: str, records, by_line: bool, make_row, on_error: str = "raise",
                 limit: int | None = None) -> list[dict]:
    """``make_row(pos, record)`` over every record, each bad one (``_BadRow``) named ``file:line`` (or
    ``file:row i``): all in one ``DataRowError`` (``raise``), or one warning each (``skip``)."""
    rows, errors = [], []
    for pos, record in records:
        if limit and len(rows) >= limit:
            break
        try:
            if isinstance(record, _BadRow):
                raise record
            rows.append(make_row(pos, record))
        except _BadRow as e:
            errors.append(f"{name}:{pos if by_line else f'row {pos}'}: {e}")
    if errors and on_error == "raise":
        listed = "\n  ".join(errors[:MAX_LISTED])
        more = f"\n  ... and {len(errors) - MAX_LISTED} more" if len(errors) > MAX_LISTED else ""
        raise DataRowError(f"{name}: {len(errors)} bad rows (fix them, or set on_error=skip to drop "
                           f"them):\n  {listed}{more}")
    for error in errors:
        log.warning("skipping %s", error)
    if errors:
        log.warning("%s: skipped %d rows (on_error=skip)", name, len(errors))
    if not rows:
        raise DataRowError(f"{name}: no usable rows")
    return rows


class _BadRow(Exception):
    pass


def reference_text(value: Any, unwrap_math: bool = False) -> str:
    """A reference answer as text: ``27.0`` -> ``"27"``, ``["$1$", "$2$"]`` -> ``"1, 2"``; "" if none."""
    if value is None or value != value:  # value != value: NaN, a missing value in a Parquet float column
        return ""
    if isinstance(value, (list, tuple)):
        return ", ".join(t for t in (reference_text(v, unwrap_math) for v in value) if t)
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    text = str(value).strip()
    if unwrap_math and text.startswith("$") and "$" not in text.strip("$"):
        text = text.strip("$").strip()
    return text


def _solution_text(value: Any) -> str:
    if isinstance(value, (list, tuple)):  # OlympiadBench lists alternative solutions; one is a target
        value = value[0] if value else None
    return value.strip() if isinstance(value, str) else ""


def _prompt(value: Any) -> str | list:
    if isinstance(value, str):
        return value if value.strip() else ""
    if isinstance(value, list) and all(isinstance(m, dict) and {"role", "content"} <= set(m) for m in value):
        return value
    raise _BadRow(f"prompt is a {type(value).__name__}, neither text nor a list of chat messages")


def _pick(row: dict, fields: tuple[str, ...], what: str, convert) -> tuple[str, Any]:
    """The first of ``fields`` in ``row`` whose value converts to something non-empty."""
    for field in fields:
        if field in row and (value := convert(row[field])):
            return field, value
    present = [f for f in fields if f in row]
    if present:
        raise _BadRow(f"empty {what} (field {present[0]!r})")
    raise _BadRow(f"missing field {' or '.join(map(repr, fields))} (has {sorted(row)})")


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
        if (path is None) == (dataset is None):
            raise ValueError("MathBenchmark reads either a file (path=...) or a datasets name (dataset=...)")
        if format != "auto" and format not in FORMATS:
            raise ValueError(f"unknown format {format!r}; one of {['auto', *FORMATS]}")
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', not {on_error!r}")
        if limit is not None and limit < 1:
            raise ValueError(f"limit must be a positive number of rows or None, not {limit}")
        self.path = Path(path) if path is not None else None
        self.format, self.limit, self.shuffle_seed, self.on_error = format, limit, shuffle_seed, on_error
        self.fields = {"prompt": prompt_field, "answer": answer_field, "solution": solution_field}
        self.dataset, self.subset, self.split, self.data_files = dataset, subset, split, data_files
        self.name = str(self.path) if self.path is not None else f"{dataset}[{split}]"

    def __call__(self) -> list[dict]:
        records, by_line = self._read()
        where = (lambda pos: f"{self.name}:{pos}") if by_line else (lambda pos: f"{self.name}:row {pos}")
        first = next(((pos, r) for pos, r in records if not isinstance(r, _BadRow)), None)
        layout = self._layout(*first, where) if first else None
        rows, errors = [], []
        for pos, record in records:
            try:
                if isinstance(record, _BadRow):
                    raise record
                rows.append(self._row(pos, record, layout))
            except _BadRow as e:
                errors.append(f"{where(pos)}: {e}")
        if errors:
            self._report(errors, len(records))
        if not rows:
            raise DataRowError(f"{self.name}: no usable rows")
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
        _, prompt = _pick(record, layout.prompt, "prompt", _prompt)
        _, answer = _pick(record, layout.answer, "answer", lambda v: reference_text(v, layout.unwrap_math))
        row_id = next((record[k] for k in ID_FIELDS if record.get(k) is not None), pos)
        row = {"id": row_id, "prompt": prompt, "answer": answer}
        if self.fields["solution"]:
            row["solution"] = _pick(record, layout.solution, "solution", _solution_text)[1]
        elif solution := next((s for f in layout.solution if (s := _solution_text(record.get(f)))), None):
            row["solution"] = solution
        return row

    def _report(self, errors: list[str], total: int) -> None:
        if self.on_error == "skip":
            for error in errors:
                log.warning("skipping %s", error)
            log.warning("%s: skipped %d of %d rows (on_error=skip)", self.name, len(errors), total)
            return
        listed = "\n  ".join(errors[:MAX_LISTED])
        more = f"\n  ... and {len(errors) - MAX_LISTED} more" if len(errors) > MAX_LISTED else ""
        raise DataRowError(f"{self.name}: {len(errors)} of {total} rows are malformed (fix them, or set "
                           f"on_error=skip to drop them):\n  {listed}{more}")

    # Readers: (position, record or the _BadRow it is instead) for every row, and whether positions are lines.

    def _read(self) -> tuple[list[tuple[int, Any]], bool]:
        if self.dataset is not None:
            return _as_records(self._load_dataset()), False
        if not self.path.is_file():
            raise FileNotFoundError(f"data file {self.path} does not exist; set this source's path "
                                    "(data.train.path, data.val.path or data.test.path), or REOPOLD_DATA "
                                    "for the benchmark presets (data=gsm8k, aime24, amc23, minerva)")
        suffix = self.path.suffix.lower()
        if suffix in (".jsonl", ".ndjson"):
            return _jsonl(self.path.read_text(encoding="utf-8-sig")), True
        if suffix == ".json":
            return self._json()
        if suffix == ".parquet":
            try:
                import pyarrow.parquet as pq
            except ImportError as e:
                raise ImportError(f"reading {self.path} needs pyarrow: pip install pyarrow") from e
            return _as_records(pq.read_table(self.path).to_pylist()), False
        raise ValueError(f"{self.path}: unknown data file type {suffix!r}; use .jsonl, .json or .parquet, "
                         "or dataset=<datasets name>")

    def _json(self) -> tuple[list[tuple[int, Any]], bool]:
        text = self.path.read_text(encoding="utf-8-sig")
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            if e.msg == "Extra data":  # JSON Lines under a .json name, as many data sets ship it
                return _jsonl(text), True
            raise DataRowError(f"{self.path}:{e.lineno}: bad JSON ({e.msg})") from e
        if isinstance(data, dict):
            lists = [k for k, v in data.items()
                     if v and isinstance(v, list) and all(isinstance(r, dict) for r in v)]
            key = "data" if "data" in lists else (lists[0] if len(lists) == 1 else None)
            if key is None:
                raise DataRowError(f"{self.path}: expected a list of rows, or an object holding one list "
                                   f"of rows (such as 'data'); found keys {sorted(data)}")
            data = data[key]
        if not isinstance(data, list):
            raise DataRowError(f"{self.path}: expected a list of rows, found a {type(data).__name__}")
        return _as_records(data), False

    def _load_dataset(self) -> list:
        try:
            import datasets
        except ImportError as e:
            raise ImportError(f"loading {self.dataset!r} needs the datasets library: "
                              "pip install datasets") from e
        files = self.data_files  # plain containers: Hydra hands over ListConfig / DictConfig
        if files is not None and not hasattr(files, "keys"):
            files = {self.split: files}
        if files is not None:
            files = {k: v if isinstance(v, str) else list(v) for k, v in files.items()}
        return list(datasets.load_dataset(self.dataset, self.subset, split=self.split, data_files=files))


def _jsonl(text: str) -> list[tuple[int, Any]]:
    records = []
    for lineno, line in enumerate(text.split("\n"), 1):  # not splitlines(): JSON text may hold a raw U+2028
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            record = _BadRow(f"bad JSON ({e.msg} at column {e.colno})")
        records.append((lineno, _checked(record)))
    return records


def _as_records(rows: list) -> list[tuple[int, Any]]:
    return [(i, _checked(r)) for i, r in enumerate(rows)]


def _checked(record: Any) -> dict | _BadRow:
    if isinstance(record, (dict, _BadRow)):
        return record
    return _BadRow(f"row is a {type(record).__name__}, not an object")
