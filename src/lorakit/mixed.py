"""Mixed-adapter batches: each row of a batch goes through its own adapter (or none) in one forward pass.

On entering `adapter_per_row`, every LoRA layer stacks the A and B of the adapters in use, zero-padded to
the largest rank, with the scaling folded into B, plus one all-zero slot for rows without an adapter:

    A_stack (n + 1, r_max, in)      B_stack (n + 1, out, r_max)

A forward pass gathers the stack at each row's slot and runs two batched products, so rows of different
adapters (and ranks) share one pass with no Python loop over rows or adapters (the S-LoRA / Punica idea).
Zero padding is exact: the padded rank directions contribute 0. The stacks are built once per ``with``
block and dropped on exit; they are snapshots, for inference.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lorakit.dora import row_norm
from lorakit.layers import AdapterLayer, LoraEmbedding, LoraLinear, ModulesToSave
from lorakit.model import adapter_configs, adapter_layers


@dataclass
class RowPlan:
    """What one layer needs for a mixed batch.

    Attributes:
        rows: (batch,) slot of each row; slot n (the last) is "no adapter".
        lora_A: (n + 1, r_max, in) for linear layers; (n + 1, num_embeddings, r_max) for embeddings.
        lora_B: (n + 1, out, r_max), scaling folded in.
        dora_factor: (n + 1, out) m / ||W + sBA|| per slot (1 for non-DoRA slots), or None without DoRA.
    """

    rows: torch.Tensor
    lora_A: torch.Tensor
    lora_B: torch.Tensor
    dora_factor: torch.Tensor | None = None


@dataclass
class CopyRowPlan:
    """What a `ModulesToSave` needs for a mixed batch: each row's slot in ``slots`` (``len(slots)``: none)."""

    rows: torch.Tensor
    slots: list[str]


@contextlib.contextmanager
def adapter_per_row(model: nn.Module, adapter_names: Sequence[str | None]) -> Iterator[None]:
    """Inside the block, row i of every batch uses adapter ``adapter_names[i]`` (None: the base model).

    Works around ``model(...)`` and ``model.generate(...)`` (greedy or sampling; the batch size must stay
    ``len(adapter_names)``). Row i's output equals running row i alone with its adapter active.

    Raises:
        ValueError: an unknown adapter name, or an adapter is merged into the base (unmerge first).
    """
    slots = list(dict.fromkeys(name for name in adapter_names if name is not None))
    known = adapter_configs(model)
    for name in slots:
        if name not in known:
            raise ValueError(f"no adapter named {name!r}; the model has {sorted(known)}")
    layers = [layer for _, layer in adapter_layers(model)]
    for layer in layers:
        if isinstance(layer, AdapterLayer) and layer.merged_adapters:
            raise ValueError(f"adapters {layer.merged_adapters} are merged into the base weights; unmerge() "
                             "before running a mixed-adapter batch")
    rows = torch.tensor([slots.index(n) if n is not None else len(slots) for n in adapter_names])
    try:
        with torch.no_grad():
            for layer in layers:
                layer.row_plan = _plan(layer, slots, rows)
        yield
    finally:
        for layer in layers:
            layer.row_plan = None


def _plan(layer: AdapterLayer | ModulesToSave, slots: list[str], rows: torch.Tensor) -> RowPlan | CopyRowPlan:
    if isinstance(layer, ModulesToSave):
        return CopyRowPlan(rows, slots)
    names = [name if name in layer.adapter_names else None for name in slots] + [None]
    r_max = max([layer.r[n] for n in names if n is not None], default=1)
    if isinstance(layer, LoraEmbedding):
        return _embedding_plan(layer, names, rows, r_max)
    assert isinstance(layer, LoraLinear)
    reference = layer.lora_A[layer.adapter_names[0]].weight
    lora_A = reference.new_zeros(len(names), r_max, layer.in_features)
    lora_B = reference.new_zeros(len(names), layer.out_features, r_max)
    dora_factor = None
    if any(n in layer.lora_magnitude_vector for n in names if n is not None):
        dora_factor = reference.new_ones(len(names), layer.out_features)
        weight = layer._dense_weight().to(reference.dtype)
    for slot, name in enumerate(names):
        if name is None:
            continue
        r = layer.r[name]
        lora_A[slot, :r] = layer.lora_A[name].weight
        lora_B[slot, :, :r] = layer.scaling[name] * layer.lora_B[name].weight
        if name in layer.lora_magnitude_vector:
            norm = row_norm(weight, layer.delta_weight(name))
            dora_factor[slot] = layer.lora_magnitude_vector[name].weight / norm
    return RowPlan(rows.to(reference.device), lora_A, lora_B, dora_factor)


def _embedding_plan(layer: LoraEmbedding, names: list[str | None], rows: torch.Tensor, r_max: int) -> RowPlan:
    reference = layer.lora_embedding_A[layer.adapter_names[0]]
    base = layer.base_layer
    lora_A = reference.new_zeros(len(names), base.num_embeddings, r_max)
    lora_B = reference.new_zeros(len(names), base.embedding_dim, r_max)
    for slot, name in enumerate(names):
        if name is None:
            continue
        r = layer.r[name]
        lora_A[slot, :, :r] = layer.lora_embedding_A[name].T
        lora_B[slot, :, :r] = layer.scaling[name] * layer.lora_embedding_B[name]
    return RowPlan(rows.to(reference.device), lora_A, lora_B)


def _check_batch(plan: RowPlan | CopyRowPlan, batch: int) -> torch.Tensor:
    rows = plan.rows
    if batch != rows.numel():
        raise ValueError(f"adapter_per_row was given {rows.numel()} adapter names but the batch has {batch} rows "
                         "(beam search and num_return_sequences > 1 change the batch size)")
    return rows


def mixed_linear_forward(layer: LoraLinear, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """x (batch, ..., in) -> (batch, ..., out), row b adapted by its slot's A and B."""
    plan: RowPlan = layer.row_plan
    result = layer.base_layer(x, *args, **kwargs)
    rows = _check_batch(plan, x.shape[0])
    if layer.disabled:
        return result
    tokens = x.reshape(x.shape[0], -1, x.shape[-1]).to(plan.lora_A.dtype)       # (b, t, in)
    hidden = torch.bmm(tokens, plan.lora_A[rows].transpose(1, 2))                  # (b, t, r_max)
    delta = torch.bmm(hidden, plan.lora_B[rows].transpose(1, 2))                   # (b, t, out)
    if plan.dora_factor is not None:
        factor = plan.dora_factor[rows][:, None, :]                                 # (b, 1, out)
        bias = layer.base_layer.bias
        base_no_bias = result.reshape(delta.shape).to(delta.dtype)
        if bias is not None:
            base_no_bias = base_no_bias - bias.to(delta.dtype)
        delta = (factor - 1) * base_no_bias + factor * delta
    return result + delta.view(result.shape).to(result.dtype)


def mixed_embedding_forward(layer: LoraEmbedding, ids: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """ids (batch, ...) -> (batch, ..., dim), row b adapted by its slot's A and B."""
    plan: RowPlan = layer.row_plan
    result = layer.base_layer(ids, *args, **kwargs)
    rows = _check_batch(plan, ids.shape[0])
    if layer.disabled:
        return result
    flat = ids.reshape(ids.shape[0], -1)                                            # (b, t)
    hidden = plan.lora_A[rows[:, None], flat]                                      # (b, t, r_max)
    delta = torch.bmm(hidden, plan.lora_B[rows].transpose(1, 2))                   # (b, t, dim)
    return result + delta.view(result.shape).to(result.dtype)


def mixed_modules_to_save_forward(wrapper: ModulesToSave, *args: Any, **kwargs: Any) -> Any:
    """Each row takes the output of its adapter's copy of the module (the original for rows without one).

    Whole-module copies (typically a small classifier head) cannot be stacked like A and B, so each
    distinct copy runs once over the batch and rows pick their own output.
    """
    plan: CopyRowPlan = wrapper.row_plan
    if wrapper.disabled:
        return wrapper.original_module(*args, **kwargs)
    modules = [wrapper.modules_to_save[n] if n in wrapper.modules_to_save else wrapper.original_module
               for n in plan.slots] + [wrapper.original_module]
    outputs = torch.stack([module(*args, **kwargs) for module in modules])            # (k, b, ...)
    rows = _check_batch(plan, outputs.shape[1]).to(outputs.device)
    return outputs[rows, torch.arange(outputs.shape[1], device=outputs.device)]
