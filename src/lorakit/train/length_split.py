"""Split a micro-batch into groups of similar length: less padding, same gradient.

A padded micro-batch costs about ``examples × longest example`` token rows in every layer (and
``examples × longest²`` in attention), however short most of its examples are. The loop sums each
micro-batch's loss over label tokens and divides by the label-token count of the whole step (see
`lorakit.train.loop`), so cutting a micro-batch into several smaller ones changes nothing in the step's
gradient but the order of floating-point sums, while each smaller batch pads only to its own longest
example and holds its activations alone (a lower peak).

`split_by_length` sorts the micro-batch's examples by length and cuts the sorted list where that saves
more padded tokens than ``overhead_tokens`` per extra forward pass (the fixed cost of one more
forward/backward: Python, kernel launches, weight reads), by dynamic programming over the cut points.
Examples of equal lengths stay together; a batch of very different lengths splits.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

DEFAULT_OVERHEAD_TOKENS = 128


def example_lengths(examples: Sequence[Any]) -> list[int] | None:
    """Token count of every example, or None when the examples are not token lists (nothing to split)."""
    lengths = []
    for example in examples:
        ids = example.get("input_ids") if isinstance(example, dict) else None
        if ids is None:
            return None
        lengths.append(len(ids))
    return lengths


def split_by_length(
    indices: Sequence[int], lengths: Sequence[int], overhead_tokens: int = DEFAULT_OVERHEAD_TOKENS
) -> list[list[int]]:
    """``indices`` cut into groups (each sorted by length, shortest group first) minimising
    ``Σ (examples in group × longest in group) + overhead_tokens × groups``.

    ``lengths[i]`` is the token count of example ``i``. Every index appears in exactly one group.

    Raises:
        ValueError: ``overhead_tokens`` < 0.
    """
    if overhead_tokens < 0:
        raise ValueError(f"overhead_tokens must be >= 0, got {overhead_tokens}")
    order = sorted(indices, key=lambda i: (lengths[i], i))
    count = len(order)
    if count <= 1:
        return [list(order)] if order else []
    # best[j]: the cheapest cost of the first j sorted examples; cut[j]: where its last group starts.
    best = [0] + [0] * count
    cut = [0] * (count + 1)
    for end in range(1, count + 1):
        longest = lengths[order[end - 1]]  # sorted: the group's last example is its longest
        best[end], cut[end] = min(
            (best[start] + (end - start) * longest + overhead_tokens, start) for start in range(end)
        )
    groups: list[list[int]] = []
    end = count
    while end > 0:
        groups.append(order[cut[end] : end])
        end = cut[end]
    return groups[::-1]
