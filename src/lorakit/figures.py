"""The one figure setup behind every PNG lorakit writes (training loss, rank, similarity and sweep plots).

Figures are a bare ``matplotlib.figure.Figure`` on the Agg canvas, never made through ``pyplot``: no GUI
backend is touched, no backend is switched in the caller's process (a notebook keeps its own), no global
figure state is left open between calls, and it works on headless machines and in threads. It lives at
the bottom of the package, beside the core, because both ``train/`` and ``analysis/`` draw figures and
``train/`` may not import ``analysis/``. matplotlib is imported on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def agg_figure(width: float, height: float, **options: Any) -> Figure:
    """A ``width`` × ``height`` inch ``Figure`` drawn by the Agg canvas; ``options`` go to ``Figure``."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), **options)
    FigureCanvasAgg(figure)
    return figure
