"""Turn rendered rows into token ids, attention masks and labels, with an explicit length policy.

A rendered row is text plus the character spans that count in the loss (causal formats) or a class
id (classify). Tokens whose characters overlap a loss span get their own id as label, every other
token gets ``IGNORE_INDEX`` (-100, which transformers' losses skip); transformers shifts labels
inside the model, so ``labels`` line up with ``input_ids`` here.

Rows longer than ``max_length`` are never cut or dropped silently: they raise ``DataError`` unless
``truncate=True`` (cut to ``max_length``) or ``skip_long=True`` (left out), and ``DataStats`` counts
both.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypedDict

from lorakit.data.errors import DataError, Origin

if TYPE_CHECKING:  # only for annotations: importing lorakit.data does not load transformers
    from transformers import PreTrainedTokenizerBase

IGNORE_INDEX = -100
_BATCH = 1024  # rows per tokenizer call: fast tokenizers work through a batch in parallel


class Example(TypedDict, total=False):
    """One training example, lists of equal length ``T`` (``labels`` is a class id for classify)."""

    input_ids: list[int]
    attention_mask: list[int]
    labels: list[int] | int
    position_ids: list[int]  # only in packed examples made with reset_position_ids=True


@dataclass
class DataStats:
    """What reading a data set did: the format chosen and why, counts, and the label names."""

    source: str
    format: str
    detected: str
    rows: int = 0
    examples: int = 0
    truncated: int = 0
    skipped: int = 0
    without_loss: int = 0  # causal examples left with no loss token (e.g. a reply truncated away)
    tokens: int = 0
    loss_tokens: int = 0
    longest: int = 0  # the longest row in tokens, before truncation
    label_names: list[str] | None = None
    num_labels: int | None = None
    packed_sequences: int | None = None
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Rendered:
    """A row ready to tokenise: its text and either loss ``spans`` (causal) or a class ``label``."""

    text: str
    origin: Origin
    spans: tuple[tuple[int, int], ...] = ()
    label: int | None = None


def tokenize_rendered(
    rendered: Sequence[Rendered],
    tokenizer: PreTrainedTokenizerBase,
    stats: DataStats,
    *,
    add_special_tokens: bool,
    max_length: int | None = None,
    truncate: bool = False,
    skip_long: bool = False,
) -> list[Example]:
    """Tokenise ``rendered`` rows (in batches) into examples, updating ``stats`` in place."""
    if truncate and skip_long:
        raise ValueError("pass truncate=True or skip_long=True, not both")
    if max_length is not None and max_length < 1:
        raise ValueError(f"max_length must be >= 1, got {max_length}")
    classify = bool(rendered) and rendered[0].label is not None
    if not classify and not tokenizer.is_fast:
        raise ValueError(
            f"{type(tokenizer).__name__} is a slow tokenizer; causal formats need a fast one "
            "(for character offsets)"
        )
    examples: list[Example] = []
    for start in range(0, len(rendered), _BATCH):
        chunk = rendered[start : start + _BATCH]
        encoded = tokenizer(
            [item.text for item in chunk],
            add_special_tokens=add_special_tokens,
            return_offsets_mapping=not classify,
            return_attention_mask=False,
            verbose=False,  # no "sequence longer than model_max_length" warning: we check lengths ourselves
        )
        for position, item in enumerate(chunk):
            ids = list(encoded["input_ids"][position])
            stats.longest = max(stats.longest, len(ids))
            if max_length is not None and len(ids) > max_length:
                if skip_long:
                    stats.skipped += 1
                    continue
                if not truncate:
                    raise DataError(
                        item.origin,
                        f"{len(ids)} tokens, more than max_length={max_length}; pass truncate=True or "
                        "skip_long=True, or raise max_length",
                    )
                stats.truncated += 1
                if classify:
                    # Re-encode with the tokenizer's own truncation so that [CLS] ... [SEP] survive.
                    ids = tokenizer(
                        item.text,
                        add_special_tokens=add_special_tokens,
                        truncation=True,
                        max_length=max_length,
                    )["input_ids"]
                else:
                    ids = ids[:max_length]
            example: Example = {"input_ids": ids, "attention_mask": [1] * len(ids)}
            if classify:
                example["labels"] = int(item.label)  # type: ignore[arg-type]
            else:
                offsets = encoded["offset_mapping"][position][: len(ids)]
                labels = _labels_from_spans(ids, offsets, item.spans)
                loss_tokens = sum(label != IGNORE_INDEX for label in labels)
                stats.loss_tokens += loss_tokens
                stats.without_loss += loss_tokens == 0
                example["labels"] = labels
            stats.tokens += len(ids)
            examples.append(example)
    stats.examples = len(examples)
    return examples


def _labels_from_spans(
    ids: Sequence[int], offsets: Sequence[Any], spans: Sequence[tuple[int, int]]
) -> list[int]:
    """Each token's id where its characters overlap a loss span, ``IGNORE_INDEX`` elsewhere.

    Special tokens added by the tokenizer (BOS, ...) have empty offsets and never count. A token
    that straddles the start of a reply counts: it holds part of the reply.
    """
    labels = [IGNORE_INDEX] * len(ids)
    span_index = 0
    for position, (token_id, (start, end)) in enumerate(zip(ids, offsets)):
        if start >= end:
            continue
        # Spans and tokens are both in order: skip spans that end before this token starts.
        while span_index < len(spans) and spans[span_index][1] <= start:
            span_index += 1
        if span_index < len(spans) and spans[span_index][0] < end:
            labels[position] = token_id
    return labels
