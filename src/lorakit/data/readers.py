"""Read rows from JSONL, JSON, CSV, TSV, Parquet and ``datasets.save_to_disk`` folders.

Every row comes back as a ``Row``: its values (a dict) and its ``Origin`` (file and line, or row
index), so that later stages can say exactly where a bad value came from. Text formats are parsed
with the standard library's ``json``/``csv`` (they track line numbers, also for quoted fields that
span lines); Parquet with pyarrow; saved datasets with ``datasets.load_from_disk``.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lorakit.data.errors import DataError, Origin, preview

SUFFIXES = (".jsonl", ".json", ".csv", ".tsv", ".parquet")


@dataclass(frozen=True)
class Row:
    """One record of a data file: column name -> value, and where it came from."""

    values: dict[str, Any]
    origin: Origin


def read_rows(path: str | Path, *, split: str | None = None) -> list[Row]:
    """All rows of ``path``, chosen by suffix (``.jsonl .json .csv .tsv .parquet``) or a saved-dataset folder.

    ``split`` picks one split of a folder written by ``DatasetDict.save_to_disk`` (required there when
    it holds more than one). CSV/TSV values are strings; a header line is required. Raises
    ``DataError`` naming the file and line for unreadable content, ``FileNotFoundError`` if the path
    does not exist.
    """
    path = Path(path)
    if path.is_dir():
        return _read_saved_dataset(path, split)
    if not path.exists():
        raise FileNotFoundError(f"data file {path} does not exist")
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return _read_jsonl(path)
    if suffix == ".json":
        return _read_json(path)
    if suffix in (".csv", ".tsv"):
        return _read_delimited(path, "\t" if suffix == ".tsv" else ",")
    if suffix == ".parquet":
        return _read_parquet(path)
    raise DataError(
        str(path),
        f"unsupported file type {suffix!r}; expected one of {', '.join(SUFFIXES)} "
        "or a folder written by datasets' save_to_disk",
    )


def read_text(path: Path) -> str:
    """The file decoded as UTF-8 (a byte-order mark is dropped).

    Raises:
        DataError: a byte sequence that is not UTF-8; the message names the line and column.
    """
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line_start = data.rfind(b"\n", 0, error.start) + 1
        line = data.count(b"\n", 0, error.start) + 1
        bad = data[error.start : error.end]
        raise DataError(
            Origin(str(path), line=line),
            f"not UTF-8: byte {bad.hex(' ')} at column {error.start - line_start + 1} ({error.reason}); "
            "save the file as UTF-8",
        ) from None


def _read_jsonl(path: Path) -> list[Row]:
    rows: list[Row] = []
    # splitlines() would also split at \x1c, \x85, U+2028 ..., which JSON strings may hold unescaped.
    for number, line in enumerate(read_text(path).split("\n"), start=1):
        if not line.strip():
            continue  # blank lines separate nothing and hold no data
        origin = Origin(str(path), line=number)
        try:
            value = json.loads(line)
        except json.JSONDecodeError as error:
            raise DataError(origin, f"invalid JSON ({error.msg} at column {error.colno})") from None
        rows.append(Row(_as_object(value, origin), origin))
    return rows


def _read_json(path: Path) -> list[Row]:
    # A JSON array of objects (e.g. Alpaca's alpaca_data.json); positions are array indices.
    try:
        value = json.loads(read_text(path))
    except json.JSONDecodeError as error:
        origin = Origin(str(path), line=error.lineno)
        raise DataError(origin, f"invalid JSON ({error.msg} at column {error.colno})") from None
    if not isinstance(value, list):
        raise DataError(str(path), f"expected a JSON array of objects, got {type(value).__name__}")
    rows = []
    for index, item in enumerate(value):
        origin = Origin(str(path), row=index)
        rows.append(Row(_as_object(item, origin), origin))
    return rows


def _as_object(value: Any, origin: Origin) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise DataError(origin, f"expected a JSON object with named fields, got {preview(value)}")
    return value


def _read_delimited(path: Path, delimiter: str) -> list[Row]:
    # TSV follows the GLUE convention: no quoting at all, a field simply cannot contain a tab.
    # CSV uses standard double-quote quoting, so one record can span several lines; we report the
    # line a record starts on.
    quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
    rows: list[Row] = []
    with io.StringIO(read_text(path), newline="") as handle:
        reader = csv.reader(handle, delimiter=delimiter, quoting=quoting, strict=True)
        try:
            header = next(reader, None)
            if header is None:
                return rows
            header = [name.strip() for name in header]
            if len(set(header)) != len(header) or "" in header:
                raise DataError(
                    Origin(str(path), line=1), f"the header needs distinct, non-empty names, got {header}"
                )
            start = reader.line_num + 1
            for fields in reader:
                origin = Origin(str(path), line=start)
                start = reader.line_num + 1
                if not fields:
                    continue  # an empty line
                if len(fields) != len(header):
                    separator = "tabs" if delimiter == "\t" else "commas"
                    raise DataError(
                        origin,
                        f"expected {len(header)} fields ({', '.join(header)}) separated by "
                        f"{separator}, got {len(fields)}: {preview(fields)}",
                    )
                rows.append(Row(dict(zip(header, fields)), origin))
        except csv.Error as error:
            raise DataError(Origin(str(path), line=reader.line_num), f"unreadable CSV: {error}") from None
    return rows


def _read_parquet(path: Path) -> list[Row]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as error:  # pyarrow raises several types for a corrupt file
        raise DataError(str(path), f"unreadable Parquet file: {error}") from None
    return [Row(values, Origin(str(path), row=index)) for index, values in enumerate(table.to_pylist())]


def _read_saved_dataset(folder: Path, split: str | None) -> list[Row]:
    import datasets

    if not ((folder / "dataset_dict.json").is_file() or (folder / "state.json").is_file()):
        raise DataError(
            str(folder),
            "a folder must be written by datasets' save_to_disk (state.json or dataset_dict.json inside)",
        )
    loaded = datasets.load_from_disk(str(folder))
    source = str(folder)
    if isinstance(loaded, datasets.DatasetDict):
        if split is None and len(loaded) == 1:
            split = next(iter(loaded))
        if split not in loaded:
            raise DataError(source, f"choose a split with split=...: this folder holds {sorted(loaded)}")
        loaded, source = loaded[split], f"{folder}[{split}]"
    elif split is not None:
        raise DataError(source, f"split={split!r} given, but this folder holds a single dataset")
    return [Row(dict(values), Origin(source, row=index)) for index, values in enumerate(loaded)]
