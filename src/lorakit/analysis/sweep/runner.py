"""Running a sweep: each setting trains into its own folder, resumably, and its cost is measured.

Each setting trains with `lorakit.train.train` into its own subfolder of the sweep folder; when it
finishes, ``sweep_result.json`` is written there (atomically) with the row of the table and the exact
options. Running the sweep again skips every setting whose ``sweep_result.json`` exists (after checking
that it was made with the same options) and reruns the others with ``resume=True``, so a run that died
midway continues from its newest checkpoint when it had ``save_every`` set, and starts afresh otherwise.

Peak memory is the peak of *live tensor bytes* measured by `lorakit.analysis.measure` (a
``TorchDispatchMode`` tracker; torch's CPU allocator keeps no peak statistic and process RSS mixes in the
interpreter, libraries and allocator caches): after a run, two optimizer steps of the trained model with
the run's own optimizer groups, on a synthetic batch of ``batch_size`` sequences of ``max_length`` tokens,
i.e. the largest batch the run can see. Weights, gradients, AdamW state and activations are included.
For causal LMs the measurement uses the model's standard loss (full logits), an upper bound of the
trainer's lean loss.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from lorakit.analysis.sweep.plan import SWEEP_OWNED, SweepSetting, setting_config, target_label
from lorakit.analysis.sweep.targets import linear_module_names
from lorakit.atomic import write_file
from lorakit.model import trainable_parameters
from lorakit.train import TrainCallback, TrainConfig, TrainResult, train

if TYPE_CHECKING:
    from lorakit.analysis.measure import MeasuredPeak

RESULT_FILE = "sweep_result.json"

# Option differences that do not make a finished run a different run.
_IGNORED_WHEN_COMPARING = ("resume", "output", "device")


@dataclass
class SweepRow:
    """One line of the table: what a setting trained, how well, and what it cost."""

    name: str
    method: str
    r: int | None
    targets: str | None
    target_modules: list[str] | str | None
    metric_name: str
    metric: float | None
    eval_metrics: dict[str, float]
    trainable_parameters: int
    total_parameters: int
    steps: int
    train_seconds: float
    wall_seconds: float
    peak_bytes: int | None
    static_bytes: int | None
    resumed_from: str | None = None
    output: str = ""

    @property
    def trainable_percent(self) -> float:
        return 100.0 * self.trainable_parameters / max(self.total_parameters, 1)


@dataclass
class SweepResult:
    """Every row in plan order, and which settings ran now and which were already done."""

    rows: list[SweepRow] = field(default_factory=list)
    ran: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    output: Path | None = None
    base_config: dict[str, Any] = field(default_factory=dict)


class SweepCallback:
    """Events of `run_sweep`; override what you need (the CLI prints them). ``index`` counts from 1."""

    def on_run_start(self, setting: SweepSetting, index: int, total: int, skipped: bool) -> None: ...

    def on_run_end(self, row: SweepRow, index: int, total: int) -> None: ...


class _Timer(TrainCallback):
    """Forwards every event to ``inner`` and times the optimizer steps of this call."""

    def __init__(self, inner: TrainCallback | None) -> None:
        self.inner = inner or TrainCallback()
        self.started: float | None = None
        self.last_step: float | None = None

    def on_train_start(self, total_steps: int, start_step: int) -> None:
        self.started = time.perf_counter()
        self.inner.on_train_start(total_steps, start_step)

    def on_step(self, record: dict[str, Any]) -> None:
        self.last_step = time.perf_counter()
        self.inner.on_step(record)

    def on_eval(self, record: dict[str, Any]) -> None:
        self.inner.on_eval(record)

    def on_checkpoint(self, path: Path) -> None:
        self.inner.on_checkpoint(path)

    def on_train_end(self, result: TrainResult) -> None:
        self.inner.on_train_end(result)

    @property
    def seconds(self) -> float:
        if self.started is None or self.last_step is None:
            return 0.0
        return self.last_step - self.started


def run_sweep(
    base: TrainConfig,
    settings: Sequence[SweepSetting],
    output: str | Path,
    *,
    full_overrides: dict[str, Any] | None = None,
    measure_memory: bool = True,
    callback: SweepCallback | None = None,
    progress: Callable[[SweepSetting], TrainCallback | None] | None = None,
) -> SweepResult:
    """Train every setting into ``output/<setting.name>``, skipping the finished ones; the table's rows.

    ``base`` gives every option but the adapter (``model``, ``data``, ``eval_data``, ``steps``, ``lr``...);
    ``full_overrides`` are options for the full fine-tuning run only (it usually wants a lower ``lr``).
    ``progress(setting)`` may return a trainer callback for that run (a progress bar).

    Raises:
        ValueError: ``base`` sets an option the sweep owns, a target name does not fit the model, or a
            finished run in ``output`` was made with other options.
    """
    if not base.model or not base.data:
        raise ValueError("a sweep needs a model and training data")
    for key in full_overrides or {}:
        if key in SWEEP_OWNED or key not in TrainConfig.__dataclass_fields__:
            raise ValueError(f"full fine-tuning override {key!r} is not an option the full run can change")
    output = Path(output)
    callback = callback or SweepCallback()
    num_labels = label_count(base) if base.task == "classify" else 2
    linear_names = linear_module_names(base.model, base.task, num_labels)
    # Every config is built (and every target resolved) before the first run: a typo fails in seconds.
    configs = [setting_config(base, s, output / s.name, linear_names, full_overrides) for s in settings]
    result = SweepResult(output=output, base_config=_comparable(base))
    for index, (setting, config) in enumerate(zip(settings, configs), start=1):
        done = _read_finished(Path(config.output), config)
        callback.on_run_start(setting, index, len(settings), skipped=done is not None)
        if done is None:
            done = _run_one(setting, config, measure_memory, progress(setting) if progress else None)
            result.ran.append(setting.name)
        else:
            result.skipped.append(setting.name)
        result.rows.append(done)
        callback.on_run_end(done, index, len(settings))
    return result


def _run_one(
    setting: SweepSetting, config: TrainConfig, measure_memory: bool, progress: TrainCallback | None
) -> SweepRow:
    timer = _Timer(progress)
    started = time.perf_counter()
    trained = train(config, timer)
    wall = time.perf_counter() - started
    model = trained.model
    assert model is not None
    trainable, total = trainable_parameters(model)
    metric_name, metric, evals = _metrics(config, trained)
    peak = _measure_peak(model, config) if measure_memory else None
    row = SweepRow(
        name=setting.name,
        method=setting.method,
        r=setting.r,
        targets=target_label(setting.targets) if setting.targets else None,
        target_modules=config.targets if setting.method != "full" else None,
        metric_name=metric_name,
        metric=metric,
        eval_metrics=evals,
        trainable_parameters=trainable,
        total_parameters=total,
        steps=trained.step,
        train_seconds=round(timer.seconds, 2),
        wall_seconds=round(wall, 2),
        peak_bytes=peak.peak_bytes if peak else None,
        static_bytes=peak.static_bytes if peak else None,
        resumed_from=str(trained.resumed_from) if trained.resumed_from else None,
        output=str(config.output),
    )
    record = {"row": asdict(row), "config": _comparable(config)}
    # Written whole or not at all: a half-written result file would mark a run finished.
    write_file(Path(config.output) / RESULT_FILE, json.dumps(record, indent=2) + "\n")
    return row


def _metrics(config: TrainConfig, trained: TrainResult) -> tuple[str, float | None, dict[str, float]]:
    """``(name, value, final eval metrics)`` of the model the run wrote."""
    if not trained.eval_history:
        # No eval data: the last training loss is all there is (said so by the metric's name).
        return "train_loss", (trained.losses[-1] if trained.losses else None), {}
    last = {k: float(v) for k, v in trained.eval_history[-1].items() if k.startswith("eval_")}
    name = f"eval_{config.eval_metric}"
    # With early stopping the written model is the best one, so its metric is the best, not the last.
    value = trained.best_metric if config.early_stopping_patience else last.get(name)
    return name, value, last


def _measure_peak(model: nn.Module, config: TrainConfig) -> MeasuredPeak:
    """Live-tensor peak of two optimizer steps on a ``batch_size × max_length`` batch (see module doc)."""
    from lorakit.analysis.measure import measure_training_peak
    from lorakit.train.optim import build_optimizer
    from lorakit.train.precision import choose_precision

    device = next(model.parameters()).device
    vocab = int(getattr(model.config, "vocab_size", 0) or 0)
    generator = torch.Generator().manual_seed(0)
    shape = (config.batch_size, config.max_length)
    input_ids = torch.randint(min(4, vocab - 1), vocab, shape, generator=generator)
    if config.task == "classify":
        labels = torch.randint(0, int(model.config.num_labels), (config.batch_size,), generator=generator)
    else:
        labels = input_ids.clone()
    batch = {"input_ids": input_ids, "attention_mask": torch.ones(shape, dtype=torch.long), "labels": labels}
    batch = {key: value.to(device) for key, value in batch.items()}
    optimizer = build_optimizer(model, config)
    # the precision the run trained in (`train` resolved dtype auto; this config still says auto)
    bf16 = choose_precision(config.dtype, device).bf16
    autocast = torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16)
    with autocast:
        return measure_training_peak(model, batch, optimizer, steps=2)


def label_count(config: TrainConfig) -> int:
    """The number of classes in a classification run's training data."""
    from lorakit.data import label_ids, read_rows

    return label_ids(read_rows(config.data))[2]


def _comparable(config: TrainConfig) -> dict[str, Any]:
    values = config.to_dict()
    for key in _IGNORED_WHEN_COMPARING:
        values.pop(key, None)
    for key in ("model", "data", "eval_data"):
        # `runs/x.tsv` and its absolute form are the same file: compare where the paths lead
        if isinstance(values.get(key), str) and Path(values[key]).exists():
            values[key] = str(Path(values[key]).resolve())
    return json.loads(json.dumps(values))  # tuples -> lists, as they come back from JSON


def _read_finished(folder: Path, config: TrainConfig) -> SweepRow | None:
    """The row of a finished run in ``folder``, None when it has not finished.

    Raises:
        ValueError: the finished run was made with other options (a stale folder would be reported as
            this setting's result).
    """
    path = folder / RESULT_FILE
    if not path.is_file():
        return None
    record = json.loads(path.read_text(encoding="utf-8"))
    saved, wanted = record.get("config", {}), _comparable(config)
    # An option missing from an older record is None there: a later option left at None changes nothing.
    keys = sorted(k for k in set(saved) | set(wanted) if saved.get(k) != wanted.get(k))
    if keys:
        differences = ", ".join(f"{k}: {saved.get(k)!r} there, {wanted.get(k)!r} now" for k in keys[:4])
        raise ValueError(
            f"{folder} holds a finished run with other options ({differences}); use another --output "
            f"or delete {path} to rerun it"
        )
    return SweepRow(**record["row"])
