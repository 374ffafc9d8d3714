"""Batch examples: right padding to the longest example of the batch."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch

from lorakit.data.tokenize import IGNORE_INDEX

if TYPE_CHECKING:  # only for annotations: importing lorakit.data does not load transformers
    from transformers import PreTrainedTokenizerBase


class PadCollator:
    """``collate_fn`` for a ``DataLoader``: pads every per-token list to the batch's longest.

    Returns int64 tensors: ``input_ids`` (B, T) padded with ``pad_token_id``, ``attention_mask``
    (B, T) padded with 0, ``labels`` (B, T) padded with -100 -- or (B,) for class ids --, and
    ``position_ids`` (B, T) padded with 0 when the examples have them. Padding is on the right.
    """

    def __init__(self, pad_token_id: int) -> None:
        self.pad_token_id = int(pad_token_id)

    def __call__(self, batch: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        if not batch:
            raise ValueError("cannot collate an empty batch")
        keys = set(batch[0])
        if "input_ids" not in keys or any(set(example) != keys for example in batch):
            raise ValueError(
                f"every example needs the same keys, including input_ids; got {[sorted(e) for e in batch]}"
            )
        longest = max(len(example["input_ids"]) for example in batch)
        padding = {
            "input_ids": self.pad_token_id,
            "attention_mask": 0,
            "labels": IGNORE_INDEX,
            "position_ids": 0,
        }
        out: dict[str, torch.Tensor] = {}
        for key in sorted(keys):
            values = [example[key] for example in batch]
            if key == "labels" and not isinstance(values[0], list):
                out[key] = torch.tensor(values, dtype=torch.long)  # class ids: (B,)
                continue
            if key not in padding:
                raise ValueError(f"do not know how to pad {key!r}; expected {sorted(padding)}")
            out[key] = torch.tensor(
                [list(value) + [padding[key]] * (longest - len(value)) for value in values], dtype=torch.long
            )
        return out


def pad_collator(tokenizer: PreTrainedTokenizerBase) -> PadCollator:
    """A ``PadCollator`` with the tokenizer's pad token id (its eos token id if it has no pad token)."""
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_id is None:
        raise ValueError(f"{type(tokenizer).__name__} has neither a pad token nor an eos token to pad with")
    return PadCollator(pad_id)
