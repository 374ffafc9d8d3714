"""Callbacks the loop reports to, and a tqdm progress bar among them (the caller decides if it shows)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


class TrainCallback:
    """Hooks called by the training loop on the main process only; every method is optional.

    Records are the dicts written to metrics.jsonl. A callback may raise to stop training (the loop does
    not catch it); tests use that to simulate a crash.
    """

    def on_train_start(self, total_steps: int, start_step: int) -> None:
        pass

    def on_step(self, record: dict[str, Any]) -> None:
        pass

    def on_eval(self, record: dict[str, Any]) -> None:
        pass

    def on_checkpoint(self, path: Path) -> None:
        pass

    def on_train_end(self, result: Any) -> None:
        pass


class CallbackList(TrainCallback):
    def __init__(self, callbacks: list[TrainCallback]) -> None:
        self.callbacks = callbacks

    def on_train_start(self, total_steps: int, start_step: int) -> None:
        for callback in self.callbacks:
            callback.on_train_start(total_steps, start_step)

    def on_step(self, record: dict[str, Any]) -> None:
        for callback in self.callbacks:
            callback.on_step(record)

    def on_eval(self, record: dict[str, Any]) -> None:
        for callback in self.callbacks:
            callback.on_eval(record)

    def on_checkpoint(self, path: Path) -> None:
        for callback in self.callbacks:
            callback.on_checkpoint(path)

    def on_train_end(self, result: Any) -> None:
        for callback in self.callbacks:
            callback.on_train_end(result)


class TqdmProgress(TrainCallback):
    """A tqdm bar over optimizer steps showing loss, tokens/s and (tqdm's own) ETA.

    ``disable=True`` (e.g. not a terminal, or not rank 0) keeps it silent; ``file`` defaults to stderr.
    """

    def __init__(self, disable: bool = False, file: Any = None, description: str = "train") -> None:
        self.disable = disable
        self.file = file
        self.description = description
        self.bar: Any = None
        self.last_eval: dict[str, float] = {}

    def on_train_start(self, total_steps: int, start_step: int) -> None:
        from tqdm.auto import tqdm

        self.bar = tqdm(
            total=total_steps,
            initial=start_step,
            desc=self.description,
            unit="step",
            disable=self.disable,
            file=self.file,
            dynamic_ncols=True,
        )

    def on_step(self, record: dict[str, Any]) -> None:
        if self.bar is None:
            return
        postfix = {"loss": f"{record['loss']:.4f}", "tok/s": f"{record['tokens_per_s']:.0f}"}
        postfix.update({k: f"{v:.4f}" for k, v in self.last_eval.items()})
        self.bar.set_postfix(postfix, refresh=False)
        self.bar.update(1)

    def on_eval(self, record: dict[str, Any]) -> None:
        self.last_eval = {k: v for k, v in record.items() if k.startswith("eval_") and isinstance(v, float)}

    def on_train_end(self, result: Any) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
