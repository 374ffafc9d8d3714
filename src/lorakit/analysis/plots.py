"""PNG plots for the rank and similarity reports.

Figures come from `lorakit.figures.agg_figure` (a bare ``Figure`` on the Agg canvas, never ``pyplot``).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from lorakit.analysis import spectrum
from lorakit.figures import agg_figure

if TYPE_CHECKING:
    from lorakit.analysis.rank import LayerRank, RankReport
    from lorakit.analysis.similarity import SimilarityReport

# more panels than this make unreadable figures; the layers beyond it stay in the JSON/markdown
MAX_PANELS = 16


def _figure(panels: int, width: float = 4.0, height: float = 3.2) -> tuple[Figure, list, int]:
    columns = min(4, max(1, panels))
    rows = math.ceil(max(1, panels) / columns)
    figure = agg_figure(width * columns, height * rows, layout="constrained")
    axes = [figure.add_subplot(rows, columns, i + 1) for i in range(max(1, panels))]
    return figure, axes, columns


def _groups(layers: list[LayerRank]) -> dict[str, list[LayerRank]]:
    groups: dict[str, list[LayerRank]] = {}
    for layer in layers:
        groups.setdefault(layer.module_type, []).append(layer)
    for members in groups.values():
        members.sort(key=lambda layer: (layer.layer_index is None, layer.layer_index or 0, layer.name))
    return dict(list(sorted(groups.items()))[:MAX_PANELS])


def _empty(path: Path, message: str) -> None:
    figure, axes, _ = _figure(1)
    axes[0].text(0.5, 0.5, message, ha="center", va="center")
    axes[0].set_axis_off()
    figure.savefig(path, dpi=100)


def _per_layer_lines(report: RankReport, path: Path, cumulative: bool) -> None:
    groups = _groups(report.layers)
    if not groups:
        _empty(path, "no layer with a non-zero update")
        return
    figure, axes, _ = _figure(len(groups))
    colormap = colormaps["viridis"]
    for axis, (kind, layers) in zip(axes, groups.items()):
        for position, layer in enumerate(layers):
            values = torch.tensor(layer.singular_values, dtype=torch.float64)
            ys = spectrum.cumulative_energy(values).tolist() if cumulative else layer.singular_values
            xs = range(1, len(ys) + 1)
            color = colormap(position / max(1, len(layers) - 1))
            axis.plot(xs, ys, color=color, linewidth=0.9, alpha=0.85)
        axis.set_title(f"{kind} ({len(layers)} layers, dark = first)", fontsize=9)
        axis.set_xlabel("index i")
        axis.set_xscale("log")
        if cumulative:
            axis.axhline(report.threshold, color="red", linestyle="--", linewidth=0.8)
            axis.set_ylabel("energy in top-i values")
            axis.set_ylim(0, 1.02)
        else:
            axis.set_yscale("log")
            axis.set_ylabel("singular value σᵢ")
        axis.grid(True, which="both", alpha=0.3)
    title = "Cumulative energy of ΔW" if cumulative else "Singular values of ΔW"
    figure.suptitle(f"{title} ({report.mode})")
    figure.savefig(path, dpi=100)


def plot_singular_values(report: RankReport, path: Path) -> None:
    """One panel per module type: σᵢ against i (log-log), one line per layer."""
    _per_layer_lines(report, path, cumulative=False)


def plot_cumulative_energy(report: RankReport, path: Path) -> None:
    """One panel per module type: fraction of ||ΔW||_F² in the top i values, the threshold in red."""
    _per_layer_lines(report, path, cumulative=True)


def plot_rank_by_layer(report: RankReport, path: Path) -> None:
    """Energy rank and stable rank against depth, one line per module type."""
    groups = _groups(report.layers)
    if not groups:
        _empty(path, "no layer with a non-zero update")
        return
    figure, axes, _ = _figure(2, width=6.0)
    for kind, layers in groups.items():
        xs = [layer.layer_index if layer.layer_index is not None else i for i, layer in enumerate(layers)]
        axes[0].plot(xs, [layer.energy_rank for layer in layers], marker=".", label=kind)
        axes[1].plot(xs, [layer.stable_rank for layer in layers], marker=".", label=kind)
    axes[0].yaxis.set_major_locator(MaxNLocator(integer=True))
    axes[0].set_title(f"rank holding {report.threshold:g} of the energy", fontsize=10)
    axes[1].set_title("stable rank ‖ΔW‖_F² / ‖ΔW‖₂²", fontsize=10)
    for axis in axes:
        axis.set_xlabel("layer index")
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        axis.grid(True, alpha=0.3)
        axis.legend(fontsize=7)
    figure.savefig(path, dpi=100)


def plot_similarity(report: SimilarityReport, path: Path) -> None:
    """Heatmaps of φ(i, j), one panel per common layer (the first ``MAX_PANELS``), like LoRA's Figure 3."""
    layers = report.layers[:MAX_PANELS]
    if not layers:
        _empty(path, "the adapters have no layer in common")
        return
    figure, axes, _ = _figure(len(layers), width=3.6, height=3.0)
    image = None
    for axis, layer in zip(axes, layers):
        grid = layer.phi  # (r1, r2)
        image = axis.imshow(
            grid,
            origin="upper",
            aspect="auto",
            vmin=0.0,
            vmax=1.0,
            cmap="viridis",
            extent=(0.5, len(grid[0]) + 0.5, len(grid) + 0.5, 0.5),
        )
        axis.set_title(layer.name, fontsize=7)
        axis.set_xlabel(f"j (adapter 2, r={layer.r2})", fontsize=8)
        axis.set_ylabel(f"i (adapter 1, r={layer.r1})", fontsize=8)
    if image is not None:
        figure.colorbar(image, ax=axes, shrink=0.8, label="φ(i, j)")
    figure.suptitle(f"Subspace similarity of the {report.matrix} matrices")
    figure.savefig(path, dpi=100)
