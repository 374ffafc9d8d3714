"""DoRA (Liu et al. 2024): the adapted weight is split into a learned magnitude and a LoRA-updated direction.

    W' = m ⊙ (W + s·B·A) / ||W + s·B·A||_row

where the row norm is taken over the input dimension and, as the paper's section 4.3 recommends, treated as
a constant (detached) during backpropagation. The layer adds ``W'x − Wx`` to the base output.
"""

from __future__ import annotations

import torch
from torch import nn


class DoraMagnitude(nn.Module):
    """The learned magnitude m, one entry per output feature: ``weight`` of shape (out,)."""

    def __init__(self, row_norm: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(row_norm.detach().clone())


def row_norm(weight: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """||W + ΔW|| over the input dimension.

    Args:
        weight: (out, in) base weight.
        delta: (out, in) scaled LoRA update s·B·A.

    Returns:
        (out,) row norms, detached.
    """
    return torch.linalg.vector_norm((weight + delta).detach(), dim=1)


def dora_delta(
    base_no_bias: torch.Tensor,
    lora_out: torch.Tensor,
    magnitude: torch.Tensor,
    norm: torch.Tensor,
    scaling: float,
) -> torch.Tensor:
    """What DoRA adds to the base output.

    Args:
        base_no_bias: (..., out) W·x without the bias.
        lora_out: (..., out) B·A·x, unscaled.
        magnitude: (out,) m.
        norm: (out,) detached ||W + s·B·A||_row.
        scaling: s.

    Returns:
        (..., out) ``(m/norm − 1)·Wx + (m/norm)·s·BAx``.
    """
    factor = magnitude / norm
    # (m/n)·s first: the product then keeps `lora_out` itself for backward (not a scaled copy), which
    # lean activations rebuild from the r-wide A·x instead of keeping (lorakit.recipes marks it).
    return (factor - 1) * base_no_bias + (factor * scaling) * lora_out
