"""The trained adapter as state: its tensors, and its files in PEFT's layout.

Which adapter trains is `lorakit.model.trainable_adapter`'s answer (one source for that fact).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from lorakit.model import trainable_adapter


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Detached CPU copies of every trainable parameter, by qualified name."""
    return {name: p.detach().to("cpu", copy=True) for name, p in model.named_parameters() if p.requires_grad}


@torch.no_grad()
def load_trainable_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy ``state`` (from `trainable_state`) back into the model's trainable parameters.

    Raises:
        ValueError: the names or shapes differ (the checkpoint belongs to another adapter or model).
    """
    parameters = {name: p for name, p in model.named_parameters() if p.requires_grad}
    if set(parameters) != set(state):
        missing, unexpected = sorted(set(parameters) - set(state)), sorted(set(state) - set(parameters))
        raise ValueError(
            f"checkpoint does not match the model's trainable parameters: missing {missing[:3]}, "
            f"unexpected {unexpected[:3]}"
        )
    shapes = [
        f"{name} {tuple(state[name].shape)} in the checkpoint, {tuple(p.shape)} in the model"
        for name, p in parameters.items()
        if state[name].shape != p.shape
    ]
    if shapes:  # another rank or model size: say so rather than fail inside copy_
        raise ValueError(
            f"checkpoint does not match the model's trainable parameters: {'; '.join(shapes[:3])}"
        )
    for name, parameter in parameters.items():
        parameter.copy_(state[name])


def write_adapter(model: nn.Module, folder: str | Path) -> Path | None:
    """Save the trainable adapter with `lorakit.io.save_adapter` (PEFT's layout); None if there is none."""
    name = trainable_adapter(model)
    if name is None:
        return None
    from lorakit.io import save_adapter

    save_adapter(model, folder, adapter_name=name)
    return Path(folder)
