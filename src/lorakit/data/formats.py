"""The four row formats, how ``auto`` recognises them, and per-row validation.

=============  =====================================================================================
format         columns
=============  =====================================================================================
chat           ``messages``: a list of ``{"role": str, "content": str}`` with at least one assistant turn
instruction    ``prompt`` + ``response`` (or ``completion``), or Alpaca's ``instruction`` + optional
               ``input`` + ``output``
text           ``text``
classify       a text column (``text``, ``sentence`` or ``content``) + ``label`` (int id or class name)
=============  =====================================================================================

Validation raises ``DataError`` naming the row's file and line and what was expected.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from lorakit.data.errors import DataError, preview
from lorakit.data.readers import Row

FORMATS = ("chat", "instruction", "text", "classify")
TEXT_COLUMNS = ("text", "sentence", "content")
LABEL_COLUMN = "label"
# The roles chat templates know; anything else (a typo such as "assitant", "bot") would be rendered
# as some other turn or dropped by the template, silently.
CHAT_ROLES = ("system", "user", "assistant", "tool")
_INTEGER = re.compile(r"[+-]?\d+")


@dataclass(frozen=True)
class FormatChoice:
    """The format rows are read as, the text column (classify only) and a sentence saying why."""

    format: str
    description: str
    text_column: str | None = None


def detect_format(rows: Sequence[Row], requested: str = "auto") -> FormatChoice:
    """Choose the format from the first row's columns (``auto``), or check that ``requested`` fits.

    The first row decides for every row; rows that do not fit fail later, with their own line.
    """
    if requested != "auto" and requested not in FORMATS:
        raise ValueError(f"format={requested!r} is unknown; expected 'auto' or one of {FORMATS}")
    if not rows:
        raise ValueError("no rows to read: the data file is empty")
    first = rows[0]
    columns = set(first.values)
    text_column = next((name for name in TEXT_COLUMNS if name in columns), None)
    if requested == "auto":
        if "messages" in columns:
            return FormatChoice("chat", "chat (column 'messages')")
        if {"prompt", "response"} <= columns or {"prompt", "completion"} <= columns:
            return FormatChoice("instruction", "instruction (columns 'prompt' and 'response'/'completion')")
        if {"instruction", "output"} <= columns:
            return FormatChoice(
                "instruction", "instruction (Alpaca columns 'instruction', 'input', 'output')"
            )
        if LABEL_COLUMN in columns and text_column is not None:
            return FormatChoice(
                "classify", f"classify (text column {text_column!r}, label column 'label')", text_column
            )
        if "text" in columns:
            return FormatChoice("text", "text (column 'text')")
        raise DataError(
            first.origin,
            f"cannot detect the format from the columns {sorted(columns)}; expected 'messages' (chat), "
            "'prompt'+'response' or 'instruction'+'output' (instruction), 'text'/'sentence'/'content' "
            "with 'label' (classify), or 'text' (text); or pass format=... explicitly",
        )
    if requested == "classify":
        if text_column is None:
            raise DataError(
                first.origin,
                f"format 'classify' needs a text column named one of {TEXT_COLUMNS}, "
                f"got columns {sorted(columns)}",
            )
        return FormatChoice("classify", f"classify (as requested; text column {text_column!r})", text_column)
    return FormatChoice(requested, f"{requested} (as requested)")


def chat_messages(row: Row) -> list[dict[str, Any]]:
    """The row's ``messages``, checked: role and content strings, at least one assistant turn.

    A JSON string is accepted too, since CSV/TSV cells can only hold text.
    """
    value = row.values.get("messages")
    if isinstance(value, str):
        # Not JSON: reported below as a string where a list was expected.
        with contextlib.suppress(json.JSONDecodeError):
            value = json.loads(value)
    expected = "expected a 'messages' list of {role, content}"
    if not isinstance(value, list) or not value:
        raise DataError(row.origin, f"{expected}, got {preview(value)}")
    for index, message in enumerate(value):
        if (
            not isinstance(message, dict)
            or not isinstance(message.get("role"), str)
            or not isinstance(message.get("content"), str)
        ):
            raise DataError(
                row.origin,
                f"{expected}; messages[{index}] should be {{role: str, content: str}}, "
                f"got {preview(message)}",
            )
    for index, message in enumerate(value):
        if message["role"] not in CHAT_ROLES:
            raise DataError(
                row.origin,
                f"messages[{index}] has role {preview(message['role'])}; expected one of "
                f"{', '.join(CHAT_ROLES)}",
            )
        if message["role"] == "assistant" and not message["content"].strip():
            # An empty reply would train the model to answer with nothing but the end-of-turn token.
            raise DataError(row.origin, f"messages[{index}] is an assistant turn with empty content")
    if not any(message["role"] == "assistant" for message in value):
        roles = [message["role"] for message in value]
        raise DataError(
            row.origin, f"{expected} with at least one 'assistant' turn to learn from, got roles {roles}"
        )
    return value


@dataclass(frozen=True)
class Instruction:
    """A prompt and its response; ``alpaca`` records whether it came as instruction/input/output."""

    instruction: str
    input: str
    response: str
    alpaca: bool


def instruction_fields(row: Row) -> Instruction:
    """The row's prompt/response (or instruction/input/output) strings, checked."""
    values = row.values
    if "prompt" in values:
        response_key = "response" if "response" in values else "completion"
        prompt, response = values.get("prompt"), values.get(response_key)
        if isinstance(prompt, str) and isinstance(response, str) and response:
            return Instruction(prompt, "", response, alpaca=False)
        got = {"prompt": prompt, response_key: response}
    else:
        instruction, extra, output = values.get("instruction"), values.get("input", ""), values.get("output")
        extra = "" if extra is None else extra
        if isinstance(instruction, str) and isinstance(extra, str) and isinstance(output, str) and output:
            return Instruction(instruction, extra, output, alpaca=True)
        got = {"instruction": instruction, "input": extra, "output": output}
    raise DataError(
        row.origin,
        "expected strings 'prompt' and a non-empty 'response' (or 'instruction', optional 'input' and a "
        f"non-empty 'output'), got {preview(got, 160)}",
    )


def text_field(row: Row, column: str = "text") -> str:
    """The row's non-empty text in ``column``."""
    value = row.values.get(column)
    if not isinstance(value, str) or not value.strip():
        raise DataError(row.origin, f"expected a non-empty string in column {column!r}, got {preview(value)}")
    return value


def label_ids(
    rows: Sequence[Row], names: Sequence[str] | None = None
) -> tuple[list[int], list[str] | None, int]:
    """Map each row's ``label`` to a class id: ``(ids, label_names, num_labels)``.

    Integer labels (also integer strings such as TSV's ``"1"``) are ids as they are. Class names
    are mapped through ``names`` if given, else through their sorted set -- pass the training set's
    ``label_names`` as ``names`` when reading its dev/test files so that ids agree. Without names,
    ``num_labels`` of integer labels is ``max id + 1``.
    """
    kinds: list[tuple[str, int | str]] = [_label_value(row) for row in rows]
    first_kind = kinds[0][0] if kinds else "id"
    for row, (kind, _) in zip(rows, kinds):
        if kind != first_kind:
            wanted = {"id": "an integer id", "bool": "a boolean", "name": "a class name"}[first_kind]
            raise DataError(
                row.origin,
                f"expected {wanted} in 'label' like the first row, got {preview(row.values.get('label'))}",
            )
    if first_kind in ("id", "bool"):
        ids = [int(value) for _, value in kinds]
        limit = len(names) if names is not None else None
        for row, label in zip(rows, ids):
            if label < 0 or (limit is not None and label >= limit):
                bound = f"between 0 and {limit - 1}" if limit is not None else ">= 0"
                raise DataError(row.origin, f"expected a label id {bound}, got {label}")
        num_labels = limit if limit is not None else (max(ids) + 1 if ids else 0)
        return ids, (list(names) if names is not None else None), num_labels
    label_names = list(names) if names is not None else sorted({str(value) for _, value in kinds})
    index = {name: position for position, name in enumerate(label_names)}
    ids = []
    for row, (_, value) in zip(rows, kinds):
        if value not in index:
            raise DataError(row.origin, f"unknown label {value!r}; expected one of {label_names}")
        ids.append(index[str(value)])
    return ids, label_names, len(label_names)


def _label_value(row: Row) -> tuple[str, int | str]:
    value = row.values.get(LABEL_COLUMN)
    if isinstance(value, bool):
        # Its own kind: true/false among integer ids is a mistake (it would silently become 1/0), while
        # a column of booleans only is a binary label.
        return "bool", int(value)
    if isinstance(value, int):
        return "id", value
    if isinstance(value, float) and value.is_integer():
        return "id", int(value)
    if isinstance(value, str) and value.strip():
        text = value.strip()
        return ("id", int(text)) if _INTEGER.fullmatch(text) else ("name", text)
    raise DataError(row.origin, f"expected a 'label' (an integer id or a class name), got {preview(value)}")
