"""Which live tensors of a model an adapter file holds, under PEFT's keys.

An `Entry` is one tensor a file can hold: the model's tensor and its kind. ``"adapter"`` for the adapter's
own weights (A, B, DoRA magnitude, modules_to_save copies): always written, required on load. ``"bias"``
and ``"embedding"`` (a targeted embedding's base weights) are written per the config, as PEFT does, and
restored when a file has them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from lorakit.adapter_layer import ADAPTER_PARAMETER_PREFIXES, AdapterLayer
from lorakit.config import LoraConfig
from lorakit.layers import LoraEmbedding, LoraLinear
from lorakit.modules_to_save import ModulesToSave
from lorakit.peft_format import PEFT_PREFIX, file_key, strip_prefix
from lorakit.registry import adapter_layers

EntryKind = Literal["adapter", "bias", "embedding"]


@dataclass(frozen=True)
class Entry:
    """One tensor an adapter file can hold: the live model tensor it belongs to, and what it is.

    ``kind`` is ``"adapter"`` for the adapter's own weights (A, B, DoRA magnitude, modules_to_save copies):
    always written, required on load. ``"bias"`` and ``"embedding"`` (a targeted embedding's base weights)
    are written per the config, as PEFT does, and restored when a file has them.
    """

    tensor: torch.Tensor
    kind: EntryKind


def adapter_entries(model: nn.Module, adapter_name: str, *, bias: str, embeddings: bool) -> dict[str, Entry]:
    """PEFT key -> entry for the adapter's tensors, the biases per ``bias`` and (optionally) the base
    weights of wrapped embedding layers. Aliased keys (PEFT writes some biases twice) share a tensor."""
    found: dict[str, Entry] = {}
    for key, tensor in _bias_tensors(model, adapter_name, bias).items():
        found[PEFT_PREFIX + key] = Entry(tensor, "bias")
    if embeddings:
        for key, tensor in _embedding_base_tensors(model).items():
            found[PEFT_PREFIX + key] = Entry(tensor, "embedding")
    # Adapter weights last: where a bias key aliases a modules_to_save weight, "adapter" wins (required).
    for key, tensor in _adapter_tensors(model, adapter_name).items():
        found[PEFT_PREFIX + key] = Entry(tensor, "adapter")
    return found


def accepted_entries(model: nn.Module, adapter_name: str, config: LoraConfig) -> dict[str, Entry]:
    """What a file for ``config`` may hold: the adapter's tensors (required), any bias when the config
    trains biases, and the base weights of wrapped embeddings (optional, as PEFT writes them)."""
    bias = "none" if config.bias == "none" else "all"
    return adapter_entries(model, adapter_name, bias=bias, embeddings=True)


def _adapter_tensors(model: nn.Module, adapter_name: str) -> dict[str, torch.Tensor]:
    """Unprefixed PEFT key -> tensor for A, B, DoRA magnitude and modules_to_save copies."""
    out: dict[str, torch.Tensor] = {}
    for path, layer in adapter_layers(model):
        if isinstance(layer, LoraLinear) and adapter_name in layer.r:
            out[_key(path, "lora_A")] = layer.lora_A[adapter_name].weight
            out[_key(path, "lora_B")] = layer.lora_B[adapter_name].weight
            if adapter_name in layer.lora_magnitude_vector:
                out[_key(path, "lora_magnitude_vector")] = layer.lora_magnitude_vector[adapter_name].weight
        elif isinstance(layer, LoraEmbedding) and adapter_name in layer.r:
            out[_key(path, "lora_embedding_A")] = layer.lora_embedding_A[adapter_name]
            out[_key(path, "lora_embedding_B")] = layer.lora_embedding_B[adapter_name]
        elif isinstance(layer, ModulesToSave) and adapter_name in layer.modules_to_save:
            # PEFT stores the trained copy under the module's own path:
            # score.modules_to_save.<name>.weight -> score.weight
            for key, tensor in layer.modules_to_save[adapter_name].state_dict(keep_vars=True).items():
                out[f"{path}.{key}"] = tensor
    return out


def _bias_tensors(model: nn.Module, adapter_name: str, bias: str) -> dict[str, torch.Tensor]:
    """The biases PEFT writes for ``bias`` (unprefixed keys, adapter name removed).

    ``"all"``: every ``*.bias`` of the model's state dict except other adapters' copies, as PEFT (which
    includes ``score.original_module.bias`` and ``score.modules_to_save.bias``). ``"lora_only"``: the base
    bias of every layer that carries this adapter.
    """
    if bias == "none":
        return {}
    state = model.state_dict(keep_vars=True)
    if bias == "lora_only":
        keys = (f"{path}.base_layer.bias" for path, layer in adapter_layers(model)
                if isinstance(layer, AdapterLayer) and adapter_name in layer.adapter_names)
        return {key: state[key] for key in keys if key in state}
    own, others = _adapter_key_prefixes(model, adapter_name)
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        if not (key == "bias" or key.endswith(".bias")) or key.startswith(others):
            continue
        for prefix, replacement in own:
            if key.startswith(prefix):
                key = replacement + key[len(prefix):]
                break
        out[key] = tensor
    return out


def _adapter_key_prefixes(
    model: nn.Module, adapter_name: str
) -> tuple[list[tuple[str, str]], tuple[str, ...]]:
    """State-dict key prefixes of this adapter's containers (with their name-free form) and of the others'."""
    own: list[tuple[str, str]] = []
    others: list[str] = []
    layer_containers = (*ADAPTER_PARAMETER_PREFIXES, "lora_dropout")
    for path, layer in adapter_layers(model):
        containers = ("modules_to_save",) if isinstance(layer, ModulesToSave) else layer_containers
        for container in containers:
            names = getattr(layer, container, None)
            for name in names if names is not None else ():
                prefix = f"{path}.{container}.{name}."
                if name == adapter_name:
                    own.append((prefix, f"{path}.{container}."))
                else:
                    others.append(prefix)
    return own, tuple(others)


def _embedding_base_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Base weights of the input / output embedding when lorakit wraps it (PEFT's save_embedding_layers)."""
    paths = {id(module): name for name, module in model.named_modules()}
    out: dict[str, torch.Tensor] = {}
    for getter_name in ("get_input_embeddings", "get_output_embeddings"):
        getter = getattr(model, getter_name, None)
        layer = getter() if callable(getter) else None
        if isinstance(layer, AdapterLayer) and isinstance(layer.base_layer, (nn.Linear, nn.Embedding)):
            path = paths.get(id(layer.base_layer))
            if path is None:
                continue
            for key, tensor in layer.base_layer.state_dict(keep_vars=True).items():
                out[f"{path}.{key}"] = tensor
    return out


def _key(path: str, part: str) -> str:
    """The unprefixed file key of ``part`` of the module at ``path``."""
    return strip_prefix(file_key(path, part))
