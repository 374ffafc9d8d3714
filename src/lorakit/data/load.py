"""From a data file (or rows) to tokenised examples and the stats of what happened on the way."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lorakit.data.chat import ChatTemplateError, render_chat
from lorakit.data.errors import DataError, Origin
from lorakit.data.formats import (
    Instruction,
    chat_messages,
    detect_format,
    instruction_fields,
    label_ids,
    text_field,
)
from lorakit.data.packing import pack_examples
from lorakit.data.readers import Row, read_rows
from lorakit.data.tokenize import DataStats, Example, Rendered, tokenize_rendered

if TYPE_CHECKING:  # only for annotations: importing lorakit.data does not load transformers
    from transformers import PreTrainedTokenizerBase

# Alpaca's prompts (Taori et al. 2023), used for instruction/input/output rows when the tokenizer
# has no chat template.
ALPACA_PROMPT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request."
    "\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)
ALPACA_PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request."
    "\n\n### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)


def load_examples(
    path: str | Path,
    tokenizer: PreTrainedTokenizerBase,
    *,
    format: str = "auto",
    max_length: int | None = None,
    truncate: bool = False,
    skip_long: bool = False,
    pack: bool = False,
    reset_position_ids: bool = False,
    labels: Sequence[str] | None = None,
    use_chat_template: bool | None = None,
    split: str | None = None,
) -> tuple[list[Example], DataStats]:
    """Read ``path`` and tokenise it: ``(examples, stats)``. See ``prepare_examples`` for the options."""
    return prepare_examples(
        read_rows(path, split=split),
        tokenizer,
        source=str(path),
        format=format,
        max_length=max_length,
        truncate=truncate,
        skip_long=skip_long,
        pack=pack,
        reset_position_ids=reset_position_ids,
        labels=labels,
        use_chat_template=use_chat_template,
    )


def rows_from_records(records: Iterable[Mapping[str, Any]], source: str = "<records>") -> list[Row]:
    """Wrap in-memory records (dicts) as rows; their origin is ``<source>[row i]``."""
    return [Row(dict(record), Origin(source, row=index)) for index, record in enumerate(records)]


def prepare_examples(
    rows: Sequence[Row],
    tokenizer: PreTrainedTokenizerBase,
    *,
    source: str = "<rows>",
    format: str = "auto",
    max_length: int | None = None,
    truncate: bool = False,
    skip_long: bool = False,
    pack: bool = False,
    reset_position_ids: bool = False,
    labels: Sequence[str] | None = None,
    use_chat_template: bool | None = None,
) -> tuple[list[Example], DataStats]:
    """Validate, render and tokenise ``rows``; optionally pack them. Returns ``(examples, stats)``.

    - ``format``: ``auto`` (detected from the first row's columns; ``stats.detected`` says how),
      ``chat``, ``instruction``, ``text`` or ``classify``.
    - ``max_length``: longer rows raise ``DataError`` unless ``truncate`` or ``skip_long``;
      ``stats.truncated`` / ``stats.skipped`` count them.
    - ``pack``: concatenate causal examples greedily into sequences of ``max_length`` (required);
      see ``lorakit.data.packing`` for how labels and attention behave across examples.
    - ``labels``: class names for ``classify``, in id order (pass the training set's
      ``stats.label_names`` when reading its dev set, so ids agree).
    - ``use_chat_template``: for ``instruction`` rows; default: when the tokenizer has one. Without
      it, ``prompt`` + ``response`` are concatenated as they are and Alpaca rows get Alpaca's prompt.

    Chat and instruction labels cover only the replies (assistant turns, with their end-of-turn
    token); text labels cover everything; classify labels are class ids.
    """
    if not rows:
        raise DataError(source, "no rows to read: the data is empty")
    if pack and max_length is None:
        raise ValueError("pack=True needs max_length: the length of the packed sequences")
    choice = detect_format(rows, format)
    if labels is not None and choice.format != "classify":
        raise ValueError(f"labels= applies to classify data, but the format is {choice.description}")
    stats = DataStats(source=source, format=choice.format, detected=choice.description, rows=len(rows))

    add_special_tokens = True
    if choice.format == "classify":
        ids, stats.label_names, stats.num_labels = label_ids(rows, labels)
        rendered = [
            Rendered(text_field(row, choice.text_column or "text"), row.origin, label=label)
            for row, label in zip(rows, ids)
        ]
    elif choice.format == "chat":
        rendered = [_render_chat_row(row, chat_messages(row), tokenizer) for row in rows]
        add_special_tokens = False  # the template writes BOS itself where the model wants one
    elif choice.format == "instruction":
        as_chat = (
            bool(getattr(tokenizer, "chat_template", None))
            if use_chat_template is None
            else use_chat_template
        )
        rendered = [_render_instruction(row, instruction_fields(row), tokenizer, as_chat) for row in rows]
        add_special_tokens = not as_chat
        stats.notes.append(
            "instruction rows rendered with the chat template"
            if as_chat
            else "instruction rows rendered as plain text"
        )
    else:
        eos = tokenizer.eos_token or ""
        rendered = []
        for row in rows:
            text = text_field(row) + eos  # eos so the model learns where a document ends
            rendered.append(Rendered(text, row.origin, spans=((0, len(text)),)))

    examples = tokenize_rendered(
        rendered,
        tokenizer,
        stats,
        add_special_tokens=add_special_tokens,
        max_length=max_length,
        truncate=truncate,
        skip_long=skip_long,
    )
    if pack:
        examples = pack_examples(examples, max_length, reset_position_ids=reset_position_ids)  # type: ignore[arg-type]
        stats.packed_sequences = len(examples)
    return examples, stats


def _render_chat_row(
    row: Row, messages: list[dict[str, Any]], tokenizer: PreTrainedTokenizerBase
) -> Rendered:
    try:
        text, spans = render_chat(messages, tokenizer)
    except ChatTemplateError as error:
        raise DataError(row.origin, str(error)) from None
    return Rendered(text, row.origin, spans=tuple(spans))


def _render_instruction(
    row: Row, item: Instruction, tokenizer: PreTrainedTokenizerBase, as_chat: bool
) -> Rendered:
    prompt = item.instruction
    if as_chat:
        if item.input:
            prompt = f"{item.instruction}\n\n{item.input}"
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": item.response}]
        return _render_chat_row(row, messages, tokenizer)
    if item.alpaca:
        template = ALPACA_PROMPT_WITH_INPUT if item.input else ALPACA_PROMPT
        prompt = template.format(instruction=item.instruction, input=item.input)
    text = prompt + item.response + (tokenizer.eos_token or "")
    return Rendered(text, row.origin, spans=((len(prompt), len(text)),))
