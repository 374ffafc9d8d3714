"""`TrainConfig`: every option of a training run, one flat dataclass mirrored by the CLI flags and YAML keys.

The field names are the YAML keys and, with ``_`` written ``-``, the CLI flags (``grad_accum`` is
``--grad-accum``). A YAML file may use either spelling; a key that is not a field is an error that names
the closest valid key.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

TASKS = ("causal", "classify")
METHODS = ("lora", "full")  # full: every parameter trains, no adapter
SCHEDULERS = ("cosine", "linear", "constant")
LONG_EXAMPLES = ("truncate", "skip")
DTYPES = ("auto", "bf16", "fp32")  # as lorakit.train.precision.DTYPES (that module imports torch)
_NAMES = re.compile(r"\s*[\w.\-]+\s*(,\s*[\w.\-]+\s*)*")
# Names other tools use for the same option (transformers' TrainingArguments, PEFT): only for the hint.
_SYNONYMS = {
    "learning_rate": "lr",
    "lora_alpha": "alpha",
    "lora_dropout": "dropout",
    "target_modules": "targets",
    "num_train_epochs": "epochs",
    "num_epochs": "epochs",
    "max_steps": "steps",
    "output_dir": "output",
    "gradient_accumulation_steps": "grad_accum",
    "per_device_train_batch_size": "batch_size",
    "gradient_checkpointing": "grad_checkpointing",
    "use_dora": "dora",
    "use_rslora": "rslora",
    "model_name_or_path": "model",
    "rank": "r",
    "lr_scheduler_type": "scheduler",
}
EVAL_METRICS = {"loss": False, "accuracy": True, "exact_match": True}  # name -> greater is better


@dataclass
class TrainConfig:
    """One training run.

    Attributes:
        model: a built-in name (``smollm2-135m-instruct``, ``minilm-l6``), an HF folder or a ``.gguf`` file;
            None: `train` uses the registry's default for the task (``smollm2-135m-instruct`` for
            ``causal``, ``minilm-l6`` for ``classify``); `fit` does not read it.
        task: ``"causal"`` (next-token loss on the label tokens) or ``"classify"`` (the model's own head).
        data: training data file or folder (JSONL, CSV, TSV, Parquet, ``datasets.save_to_disk``).
        format: ``chat``, ``instruction``, ``text`` or ``classify``; None lets `lorakit.data` detect it.
        eval_data: evaluation data, same formats; needed for ``eval_every`` and early stopping.
        max_length: token limit per example (or per packed sequence).
        long_examples: ``"truncate"`` or ``"skip"`` the examples longer than ``max_length``.
        packing: concatenate short examples into sequences of ``max_length`` tokens.
        method: ``"lora"`` (inject the adapter below; the base stays frozen) or ``"full"`` (full
            fine-tuning: no adapter, every parameter trains, and the output folder holds the whole model
            via ``save_pretrained`` plus its tokenizer; the adapter options are then unused).
        r, alpha, dropout, targets, dora, rslora: the adapter (`lorakit.LoraConfig`'s ``r``,
            ``lora_alpha``, ``lora_dropout``, ``target_modules``, ``use_dora``, ``use_rslora``). ``targets``
            is ``"all-linear"``, a list of module names, a comma-separated string of names, or a regex.
        modules_to_save: modules trained in full beside the adapter and saved with it (PEFT's
            ``modules_to_save``, e.g. ``["pooler"]``); a classifier's head (``classifier``/``score``) is
            always among them. A list of names or a comma-separated string.
        quantize: ``"nf4"`` trains a QLoRA: the base in 4-bit NF4, the adapters in fp32.
        lr: peak learning rate of AdamW.
        loraplus_ratio: LoRA+: the lr of every ``lora_B`` is ``loraplus_ratio × lr`` (None: plain LoRA).
        weight_decay: AdamW's decoupled weight decay (not applied to 1-D parameters).
        scheduler: ``cosine``, ``linear`` or ``constant``, each after a linear warmup.
        warmup_ratio, warmup_steps: warmup length as a fraction of all steps, or in steps (wins if set).
        max_grad_norm: clip the global gradient norm to this (None: no clipping).
        epochs, steps: run length; ``steps`` (optimizer steps) wins when set.
        batch_size: examples per micro-batch on each process.
        grad_accum: micro-batches accumulated per optimizer step; the global batch is
            ``batch_size × grad_accum × world_size`` examples.
        eval_every: evaluate every N optimizer steps (None: only at the end, when there is eval data).
        eval_batch_size: micro-batch size for evaluation (default: ``batch_size``).
        eval_metric: ``loss``, ``accuracy`` (classify) or ``exact_match`` (generation); early stopping
            and the best adapter follow it.
        exact_match_examples: how many eval examples the generation-based exact match uses (0: none).
        max_new_tokens: generation length for exact match.
        early_stopping_patience: stop after this many evaluations without improvement; the adapter
            kept at the end is then the best one seen.
        dtype: ``auto`` (bf16 autocast where the device computes bf16 natively -- a CPU with AVX512-BF16,
            AMX or Arm BF16, an Ampere or later GPU -- fp32 elsewhere; `train` logs what it chose and
            why: `lorakit.train.precision`), ``bf16`` or ``fp32``. `train` resolves ``auto`` before the
            run starts (its run_config.yaml records the choice); `fit` reads ``bf16`` alone.
        bf16: bfloat16 autocast (CPU or CUDA); the adapters and the optimizer stay fp32. True is
            ``dtype="bf16"`` (the older switch); with ``dtype="auto"`` it stays False until `train`
            resolves the choice.
        grad_checkpointing: recompute the transformer blocks in backward (less memory, ~30 % slower).
        lean_activations: keep norm, activation and gated-MLP outputs for backward as recipes rebuilt
            from tensors kept anyway (`lorakit.train.lean_activations`): same gradients, ~40 % fewer
            activations, no matrix product recomputed.
        loss_chunk_size: label tokens per chunk of the memory-lean causal LM loss.
        split_by_length: on one process, cut each micro-batch into groups of similar length
            (`lorakit.train.length_split`): the same examples and the same gradient per step, less padding
            and a lower activation peak. Off: every micro-batch is padded as a whole.
        seed: one seed for the adapter init, data order and dropout.
        output: the run folder: adapter, metrics.jsonl, loss.png, run_config.yaml, checkpoints/,
            run_state.json. `train` refuses a folder that holds anything else than this run
            (`lorakit.train.output`).
        overwrite: replace a previous lorakit run in ``output`` (never a folder of other files).
        save_every: write a resumable checkpoint every N steps (None: none).
        keep_checkpoints: how many of the newest checkpoints to keep.
        resume: ``True`` continues from the newest checkpoint in ``output/checkpoints``; a path names one.
        log_every: append a training record to metrics.jsonl every N steps.
        device: ``cpu``, ``cuda``, ``cuda:1``; None picks CUDA when there is one (per local rank).
        ddp_find_unused_parameters: let DDP search for adapters that get no gradient (slower; only needed
            when an adapted module does not take part in the loss).
        fsdp: under torchrun, shard the frozen base, the adapter, its gradients and AdamW state over the
            processes with FSDP2, one unit per decoder layer (`lorakit.train.fsdp`); the adapter written is
            the whole one. Not with ``quantize``, ``method="full"`` or ``exact_match_examples``.
    """

    model: str | None = None
    task: str = "causal"
    data: str | None = None
    format: str | None = None
    eval_data: str | None = None
    max_length: int = 512
    long_examples: str = "truncate"
    packing: bool = False

    method: str = "lora"
    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.05
    targets: list[str] | str = "all-linear"
    modules_to_save: list[str] | None = None
    dora: bool = False
    rslora: bool = False
    quantize: str | None = None

    lr: float = 2e-4
    loraplus_ratio: float | None = None
    weight_decay: float = 0.0
    scheduler: str = "cosine"
    warmup_ratio: float = 0.03
    warmup_steps: int | None = None
    max_grad_norm: float | None = 1.0
    epochs: float = 1.0
    steps: int | None = None
    batch_size: int = 8
    grad_accum: int = 1

    eval_every: int | None = None
    eval_batch_size: int | None = None
    eval_metric: str = "loss"
    exact_match_examples: int = 0
    max_new_tokens: int = 32
    early_stopping_patience: int | None = None

    dtype: str = "auto"
    bf16: bool = False
    grad_checkpointing: bool = False
    lean_activations: bool = True
    split_by_length: bool = True
    loss_chunk_size: int = 512
    seed: int = 0
    output: str = "runs/lorakit"
    overwrite: bool = False
    save_every: int | None = None
    keep_checkpoints: int = 2
    resume: bool | str = False
    log_every: int = 1
    device: str | None = None
    ddp_find_unused_parameters: bool = False
    fsdp: bool = False

    def __post_init__(self) -> None:
        # PyYAML reads `2e-4` (no dot) as a string; numbers written that way are meant as floats.
        for name in (
            "alpha",
            "dropout",
            "lr",
            "loraplus_ratio",
            "weight_decay",
            "warmup_ratio",
            "max_grad_norm",
            "epochs",
        ):
            setattr(self, name, _as_float(name, getattr(self, name)))
        _one_of("task", self.task, TASKS)
        _one_of("method", self.method, METHODS)
        if self.method == "full" and (self.dora or self.quantize is not None):
            # DoRA is an adapter; a 4-bit base cannot be trained directly.
            raise ValueError(
                "method='full' trains every parameter: it cannot be combined with dora or quantize"
            )
        _one_of("scheduler", self.scheduler, SCHEDULERS)
        _one_of("long_examples", self.long_examples, LONG_EXAMPLES)
        _one_of("dtype", self.dtype, DTYPES)
        if self.bf16 and self.dtype == "fp32":
            raise ValueError("bf16=True contradicts dtype='fp32'; give one of them")
        if self.bf16:  # the older switch: bf16 on is dtype bf16
            self.dtype = "bf16"
        self.bf16 = self.dtype == "bf16"
        _one_of("eval_metric", self.eval_metric, tuple(EVAL_METRICS))
        if self.fsdp:
            _check_fsdp(self)
        if self.quantize is not None:
            _one_of("quantize", self.quantize, ("nf4",))
        for name in (
            "max_length",
            "r",
            "batch_size",
            "grad_accum",
            "loss_chunk_size",
            "log_every",
            "keep_checkpoints",
            "max_new_tokens",
        ):
            _at_least(name, getattr(self, name), 1)
        for name in ("steps", "eval_every", "eval_batch_size", "save_every", "early_stopping_patience"):
            if getattr(self, name) is not None:
                _at_least(name, getattr(self, name), 1)
        _at_least("exact_match_examples", self.exact_match_examples, 0)
        if self.warmup_steps is not None:
            _at_least("warmup_steps", self.warmup_steps, 0)
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio!r}")
        if not self.lr > 0 or not self.alpha > 0 or not self.epochs > 0:
            raise ValueError(
                f"lr, alpha and epochs must be > 0, got {self.lr!r}, {self.alpha!r}, {self.epochs!r}"
            )
        if self.loraplus_ratio is not None and not self.loraplus_ratio > 0:
            raise ValueError(f"loraplus_ratio must be > 0 (typically 16), got {self.loraplus_ratio!r}")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ValueError(f"max_grad_norm must be > 0 or None, got {self.max_grad_norm!r}")
        if self.eval_metric == "accuracy" and self.task != "classify":
            raise ValueError("eval_metric='accuracy' needs task='classify'; use 'loss' or 'exact_match'")
        plain = isinstance(self.targets, str) and _NAMES.fullmatch(self.targets)
        if plain and self.targets.lower() != "all-linear":
            # Plain module names ("q_proj,v_proj" or one name) are a list; anything else stays a regex.
            self.targets = _split_names(self.targets)
        if isinstance(self.modules_to_save, str):
            self.modules_to_save = _split_names(self.modules_to_save)

    @property
    def greater_is_better(self) -> bool:
        return EVAL_METRICS[self.eval_metric]

    def to_dict(self) -> dict[str, Any]:
        """The options as plain YAML-able values."""
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> TrainConfig:
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "config") -> TrainConfig:
        """Build from a mapping whose keys are field names (``-`` or ``_``).

        Raises:
            ValueError: a key is not an option; the message names the closest valid one.
        """
        return cls(**normalise_keys(values, source))


def _split_names(text: str) -> list[str]:
    """``"q_proj, v_proj"`` -> ``["q_proj", "v_proj"]``."""
    return [name.strip() for name in text.split(",") if name.strip()]


def field_names() -> set[str]:
    return {f.name for f in dataclasses.fields(TrainConfig)}


def normalise_keys(values: dict[str, Any], source: str = "config") -> dict[str, Any]:
    """``values`` with ``-`` in keys written ``_``.

    Raises:
        ValueError: a key is not an option; the message names the closest valid one.
    """
    known = field_names()
    normalised: dict[str, Any] = {}
    for key, value in values.items():
        name = str(key).replace("-", "_")
        if name not in known:
            close = (
                [_SYNONYMS[name]]
                if name in _SYNONYMS
                else difflib.get_close_matches(name, sorted(known), n=1, cutoff=0.5)
            )
            hint = f"; did you mean {close[0]!r}?" if close else f"; valid keys: {', '.join(sorted(known))}"
            raise ValueError(f"{source}: unknown option {key!r}{hint}")
        normalised[name] = value
    return normalised


def load_yaml(path: str | Path) -> dict[str, Any]:
    """The mapping in a YAML file (empty file: empty mapping)."""
    import yaml

    text = Path(path).read_text(encoding="utf-8")
    values = yaml.safe_load(text)
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ValueError(
            f"{path}: a run config must be a mapping of option: value, got {type(values).__name__}"
        )
    return values


def build_config(yaml_path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """Defaults, then the YAML file, then ``overrides`` (the CLI flags that were given): later wins."""
    values: dict[str, Any] = {}
    if yaml_path is not None:
        values.update(normalise_keys(load_yaml(yaml_path), source=str(yaml_path)))
    values.update(normalise_keys(overrides or {}, source="command line"))
    return TrainConfig(**values)


def write_yaml(config: TrainConfig, path: str | Path) -> None:
    import yaml

    Path(path).write_text(yaml.safe_dump(config.to_dict(), sort_keys=False), encoding="utf-8")


def _check_fsdp(config: TrainConfig) -> None:
    """Options FSDP does not run with: a 4-bit base cannot be split into DTensor shards; exact-match
    generation runs on rank 0 alone while every forward of a sharded model needs all processes; full
    fine-tuning would gather the whole model at each checkpoint."""
    if config.quantize is not None:
        raise ValueError("fsdp cannot shard a 4-bit (quantize='nf4') base; train QLoRA without fsdp (DDP)")
    if config.method != "lora":
        raise ValueError("fsdp shards LoRA training (method='lora'); full fine-tuning is not supported")
    if config.exact_match_examples:
        raise ValueError(
            "fsdp does not run the exact-match scorer (generation on one process of a sharded model); "
            "set exact_match_examples to 0 or train without fsdp"
        )


def _one_of(name: str, value: Any, choices: tuple[Any, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def _at_least(name: str, value: Any, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")


def _as_float(name: str, value: Any) -> Any:
    if value is None or isinstance(value, bool):
        return value
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {value!r}") from None
