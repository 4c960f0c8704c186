"""Reading JSON-lines data files with errors that point at the offending file, line and field."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path


class MissingFieldError(KeyError, ValueError):
    """A data row lacks a field a task needs.

    Subclasses both ``KeyError`` (it is a missing key) and ``ValueError`` (it is bad data), so
    callers may catch either.
    """

    def __str__(self) -> str:
        # KeyError.__str__ would repr() the message, wrapping it in quotes.
        return str(self.args[0]) if self.args else ""


def require_field(row: dict, field: str, where: str = "example") -> object:
    """Returns ``row[field]``, raising a `MissingFieldError` that names the field when absent.

    Args:
        row: A data row.
        field: The key to read.
        where: Words naming the row's origin for the message, e.g. ``"gsm8k example"`` or
            ``"data/test.jsonl line 3"``.
    """
    if not isinstance(row, dict):
        raise TypeError(f"{where} must be a dict, got {type(row).__name__}")
    if field not in row:
        raise MissingFieldError(f"{where} is missing field {field!r} (it has: {sorted(row)})")
    return row[field]


def read_jsonl(path: str | Path, required: Iterable[str] = ("question", "answer")) -> list[dict]:
    """Reads a JSON-lines file: one JSON object per line, blank lines skipped.

    Args:
        path: The file to read.
        required: Fields every row must have.

    Returns:
        The rows, in file order.

    Raises:
        FileNotFoundError: The file does not exist.
        ValueError: A line is not valid JSON or not a JSON object (the message names the file
            and the 1-based line number), or a row lacks a required field (`MissingFieldError`,
            naming file, line and field).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such JSON-lines file: {path}")
    required = tuple(required)
    rows = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path} line {lineno}: malformed JSON ({e.msg} at column {e.colno})") from e
            if not isinstance(row, dict):
                raise ValueError(f"{path} line {lineno}: expected a JSON object, got {type(row).__name__}")
            for field in required:
                require_field(row, field, where=f"{path} line {lineno}")
            rows.append(row)
    return rows
