"""Adapter slots: preallocated, stacked LoRA weights that every row of a batch indexes into.

For each adapted module the pool keeps one stack per factor, ``n_slots`` deep and padded to ``max_rank``:

    linear      A (n_slots, R, in)              s·B (n_slots, out, R)     DoRA factor (n_slots, out)
    embedding   Aᵀ (n_slots, num_embeddings, R)  s·B (n_slots, dim, R)

Slot 0 is all zeros: the base model. A batch sets one slot index per row (`AdapterPool.set_rows`); every
`SlotRoute` then gathers its stacks at those indices and runs two batched products, so rows of different
adapters and ranks share one forward pass (S-LoRA / Punica). Zero padding is exact: padded rank directions
contribute 0. Writing an adapter touches only its own slot. The pool is the one owner of this state: the
serving engine keeps one for its lifetime, and `lorakit.adapter_per_row` builds one per block.

A route is what a lorakit layer (or the engine's `SlotModule`) calls instead of computing its own
adapters (see `lorakit.routing`): ``route.forward(layer, x)`` returns ``layer.base_layer(x)`` plus each
row's update.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


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
        self.pool, self.kind = pool, kind
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
        """Put ``weights`` in ``slot`` (None: zeros, so the slot leaves this module unchanged)."""
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


class SlotModule(nn.Module):
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


class AdapterPool:
    """``max_loras`` adapter slots (plus slot 0, the base model) for the modules of one model.

    Routes are created per module on first use (`route_for`); a module no adapter ever targets costs
    nothing. ``dtype`` is the stacks' dtype (fp32 next to a bf16/fp16 base, as lorakit's adapters).
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

    def route_for(self, name: str, module: nn.Module) -> SlotRoute:
        """The route of module ``name`` (created, all slots zero, on first use)."""
        route = self.routes.get(name)
        if route is None:
            kind, in_features, out_features = module_shape(module)
            route = SlotRoute(self, kind, in_features, out_features, self.n_slots, self.max_rank,
                              self.dtype, self.device)
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
                raise ValueError(f"module {name!r} has no slot route; call route_for first")
            if item.r > self.max_rank:
                raise ValueError(f"module {name!r} has rank {item.r} above the pool's max rank "
                                 f"{self.max_rank}")
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
