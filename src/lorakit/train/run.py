"""`train(config)`: a whole run from a `TrainConfig`: model, adapter, data, the loop, the output folder.

The output folder ends up with the adapter in PEFT's layout (adapter_config.json,
adapter_model.safetensors) -- or, with ``method="full"``, the whole model and its tokenizer
(``save_pretrained``) --, metrics.jsonl, loss.png, run_config.yaml (the exact options used),
run_state.json (written last, when the run ended) and, when ``save_every`` is set, checkpoints/.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lorakit.config import LoraConfig
from lorakit.model import inject
from lorakit.models.registry import DEFAULT_CAUSAL_LM, DEFAULT_CLASSIFIER
from lorakit.train.adapter import write_adapter
from lorakit.train.checkpoint import seed_everything
from lorakit.train.config import TrainConfig
from lorakit.train.distributed import Distributed
from lorakit.train.evaluate import Scorer, exact_match_scorer
from lorakit.train.loop import fit, make_autocast
from lorakit.train.output import prepare_output
from lorakit.train.precision import (
    choose_precision,
    log_precision,
    restore_linears_from,
    store_frozen_linears_in,
)
from lorakit.train.progress import TrainCallback
from lorakit.train.state import TrainResult


def lora_config(config: TrainConfig) -> LoraConfig:
    """The adapter `config` asks for, as a `lorakit.LoraConfig` (PEFT's names)."""
    return LoraConfig(
        r=config.r,
        lora_alpha=config.alpha,
        lora_dropout=config.dropout,
        target_modules=config.targets,
        modules_to_save=config.modules_to_save,
        use_dora=config.dora,
        use_rslora=config.rslora,
        task_type="SEQ_CLS" if config.task == "classify" else "CAUSAL_LM",
        base_model_name_or_path=config.model,
    )


def train(
    config: TrainConfig, progress: TrainCallback | None = None, *, restore_base: bool = True
) -> TrainResult:
    """Load the model and data that ``config`` names, inject the adapter, train, and write the run folder.

    Under bf16 the frozen linear weights are stored in bf16 while training (`store_frozen_linears_in`);
    with ``restore_base`` (the default) the returned model gets its fp32 weights back from the model's
    files, so it computes as loaded outside autocast too. The CLI, which exits after writing, skips that.

    Works the same on one process and under ``torchrun`` (each process loads the model; only rank 0
    writes). ``progress`` receives the loop's events on rank 0 (e.g. `lorakit.train.TqdmProgress`).

    The output folder must be empty, or hold this very run (with ``resume``), or a previous lorakit run
    to replace (with ``overwrite``): see `lorakit.train.output.prepare_output`. Without ``model`` the
    registry's default for the task is trained (``smollm2-135m-instruct``, or ``minilm-l6`` to classify).

    Raises:
        ValueError: an inconsistent configuration (missing data, task and format disagree, ...), an output
            folder that holds something else (`lorakit.train.output.OutputFolderError`), a resume that
            asks for another run than its checkpoint's (the differing options are named).
        lorakit.data.DataError: a malformed data row (the message names its file and line).
    """
    if not config.data:
        raise ValueError("train needs training data (--data)")
    if config.model is None:  # the model registry's default for the task
        config = config.replace(model=DEFAULT_CLASSIFIER if config.task == "classify" else DEFAULT_CAUSAL_LM)
    if config.eval_metric == "exact_match" and not (config.exact_match_examples and config.eval_data):
        raise ValueError(
            "eval_metric='exact_match' needs eval_data and exact_match_examples > 0 (how many "
            "eval examples to generate answers for)"
        )
    if (config.eval_every or config.early_stopping_patience) and not config.eval_data:
        raise ValueError("eval_every / early_stopping_patience need eval_data")
    context = Distributed.from_env(config.device)
    # dtype auto becomes bf16 or fp32 for this device (the run records the choice); said once the output
    # folder is known to be free, so that a refused run prints its error alone.
    precision = choose_precision(config.dtype, context.device)
    config = config.replace(dtype=precision.dtype, bf16=precision.bf16)
    try:
        # Before anything is loaded or written: the folder must be free for this run (every process
        # checks, the main one alone clears a previous run when asked to).
        prepare_output(config, remove=False)
        context.barrier()
        if context.is_main:
            prepare_output(config)
            log_precision(precision)
        context.barrier()
        seed_everything(config.seed)  # the adapter's initial weights and a classifier head's
        model, tokenizer, train_examples, eval_examples, eval_rows = _prepare(config)
        lowered: list[str] = []
        if config.method == "lora" and config.bf16 and not config.quantize and not config.fsdp:
            # bf16 autocast computes with bf16 copies of the frozen weights: store them so. (A QLoRA base is
            # bf16 already; FSDP shards one flat fp32 group per block.)
            lowered = store_frozen_linears_in(model, torch.bfloat16)
        scorer = _scorer(config, tokenizer, eval_rows, context) if eval_rows is not None else None
        from lorakit.data import pad_collator

        result = fit(
            model,
            train_examples,
            config,
            collate=pad_collator(tokenizer),
            eval_data=eval_examples,
            scorer=scorer,
            callback=progress,
            context=context,
            adapter_writer=write_adapter if config.method == "lora" else _full_model_writer(tokenizer),
        )
        if lowered and restore_base:
            with torch.random.fork_rng(devices=[]):  # a reloaded classifier draws a fresh head
                restore_linears_from(model, lowered, _load_model(config, model.config.num_labels)[0])
        return result
    finally:
        context.close()


def _prepare(config: TrainConfig) -> tuple[nn.Module, Any, list[Any], list[Any] | None, list[Any] | None]:
    """``(model with adapter, tokenizer, train examples, eval examples, eval rows)``."""
    from lorakit.data import detect_format, label_ids, prepare_examples, read_rows

    rows = read_rows(config.data)
    choice = detect_format(rows, config.format or "auto")
    if (choice.format == "classify") != (config.task == "classify"):
        raise ValueError(
            f"task={config.task!r} does not fit the data format {choice.description}; use "
            "task 'classify' with classify data and 'causal' with chat/instruction/text data"
        )
    label_names, num_labels = None, None
    if config.task == "classify":
        _, label_names, num_labels = label_ids(rows)
    model, tokenizer = _load_model(config, num_labels)
    if config.method == "lora":
        inject(model, lora_config(config))
    else:  # full fine-tuning: from_pretrained leaves nothing frozen, but say so rather than rely on it
        model.requires_grad_(True)

    options = {
        "format": choice.format,
        "max_length": config.max_length,
        "truncate": config.long_examples == "truncate",
        "skip_long": config.long_examples == "skip",
    }
    train_examples, stats = prepare_examples(
        rows, tokenizer, source=str(config.data), pack=config.packing, labels=label_names, **options
    )
    if not train_examples:
        raise ValueError(f"{config.data}: no training example left (skipped {stats.skipped} too long)")
    eval_examples = eval_rows = None
    if config.eval_data:
        eval_rows = read_rows(config.eval_data)
        # Evaluation is never packed: its loss is then per example, comparable between runs.
        eval_examples, _ = prepare_examples(
            eval_rows, tokenizer, source=str(config.eval_data), labels=stats.label_names, **options
        )
    return model, tokenizer, train_examples, eval_examples, eval_rows


def _load_model(config: TrainConfig, num_labels: int | None) -> tuple[nn.Module, Any]:
    """``(model, tokenizer)`` as ``config`` asks (a classifier with ``num_labels`` classes for classify)."""
    # QLoRA with bf16: the 4-bit layers compute in bf16 (QLoRA's recipe) and the rest of the frozen base is
    # stored in bf16. Otherwise the base stays fp32 and bf16 comes from autocast alone.
    dtype = "bfloat16" if config.quantize and config.bf16 else "float32"
    if config.task == "classify":
        from lorakit.models import load_classifier

        assert num_labels is not None
        return load_classifier(config.model, num_labels, quantize=config.quantize, dtype=dtype)
    from lorakit.models import load_causal_lm

    return load_causal_lm(config.model, quantize=config.quantize, dtype=dtype)


def _full_model_writer(tokenizer: Any) -> Callable[[nn.Module, Path], Path]:
    """The output writer of ``method="full"``: an HF model folder (weights, config, tokenizer)."""

    def write(model: nn.Module, folder: Path) -> Path:
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        return Path(folder)

    return write


def _scorer(config: TrainConfig, tokenizer: Any, eval_rows: list[Any], context: Distributed) -> Scorer | None:
    if config.exact_match_examples == 0 or config.task != "causal":
        return None
    from lorakit.train.prompts import prompts_and_references

    prompt_ids, references = prompts_and_references(
        eval_rows, tokenizer, config.format or "auto", config.exact_match_examples
    )
    return exact_match_scorer(
        prompt_ids,
        references,
        tokenizer,
        config.max_new_tokens,
        config.eval_batch_size or config.batch_size,
        make_autocast(context.device, config.bf16),
    )
