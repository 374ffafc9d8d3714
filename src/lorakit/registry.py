"""The model-level record of adapters: each adapter's config, and the lorakit layers inside a model.

Everything else about an adapter (its weights, whether it is active or merged) lives in the layers; this
module only finds them. It is the one place both `lorakit.model` and the mixed-batch code look.
"""

from __future__ import annotations

from collections.abc import Iterator

from torch import nn

from lorakit.adapter_layer import AdapterLayer
from lorakit.config import LoraConfig
from lorakit.modules_to_save import ModulesToSave

CONFIGS_ATTRIBUTE = "lorakit_configs"


def adapter_configs(model: nn.Module) -> dict[str, LoraConfig]:
    """The config of every adapter in ``model``, by name (empty for a model without adapters)."""
    return model.__dict__.setdefault(CONFIGS_ATTRIBUTE, {})


def forget_adapters(model: nn.Module) -> None:
    """Drop the record (after every lorakit layer has been removed from ``model``)."""
    model.__dict__.pop(CONFIGS_ATTRIBUTE, None)


def adapter_layers(model: nn.Module) -> Iterator[tuple[str, AdapterLayer | ModulesToSave]]:
    """Every lorakit wrapper in ``model`` with its qualified name."""
    for name, module in model.named_modules():
        if isinstance(module, (AdapterLayer, ModulesToSave)):
            yield name, module
