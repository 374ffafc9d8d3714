"""LoRA's input dropout, drawn cheaply and kept small for backward.

``nn.Dropout`` on a LoRA input costs more than the adapter itself: on a CPU it draws one Bernoulli sample
per element (about 1.3x the time of a bf16 576x576 matmul over the same rows), and backward keeps a mask
and a dropped-out copy of the input in the input's width. Every adapted layer pays this, seven per decoder
block with all-linear targets. Here:

* the mask comes from 64-bit random words cut into four 16-bit lanes (one generator call per four
  elements, about 5x faster on a CPU); an element is dropped when its lane falls below ``p`` of the
  16-bit range, so the probability is ``p`` rounded to a multiple of 2^-16 (|error| <= 7.7e-6), and the
  kept elements are scaled by exactly ``1 / (1 - rounded p)``, which keeps the expectation exact;
* the scale is not applied to the input but folded into the adapter's scaling (one scalar), so the
  dropped-out input is the input times a 0/1 byte mask: the input where kept, zero where dropped;
* that tensor is marked recomputable from the input and a 1-byte mask, so under lean activations
  backward keeps the mask instead of a copy (the input is kept or rebuilt anyway).

The draws come from torch's generator of the input's device, so a seeded run is repeatable and resume
restores them with the generator state.
"""

from __future__ import annotations

import functools

import torch

from lorakit.recipes import mark_recomputable

LANE_STATES = 2**16  # a 16-bit lane takes this many values
LANES_PER_WORD = 4  # 16-bit lanes in one 64-bit word


@functools.lru_cache(maxsize=64)
def lane_threshold(p: float) -> int:
    """Lanes (int16, uniform over [-2^15, 2^15)) below this value are dropped: ``p`` of the range, rounded."""
    return min(round(p * LANE_STATES), LANE_STATES - 1) - LANE_STATES // 2  # p < 1 stays below 1


def rounded_probability(p: float) -> float:
    """The drop probability actually used: ``p`` rounded to a multiple of 2^-16."""
    return (lane_threshold(p) + LANE_STATES // 2) / LANE_STATES


def keep_mask(shape: torch.Size, p: float, device: torch.device) -> torch.Tensor:
    """uint8 tensor of ``shape``: 1 where an element is kept, 0 where it is dropped (probability
    `rounded_probability`). uint8, not bool: ``x * mask`` is several times faster than ``masked_fill`` on
    a CPU, in forward, in the rebuild and in backward, and it is the same byte per element."""
    count = 1
    for size in shape:
        count *= size
    words = torch.empty((count + LANES_PER_WORD - 1) // LANES_PER_WORD, dtype=torch.int64, device=device)
    words.random_(torch.iinfo(torch.int64).min, None)  # every bit uniform (the full 64-bit range)
    return words.view(torch.int16)[:count].view(shape).ge(lane_threshold(p)).view(torch.uint8)


def drop_inputs(x: torch.Tensor, p: float) -> tuple[torch.Tensor, float]:
    """``(x with dropped elements zeroed, 1 / (1 - rounded p))``: x (..., in) -> (..., in), same dtype.

    The caller multiplies the adapter's output by the returned factor (dropout's rescaling, moved out of
    the input). ``p`` in (0, 1).
    """
    keep = keep_mask(x.shape, p, x.device)
    out = x * keep  # uint8 promotes to x's dtype: x where kept, zero where dropped
    mark_recomputable(out, torch.mul, x, keep)
    return out, 1.0 / (1.0 - rounded_probability(p))
