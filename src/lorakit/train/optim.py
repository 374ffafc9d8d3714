"""AdamW over the trainable parameters only, LoRA+ learning-rate groups, and the warmup schedules."""

from __future__ import annotations

import functools
import math

import torch
from torch import nn

from lorakit.train.config import TrainConfig

# LoRA+ (Hayou et al., 2024): B learns `ratio` times faster than A. PEFT's create_loraplus_optimizer names
# the same parameters; the embedding's B is the `lora_embedding_B` table.
_LORAPLUS_B_NAMES = ("lora_B", "lora_embedding_B")


def trainable_named_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """``(name, parameter)`` for every parameter that requires grad, in ``named_parameters`` order."""
    return [(name, p) for name, p in model.named_parameters() if p.requires_grad]


def is_loraplus_b(name: str) -> bool:
    return any(part in _LORAPLUS_B_NAMES for part in name.split("."))


def parameter_groups(
    model: nn.Module, lr: float, weight_decay: float = 0.0, loraplus_ratio: float | None = None
) -> list[dict]:
    """Optimizer parameter groups, each with a ``name``, ``lr``, ``weight_decay`` and ``params``.

    Groups: ``A`` (everything trainable that is not in another group), ``B`` (LoRA+ only: ``lora_B`` /
    ``lora_embedding_B`` at ``loraplus_ratio × lr``) and ``no_decay`` (1-D parameters: biases, DoRA
    magnitudes; decaying them towards zero has no regularising meaning). Empty groups are left out.

    Raises:
        ValueError: nothing in ``model`` requires grad.
    """
    named = trainable_named_parameters(model)
    if not named:
        raise ValueError("the model has no trainable parameters: inject an adapter first (lorakit.inject)")
    ratio = loraplus_ratio or 1.0
    groups: dict[str, dict] = {
        "A": {"name": "A", "lr": lr, "weight_decay": weight_decay, "params": [], "param_names": []},
        "B": {"name": "B", "lr": lr * ratio, "weight_decay": weight_decay, "params": [], "param_names": []},
        "no_decay": {"name": "no_decay", "lr": lr, "weight_decay": 0.0, "params": [], "param_names": []},
    }
    for name, parameter in named:
        if loraplus_ratio is not None and is_loraplus_b(name):
            key = "B"
        elif parameter.ndim <= 1:
            key = "no_decay"
        else:
            key = "A"
        groups[key]["params"].append(parameter)
        groups[key]["param_names"].append(name)
    return [group for group in groups.values() if group["params"]]


def build_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW over the trainable parameters, grouped by `parameter_groups`."""
    groups = parameter_groups(model, config.lr, config.weight_decay, config.loraplus_ratio)
    return torch.optim.AdamW(groups, lr=config.lr, weight_decay=config.weight_decay)


def warmup_steps(config: TrainConfig, total_steps: int) -> int:
    if config.warmup_steps is not None:
        return min(config.warmup_steps, total_steps)
    return math.ceil(config.warmup_ratio * total_steps)


def build_scheduler(
    optimizer: torch.optim.Optimizer, config: TrainConfig, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup, then ``cosine`` / ``linear`` decay to 0 or ``constant``; stepped once per update.

    The multipliers are those of transformers' ``get_cosine_schedule_with_warmup`` (one half cycle),
    ``get_linear_schedule_with_warmup`` and ``get_constant_schedule_with_warmup`` (a test checks they agree).
    They are written out here because importing ``transformers.optimization`` pulls in its Trainer and
    peft (~3 s per process, paid again by every torchrun worker). Each parameter group keeps its own base
    lr, so the LoRA+ ratio holds at every step.
    """
    warmup = warmup_steps(config, total_steps)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, functools.partial(lr_multiplier, kind=config.scheduler, warmup=warmup, total=total_steps)
    )


def lr_multiplier(step: int, kind: str, warmup: int, total: int) -> float:
    """The factor applied to each group's base lr after ``step`` scheduler steps."""
    if step < warmup:
        return step / max(1, warmup)
    if kind == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    if kind == "linear":
        return max(0.0, 1.0 - progress)
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))
