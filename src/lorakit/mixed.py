"""Mixed-adapter batches: each row of a batch goes through its own adapter (or none) in one forward pass.

`AdapterPool` is the one owner of stacked adapter weights, here and in the serving engine
(`lorakit.serve`). `adapter_per_row` builds one for the adapters the block uses: per LoRA layer, slot 0 is all
zeros (rows without an adapter) and slot i holds the i-th adapter, zero-padded to the largest rank of the
layer's adapters in use, with the scaling folded into B:

    A_stack (n + 1, r_max, in)      s·B_stack (n + 1, out, r_max)      DoRA factor m/‖W + sBA‖ (n + 1, out)

Every layer gets a route (`lorakit.routing`) that gathers each row's slot and runs two batched products,
so rows of different adapters and ranks share one pass with no Python loop over rows or adapters (the
S-LoRA / Punica idea). Zero padding is exact.

The stacks are built on entry to every block and dropped on exit: nothing is cached between blocks, so no
edit of the weights (an optimizer step, ``load_state_dict``, even a ``.data`` write that bumps no version
counter) can leave a later block computing with stale stacks. Inside a block the stacks are a snapshot:
``merge``/``unmerge``/``load_adapter``/``delete_adapter`` raise there (the model checks for routes). The
cost of entry is one copy of the used adapters' A and B; a caller that runs many steps (``generate``, a
serving loop) pays it once per block.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lorakit.adapter_layer import AdapterLayer
from lorakit.dora import row_norm
from lorakit.layers import LoraEmbedding, LoraLinear
from lorakit.modules_to_save import ModulesToSave
from lorakit.registry import adapter_configs, adapter_layers
from lorakit.routing import clear_route, routed, set_route


@dataclass(frozen=True)
class SlotWeights:
    """One module's update for one slot, ready to be written (fp32 or the adapter's dtype).

    Attributes:
        lora_A: (r, in) for a linear module; (r, num_embeddings) for an embedding.
        lora_B: (out, r) with the scaling (and any combination weight) folded in.
        dora_factor: (out,) m / ||W + s·B·A||_row for a DoRA adapter, else None.
    """

    lora_A: torch.Tensor
    lora_B: torch.Tensor
    dora_factor: torch.Tensor | None = None

    @property
    def r(self) -> int:
        return int(self.lora_A.shape[0])


class SlotRoute:
    """The stacked slots of one module and the mixed forward pass over them.

    ``kind`` is ``"linear"`` (x (batch, ..., in) -> (batch, ..., out)) or ``"embedding"``
    (ids (batch, ...) -> (batch, ..., dim)). Rows come from the owning pool at forward time.
    """

    def __init__(self, pool: AdapterPool, kind: str, in_features: int, out_features: int,
                 n_slots: int, max_rank: int, dtype: torch.dtype, device: torch.device) -> None:
        self.pool, self.kind, self.max_rank = pool, kind, max_rank
        self.in_features, self.out_features = in_features, out_features
        if kind == "embedding":
            self.lora_A = torch.zeros(n_slots, in_features, max_rank, dtype=dtype, device=device)
        else:
            self.lora_A = torch.zeros(n_slots, max_rank, in_features, dtype=dtype, device=device)
        self.lora_B = torch.zeros(n_slots, out_features, max_rank, dtype=dtype, device=device)
        # Allocated on the first DoRA adapter written here (ones: a factor of 1 leaves a row unchanged).
        self.dora_factor: torch.Tensor | None = None

    @torch.no_grad()
    def write(self, slot: int, weights: SlotWeights | None) -> None:
        """Put ``weights`` in ``slot`` (None: zeros, so the slot leaves this module unchanged).

        ``weights`` may be on another device or in another dtype; they are copied into the stacks.
        """
        self.lora_A[slot].zero_()
        self.lora_B[slot].zero_()
        if self.dora_factor is not None:
            self.dora_factor[slot] = 1.0
        if weights is None:
            return
        r = weights.r
        if self.kind == "embedding":
            self.lora_A[slot, :, :r] = weights.lora_A.T
        else:
            self.lora_A[slot, :r] = weights.lora_A
        self.lora_B[slot, :, :r] = weights.lora_B
        if weights.dora_factor is not None:
            if self.dora_factor is None:
                self.dora_factor = self.lora_B.new_ones(self.lora_B.shape[0], self.out_features)
            self.dora_factor[slot] = weights.dora_factor

    def forward(self, layer: nn.Module, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        result = layer.base_layer(x, *args, **kwargs)
        rows = self.pool.rows_for(x.shape[0])
        if rows is None or getattr(layer, "disabled", False):
            return result
        rows = rows.to(self.lora_B.device)
        if self.kind == "embedding":
            flat = x.reshape(x.shape[0], -1)                                          # (b, t)
            hidden = self.lora_A[rows[:, None], flat]                                 # (b, t, R)
            delta = torch.bmm(hidden, self.lora_B[rows].transpose(1, 2))              # (b, t, dim)
            return result + delta.view(result.shape).to(result.dtype)
        tokens = x.reshape(x.shape[0], -1, x.shape[-1]).to(self.lora_A.dtype)       # (b, t, in)
        hidden = torch.bmm(tokens, self.lora_A[rows].transpose(1, 2))                # (b, t, R)
        lora_B = self.lora_B[rows].transpose(1, 2)                                   # (b, R, out)
        if self.dora_factor is None and result.dtype == hidden.dtype and result.is_contiguous():
            # The base output is a fresh tensor nothing else holds: accumulate into it in place.
            result.view(hidden.shape[0], hidden.shape[1], -1).baddbmm_(hidden, lora_B)
            return result
        delta = torch.bmm(hidden, lora_B)                                            # (b, t, out)
        if self.dora_factor is not None:
            factor = self.dora_factor[rows][:, None, :]                               # (b, 1, out)
            bias = getattr(layer.base_layer, "bias", None)
            base_no_bias = result.reshape(delta.shape).to(delta.dtype)
            if bias is not None:
                base_no_bias = base_no_bias - bias.to(delta.dtype)
            delta = (factor - 1) * base_no_bias + factor * delta
        return result + delta.view(result.shape).to(result.dtype)


class AdapterPool:
    """``max_loras`` adapter slots (plus slot 0, the base model) for the modules of one model.

    Routes are added per module (`add_route`), by the engine on first use, so a module no adapter
    targets costs nothing. ``dtype`` is the stacks' dtype (fp32 next to a bf16/fp16 base, as lorakit's
    adapters).
    """

    def __init__(self, max_loras: int, max_rank: int, *, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu") -> None:
        if max_loras < 1 or max_rank < 1:
            raise ValueError(f"max_loras and max_rank must be >= 1, got {max_loras} and {max_rank}")
        self.max_loras, self.max_rank = max_loras, max_rank
        self.dtype, self.device = dtype, torch.device(device)
        self.routes: dict[str, SlotRoute] = {}
        self._rows: torch.Tensor | None = None

    @property
    def n_slots(self) -> int:
        return self.max_loras + 1

    def add_route(self, name: str, kind: str, in_features: int, out_features: int, *,
                  max_rank: int | None = None, dtype: torch.dtype | None = None,
                  device: torch.device | None = None) -> SlotRoute:
        """A new route for module ``name``; rank, dtype and device default to the pool's."""
        route = SlotRoute(self, kind, in_features, out_features, self.n_slots, max_rank or self.max_rank,
                          dtype or self.dtype, device or self.device)
        self.routes[name] = route
        return route

    def write(self, slot: int, weights: dict[str, SlotWeights]) -> None:
        """Fill ``slot`` (1..max_loras) with ``weights`` by module name; every other module gets zeros there.

        Raises:
            ValueError: slot 0 or out of range, a module without a route, or a rank above ``max_rank``.
        """
        if not 1 <= slot <= self.max_loras:
            raise ValueError(f"slot must be in 1..{self.max_loras}, got {slot}")
        for name, item in weights.items():
            if name not in self.routes:
                raise ValueError(f"module {name!r} has no slot route; add_route first")
            if item.r > self.routes[name].max_rank:
                raise ValueError(f"module {name!r} has rank {item.r} above the pool's max rank "
                                 f"{self.routes[name].max_rank}")
        for name, route in self.routes.items():
            route.write(slot, weights.get(name))

    def clear(self, slot: int) -> None:
        for route in self.routes.values():
            route.write(slot, None)

    def set_rows(self, rows: torch.Tensor | None) -> None:
        """The slot of each row of the next forward passes: (batch,) int64, or None for the base model."""
        self._rows = None if rows is None else rows.to(self.device)

    def rows_for(self, batch: int) -> torch.Tensor | None:
        rows = self._rows
        if rows is not None and rows.numel() != batch:
            raise ValueError(f"{rows.numel()} names were given (one slot per row) but the batch has "
                             f"{batch} rows "
                             "(beam search and num_return_sequences > 1 change the batch size)")
        return rows

    def nbytes(self) -> int:
        """Bytes held by the stacks."""
        total = 0
        for route in self.routes.values():
            for stack in (route.lora_A, route.lora_B, route.dora_factor):
                if stack is not None:
                    total += stack.numel() * stack.element_size()
        return total


class CopyRoute:
    """A `ModulesToSave` in a mixed batch: each distinct copy runs once over the batch, rows pick theirs.

    Whole-module copies (typically a small classifier head) cannot be stacked like A and B.
    """

    def __init__(self, pool: AdapterPool, slots: list[str]) -> None:
        self.pool, self.slots = pool, slots

    def forward(self, wrapper: ModulesToSave, *args: Any, **kwargs: Any) -> Any:
        if wrapper.disabled:
            return wrapper.original_module(*args, **kwargs)
        copies = dict(wrapper.modules_to_save.items())
        modules = [wrapper.original_module, *(copies.get(n, wrapper.original_module) for n in self.slots)]
        outputs = torch.stack([module(*args, **kwargs) for module in modules])      # (n + 1, b, ...)
        rows = self.pool.rows_for(outputs.shape[1]).to(outputs.device)
        return outputs[rows, torch.arange(outputs.shape[1], device=outputs.device)]


@contextlib.contextmanager
def adapter_per_row(model: nn.Module, adapter_names: Sequence[str | None]) -> Iterator[None]:
    """Inside the block, row i of every batch uses adapter ``adapter_names[i]`` (None: the base model).

    Works around ``model(...)`` and ``model.generate(...)`` (greedy or sampling; the batch size must stay
    ``len(adapter_names)``). Row i's output equals running row i alone with its adapter active.

    Raises:
        ValueError: an unknown adapter name, or an adapter is merged into the base (unmerge first); at
            forward time, a batch whose size is not ``len(adapter_names)``.
        RuntimeError: the block is nested inside another ``adapter_per_row`` block (or a serving engine).
    """
    slots = list(dict.fromkeys(name for name in adapter_names if name is not None))
    known = adapter_configs(model)
    for name in slots:
        if name not in known:
            raise ValueError(f"no adapter named {name!r}; the model has {sorted(known)}")
    layers = list(adapter_layers(model))
    if routed(layer for _, layer in layers):
        raise RuntimeError("adapter_per_row blocks do not nest: leave the outer block first")
    for _, layer in layers:
        if isinstance(layer, AdapterLayer) and layer.merged_adapters:
            raise ValueError(f"adapters {layer.merged_adapters} are merged into the base weights; unmerge() "
                             "before running a mixed-adapter batch")
    pool = AdapterPool(max(len(slots), 1), 1)
    routes = {}
    with torch.no_grad():
        for name, layer in layers:
            routes[layer] = CopyRoute(pool, slots) if isinstance(layer, ModulesToSave) else \
                _stacked_route(pool, name, layer, slots)
    pool.set_rows(torch.tensor([slots.index(n) + 1 if n is not None else 0 for n in adapter_names]))
    entered = []
    try:
        for layer, route in routes.items():
            set_route(layer, route)
            entered.append(layer)
        yield
    finally:
        for layer in entered:
            clear_route(layer)


def _stacked_route(pool: AdapterPool, name: str, layer: AdapterLayer, slots: list[str]):
    """The route of one LoRA layer with slot i + 1 holding adapter ``slots[i]`` (zeros where it is absent)."""
    used = [n for n in slots if n in layer.r]
    r_max = max((layer.r[n] for n in used), default=1)
    if isinstance(layer, LoraEmbedding):
        reference = next(iter(layer.lora_embedding_A.values()))
        base = layer.base_layer
        route = pool.add_route(name, "embedding", base.num_embeddings, base.embedding_dim, max_rank=r_max,
                               dtype=reference.dtype, device=reference.device)
    else:
        reference = next(iter(layer.lora_A.values())).weight
        route = pool.add_route(name, "linear", layer.in_features, layer.out_features, max_rank=r_max,
                               dtype=reference.dtype, device=reference.device)
    for slot, adapter in enumerate(slots, start=1):
        if adapter in layer.r:
            route.write(slot, _slot_weights(layer, adapter, reference.dtype))
    return route


def _slot_weights(layer: AdapterLayer, name: str, dtype: torch.dtype) -> SlotWeights:
    scaling = layer.scaling[name]
    if isinstance(layer, LoraEmbedding):
        return SlotWeights(layer.lora_embedding_A[name], scaling * layer.lora_embedding_B[name])
    assert isinstance(layer, LoraLinear)
    factor = None
    if name in layer.lora_magnitude_vector:
        norm = row_norm(layer._dense_weight().to(dtype), layer.delta_weight(name))
        factor = layer.lora_magnitude_vector[name].weight / norm
    return SlotWeights(layer.lora_A[name].weight, scaling * layer.lora_B[name].weight, factor)
