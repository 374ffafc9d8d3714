"""Spectral statistics of a weight update ΔW: the numbers the rank report is made of.

All of them follow from the singular values σ₁ ≥ σ₂ ≥ … ≥ 0 of ΔW (float64):

- energy rank at threshold τ: the smallest k with Σ_{i≤k} σᵢ² ≥ τ · Σ_i σᵢ²;
- stable rank: ||ΔW||_F² / ||ΔW||_2² = Σ σᵢ² / σ₁² (a continuous, noise-robust rank; ≤ the rank);
- Eckart–Young: the best rank-k approximation in Frobenius norm is the truncated SVD, with relative
  error sqrt(Σ_{i>k} σᵢ²) / sqrt(Σ_i σᵢ²).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

ERROR_RANKS: tuple[int, ...] = (1, 2, 4, 8, 16, 64)


def singular_values(matrix: torch.Tensor) -> torch.Tensor:
    """Singular values of a (m, n) matrix, descending, shape (min(m, n),), computed in float64."""
    if matrix.ndim != 2:
        raise ValueError(f"expected a 2-D matrix, got shape {tuple(matrix.shape)}")
    return torch.linalg.svdvals(matrix.to(torch.float64))


def lowrank_singular_values(lora_B: torch.Tensor, lora_A: torch.Tensor, scaling: float = 1.0) -> torch.Tensor:
    """Singular values of scaling · B @ A without forming the (out, in) product.

    B is (out, r), A is (r, in). With B = Q_B R_B and Aᵀ = Q_A R_A (reduced QR, Q with orthonormal
    columns), scaling · B A = Q_B (scaling · R_B R_Aᵀ) Q_Aᵀ, and multiplying by matrices with
    orthonormal columns keeps singular values, so they are those of the r×r core. Cost O((out+in)·r²)
    instead of O(out·in·r). Returns shape (r,), descending, float64.
    """
    if lora_B.ndim != 2 or lora_A.ndim != 2 or lora_B.shape[1] != lora_A.shape[0]:
        raise ValueError(
            f"B (out, r) and A (r, in) do not chain: {tuple(lora_B.shape)} @ {tuple(lora_A.shape)}"
        )
    _, r_b = torch.linalg.qr(lora_B.to(torch.float64))  # (min(out, r), r)
    _, r_a = torch.linalg.qr(lora_A.to(torch.float64).T)  # (min(in, r), r)
    core = scaling * (r_b @ r_a.T)
    values = torch.linalg.svdvals(core)
    # a core smaller than r (out < r or in < r) has fewer values: pad with the product's exact zeros
    r = lora_A.shape[0]
    return torch.cat([values, values.new_zeros(r - values.numel())]) if values.numel() < r else values


def energy(values: torch.Tensor) -> float:
    """Σ σᵢ² = ||ΔW||_F²."""
    return float((values.to(torch.float64) ** 2).sum())


def energy_rank(values: torch.Tensor, threshold: float) -> int:
    """The smallest k whose top-k singular values hold at least ``threshold`` of the energy (0 if ΔW = 0)."""
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold must be in (0, 1], got {threshold}")
    squares = values.to(torch.float64) ** 2
    total = float(squares.sum())
    if total == 0.0:
        return 0
    cumulative = torch.cumsum(squares, 0) / total
    # the tolerance keeps threshold=1.0 reachable despite rounding in the cumulative sum
    return int((cumulative < threshold - 1e-12).sum()) + 1


def stable_rank(values: torch.Tensor) -> float:
    """||ΔW||_F² / ||ΔW||_2² (0 if ΔW = 0)."""
    top = float(values.max()) if values.numel() else 0.0
    return energy(values) / top**2 if top > 0 else 0.0


def cumulative_energy(values: torch.Tensor) -> torch.Tensor:
    """Fraction of the energy in the top-k values for k = 1..n, shape (n,)."""
    squares = values.to(torch.float64) ** 2
    total = squares.sum()
    return torch.cumsum(squares, 0) / total if total > 0 else torch.zeros_like(squares)


def eckart_young_errors(values: torch.Tensor, ranks: Iterable[int] = ERROR_RANKS) -> dict[int, float]:
    """Relative Frobenius error ||ΔW − ΔW_k||_F / ||ΔW||_F of the best rank-k approximation, per k."""
    squares = values.to(torch.float64) ** 2
    total = float(squares.sum())
    errors: dict[int, float] = {}
    for k in ranks:
        tail = float(squares[k:].sum())
        errors[k] = (tail / total) ** 0.5 if total > 0 else 0.0
    return errors
