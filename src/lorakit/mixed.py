"""Mixed-adapter batches: each row of a batch goes through its own adapter (or none) in one forward pass.

On entering `adapter_per_row`, every LoRA layer stacks the A and B of the adapters in use, zero-padded to
the largest rank, with the scaling folded into B, plus one all-zero slot for rows without an adapter:

    A_stack (n + 1, r_max, in)      B_stack (n + 1, out, r_max)

A forward pass gathers the stack at each row's slot and runs two batched products, so rows of different
adapters (and ranks) share one pass with no Python loop over rows or adapters (the S-LoRA / Punica idea).
Zero padding is exact: the padded rank directions contribute 0.

The stacks are snapshots for inference (no dropout, no gradients). Each layer keeps its last stacks after
the block and reuses them in the next block over the same adapters, as long as none of the layer's
tensors changed: a serving loop pays for the stacking once. Any in-place update (an optimizer step,
``load_state_dict``, ``copy_``) bumps a tensor's version counter and a moved or reassigned tensor has a
new address, so the fingerprint (address, version) of every parameter of the layer catches all of them.
The cost is one extra copy of the A and B of the adapters in use (and a reference to the tensors they
came from), kept until the layer's next mixed batch stacks something else or the layer is freed.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lorakit.dora import row_norm
from lorakit.layers import AdapterLayer, LoraEmbedding, LoraLinear, ModulesToSave
from lorakit.registry import adapter_configs, adapter_layers
from lorakit.routing import clear_route, routed, set_route


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

    def forward(self, layer: AdapterLayer, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if isinstance(layer, LoraEmbedding):
            return mixed_embedding_forward(layer, self, x, *args, **kwargs)
        return mixed_linear_forward(layer, self, x, *args, **kwargs)


@dataclass
class CopyRowPlan:
    """What a `ModulesToSave` needs for a mixed batch: each row's slot in ``slots`` (``len(slots)``: none)."""

    rows: torch.Tensor
    slots: list[str]

    def forward(self, wrapper: ModulesToSave, *args: Any, **kwargs: Any) -> Any:
        return mixed_modules_to_save_forward(wrapper, self, *args, **kwargs)


@contextlib.contextmanager
def adapter_per_row(model: nn.Module, adapter_names: Sequence[str | None]) -> Iterator[None]:
    """Inside the block, row i of every batch uses adapter ``adapter_names[i]`` (None: the base model).

    Works around ``model(...)`` and ``model.generate(...)`` (greedy or sampling; the batch size must stay
    ``len(adapter_names)``). Row i's output equals running row i alone with its adapter active.

    Raises:
        ValueError: an unknown adapter name, or an adapter is merged into the base (unmerge first); at
            forward time, a batch whose size is not ``len(adapter_names)``.
        RuntimeError: the block is nested inside another ``adapter_per_row`` block.
    """
    slots = list(dict.fromkeys(name for name in adapter_names if name is not None))
    known = adapter_configs(model)
    for name in slots:
        if name not in known:
            raise ValueError(f"no adapter named {name!r}; the model has {sorted(known)}")
    layers = [layer for _, layer in adapter_layers(model)]
    if routed(layers):
        raise RuntimeError("adapter_per_row blocks do not nest: leave the outer block first")
    for layer in layers:
        if isinstance(layer, AdapterLayer) and layer.merged_adapters:
            raise ValueError(f"adapters {layer.merged_adapters} are merged into the base weights; unmerge() "
                             "before running a mixed-adapter batch")
    rows = torch.tensor([slots.index(n) if n is not None else len(slots) for n in adapter_names])
    try:
        with torch.no_grad():
            for layer in layers:
                set_route(layer, _plan(layer, slots, rows))
        yield
    finally:
        for layer in layers:
            clear_route(layer)


def _plan(layer: AdapterLayer | ModulesToSave, slots: list[str], rows: torch.Tensor) -> RowPlan | CopyRowPlan:
    if isinstance(layer, ModulesToSave):
        return CopyRowPlan(rows, slots)
    names = [name if name in layer.r else None for name in slots] + [None]
    key = _fingerprint(layer, names)
    cached = _STACKS.get(layer)
    if key is not None and cached is not None and cached[0] == key:
        stacks = cached[1]
    else:
        build = _embedding_stacks if isinstance(layer, LoraEmbedding) else _linear_stacks
        stacks = build(layer, names)
        if key is not None:
            # The detached views pin the storages the key points at, so no later tensor can reuse one of
            # those addresses and pass for the old one.
            _STACKS[layer] = (key, stacks, [p.detach() for p in layer.parameters()])
    return RowPlan(rows.to(stacks[0].device), *stacks)


# layer -> (fingerprint, stacks, pinned tensors) of its last mixed batch; entries go with their layer.
_STACKS: weakref.WeakKeyDictionary[AdapterLayer, tuple[tuple, tuple, list]] = weakref.WeakKeyDictionary()


def _fingerprint(layer: AdapterLayer, names: list[str | None]) -> tuple | None:
    """What the stacks of ``layer`` depend on; None when it cannot be known (then nothing is cached)."""
    try:
        tensors = tuple((p.data_ptr(), p._version) for p in layer.parameters())
    except RuntimeError:  # tensors created under torch.inference_mode() have no version counter
        return None
    scalings = tuple(layer.scaling[n] for n in names if n is not None)
    # Stacks built under inference_mode are inference tensors, unusable where autograd records.
    return tuple(names), scalings, tensors, torch.is_inference_mode_enabled()


def _linear_stacks(layer: LoraLinear, names: list[str | None]) -> tuple[torch.Tensor, ...]:
    """A (n+1, r_max, in), s·B (n+1, out, r_max) and the DoRA factor (n+1, out) or None."""
    r_max = max([layer.r[n] for n in names if n is not None], default=1)
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
    return lora_A, lora_B, dora_factor


def _embedding_stacks(layer: LoraEmbedding, names: list[str | None]) -> tuple[torch.Tensor, ...]:
    """Aᵀ (n+1, num_embeddings, r_max) and s·B (n+1, dim, r_max)."""
    r_max = max([layer.r[n] for n in names if n is not None], default=1)
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
    return lora_A, lora_B, None


def _check_batch(plan: RowPlan | CopyRowPlan, batch: int) -> torch.Tensor:
    rows = plan.rows
    if batch != rows.numel():
        raise ValueError(f"adapter_per_row was given {rows.numel()} names (one per row) but the batch has "
                         f"{batch} rows (beam search and num_return_sequences > 1 change the batch size)")
    return rows


def mixed_linear_forward(
    layer: LoraLinear, plan: RowPlan, x: torch.Tensor, *args: Any, **kwargs: Any
) -> torch.Tensor:
    """x (batch, ..., in) -> (batch, ..., out), row b adapted by its slot's A and B."""
    result = layer.base_layer(x, *args, **kwargs)
    rows = _check_batch(plan, x.shape[0])
    if layer.disabled:
        return result
    tokens = x.reshape(x.shape[0], -1, x.shape[-1]).to(plan.lora_A.dtype)       # (b, t, in)
    hidden = torch.bmm(tokens, plan.lora_A[rows].transpose(1, 2))                  # (b, t, r_max)
    lora_B = plan.lora_B[rows].transpose(1, 2)                                     # (b, r_max, out)
    if plan.dora_factor is None and result.dtype == hidden.dtype and result.is_contiguous():
        # Accumulate into the fresh base output in place, as LoraLinear.forward does (see there).
        result.view(hidden.shape[0], hidden.shape[1], -1).baddbmm_(hidden, lora_B)
        return result
    delta = torch.bmm(hidden, lora_B)                                              # (b, t, out)
    if plan.dora_factor is not None:
        factor = plan.dora_factor[rows][:, None, :]                                 # (b, 1, out)
        bias = layer.base_layer.bias
        base_no_bias = result.reshape(delta.shape).to(delta.dtype)
        if bias is not None:
            base_no_bias = base_no_bias - bias.to(delta.dtype)
        delta = (factor - 1) * base_no_bias + factor * delta
    return result + delta.view(result.shape).to(result.dtype)


def mixed_embedding_forward(
    layer: LoraEmbedding, plan: RowPlan, ids: torch.Tensor, *args: Any, **kwargs: Any
) -> torch.Tensor:
    """ids (batch, ...) -> (batch, ..., dim), row b adapted by its slot's A and B."""
    result = layer.base_layer(ids, *args, **kwargs)
    rows = _check_batch(plan, ids.shape[0])
    if layer.disabled:
        return result
    flat = ids.reshape(ids.shape[0], -1)                                            # (b, t)
    hidden = plan.lora_A[rows[:, None], flat]                                      # (b, t, r_max)
    delta = torch.bmm(hidden, plan.lora_B[rows].transpose(1, 2))                   # (b, t, dim)
    return result + delta.view(result.shape).to(result.dtype)


def mixed_modules_to_save_forward(
    wrapper: ModulesToSave, plan: CopyRowPlan, *args: Any, **kwargs: Any
) -> Any:
    """Each row takes the output of its adapter's copy of the module (the original for rows without one).

    Whole-module copies (typically a small classifier head) cannot be stacked like A and B, so each
    distinct copy runs once over the batch and rows pick their own output.
    """
    if wrapper.disabled:
        return wrapper.original_module(*args, **kwargs)
    copies = dict(wrapper.modules_to_save.items())
    modules = [copies.get(n, wrapper.original_module) for n in plan.slots]
    modules.append(wrapper.original_module)  # the slot of rows without an adapter
    outputs = torch.stack([module(*args, **kwargs) for module in modules])            # (k, b, ...)
    rows = _check_batch(plan, outputs.shape[1]).to(outputs.device)
    return outputs[rows, torch.arange(outputs.shape[1], device=outputs.device)]
