"""Early stopping on an evaluation metric, with patience, and the record of the best value."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass
class EarlyStopping:
    """Tracks the best value of one metric; `should_stop` after ``patience`` evaluations without improvement.

    ``patience=None`` never stops but still records the best value and step.
    """

    patience: int | None = None
    greater_is_better: bool = False
    best: float | None = None
    best_step: int | None = None
    bad_evals: int = 0

    def update(self, value: float, step: int) -> bool:
        """Record an evaluation; True when it is the best so far (strictly better)."""
        improved = self.best is None or (value > self.best if self.greater_is_better else value < self.best)
        if improved:
            self.best, self.best_step, self.bad_evals = value, step, 0
        else:
            self.bad_evals += 1
        return improved

    @property
    def should_stop(self) -> bool:
        return self.patience is not None and self.bad_evals >= self.patience

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best, self.best_step, self.bad_evals = state["best"], state["best_step"], state["bad_evals"]
