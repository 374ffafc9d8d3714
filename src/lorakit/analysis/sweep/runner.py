"""Sweeps: train one model once per setting (rank × target set, DoRA, full fine-tuning) and tabulate.

Each setting trains with `lorakit.train.train` into its own subfolder of the sweep folder; when it
finishes, ``sweep_result.json`` is written there (atomically) with the row of the table and the exact
options. Running the sweep again skips every setting whose ``sweep_result.json`` exists (after checking
that it was made with the same options) and reruns the others with ``resume=True``, so a run that died
midway continues from its newest checkpoint when it had ``save_every`` set, and starts afresh otherwise.

Short target names are mapped to the module names of the model's architecture (`SHORT_TARGETS`):

====== ============================================== ==================================
short  BERT / RoBERTa / ELECTRA (``BertLayer``)       Llama, Mistral, Qwen, Gemma, ...
====== ============================================== ==================================
q      ``query``                                      ``q_proj``
k      ``key``                                        ``k_proj``
v      ``value``                                      ``v_proj``
o      ``attention.output.dense``                     ``o_proj``
gate   --                                             ``gate_proj``
up     ``intermediate.dense``                         ``up_proj``
down   ``output.dense`` (not ``attention.output``)    ``down_proj``
====== ============================================== ==================================

DistilBERT (``q_lin``, ``k_lin``, ``v_lin``, ``out_lin``, ``lin1``, ``lin2``) and OPT / BART
(``q_proj``..., ``out_proj``, ``fc1``, ``fc2``) are covered too. ``all-linear`` is passed through (every
linear layer but the output head), and any other name is taken as a module name when the model has a
linear layer of that name. Names are checked against the model before anything trains.

Peak memory is the peak of *live tensor bytes* measured by `lorakit.analysis.measure` (a
``TorchDispatchMode`` tracker; torch's CPU allocator keeps no peak statistic and process RSS mixes in the
interpreter, libraries and allocator caches): after a run, two optimizer steps of the trained model with
the run's own optimizer groups, on a synthetic batch of ``batch_size`` sequences of ``max_length`` tokens,
i.e. the largest batch the run can see. Weights, gradients, AdamW state and activations are included.
For causal LMs the measurement uses the model's standard loss (full logits), an upper bound of the
trainer's lean loss.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import nn

from lorakit.matching import is_linear, name_matches
from lorakit.model import trainable_parameters
from lorakit.train import TrainCallback, TrainConfig, TrainResult, train

if TYPE_CHECKING:
    from lorakit.analysis.measure import MeasuredPeak

RESULT_FILE = "sweep_result.json"
TABLE_JSON, TABLE_MD = "sweep.json", "sweep.md"
PLOT_RANK, PLOT_PARAMS = "metric_vs_rank.png", "metric_vs_params.png"
GRIDS = ("product", "axes")
Method = Literal["lora", "dora", "full"]
# Options a sweep sets per setting: giving them as a base option would be silently overwritten.
SWEEP_OWNED = ("r", "targets", "dora", "method", "output", "resume")
# Option differences that do not make a finished run a different run.
_IGNORED_WHEN_COMPARING = ("resume", "output", "device")


@dataclass(frozen=True)
class TargetRule:
    """Modules whose qualified name ends with ``suffix`` (PEFT's list rule) but not with ``exclude``."""

    suffix: str
    exclude: str | None = None

    def matches(self, name: str) -> bool:
        if not name_matches(name, [self.suffix]):
            return False
        return self.exclude is None or not name_matches(name, [self.exclude])


# Short name -> candidate rules, tried in order; the first that matches a linear layer of the model wins.
SHORT_TARGETS: dict[str, tuple[TargetRule, ...]] = {
    "q": (TargetRule("q_proj"), TargetRule("query"), TargetRule("q_lin")),
    "k": (TargetRule("k_proj"), TargetRule("key"), TargetRule("k_lin")),
    "v": (TargetRule("v_proj"), TargetRule("value"), TargetRule("v_lin")),
    "o": (
        TargetRule("o_proj"),
        TargetRule("attention.output.dense"),
        TargetRule("out_proj"),
        TargetRule("out_lin"),
    ),
    "gate": (TargetRule("gate_proj"),),
    "up": (TargetRule("up_proj"), TargetRule("intermediate.dense"), TargetRule("fc1"), TargetRule("lin1")),
    "down": (
        TargetRule("down_proj"),
        # BERT's FFN output is `layer.N.output.dense`; `layer.N.attention.output.dense` is `o`.
        TargetRule("output.dense", exclude="attention.output.dense"),
        TargetRule("fc2"),
        TargetRule("lin2"),
    ),
}
ALL_LINEAR = "all-linear"


# --- parsing ---------------------------------------------------------------------------------------------


def parse_ranks(text: str) -> list[int]:
    """``"1,2,4"`` -> ``[1, 2, 4]``.

    Raises:
        ValueError: empty, not an integer, below 1, or repeated.
    """
    ranks: list[int] = []
    for part in text.split(","):
        part = part.strip()
        if not part.isdigit() or int(part) < 1:
            raise ValueError(
                f"ranks must be comma-separated integers >= 1, got {text!r} (bad entry {part!r})"
            )
        if int(part) in ranks:
            raise ValueError(f"rank {part} is listed twice in {text!r}")
        ranks.append(int(part))
    return ranks


def parse_target_sets(text: str) -> list[tuple[str, ...]]:
    """``"q,v;q,k,v,o;all-linear"`` -> ``[("q", "v"), ("q", "k", "v", "o"), ("all-linear",)]``.

    Sets are separated by ``;``, names inside a set by ``,``. Whether a name exists in the model is
    checked later by `resolve_targets`.

    Raises:
        ValueError: an empty set or name, a name twice in a set, a set twice, or ``all-linear`` mixed
            with other names.
    """
    sets: list[tuple[str, ...]] = []
    for raw in text.split(";"):
        names = tuple(name.strip() for name in raw.split(","))
        if not raw.strip() or any(not name for name in names):
            raise ValueError(
                f"targets {text!r}: empty target set or name in {raw!r}; "
                "write sets like 'q,v;q,k,v,o;all-linear'"
            )
        if not all(re.fullmatch(r"[\w.\-]+", name) for name in names):
            raise ValueError(f"targets {text!r}: {raw!r} holds a character that is not in a module name")
        if len(set(names)) != len(names):
            raise ValueError(f"targets {text!r}: a name is repeated in {raw!r}")
        if ALL_LINEAR in (name.lower() for name in names) and len(names) > 1:
            raise ValueError(
                f"targets {text!r}: 'all-linear' already selects every linear layer; use it alone"
            )
        if names in sets:
            raise ValueError(f"targets {text!r}: the set {raw!r} is listed twice")
        sets.append(tuple(ALL_LINEAR if name.lower() == ALL_LINEAR else name for name in names))
    return sets


def parse_assignments(items: Sequence[str]) -> dict[str, Any]:
    """``["lr=1e-3", "targets=[q,v]"]`` -> ``{"lr": 0.001, ...}``; values are read as YAML scalars/lists.

    Raises:
        ValueError: an item without ``=``.
    """
    import yaml

    values: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"expected KEY=VALUE, got {item!r}")
        parsed = yaml.safe_load(value) if value.strip() else None
        if isinstance(parsed, str):
            # PyYAML reads `1e-3` (no dot) as a string; a value that reads as a number is one.
            with contextlib.suppress(ValueError):
                parsed = float(parsed)
        values[key.strip()] = parsed
    return values


# --- target names per architecture -----------------------------------------------------------------------


def linear_module_names(model: str, task: str = "causal", num_labels: int = 2) -> list[str]:
    """Qualified names of the linear layers of ``model`` (built-in name or folder), as the trainer loads it.

    Built on the meta device from the config alone: no weights are read.
    """
    import transformers

    from lorakit.models.loading import model_folder

    config = transformers.AutoConfig.from_pretrained(model_folder(model), local_files_only=True)
    if task == "classify":
        config.num_labels = num_labels
        auto = transformers.AutoModelForSequenceClassification
    else:
        auto = transformers.AutoModelForCausalLM
    with torch.device("meta"):
        built = auto.from_config(config)
    return [name for name, module in built.named_modules() if is_linear(module)]


def resolve_targets(names: Sequence[str], linear_names: Sequence[str]) -> list[str] | str:
    """The ``target_modules`` for the short or literal ``names`` on a model with ``linear_names``.

    Each short name becomes the first of its `SHORT_TARGETS` rules that selects a linear layer; a rule
    that needs an exclusion (BERT's ``down``) becomes the full names it selects, so the list means exactly
    the same under PEFT's suffix rule. ``("all-linear",)`` stays ``"all-linear"``.

    Raises:
        ValueError: a short name with no module in this architecture, or an unknown name.
    """
    if tuple(names) == (ALL_LINEAR,):
        return ALL_LINEAR
    resolved: list[str] = []
    for name in names:
        if name in SHORT_TARGETS:
            rules = SHORT_TARGETS[name]
            rule = next((r for r in rules if any(r.matches(n) for n in linear_names)), None)
            if rule is None:
                tried = ", ".join(r.suffix for r in rules)
                raise ValueError(
                    f"target {name!r} has no module in this architecture (looked for {tried}); "
                    f"its linear layers are named like {_leaf_examples(linear_names)}"
                )
            if rule.exclude is None:
                resolved.append(rule.suffix)
            else:
                resolved.extend(n for n in linear_names if rule.matches(n))
        elif any(name_matches(n, [name]) for n in linear_names):
            resolved.append(name)  # a literal module name, e.g. "query"
        else:
            raise ValueError(
                f"unknown target {name!r}: neither a short name ({', '.join(SHORT_TARGETS)}, {ALL_LINEAR}) "
                f"nor a linear layer of the model (named like {_leaf_examples(linear_names)})"
            )
    return list(dict.fromkeys(resolved))


def _leaf_examples(linear_names: Sequence[str], limit: int = 8) -> str:
    leaves = list(dict.fromkeys(n.rsplit(".", 1)[-1] for n in linear_names))
    return ", ".join(leaves[:limit]) or "(none)"


# --- the plan --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SweepSetting:
    """One run of a sweep: ``method`` with rank ``r`` on the ``targets`` short names (None for full FT)."""

    method: Method
    r: int | None = None
    targets: tuple[str, ...] | None = None

    @property
    def name(self) -> str:
        """The folder name: ``full``, ``lora-qv-r8``, ``lora-all-linear-r8``, ``dora-qkvo-r8``."""
        if self.method == "full" or self.targets is None:
            return "full"
        return f"{self.method}-{target_label(self.targets, compact=True)}-r{self.r}"


def target_label(targets: Sequence[str], compact: bool = False) -> str:
    """``("q", "v")`` -> ``"q,v"`` (or ``"qv"`` when ``compact`` and every name is one letter)."""
    if compact:
        return "".join(targets) if all(len(t) == 1 for t in targets) else "+".join(targets)
    return ",".join(targets)


def plan_settings(
    ranks: Sequence[int],
    target_sets: Sequence[Sequence[str]],
    *,
    grid: str = "product",
    anchor_rank: int | None = None,
    dora: bool = False,
    full: bool = False,
) -> list[SweepSetting]:
    """The runs of a sweep, in order.

    ``grid="product"``: LoRA at every rank on every target set. ``grid="axes"``: every rank on the first
    target set, and every other target set at ``anchor_rank`` only (a one-factor-at-a-time sweep; far
    fewer runs). ``dora`` adds one DoRA run at ``anchor_rank`` on the first target set, ``full`` one full
    fine-tuning run. ``anchor_rank`` defaults to 8 when it is among ``ranks``, else to the first rank.

    Raises:
        ValueError: an unknown grid, or no rank or target set.
    """
    if grid not in GRIDS:
        raise ValueError(f"grid must be one of {GRIDS}, got {grid!r}")
    if not ranks or not target_sets:
        raise ValueError("a sweep needs at least one rank and one target set")
    anchor = anchor_rank if anchor_rank is not None else (8 if 8 in ranks else ranks[0])
    settings: list[SweepSetting] = []
    for index, targets in enumerate(target_sets):
        chosen = ranks if grid == "product" or index == 0 else [anchor]
        settings.extend(SweepSetting("lora", r, tuple(targets)) for r in chosen)
    if dora:
        settings.append(SweepSetting("dora", anchor, tuple(target_sets[0])))
    if full:
        settings.append(SweepSetting("full"))
    return list(dict.fromkeys(settings))


def setting_config(
    base: TrainConfig,
    setting: SweepSetting,
    folder: Path,
    linear_names: Sequence[str],
    full_overrides: dict[str, Any] | None = None,
) -> TrainConfig:
    """The `TrainConfig` of one setting: ``base`` with the setting's adapter, its folder, ``resume=True``."""
    changes: dict[str, Any] = {"output": str(folder), "resume": True}
    if setting.method == "full":
        changes.update(method="full", dora=False, **(full_overrides or {}))
    else:
        assert setting.targets is not None and setting.r is not None
        changes.update(
            method="lora",
            r=setting.r,
            targets=resolve_targets(setting.targets, linear_names),
            dora=setting.method == "dora",
        )
    return base.replace(**changes)


# --- running ---------------------------------------------------------------------------------------------


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
    num_labels = _num_labels(base) if base.task == "classify" else 2
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
    _write_json_atomic(Path(config.output) / RESULT_FILE, record)
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
    autocast = torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=config.bf16)
    with autocast:
        return measure_training_peak(model, batch, optimizer, steps=2)


def _num_labels(config: TrainConfig) -> int:
    from lorakit.data import label_ids, read_rows

    return label_ids(read_rows(config.data))[2]


def _comparable(config: TrainConfig) -> dict[str, Any]:
    values = config.to_dict()
    for key in _IGNORED_WHEN_COMPARING:
        values.pop(key, None)
    for key in ("model", "data", "eval_data"):
        # `runs/x.tsv` and `/work/runs/x.tsv` are the same file: compare where the paths lead
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
    if saved != wanted:
        keys = sorted(k for k in set(saved) | set(wanted) if saved.get(k) != wanted.get(k))
        differences = ", ".join(f"{k}: {saved.get(k)!r} there, {wanted.get(k)!r} now" for k in keys[:4])
        raise ValueError(
            f"{folder} holds a finished run with other options ({differences}); use another --output "
            f"or delete {path} to rerun it"
        )
    return SweepRow(**record["row"])


def _write_json_atomic(path: Path, value: Any) -> None:
    # Written whole or not at all: a half-written result file would mark a run finished.
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(json.dumps(value, indent=2) + "\n", encoding="utf-8")
    os.replace(temporary, path)


# --- the report ------------------------------------------------------------------------------------------


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
    paths["markdown"].write_text(table_markdown(result), encoding="utf-8")
    paths["json"].write_text(json.dumps(result_to_json(result), indent=2) + "\n", encoding="utf-8")
    plot_metric_vs_rank(result.rows, paths["metric_vs_rank"])
    plot_metric_vs_params(result.rows, paths["metric_vs_params"])
    return paths


def _figure(width: float = 6.0, height: float = 4.0) -> tuple[Any, Any]:
    # A bare Figure on the Agg canvas: no pyplot state, no backend switch in the caller's process.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=110)
    FigureCanvasAgg(figure)
    return figure, figure.add_subplot()


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
    axes.set_ylabel(rows[0].metric_name if rows else "metric")
    axes.grid(alpha=0.3)
    if rows:
        axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path)
    return Path(path)


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
    axes.set_ylabel(rows[0].metric_name if rows else "metric")
    axes.grid(alpha=0.3)
    if rows:
        axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path)
    return Path(path)


# --- scoring a finished run on other data ----------------------------------------------------------------


def load_run_model(run_dir: str | Path) -> tuple[nn.Module, Any, TrainConfig]:
    """The trained classifier of a run folder as training left it: ``(model, tokenizer, config)``.

    A full fine-tuning folder is an HF model folder; a LoRA folder is the base (rebuilt with the run's
    seed, so any randomly initialised part equals the trained run's) plus its adapter, the classifier head
    included (``modules_to_save``).

    Raises:
        ValueError: the run is not a classification run.
    """
    from lorakit.io import load_adapter
    from lorakit.models import load_classifier
    from lorakit.train.checkpoint import seed_everything
    from lorakit.train.config import load_yaml

    run_dir = Path(run_dir)
    config = TrainConfig.from_dict(load_yaml(run_dir / "run_config.yaml"), source=str(run_dir))
    if config.task != "classify":
        raise ValueError(f"{run_dir}: only classification runs can be scored here (task={config.task!r})")
    num_labels = _num_labels(config)
    seed_everything(config.seed)
    if config.method == "full":
        model, tokenizer = load_classifier(run_dir, num_labels)
    else:
        model, tokenizer = load_classifier(config.model, num_labels)
        load_adapter(model, run_dir)
    return model.eval(), tokenizer, config


@torch.no_grad()
def evaluate_run(run_dir: str | Path, data: str | Path, batch_size: int = 64) -> dict[str, float]:
    """Loss and accuracy of a finished classification run on ``data`` (e.g. a held-out test file).

    The examples are prepared like the trainer's evaluation set (same format, ``max_length``, truncation
    and label ids).
    """
    from lorakit.data import label_ids, pad_collator, prepare_examples, read_rows

    model, tokenizer, config = load_run_model(run_dir)
    _, label_names, _ = label_ids(read_rows(config.data))
    examples, _ = prepare_examples(
        read_rows(data),
        tokenizer,
        source=str(data),
        format="classify",
        max_length=config.max_length,
        truncate=config.long_examples == "truncate",
        skip_long=config.long_examples == "skip",
        labels=label_names,
    )
    collate = pad_collator(tokenizer)
    loss_sum, correct = 0.0, 0
    for start in range(0, len(examples), batch_size):
        batch = collate(examples[start : start + batch_size])
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
        loss_sum += float(nn.functional.cross_entropy(logits, batch["labels"], reduction="sum"))
        correct += int((logits.argmax(-1) == batch["labels"]).sum())
    count = max(len(examples), 1)
    return {"loss": loss_sum / count, "accuracy": correct / count, "examples": float(len(examples))}
