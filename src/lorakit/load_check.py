"""The load check: an adapter file is tried on a storage-free copy of the model before the model is touched.

`check_fits_shadow` injects the adapter into a deep copy of the model whose tensors are on the meta device
(names and shapes, no storage) and compares the file's tensors with it: every missing key, unexpected key
and shape mismatch is reported at once, and the real model stays exactly as it was.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from lorakit.adapter_tensors import Entry, accepted_entries
from lorakit.config import LoraConfig
from lorakit.layers import LoraEmbedding, LoraLinear
from lorakit.model import add_adapter
from lorakit.peft_format import file_key
from lorakit.registry import adapter_layers


def check_fits_shadow(
    model: nn.Module, config: LoraConfig, adapter_name: str, tensors: Mapping[str, torch.Tensor], where: str
) -> None:
    """Inject the adapter into a storage-free copy of ``model`` and check ``tensors`` against it."""
    shadow = _meta_shadow(model)
    # The shadow only needs names and shapes: no base-rewriting init, and DoRA magnitudes (whose init
    # reads the base weight, impossible on meta or 4-bit storage) are added as placeholders below.
    try:
        add_adapter(shadow, config.replace(init_lora_weights=True, use_dora=False), adapter_name)
    except ValueError as error:
        raise ValueError(f"{where} does not fit this {type(model).__name__}: {error}") from error
    entries = accepted_entries(shadow, adapter_name, config)
    if config.use_dora:
        entries.update(_dora_placeholders(shadow, adapter_name, where))
    raise_on_mismatch(entries, tensors, where, type(model).__name__)


def _meta_shadow(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` whose parameters and buffers are meta tensors: structure without storage."""
    memo: dict[int, Any] = {}
    for tensor in itertools.chain(model.parameters(), model.buffers()):
        meta = torch.empty(tensor.shape, dtype=tensor.dtype, device="meta")
        is_parameter = isinstance(tensor, nn.Parameter)
        memo[id(tensor)] = nn.Parameter(meta, requires_grad=False) if is_parameter else meta
    return copy.deepcopy(model, memo)


def _dora_placeholders(shadow: nn.Module, adapter_name: str, where: str) -> dict[str, Entry]:
    out: dict[str, Entry] = {}
    for path, layer in adapter_layers(shadow):
        if isinstance(layer, LoraEmbedding) and adapter_name in layer.r:
            raise ValueError(f"{where}: DoRA on embedding layers ({path}) is not supported by lorakit")
        if isinstance(layer, LoraLinear) and adapter_name in layer.r:
            meta = torch.empty(layer.out_features, device="meta")
            out[file_key(path, "lora_magnitude_vector")] = Entry(meta, "adapter")
    return out


def raise_on_mismatch(
    entries: Mapping[str, Entry], tensors: Mapping[str, torch.Tensor], where: str, model_name: str
) -> None:
    """ValueError listing every missing key, unexpected key and shape mismatch (with both shapes)."""
    missing = sorted(key for key, entry in entries.items() if entry.kind == "adapter" and key not in tensors)
    unexpected = sorted(key for key in tensors if key not in entries)
    problems = [f"missing key {key}" for key in missing]
    problems += [f"unexpected key {key} (the model has no such adapter tensor)" for key in unexpected]
    for key in sorted(tensors.keys() & entries.keys()):
        file_tensor, model_tensor = tensors[key], entries[key].tensor
        if not isinstance(file_tensor, torch.Tensor):
            problems.append(f"{key} is a {type(file_tensor).__name__}, not a tensor")
        elif tuple(file_tensor.shape) != tuple(model_tensor.shape):
            problems.append(f"{key}: shape {tuple(file_tensor.shape)} in the file, "
                            f"{tuple(model_tensor.shape)} in the model")
        elif model_tensor.is_floating_point() and not file_tensor.is_floating_point():
            problems.append(f"{key}: dtype {file_tensor.dtype} in the file, {model_tensor.dtype} in the "
                            "model")
    if problems:
        more = len(problems) - 12
        shown = "; ".join(problems[:12]) + (f"; ... and {more} more" if more > 0 else "")
        raise ValueError(f"{where} does not fit this {model_name}: {shown}")


@torch.no_grad()
def copy_into(entries: Mapping[str, Entry], tensors: Mapping[str, torch.Tensor]) -> None:
    """Copy validated tensors into the model; adapter weights last so they win over aliased bias keys."""
    order = {"bias": 0, "embedding": 1, "adapter": 2}
    for key in sorted(tensors.keys() & entries.keys(), key=lambda k: order[entries[k].kind]):
        entries[key].tensor.copy_(tensors[key])


