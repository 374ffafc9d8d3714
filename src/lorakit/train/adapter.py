"""The trained adapter as state: which adapter trains, its tensors, and its files in PEFT's layout."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from lorakit.model import adapter_configs


def trainable_adapter_name(model: nn.Module) -> str | None:
    """The name of the adapter whose parameters require grad (None for a model without lorakit adapters)."""
    names = set(adapter_configs(model))
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            for part in name.split("."):
                if part in names:
                    return part
    return None


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Detached CPU copies of every trainable parameter, by qualified name."""
    return {name: p.detach().to("cpu", copy=True) for name, p in model.named_parameters() if p.requires_grad}


@torch.no_grad()
def load_trainable_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy ``state`` (from `trainable_state`) back into the model's trainable parameters.

    Raises:
        ValueError: the names differ (the checkpoint belongs to another adapter or model).
    """
    parameters = {name: p for name, p in model.named_parameters() if p.requires_grad}
    if set(parameters) != set(state):
        missing, unexpected = sorted(set(parameters) - set(state)), sorted(set(state) - set(parameters))
        raise ValueError(
            f"checkpoint does not match the model's trainable parameters: missing {missing[:3]}, "
            f"unexpected {unexpected[:3]}"
        )
    for name, parameter in parameters.items():
        parameter.copy_(state[name])


def write_adapter(model: nn.Module, folder: str | Path) -> Path | None:
    """Save the trainable adapter with `lorakit.io.save_adapter` (PEFT's layout); None if there is none."""
    name = trainable_adapter_name(model)
    if name is None:
        return None
    from lorakit.io import save_adapter

    save_adapter(model, folder, adapter_name=name)
    return Path(folder)
