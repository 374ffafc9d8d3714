"""Greedy packing of short causal-LM examples into sequences of at most ``max_length`` tokens.

Examples are taken in order and appended to the current sequence while they fit; the next one that
does not fit starts a new sequence (next-fit). Labels stay per example: the first token of every
example but the first in a sequence gets ``IGNORE_INDEX``, so no loss asks the model to predict one
example's start from the end of another; the rest of each example keeps its own labels.

Caveat: attention still crosses example boundaries -- a token sees the earlier examples of its
sequence -- because the attention mask is all ones. ``reset_position_ids=True`` adds
``position_ids`` that restart at 0 for every example; attention implementations that understand
packed sequences (e.g. transformers' flash-attention path) then keep examples apart, the default
SDPA/eager paths do not.
"""

from __future__ import annotations

from collections.abc import Sequence

from lorakit.data.tokenize import IGNORE_INDEX, Example


def pack_examples(
    examples: Sequence[Example], max_length: int, *, reset_position_ids: bool = False
) -> list[Example]:
    """Concatenate consecutive examples into sequences of at most ``max_length`` tokens."""
    if max_length < 1:
        raise ValueError(f"max_length must be >= 1, got {max_length}")
    packed: list[Example] = []
    current: Example | None = None
    for index, example in enumerate(examples):
        labels = example.get("labels")
        if not isinstance(labels, list):
            raise ValueError("only causal examples (labels per token) can be packed, not classification ones")
        length = len(example["input_ids"])
        if length > max_length:
            raise ValueError(f"example {index} has {length} tokens, more than max_length={max_length}")
        if current is None or len(current["input_ids"]) + length > max_length:
            current = {"input_ids": [], "attention_mask": [], "labels": []}
            if reset_position_ids:
                current["position_ids"] = []
            packed.append(current)
        elif length:
            labels = [IGNORE_INDEX, *labels[1:]]
        current["input_ids"].extend(example["input_ids"])
        current["attention_mask"].extend(example["attention_mask"])
        current["labels"].extend(labels)  # type: ignore[union-attr]
        if reset_position_ids:
            current["position_ids"].extend(range(length))
    return packed
