"""Data files to training batches: readers, the chat/instruction/text/classify formats, label
masking, optional packing and padding.

    examples, stats = load_examples("train.jsonl", tokenizer, max_length=512)
    loader = DataLoader(examples, batch_size=8, shuffle=True, collate_fn=pad_collator(tokenizer))
"""

from __future__ import annotations

from lorakit.data.chat import ChatTemplateError, render_chat
from lorakit.data.collate import PadCollator, pad_collator
from lorakit.data.errors import DataError, Origin
from lorakit.data.formats import FORMATS, TEXT_COLUMNS, FormatChoice, detect_format, label_ids
from lorakit.data.load import load_examples, prepare_examples, rows_from_records
from lorakit.data.packing import pack_examples
from lorakit.data.readers import Row, read_rows
from lorakit.data.tokenize import IGNORE_INDEX, DataStats, Example

__all__ = [
    "FORMATS",
    "IGNORE_INDEX",
    "TEXT_COLUMNS",
    "ChatTemplateError",
    "DataError",
    "DataStats",
    "Example",
    "FormatChoice",
    "Origin",
    "PadCollator",
    "Row",
    "detect_format",
    "label_ids",
    "load_examples",
    "pack_examples",
    "pad_collator",
    "prepare_examples",
    "read_rows",
    "render_chat",
    "rows_from_records",
]
