"""Exact trainable-parameter counts from a model config alone.

The model is built on the meta device (shapes, no storage, no download) and the real `lorakit.inject`
runs on it, so the counts are those of the real thing, and equal peft's ``print_trainable_parameters``.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from lorakit.config import LoraConfig
from lorakit.model import adapter_layers, inject, trainable_parameters

BYTES = {"fp32": 4, "bf16": 2}


@dataclass
class ModuleTypeCount:
    """The adapter parameters on every module with one leaf name (e.g. all ``q_proj``)."""

    modules: int = 0
    parameters: int = 0


@dataclass
class ParamReport:
    trainable: int
    total: int
    per_module_type: dict[str, ModuleTypeCount] = field(default_factory=dict)
    adapter_tensor_bytes: dict[str, int] = field(default_factory=dict)

    @property
    def trainable_percent(self) -> float:
        return 100 * self.trainable / self.total


def load_config(source: str | Path):  # -> transformers.PretrainedConfig
    """A transformers config from a ``config.json`` file or a model folder."""
    from transformers import AutoConfig

    path = Path(source)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"no model config at {source} (expected a config.json or a folder with one)")
    values = json.loads(path.read_text())
    if "model_type" not in values:
        raise ValueError(f"{path}: no 'model_type' field, so transformers cannot tell which model it is")
    model_type = values.pop("model_type")
    return AutoConfig.for_model(model_type, **values)


def meta_model(config) -> nn.Module:  # config: transformers.PretrainedConfig
    """The model ``config`` describes, with every tensor on the meta device.

    The class is the first of ``config.architectures`` that transformers knows, else the bare ``AutoModel``.
    """
    import transformers

    architecture = next((getattr(transformers, name) for name in (config.architectures or [])
                         if hasattr(transformers, name)), None)
    with torch.device("meta"):
        if architecture is not None:
            return architecture(config)
        return transformers.AutoModel.from_config(config)


def count_parameters(model: nn.Module, lora: LoraConfig) -> ParamReport:
    """Inject ``lora`` into ``model`` (in place; use a meta model) and count what trains.

    ``adapter_tensor_bytes`` is the size of the tensors an adapter file holds (LoRA factors, DoRA
    magnitudes, modules_to_save copies), in fp32 and bf16; the file adds a small JSON header.
    """
    inject(model, lora)
    trainable, total = trainable_parameters(model)
    per_type: dict[str, ModuleTypeCount] = defaultdict(ModuleTypeCount)
    for name, layer in adapter_layers(model):
        leaf = name.rsplit(".", 1)[-1]
        count = sum(p.numel() for n, p in layer.named_parameters() if p.requires_grad)
        per_type[leaf].modules += 1
        per_type[leaf].parameters += count
    saved = sum(per_type[leaf].parameters for leaf in per_type)
    return ParamReport(
        trainable=trainable,
        total=total,
        per_module_type=dict(sorted(per_type.items())),
        adapter_tensor_bytes={dtype: saved * size for dtype, size in BYTES.items()},
    )
