"""A finished classification run of a sweep, scored on other data (e.g. a held-out test file)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from lorakit.analysis.sweep.runner import label_count
from lorakit.train import TrainConfig


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
    num_labels = label_count(config)
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
