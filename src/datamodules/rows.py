"""Rows of one data split, read from a file or a ``datasets`` name, with every bad row named by file and line.

``RowReader`` reads JSONL (``.jsonl``, ``.ndjson``; also JSON Lines under a ``.json`` name), JSON (a list of rows,
or an object holding one such list, as ``{"data": [...]}``), Parquet, or ``datasets.load_dataset``, and gives
``(position, record)`` pairs: the position is the 1-based line in a JSONL file, else the 0-based row index. A
record that is not an object, or a line that is not JSON, comes as a ``BadRow`` in its place.

``checked_rows`` turns the records into rows with a data set's own ``make_row(position, record)``, which raises
``BadRow`` for a row it cannot use. The whole split is checked before a row is returned (up to ``limit`` good
rows, where a source stops early so as not to decode what it will not use), so a bad row fails the run at setup,
never halfway through: ``on_error="raise"`` raises one ``DataRowError`` listing every bad row as
``file:line: why`` (``file:row i`` outside JSONL), ``on_error="skip"`` drops them with a warning each and a count.
Every prompt source (math benchmarks, vision-language and tool-use data, plain JSONL) reads its rows this way.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

ID_FIELDS = ("id", "idx", "unique_id")
MAX_LISTED = 20  # bad rows named in one error; a broken file would otherwise print every line
ON_ERROR = ("raise", "skip")


class DataRowError(ValueError):
    """Malformed data rows; the message names each one's file and line."""


class BadRow(Exception):
    """Why one record cannot be a row (raised by a ``make_row``; ``checked_rows`` adds the file and line)."""


def check_on_error(on_error: str, limit: int | None = None) -> str:
    """A source's ``on_error`` and ``limit`` settings (``data.<split>.on_error``, ``data.<split>.limit``)."""
    if on_error not in ON_ERROR:
        raise ValueError(f"data.<split>.on_error must be 'raise' or 'skip', not {on_error!r}")
    if limit is not None and limit < 1:
        raise ValueError(f"data.<split>.limit must be a positive number of rows or null, not {limit}")
    return on_error


def reference_text(value: Any, unwrap_math: bool = False) -> str:
    """A reference answer as text: ``27.0`` -> ``"27"``, ``["$1$", "$2$"]`` -> ``"1, 2"``; "" if none."""
    if value is None or value != value:  # value != value: NaN, a missing value in a Parquet float column
        return ""
    if isinstance(value, (bool, dict)):  # not an answer: "True" or "{'x': 1}" would be graded as one
        raise BadRow(f"answer is {'a bool' if isinstance(value, bool) else 'a dict'} ({value!r}), not text or a number")
    if isinstance(value, (list, tuple)):
        return ", ".join(t for t in (reference_text(v, unwrap_math) for v in value) if t)
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    text = str(value).strip()
    if unwrap_math and text.startswith("$") and "$" not in text.strip("$"):
        text = text.strip("$").strip()
    return text


def prompt_value(value: Any) -> str | list:
    """A prompt as a row holds it: text ("" if blank) or a list of chat messages; anything else is a ``BadRow``."""
    if isinstance(value, str):
        return value if value.strip() else ""
    if isinstance(value, list) and all(isinstance(m, dict) and {"role", "content"} <= set(m) for m in value):
        for i, m in enumerate(value):
            content = m["content"]
            if not isinstance(m["role"], str) or not m["role"]:
                raise BadRow(f"prompt message {i} has role {m['role']!r}, not a role name")
            # text, or a list of parts (images and text); None only beside the tool calls it stands for
            if not (isinstance(content, (str, list)) or (content is None and m.get("tool_calls"))):
                raise BadRow(f"prompt message {i} ({m['role']}) has content {content!r}, neither text nor a list of "
                             f"parts")
        return value
    kind = type(value).__name__
    raise BadRow(f"prompt is {'an' if kind[0] in 'aeiou' else 'a'} {kind}, neither text nor a list of chat messages")


def row_id(record: dict, position: int, fields: tuple[str, ...] = ID_FIELDS):
    """The record's own id (the first of ``fields`` it holds), else its position."""
    return next((record[k] for k in fields if record.get(k) is not None), position)


def checked_rows(name: str, records: list[tuple[int, Any]], by_line: bool, make_row: Callable[[int, dict], dict],
                 on_error: str = "raise", limit: int | None = None) -> list[dict]:
    """``make_row(position, record)`` over the records (see the module docstring); at most ``limit`` good rows
    (later records are not looked at)."""
    rows, errors, seen = [], [], 0
    for pos, record in records:
        if limit and len(rows) >= limit:
            break
        seen += 1
        try:
            if isinstance(record, BadRow):
                raise record
            rows.append(make_row(pos, record))
        except BadRow as e:
            errors.append(f"{name}:{pos if by_line else f'row {pos}'}: {e}")
    if errors and on_error == "raise":
        listed = "\n  ".join(errors[:MAX_LISTED])
        more = f"\n  ... and {len(errors) - MAX_LISTED} more" if len(errors) > MAX_LISTED else ""
        raise DataRowError(f"{name}: {len(errors)} of {seen} rows are malformed (fix them, or set on_error=skip "
                           f"to drop them):\n  {listed}{more}")
    for error in errors:
        log.warning("skipping %s", error)
    if errors:
        log.warning("%s: skipped %d of %d rows (on_error=skip)", name, len(errors), seen)
    if not rows:
        raise DataRowError(f"{name}: no usable rows")
    return rows


class RowReader:
    """The records of one file (``path``) or ``datasets`` split (``dataset``, ``subset``, ``split``,
    ``data_files``; needs ``pip install datasets``; a single ``data_files`` entry is read as ``split``)."""

    def __init__(self, path: str | None = None, dataset: str | None = None, subset: str | None = None,
                 split: str = "test", data_files: str | list | dict | None = None):
        if (path is None) == (dataset is None):
            raise ValueError("a data source reads either a file (path=...) or a datasets name (dataset=...)")
        self.path = Path(path) if path is not None else None
        self.dataset, self.subset, self.split, self.data_files = dataset, subset, split, data_files
        self.name = str(self.path) if self.path is not None else f"{dataset}[{split}]"

    def records(self) -> tuple[list[tuple[int, Any]], bool]:
        """``(position, record or BadRow)`` for every row, and whether positions are lines."""
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
            record = BadRow(f"bad JSON ({e.msg} at column {e.colno})")
        records.append((lineno, _checked(record)))
    return records


def _as_records(rows: list) -> list[tuple[int, Any]]:
    return [(i, _checked(r)) for i, r in enumerate(rows)]


def _checked(record: Any) -> dict | BadRow:
    if isinstance(record, (dict, BadRow)):
        return record
    return BadRow(f"row is a {type(record).__name__}, not an object")
