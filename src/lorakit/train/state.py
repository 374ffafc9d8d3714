"""What a run reports (`TrainResult`) and where it stands in the data (`Position`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn


@dataclass
class TrainResult:
    """What a run did.

    Attributes:
        step: optimizer steps done (including those before a resume).
        total_steps: steps the run was planned for.
        losses: training loss (mean per label token of the global batch) of each step run by this call.
        eval_history: every evaluation record of this call.
        best_metric, best_step: the best value of ``eval_metric`` and its step (None without evaluation).
        stopped_early: early stopping ended the run.
        resumed_from: the checkpoint this call started from.
        already_finished: the run had already ended at ``total_steps``; nothing was trained or written.
        output: the run folder.
        model: the trained model (the adapter in place; the best one when early stopping kept it).
    """

    step: int
    total_steps: int
    losses: list[float] = field(default_factory=list)
    eval_history: list[dict[str, Any]] = field(default_factory=list)
    best_metric: float | None = None
    best_step: int | None = None
    stopped_early: bool = False
    resumed_from: Path | None = None
    already_finished: bool = False
    output: Path | None = None
    model: nn.Module | None = field(default=None, repr=False)


@dataclass
class Position:
    """Where the data order stands: the next step reads batch ``batch_index`` of ``epoch``."""

    step: int = 0
    epoch: int = 0
    batch_index: int = 0

    def advance(self, steps_per_epoch: int) -> None:
        self.step += 1
        self.batch_index += 1
        if self.batch_index == steps_per_epoch:
            self.epoch, self.batch_index = self.epoch + 1, 0
