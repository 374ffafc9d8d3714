"""Subspace similarity between two adapters (Hu et al., LoRA, section 7.2 and Figure 3).

For the A matrices (r, in) of one layer in two adapters, let U₁ (d, r₁) and U₂ (d, r₂) hold the
right-singular vectors of A₁ and A₂ as columns, ordered by singular value (d = in). Then

    φ(A₁, A₂, i, j) = ||U₁[:, :i]ᵀ U₂[:, :j]||_F² / min(i, j)      for 1 ≤ i ≤ r₁, 1 ≤ j ≤ r₂,

which is 1 when one top subspace contains the other and 0 when they are orthogonal. For independent
random subspaces E[||U₁[:, :i]ᵀ U₂[:, :j]||_F²] = i·j/d, so E[φ] = max(i, j)/d: the baseline against
which "the top directions are shared" is judged. With ``matrix="B"`` the left-singular vectors of the
B matrices (out, r) are compared instead (d = out).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import torch

from lorakit.peft_format import load_adapter_folder


def subspace_basis(matrix: torch.Tensor, side: Literal["A", "B"] = "A") -> torch.Tensor:
    """Orthonormal basis of an adapter matrix's subspace, columns ordered by singular value.

    ``side="A"``: A is (r, d); returns the right-singular vectors, shape (d, min(r, d)).
    ``side="B"``: B is (d, r); returns the left-singular vectors, shape (d, min(r, d)).
    """
    if matrix.ndim != 2:
        raise ValueError(f"expected a 2-D adapter matrix, got shape {tuple(matrix.shape)}")
    u, _, vh = torch.linalg.svd(matrix.to(torch.float64), full_matrices=False)
    return vh.T if side == "A" else u


def subspace_similarity(basis_1: torch.Tensor, basis_2: torch.Tensor) -> torch.Tensor:
    """φ(i, j) for all 1 ≤ i ≤ r₁, 1 ≤ j ≤ r₂ from bases (d, r₁) and (d, r₂); returns (r₁, r₂).

    ||U₁[:, :i]ᵀ U₂[:, :j]||_F² is the sum of the squared entries of the top-left i×j block of
    M = U₁ᵀ U₂, so one 2-D cumulative sum of M² gives every (i, j) at once.
    """
    if basis_1.shape[0] != basis_2.shape[0]:
        raise ValueError(f"bases live in different spaces: {tuple(basis_1.shape)} vs {tuple(basis_2.shape)}")
    overlap = (basis_1.to(torch.float64).T @ basis_2.to(torch.float64)) ** 2
    block_sums = overlap.cumsum(0).cumsum(1)
    i = torch.arange(1, overlap.shape[0] + 1, dtype=torch.float64)[:, None]
    j = torch.arange(1, overlap.shape[1] + 1, dtype=torch.float64)[None, :]
    return block_sums / torch.minimum(i, j)


@dataclass
class LayerSimilarity:
    """φ(i, j) of one layer; ``phi[i-1][j-1]``, shape (r1, r2); ``dimension`` is d."""

    name: str
    r1: int
    r2: int
    dimension: int
    phi: list[list[float]]

    @property
    def phi_top(self) -> float:
        """φ(1, 1): do the two dominant directions coincide?"""
        return self.phi[0][0]

    @property
    def phi_common(self) -> float:
        """φ(r, r) with r = min(r1, r2): overlap of the two smaller-rank subspaces."""
        r = min(self.r1, self.r2)
        return self.phi[r - 1][r - 1]

    @property
    def phi_mean(self) -> float:
        return sum(map(sum, self.phi)) / (self.r1 * self.r2)

    @property
    def random_common(self) -> float:
        """E[φ(r, r)] for random subspaces, r = min(r1, r2): r / d."""
        return min(self.r1, self.r2) / self.dimension


@dataclass
class SimilarityReport:
    adapter_1: str
    adapter_2: str
    matrix: Literal["A", "B"]
    layers: list[LayerSimilarity] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)


def compare_adapters(
    adapter_1: str | Path, adapter_2: str | Path, matrix: Literal["A", "B"] = "A"
) -> SimilarityReport:
    """φ for every module adapted in both PEFT adapter folders."""
    if matrix not in ("A", "B"):
        raise ValueError(f"matrix must be 'A' or 'B', got {matrix!r}")
    first, second = load_adapter_folder(adapter_1), load_adapter_folder(adapter_2)
    report = SimilarityReport(adapter_1=str(adapter_1), adapter_2=str(adapter_2), matrix=matrix)
    for name in sorted(set(first.pairs) ^ set(second.pairs)):
        report.skipped[name] = "only in adapter 1" if name in first.pairs else "only in adapter 2"
    for name in sorted(set(first.pairs) & set(second.pairs)):
        pair_1, pair_2 = first.pairs[name], second.pairs[name]
        m1 = pair_1.lora_A if matrix == "A" else pair_1.lora_B
        m2 = pair_2.lora_A if matrix == "A" else pair_2.lora_B
        axis = 1 if matrix == "A" else 0
        if m1.shape[axis] != m2.shape[axis]:
            report.skipped[name] = f"different spaces: {tuple(m1.shape)} vs {tuple(m2.shape)}"
            continue
        basis_1, basis_2 = subspace_basis(m1, matrix), subspace_basis(m2, matrix)
        phi = subspace_similarity(basis_1, basis_2)
        report.layers.append(
            LayerSimilarity(
                name=name,
                r1=int(phi.shape[0]),
                r2=int(phi.shape[1]),
                dimension=int(m1.shape[axis]),
                phi=phi.tolist(),
            )
        )
    return report


def report_to_json(report: SimilarityReport) -> dict:
    data = asdict(report)
    for layer, source in zip(data["layers"], report.layers):
        layer.update(
            phi_top=source.phi_top,
            phi_common=source.phi_common,
            phi_mean=source.phi_mean,
            random_common=source.random_common,
        )
    return data


def report_to_markdown(report: SimilarityReport) -> str:
    lines = [
        "# Subspace similarity of two adapters",
        "",
        f"- adapter 1: {report.adapter_1}",
        f"- adapter 2: {report.adapter_2}",
        f"- matrix: {report.matrix} ({'right' if report.matrix == 'A' else 'left'}-singular vectors)",
        f"- common layers: {len(report.layers)}; skipped: {len(report.skipped)}",
        "",
        "φ(i, j) = ‖U₁[:, :i]ᵀ U₂[:, :j]‖_F² / min(i, j); r = min(r₁, r₂); random subspaces give r/d.",
        "",
        "| layer | d | r₁ | r₂ | φ(1,1) | φ(r,r) | mean φ | random φ(r,r) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for layer in report.layers:
        lines.append(
            f"| {layer.name} | {layer.dimension} | {layer.r1} | {layer.r2} | {layer.phi_top:.3f} "
            f"| {layer.phi_common:.3f} | {layer.phi_mean:.3f} | {layer.random_common:.3f} |"
        )
    if report.skipped:
        lines += ["", "## Skipped", "", "| layer | reason |", "| --- | --- |"]
        lines += [f"| {name} | {reason} |" for name, reason in report.skipped.items()]
    return "\n".join(lines) + "\n"


def write_similarity_report(report: SimilarityReport, output_dir: str | Path) -> dict[str, Path]:
    """Write similarity.json, similarity.md and similarity.png (heatmaps of φ)."""
    from lorakit.analysis import plots

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    paths = {
        "json": output_dir / "similarity.json",
        "markdown": output_dir / "similarity.md",
        "heatmap": output_dir / "similarity.png",
    }
    paths["json"].write_text(json.dumps(report_to_json(report), indent=2) + "\n")
    paths["markdown"].write_text(report_to_markdown(report))
    plots.plot_similarity(report, paths["heatmap"])
    return paths
