"""NumPy reference implementations of the LoRA layers, public: the maths of LoRA in a page.

This module is part of lorakit's public API (``lorakit.reference``), for two readers: someone learning
what a LoRA layer computes, and a test that needs an independent oracle. The forward and the backward of
LoRA, DoRA and the embedding variant are written out by hand from the formulas, with no torch and no
autograd (the backward is derived, not traced), so comparing `lorakit.layers` against these functions
checks the maths rather than lorakit against itself. docs/core.md walks through them.

Shapes (n rows of input):

    x (n, in)   W (out, in)   b (out,)   A (r, in)   B (out, r)   s: scaling (lora_alpha / r, or / sqrt(r))
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class LoraLinearGrads:
    """Gradients of a scalar loss L through `lora_linear_forward`, given g = dL/dy (n, out).

    Attributes:
        dx: (n, in) dL/dx = g·W + s·(g·B)·A.
        dA: (r, in) dL/dA = s·(g·B)ᵀ·x.
        dB: (out, r) dL/dB = s·gᵀ·(x·Aᵀ).
    """

    dx: np.ndarray
    dA: np.ndarray
    dB: np.ndarray


def lora_linear_forward(
    x: np.ndarray, W: np.ndarray, b: np.ndarray | None, A: np.ndarray, B: np.ndarray, scaling: float
) -> np.ndarray:
    """y = x·Wᵀ + b + s·(x·Aᵀ)·Bᵀ.

    Args:
        x: (n, in) input.
        W: (out, in) frozen base weight.
        b: (out,) base bias, or None.
        A: (r, in) LoRA down-projection.
        B: (out, r) LoRA up-projection.
        scaling: s.

    Returns:
        (n, out) output.
    """
    y = x @ W.T + scaling * ((x @ A.T) @ B.T)
    return y if b is None else y + b


def lora_linear_backward(
    x: np.ndarray, W: np.ndarray, A: np.ndarray, B: np.ndarray, scaling: float, grad_out: np.ndarray
) -> LoraLinearGrads:
    """Hand-derived backward pass of `lora_linear_forward` (W and b are frozen, so no dW, db).

    With h = x·Aᵀ (n, r) and y = x·Wᵀ + b + s·h·Bᵀ:
    dB = s·gᵀ·h, dh = s·g·B, dA = dhᵀ·x, dx = g·W + dh·A.

    Args:
        x: (n, in) input of the forward pass.
        W: (out, in), A: (r, in), B: (out, r), scaling: as in the forward pass.
        grad_out: (n, out) g = dL/dy.

    Returns:
        dx (n, in), dA (r, in), dB (out, r).
    """
    hidden = x @ A.T                       # (n, r)
    grad_hidden = scaling * (grad_out @ B)  # (n, r)
    return LoraLinearGrads(
        dx=grad_out @ W + grad_hidden @ A,
        dA=grad_hidden.T @ x,
        dB=scaling * (grad_out.T @ hidden),
    )


def dora_weight(
    W: np.ndarray, A: np.ndarray, B: np.ndarray, magnitude: np.ndarray, scaling: float
) -> np.ndarray:
    """DoRA's effective weight W' = m ⊙ (W + s·B·A) / ||W + s·B·A||, the norm taken per output row.

    Args:
        W: (out, in), A: (r, in), B: (out, r), scaling: s.
        magnitude: (out,) m.

    Returns:
        (out, in) W'.
    """
    updated = W + scaling * (B @ A)
    norm = np.sqrt((updated * updated).sum(axis=1))
    return (magnitude / norm)[:, None] * updated


def dora_linear_forward(
    x: np.ndarray,
    W: np.ndarray,
    b: np.ndarray | None,
    A: np.ndarray,
    B: np.ndarray,
    magnitude: np.ndarray,
    scaling: float,
) -> np.ndarray:
    """y = x·W'ᵀ + b with W' = `dora_weight` (no dropout).

    Args:
        x: (n, in); W: (out, in); b: (out,) or None; A: (r, in); B: (out, r); magnitude: (out,); scaling: s.

    Returns:
        (n, out) output.
    """
    y = x @ dora_weight(W, A, B, magnitude, scaling).T
    return y if b is None else y + b


def lora_embedding_forward(
    ids: np.ndarray, E: np.ndarray, A: np.ndarray, B: np.ndarray, scaling: float
) -> np.ndarray:
    """y = E[ids] + s·(Aᵀ[ids])·Bᵀ, PEFT's layout for an embedding adapter.

    Args:
        ids: (...) integer token ids.
        E: (num_embeddings, dim) base table.
        A: (r, num_embeddings) ``lora_embedding_A``.
        B: (dim, r) ``lora_embedding_B``.
        scaling: s.

    Returns:
        (..., dim) embeddings.
    """
    return E[ids] + scaling * (A.T[ids] @ B.T)
