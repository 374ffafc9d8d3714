"""``metrics.jsonl`` (one JSON record per line) and its picture ``loss.png``."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "loss.png"


class MetricsLog:
    """Appends records to ``<output>/metrics.jsonl``; each record has ``step`` and a ``kind``.

    ``kind`` is ``"train"`` (loss, lr, grad_norm, tokens_per_s, ...) or ``"eval"`` (eval_loss, ...).
    """

    def __init__(self, output: str | Path) -> None:
        self.path = Path(output) / METRICS_FILE
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def append(self, record: dict[str, Any]) -> None:
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record, allow_nan=True) + "\n")

    def truncate_after(self, step: int) -> None:
        """Drop records of steps after ``step``: a resumed run rewrites them."""
        kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= step]
        self.path.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl (a missing file: none)."""
    path = Path(path)
    if path.is_dir():
        path = path / METRICS_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def plot_loss(records: list[dict[str, Any]], path: str | Path) -> Path:
    """Training loss (and eval loss, when present) against step, written as a PNG.

    Drawn on a bare ``Figure`` with the Agg canvas (`lorakit.figures.agg_figure`), not through pyplot: no
    global backend is switched and no figure is left open in the caller's session.
    """
    from lorakit.figures import agg_figure

    train = [(r["step"], r["loss"]) for r in records if r.get("kind") == "train" and _finite(r.get("loss"))]
    evals = [
        (r["step"], r["eval_loss"])
        for r in records
        if r.get("kind") == "eval" and _finite(r.get("eval_loss"))
    ]
    figure = agg_figure(7, 4, dpi=100)
    axes = figure.add_subplot()
    if train:
        axes.plot(*zip(*train), label="train loss", linewidth=1)
    if evals:
        axes.plot(*zip(*evals), "o-", label="eval loss", linewidth=1.5)
    axes.set_xlabel("optimizer step")
    axes.set_ylabel("mean cross-entropy per target")
    axes.grid(alpha=0.3)
    if train or evals:
        axes.legend()
    figure.tight_layout()
    figure.savefig(path)
    return Path(path)


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)
