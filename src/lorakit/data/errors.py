"""Where a row came from, and the error that names it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Origin:
    """The place a row came from: ``source`` plus a 1-based ``line`` (text files) or a 0-based ``row``.

    ``str(origin)`` is what error messages show: ``train.jsonl:17`` or ``train.parquet[row 16]``.
    """

    source: str
    line: int | None = None
    row: int | None = None

    def __str__(self) -> str:
        if self.line is not None:
            return f"{self.source}:{self.line}"
        if self.row is not None:
            return f"{self.source}[row {self.row}]"
        return self.source


class DataError(ValueError):
    """A malformed data file or row; the message starts with the file and line (or row) it is about."""

    def __init__(self, origin: Origin | str, message: str) -> None:
        self.origin = origin
        super().__init__(f"{origin}: {message}")


def preview(value: Any, limit: int = 80) -> str:
    """A short ``repr`` of an offending value for error messages."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
