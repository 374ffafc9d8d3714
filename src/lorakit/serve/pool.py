"""What the serving engine adds to the core's adapter slots (`lorakit.mixed.AdapterPool`): a module that
routes a plain model's layer through a slot route, and the shapes of the modules a slot can adapt.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lorakit.adapter_layer import WrapsBase
from lorakit.mixed import AdapterPool, SlotRoute, SlotWeights

__all__ = ["AdapterPool", "SlotModule", "SlotRoute", "SlotWeights", "dense_weight", "module_shape"]


class SlotModule(WrapsBase):
    """What the engine puts in place of an adapted module of a plain model: base output + each row's slot."""

    def __init__(self, base_layer: nn.Module, route: SlotRoute) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.route = route

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.route.forward(self, x, *args, **kwargs)


def module_shape(module: nn.Module) -> tuple[str, int, int]:
    """(kind, in, out) of a module a slot can adapt: nn.Linear, transformers' Conv1D or nn.Embedding.

    Raises:
        ValueError: any other module type.
    """
    if isinstance(module, nn.Embedding):
        return "embedding", module.num_embeddings, module.embedding_dim
    if isinstance(module, nn.Linear):
        return "linear", module.in_features, module.out_features
    if type(module).__name__ == "Conv1D":
        in_features, out_features = module.weight.shape
        return "linear", int(in_features), int(out_features)
    raise ValueError(f"a {type(module).__name__} cannot take a LoRA slot (linear, Conv1D and embedding can)")


def dense_weight(module: nn.Module) -> torch.Tensor:
    """A linear module's weight as (out, in) (Conv1D stores (in, out))."""
    weight = module.weight.detach()
    return weight.T if type(module).__name__ == "Conv1D" else weight
