"""The report of a sweep: the table (``sweep.md``, ``sweep.json``) and the two plots."""

from __future__ import annotations

import io
import json
import math
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from lorakit.analysis.sweep.runner import SweepResult, SweepRow
from lorakit.atomic import write_file
from lorakit.figures import agg_figure

TABLE_JSON, TABLE_MD = "sweep.json", "sweep.md"
PLOT_RANK, PLOT_PARAMS = "metric_vs_rank.png", "metric_vs_params.png"


def _fmt_bytes(value: int | None) -> str:
    return "–" if value is None else f"{value / 2**20:,.0f}"


def _fmt_metric(value: float | None) -> str:
    return "–" if value is None or not math.isfinite(value) else f"{value:.4f}"


def _fmt_params(value: int) -> str:
    return f"{value:,}"


def table_markdown(result: SweepResult) -> str:
    """The table: one row per setting (metric, trainable parameters and %, time, peak memory)."""
    if not result.rows:
        return "(no runs)\n"
    metric_name = result.rows[0].metric_name
    extra = [k for k in result.rows[0].eval_metrics if k != metric_name]
    header = [
        "setting",
        "method",
        "targets",
        "r",
        metric_name,
        *extra,
        "trainable params",
        "trainable %",
        "steps",
        "train time (s)",
        "peak live tensors (MiB)",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in result.rows:
        cells = [
            row.name,
            row.method,
            row.targets or "all parameters",
            str(row.r) if row.r is not None else "–",
            _fmt_metric(row.metric),
            *(_fmt_metric(row.eval_metrics.get(k)) for k in extra),
            _fmt_params(row.trainable_parameters),
            f"{row.trainable_percent:.3f}",
            str(row.steps),
            f"{row.train_seconds:.0f}" + (" *" if row.resumed_from else ""),
            _fmt_bytes(row.peak_bytes),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    if any(row.resumed_from for row in result.rows):
        lines.append("")
        lines.append("\\* resumed from a checkpoint: the time covers the steps after it only.")
    return "\n".join(lines) + "\n"


def result_to_json(result: SweepResult) -> dict[str, Any]:
    rows = []
    for row in result.rows:
        values = asdict(row)
        values["trainable_percent"] = row.trainable_percent
        rows.append(values)
    return {"base_config": result.base_config, "rows": rows}


def write_sweep_report(result: SweepResult, output_dir: str | Path) -> dict[str, Path]:
    """Write ``sweep.md``, ``sweep.json``, ``metric_vs_rank.png`` and ``metric_vs_params.png``."""
    output = Path(output_dir)
    output.mkdir(parents=True, exist_ok=True)
    paths = {
        "markdown": output / TABLE_MD,
        "json": output / TABLE_JSON,
        "metric_vs_rank": output / PLOT_RANK,
        "metric_vs_params": output / PLOT_PARAMS,
    }
    write_file(paths["markdown"], table_markdown(result))
    write_file(paths["json"], json.dumps(result_to_json(result), indent=2) + "\n")
    plot_metric_vs_rank(result.rows, paths["metric_vs_rank"])
    plot_metric_vs_params(result.rows, paths["metric_vs_params"])
    return paths


def _figure(width: float = 6.0, height: float = 4.0) -> tuple[Any, Any]:
    figure = agg_figure(width, height, dpi=110)
    return figure, figure.add_subplot()


def _save_figure(figure: Any, path: str | Path) -> Path:
    # Rendered in memory, then written atomically: an interrupted report leaves the old plot or the new one.
    buffer = io.BytesIO()
    figure.savefig(buffer, format=Path(path).suffix.lstrip(".") or "png")
    return write_file(path, buffer.getvalue())


def plot_metric_vs_rank(rows: Sequence[SweepRow], path: str | Path) -> Path:
    """One line per (method, target set) over the ranks; full fine-tuning as a horizontal line."""
    figure, axes = _figure()
    series: dict[str, list[SweepRow]] = {}
    for row in rows:
        if row.method != "full" and row.metric is not None:
            method = "DoRA" if row.method == "dora" else "LoRA"
            series.setdefault(f"{method} {row.targets}", []).append(row)
    for label, members in series.items():
        members = sorted(members, key=lambda r: r.r or 0)
        style = "o-" if len(members) > 1 else ("s" if label.startswith("DoRA") else "D")
        axes.plot([r.r for r in members], [r.metric for r in members], style, label=label)
    for row in rows:
        if row.method == "full" and row.metric is not None:
            axes.axhline(row.metric, color="black", linestyle="--", linewidth=1, label="full fine-tuning")
    axes.set_xscale("log", base=2)
    ranks = sorted({r.r for r in rows if r.r is not None})
    if ranks:
        axes.set_xticks(ranks, [str(r) for r in ranks])
    axes.set_xlabel("rank r")
    return _finish(figure, axes, rows, path)


def _finish(figure: Any, axes: Any, rows: Sequence[SweepRow], path: str | Path) -> Path:
    """The metric's axis label, grid and legend, then the figure written to ``path``."""
    axes.set_ylabel(rows[0].metric_name if rows else "metric")
    axes.grid(alpha=0.3)
    if rows:
        axes.legend(fontsize=8)
    figure.tight_layout()
    return _save_figure(figure, path)


def plot_metric_vs_params(rows: Sequence[SweepRow], path: str | Path) -> Path:
    """Every run as a point: the metric against its trainable parameters (log scale), labelled."""
    figure, axes = _figure()
    markers = {"lora": "o", "dora": "s", "full": "*"}
    for method, marker in markers.items():
        members = [r for r in rows if r.method == method and r.metric is not None]
        if members:
            axes.scatter(
                [r.trainable_parameters for r in members],
                [r.metric for r in members],
                marker=marker,
                s=60 if method == "full" else 30,
                label={"lora": "LoRA", "dora": "DoRA", "full": "full fine-tuning"}[method],
            )
            for r in members:
                axes.annotate(
                    r.name,
                    (r.trainable_parameters, r.metric),
                    fontsize=6,
                    textcoords="offset points",
                    # DoRA sits next to LoRA of the same rank: its label goes below so both stay legible
                    xytext=(3, -9) if method == "dora" else (3, 3),
                )
    axes.set_xscale("log")
    axes.set_xlabel("trainable parameters")
    return _finish(figure, axes, rows, path)
